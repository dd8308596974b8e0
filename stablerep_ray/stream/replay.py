"""Worker side of the stream: caption groups from the Ray Data shard -> replay buffer -> batches.

Generating an image costs hundreds of training steps on it (docs: cost model), so each worker keeps a
bounded in-memory replay of recent caption groups. A group is served up to ``reuse`` (R) times, each
time with a fresh m-of-n image subset (and fresh augmentation on the device), then evicted. R = 1 is
pure streaming: every group is served exactly once, in arrival order. Nothing touches the disk.

A batch is K whole caption groups; a group never straddles two batches, and since the shard hands each
row to exactly one worker, never two workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np


class StreamExhausted(RuntimeError):
    """The caption stream ended before the run's last step (a finite source with captions.repeat off)."""


def stream_key(chunk: int, row: int) -> int:
    """A row's unique place in the stream (chunks are numbered across passes)."""
    return chunk << 32 | row


@dataclass
class Group:
    key: int  # stream_key(chunk, row)
    caption_id: int
    caption: str
    images: np.ndarray  # (n, S, S, 3) uint8; the first num_images are valid
    num_images: int
    served: int = 0

    @property
    def nbytes(self) -> int:
        return self.images.nbytes


@dataclass
class Batch:
    images: np.ndarray  # (K * m, S, S, 3) uint8, caption-major
    caption_ids: np.ndarray  # (K * m,) int64: the positive labels
    captions: list[str]  # (K,) one per group
    keys: np.ndarray  # (K,) stream keys of the groups served

    @property
    def group_ids(self) -> np.ndarray:
        """(K,) caption id of each group, in batch order."""
        return self.caption_ids[:: len(self.caption_ids) // max(1, len(self.captions))]


class ChunkProgress:
    """Rows consumed per stream chunk: what a checkpoint needs to resume without a gap."""

    def __init__(self):
        self.consumed: dict[int, int] = {}
        self.rows: dict[int, int] = {}

    def add(self, chunk: int, chunk_rows: int) -> None:
        self.consumed[chunk] = self.consumed.get(chunk, 0) + 1
        self.rows[chunk] = chunk_rows

    def state(self) -> dict[int, tuple[int, int]]:
        return {c: (n, self.rows[c]) for c, n in self.consumed.items()}

    def forget_before(self, chunk: int) -> None:
        for c in [c for c in self.consumed if c < chunk]:
            del self.consumed[c], self.rows[c]


def resume_chunk(states: list[dict[int, tuple[int, int]]], start: int) -> tuple[int, int]:
    """(first chunk >= start not fully consumed across all workers, rows consumed beyond it).

    A restart reads again from that chunk; the rows counted here are the bounded repetition it causes.
    """
    totals: dict[int, list[int]] = {}
    for state in states:
        for chunk, (consumed, rows) in state.items():
            entry = totals.setdefault(chunk, [0, rows])
            entry[0] += consumed
    chunk = start
    while chunk in totals and totals[chunk][0] >= totals[chunk][1]:
        chunk += 1
    repeated = sum(consumed for c, (consumed, _) in totals.items() if c >= chunk)
    return chunk, repeated


def iter_groups(batches: Iterator[dict], min_images: int, progress: ChunkProgress) -> Iterator[Group]:
    """Flatten generator output into groups; every row counts as consumed, served or not."""
    for batch in batches:
        for i in range(len(batch["caption_id"])):
            progress.add(int(batch["chunk"][i]), int(batch["chunk_rows"][i]))
            count = int(batch["num_images"][i])
            if count < min_images:
                continue  # an empty-chunk marker, or the safety checker dropped too many
            yield Group(
                key=stream_key(int(batch["chunk"][i]), int(batch["row"][i])),
                caption_id=int(batch["caption_id"][i]),
                caption=str(batch["caption"][i]),
                images=np.asarray(batch["images"][i]),
                num_images=count,
            )


class ReplayBuffer:
    """Caption groups kept for reuse; each served at most ``reuse`` times; bytes capped."""

    def __init__(self, reuse: int, capacity_bytes: int, rng: np.random.Generator):
        self.reuse = reuse
        self.capacity_bytes = capacity_bytes
        self.rng = rng
        self.groups: list[Group] = []
        self.nbytes = 0
        self.peak_bytes = 0
        self.evicted_early = 0  # evicted for memory before being served R times

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: Group) -> None:
        while self.groups and self.nbytes + group.nbytes > self.capacity_bytes:
            most_served = max(range(len(self.groups)), key=lambda i: self.groups[i].served)
            self.evicted_early += 1
            self._remove(most_served)
        self.groups.append(group)
        self.nbytes += group.nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def _remove(self, index: int) -> None:
        self.nbytes -= self.groups[index].nbytes
        self.groups.pop(index)

    def take(self, k: int) -> list[Group]:
        """k distinct groups: the fresh ones first (each arrives once), the rest at random."""
        if self.reuse == 1:
            chosen = list(range(k))  # pure streaming: arrival order
        else:
            fresh = [i for i, g in enumerate(self.groups) if g.served == 0][:k]
            others = [i for i, g in enumerate(self.groups) if g.served > 0]
            extra = self.rng.choice(len(others), size=k - len(fresh), replace=False) if k > len(fresh) else []
            chosen = fresh + [others[j] for j in extra]
        taken = [self.groups[i] for i in chosen]
        for group in taken:
            group.served += 1
        for i in sorted(chosen, reverse=True):
            if self.groups[i].served >= self.reuse:
                self._remove(i)
        return taken


class GroupStream:
    """Turns a worker's shard iterator into batches of K caption groups x m images.

    Per step it admits K/R new groups on average (fractional credit), and always enough to have K
    groups to serve, so R trades generation for reuse exactly.
    """

    def __init__(
        self,
        batches: Iterator[dict],
        captions_per_step: int,
        images_per_group: int,
        reuse: int,
        buffer_bytes: int,
        seed: int,
    ):
        self.progress = ChunkProgress()
        self.groups = iter_groups(batches, images_per_group, self.progress)
        self.k = captions_per_step
        self.m = images_per_group
        self.rng = np.random.default_rng(seed)
        self.buffer = ReplayBuffer(reuse, buffer_bytes, self.rng)
        self.credit = 0.0
        self.wait_seconds = 0.0  # time blocked on the shard: the trainer's data-wait
        self.admitted = 0  # groups that entered the buffer

    def _admit(self, count: int) -> int:
        start = time.perf_counter()
        admitted = 0
        try:
            for _ in range(count):
                self.buffer.add(next(self.groups))
                admitted += 1
        except StopIteration:
            if len(self.buffer) < self.k:
                raise StreamExhausted(
                    "the caption stream ended before the last step; set captions.repeat=true or "
                    "lower train.steps"
                ) from None
        finally:
            self.wait_seconds += time.perf_counter() - start
        self.admitted += admitted
        return admitted

    def next_batch(self) -> Batch:
        self.credit += self.k / self.buffer.reuse
        wanted = max(int(self.credit), self.k - len(self.buffer))
        admitted = self._admit(wanted)
        self.credit -= admitted
        groups = self.buffer.take(self.k)
        images, labels = [], []
        for group in groups:
            pick = self.rng.choice(group.num_images, size=self.m, replace=False)
            images.append(group.images[np.sort(pick)])
            labels.append(np.full(self.m, group.caption_id, dtype=np.int64))
        return Batch(
            images=np.concatenate(images),
            caption_ids=np.concatenate(labels),
            captions=[g.caption for g in groups],
            keys=np.array([g.key for g in groups], dtype=np.int64),
        )
