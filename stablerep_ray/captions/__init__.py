"""Caption sources: files and URIs read chunk by chunk by Ray Data tasks, each caption with a stable id;
or, with ``captions.source: synth``, captions written from concept lists as the run goes (``synth/``)."""

from .files import (
    EMPTY_CHUNK_ID,
    caption_id,
    caption_rows,
    count_captions_per_pass,
    inspect_captions,
    normalise_caption,
    plan_chunks,
    read_captions,
    read_chunk,
    whole_file_warnings,
)

__all__ = [
    "EMPTY_CHUNK_ID", "caption_id", "caption_rows", "count_captions_per_pass", "inspect_captions",
    "normalise_caption", "plan_chunks", "read_captions", "read_chunk", "whole_file_warnings",
]
