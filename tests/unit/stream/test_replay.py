"""Worker-side stream: whole groups per batch, exactly-once at R = 1, at most R serves, memory cap."""

from collections import Counter

import numpy as np
import pytest

from stablerep_ray.stream.replay import GroupStream, StreamExhausted, resume_chunk

CHUNK_ROWS = 7


def generator_batches(num_groups, n=4, size=8, per_call=3, start=0):
    """Batches shaped like the generator stage's output (numpy batch format), 7 rows per chunk."""
    for first in range(start, start + num_groups, per_call):
        ids = np.arange(first, min(first + per_call, start + num_groups))
        images = np.zeros((len(ids), n, size, size, 3), dtype=np.uint8)
        images[:] = (ids % 251)[:, None, None, None, None]
        images[:, :, 0, 0, 0] = np.arange(n)  # image index, to see m-of-n subsets
        yield {
            "chunk": ids // CHUNK_ROWS,
            "row": ids % CHUNK_ROWS,
            "chunk_rows": np.full(len(ids), CHUNK_ROWS),
            "caption_id": ids * 10,
            "caption": np.array([f"caption {i}" for i in ids]),
            "images": images,
            "num_images": np.full(len(ids), n, dtype=np.int32),
        }


def test_pure_streaming_serves_every_group_exactly_once_in_whole_groups():
    stream = GroupStream(generator_batches(100), captions_per_step=5, images_per_group=3, reuse=1,
                         buffer_groups=5, seed=0)
    served = Counter()
    for _ in range(20):
        batch = stream.next_batch()
        assert batch.images.shape == (15, 8, 8, 3)
        labels = batch.caption_ids.reshape(5, 3)
        assert (labels == labels[:, :1]).all(), "a group's images stay together"
        assert len(set(labels[:, 0])) == 5
        # the pixels come from the group the label says, distinct images of it
        assert (batch.images[:, 1, 1, 0] == (batch.caption_ids // 10) % 251).all()
        for row in batch.images.reshape(5, 3, 8, 8, 3):
            assert len(set(row[:, 0, 0, 0])) == 3
        served.update(batch.keys.tolist())
    expected = [(i // CHUNK_ROWS) << 32 | i % CHUNK_ROWS for i in range(100)]
    assert sorted(served) == expected and set(served.values()) == {1}
    with pytest.raises(StreamExhausted):
        stream.next_batch()


@pytest.mark.parametrize("reuse", [2, 3, 5])
def test_reuse_serves_at_most_r_times_and_amplifies(reuse):
    k, steps, capacity = 6, 60, 4 * reuse * 6
    stream = GroupStream(generator_batches(10_000), captions_per_step=k, images_per_group=2,
                         reuse=reuse, buffer_groups=capacity, seed=1)
    served = Counter()
    for _ in range(steps):
        batch = stream.next_batch()
        assert len(set(batch.keys.tolist())) == k
        served.update(batch.keys.tolist())
        assert len(stream.buffer) <= capacity
    assert max(served.values()) <= reuse
    assert sum(served.values()) == k * steps
    # Every group but those still buffered left after exactly R serves: R trades generation for reuse.
    assert k * steps / reuse <= stream.admitted <= k * steps / reuse + capacity
    assert sum(1 for n in served.values() if n < reuse) <= len(stream.buffer)


def test_paper_shape_serves_mix_across_many_steps():
    """A paper-sized stream per worker: K = 43 captions a step, n = 10, m = 6, R = 9 (the paper config's
    15 needs longer than 600 steps to reach its steady state), the auto buffer."""
    k, reuse, n, size = 43, 9, 10, 8
    capacity = 2 * reuse * k  # what stream.buffer_mb = 0 (auto) gives
    stream = GroupStream(generator_batches(100_000, n=n, size=size, per_call=64), captions_per_step=k,
                         images_per_group=6, reuse=reuse, buffer_groups=capacity, seed=3)
    batches, held = [], []
    for _ in range(600):
        batches.append(stream.next_batch().keys.tolist())
        held.append(len(stream.buffer))
    assert stream.buffer.peak_bytes <= capacity * n * size * size * 3, "memory under the cap"
    full = held.index(max(held))
    assert full < 100 and min(held[full:]) >= capacity - k, "the buffer fills up, then stays full"
    steady = batches[full:]
    overlaps = [len(set(a) & set(b)) / k for a, b in zip(steady, steady[1:], strict=False)]
    assert max(overlaps) <= 2 / reuse, "consecutive batches share few captions"
    assert np.mean(overlaps) <= 1 / reuse
    served = Counter(key for keys in batches for key in keys)
    still_buffered = {g.key for g in stream.buffer.groups}
    assert {n for key, n in served.items() if key not in still_buffered} == {reuse}, "served exactly R times"
    assert all(served[key] < reuse for key in still_buffered)
    gaps = stream.buffer.gap_steps / stream.buffer.gaps
    assert gaps >= capacity / k / 2, f"serves of a group {gaps:.1f} steps apart on average"
    stats = stream.stats()
    assert stats["stream/buffer_fill"] > 0.95
    assert stats["stream/fresh_groups_per_step"] == pytest.approx(k / reuse, rel=0.2)


def test_buffer_never_exceeds_its_groups():
    stream = GroupStream(generator_batches(10_000), captions_per_step=6, images_per_group=2,
                         reuse=8, buffer_groups=9, seed=2)
    served = Counter()
    for _ in range(50):
        served.update(stream.next_batch().keys.tolist())
        assert len(stream.buffer) <= 9
    assert stream.buffer.peak_bytes <= 9 * 4 * 8 * 8 * 3
    assert max(served.values()) <= 8


def test_resume_chunk_is_the_first_chunk_not_consumed_by_all_workers():
    worker_a = {0: (3, 5), 1: (2, 4), 3: (1, 2)}
    worker_b = {0: (2, 5), 1: (2, 4), 2: (1, 3)}
    assert resume_chunk([worker_a, worker_b], 0) == (2, 2)  # chunk 2 has 1 of 3; chunk 3 repeats 1
    assert resume_chunk([{}], 4) == (4, 0)


def test_progress_counts_rows_the_stream_skips():
    """Rows without enough images (empty-chunk markers, safety drops) still complete their chunk."""
    batches = list(generator_batches(14))
    for batch in batches:
        batch["num_images"][batch["row"] == 0] = 0
    stream = GroupStream(iter(batches), captions_per_step=4, images_per_group=2, reuse=1,
                         buffer_groups=4, seed=0)
    for _ in range(3):  # 14 rows, 2 unservable: 12 groups
        stream.next_batch()
    with pytest.raises(StreamExhausted):
        stream.next_batch()
    assert resume_chunk([stream.progress.state()], 0) == (2, 0)


@pytest.mark.parametrize("reuse", [1, 4])
def test_a_resume_serves_every_row_the_lost_buffer_had_not(reuse):
    """A restart loses the replay buffer: the resume chunk must come no later than the first chunk with
    a row not yet served, so every caption is served at least once across the restart."""
    k, capacity = 4, 2 * reuse * 4
    stream = GroupStream(generator_batches(10_000), captions_per_step=k, images_per_group=2, reuse=reuse,
                         buffer_groups=capacity, seed=4)
    served = set()
    for _ in range(40):
        served.update(stream.next_batch().keys.tolist())
    chunk, repeated = resume_chunk([stream.progress.state()], 0)
    rows_served = {i for i in range(10_000) if (i // CHUNK_ROWS) << 32 | i % CHUNK_ROWS in served}
    first_unserved = min(set(range(10_000)) - rows_served)
    assert chunk <= first_unserved // CHUNK_ROWS
    assert repeated == sum(1 for i in rows_served if i // CHUNK_ROWS >= chunk)
    if reuse > 1:
        assert any(g.served == 0 for g in stream.buffer.groups), "the case: admitted, never served"
