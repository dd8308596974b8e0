"""The trainer side of the stream: caption groups from a worker's shard -> replay buffer -> batches."""

from .replay import Batch, GroupStream, StreamExhausted, resume_chunk

__all__ = ["Batch", "GroupStream", "StreamExhausted", "resume_chunk"]
