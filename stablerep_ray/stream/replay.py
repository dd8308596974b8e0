"""Worker side of the stream: caption groups from the Ray Data shard -> replay buffer -> batches.

Generating an image costs hundreds of training steps on it (docs: cost model), so each worker keeps a
bounded in-memory replay of caption groups. A group is served ``reuse`` (R) times, each time with a
fresh m-of-n image subset (and fresh augmentation on the device), at random steps among all buffered
groups, then evicted. R = 1 is pure streaming: every group is served exactly once, in arrival order.
Nothing touches the disk.

A batch is K whole caption groups; a group never straddles two batches, and since the shard hands each
row to exactly one worker, never two workers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

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
    chunk_rows: int  # rows of its stream chunk, for ChunkProgress at its first serve
    served: int = 0
    last_step: int = -1  # the step of its latest serve

    @property
    def nbytes(self) -> int:
        return self.images.nbytes

    @property
    def chunk(self) -> int:
        return self.key >> 32  # stream_key's high bits


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
    """Rows consumed per stream chunk: what a checkpoint needs to resume without a gap.

    A row is consumed at its group's first serve (or when it is read, if it has nothing to serve). A
    row admitted to the replay buffer but not yet served is not: a restart loses the buffer, so its
    chunk must be read again. Groups served fewer than R times lose their remaining serves, and no
    caption goes unserved.
    """

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
    """Flatten generator output into groups; a row with too few images to serve counts as consumed here."""
    for batch in batches:
        for i in range(len(batch["caption_id"])):
            count = int(batch["num_images"][i])
            if count < min_images:  # an empty-chunk marker, or the safety checker dropped too many
                progress.add(int(batch["chunk"][i]), int(batch["chunk_rows"][i]))
                continue
            yield Group(
                key=stream_key(int(batch["chunk"][i]), int(batch["row"][i])),
                caption_id=int(batch["caption_id"][i]),
                caption=str(batch["caption"][i]),
                # A copy: a view would keep the whole generator block (and its object-store
                # memory) alive for as long as any one of its groups is buffered.
                images=np.array(batch["images"][i]),
                num_images=count,
                chunk_rows=int(batch["chunk_rows"][i]),
            )


class ReplayBuffer:
    """Caption groups held for reuse, at most ``capacity`` of them.

    R = 1 is a queue: K groups served in arrival order, once each. For R > 1 every serve draws K
    distinct groups uniformly among all held ones, so a group's R serves land at random later steps,
    among many other groups', and it leaves after its R-th serve.
    """

    def __init__(self, reuse: int, capacity: int, rng: np.random.Generator):
        self.reuse = reuse
        self.capacity = capacity
        self.rng = rng
        self.groups: list[Group] = []
        self.nbytes = 0
        self.peak_bytes = 0
        self.gap_steps = 0  # steps between consecutive serves of a group, summed ...
        self.gaps = 0  # ... over this many repeat serves

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: Group) -> None:
        if len(self.groups) >= self.capacity:
            raise RuntimeError(f"replay buffer full ({self.capacity} groups); the stream admits only into free room")
        self.groups.append(group)
        self.nbytes += group.nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)

    def take(self, k: int, step: int) -> list[Group]:
        """k distinct groups to serve at ``step``; those served R times leave the buffer."""
        if self.reuse == 1:
            chosen = np.arange(k)
        else:
            chosen = np.sort(self.rng.choice(len(self.groups), size=k, replace=False))
        taken = [self.groups[i] for i in chosen]
        for group in taken:
            if group.served:
                self.gap_steps += step - group.last_step
                self.gaps += 1
            group.served += 1
            group.last_step = step
        for i in chosen[::-1]:  # descending, so a swapped-in last group is never one still to remove
            if self.groups[i].served >= self.reuse:
                self._remove(int(i))
        return taken

    def _remove(self, index: int) -> None:
        """Remove without shifting: the last group takes the slot (order matters only at R = 1)."""
        group = self.groups[index]
        self.nbytes -= group.nbytes
        if self.reuse == 1:
            self.groups.pop(index)
        else:
            self.groups[index] = self.groups[-1]
            self.groups.pop()


class GroupStream:
    """Turns a worker's shard iterator into batches of K caption groups x m images.

    At R = 1 it admits exactly the K groups a step serves. For R > 1 it admits up to K fresh groups
    a step until the buffer holds ``buffer_groups``, then refills only what the last step evicted:
    about K/R a step, so R trades generation for reuse exactly.
    """

    def __init__(
        self,
        batches: Iterator[dict],
        captions_per_step: int,
        images_per_group: int,
        reuse: int,
        buffer_groups: int,
        seed: int,
    ):
        if buffer_groups < captions_per_step:
            raise ValueError(f"a replay buffer of {buffer_groups} groups cannot serve {captions_per_step} a step")
        self.progress = ChunkProgress()
        self.groups = iter_groups(batches, images_per_group, self.progress)
        self.k = captions_per_step
        self.m = images_per_group
        self.rng = np.random.default_rng(seed)
        self.buffer = ReplayBuffer(reuse, buffer_groups, self.rng)
        self.step = 0
        self.wait_seconds = 0.0  # time blocked on the shard: the trainer's data-wait
        self.admitted = 0  # groups that entered the buffer
        self._last_stats = (0, 0, 0, 0)  # (step, admitted, gap steps, gaps) when stats() was last read

    def _admit(self, count: int) -> None:
        start = time.perf_counter()
        try:
            for _ in range(count):
                self.buffer.add(next(self.groups))
                self.admitted += 1
        except StopIteration:
            if len(self.buffer) < self.k:
                raise StreamExhausted(
                    "the caption stream ended before the last step; set captions.repeat=true or "
                    "lower train.steps"
                ) from None
        finally:
            self.wait_seconds += time.perf_counter() - start

    def stats(self, world: int = 1) -> dict[str, float]:
        """TensorBoard scalars of the stream since the last call (``world``: workers, all alike)."""
        buffer = self.buffer
        step, admitted, gap_steps, gaps = self._last_stats
        self._last_stats = (self.step, self.admitted, buffer.gap_steps, buffer.gaps)
        stats = {
            "stream/buffer_mb": buffer.nbytes / 2**20,
            "stream/buffer_fill": len(buffer) / buffer.capacity,
            "stream/groups_admitted": self.admitted * world,
            "stream/fresh_groups_per_step": (self.admitted - admitted) / max(1, self.step - step),
        }
        if buffer.gaps > gaps:
            stats["stream/steps_between_serves"] = (buffer.gap_steps - gap_steps) / (buffer.gaps - gaps)
        return stats

    def next_batch(self) -> Batch:
        if self.buffer.reuse == 1:
            self._admit(self.k - len(self.buffer))
        else:
            self._admit(min(self.k, self.buffer.capacity - len(self.buffer)))
        groups = self.buffer.take(self.k, self.step)
        self.step += 1
        images, labels = [], []
        for group in groups:
            if group.served == 1:
                self.progress.add(group.chunk, group.chunk_rows)
            pick = self.rng.choice(group.num_images, size=self.m, replace=False)
            images.append(group.images[np.sort(pick)])
            labels.append(np.full(self.m, group.caption_id, dtype=np.int64))
        return Batch(
            images=np.concatenate(images),
            caption_ids=np.concatenate(labels),
            captions=[g.caption for g in groups],
            keys=np.array([g.key for g in groups], dtype=np.int64),
        )
