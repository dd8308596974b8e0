"""Completions -> the stream's caption rows, the same columns file captions have.

Prompt i becomes row ``i % prompts_per_chunk`` of chunk ``i // prompts_per_chunk``, with ``position``
i (it seeds the images). Every prompt yields exactly one row, so a chunk's row count is known before any
completion exists and the checkpoint's resume point works for any backend, whatever order rows come
back in: a completion that is blank or over-long is dropped by turning its row into a marker
(``caption_id == EMPTY_CHUNK_ID``), which counts as consumed and is never rendered.
"""

from __future__ import annotations

import logging
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from ..files import EMPTY_CHUNK_ID, caption_id, normalise_caption

logger = logging.getLogger(__name__)

STREAM_COLUMNS = ("chunk", "row", "chunk_rows", "caption_id", "position", "caption")
DETAIL_COLUMNS = ("kind", "concept")  # kept only for previews (synth-captions), with "dropped": why
BLANK, TOO_LONG = "blank", "too_long"


def clean_completion(text: str, max_chars: int) -> tuple[str, str | None]:
    """(caption, None), or ('', why it is dropped): its first line, control characters removed, normalised."""
    line = str(text).lstrip(" \t").split("\n", 1)[0]
    line = "".join(ch for ch in line if unicodedata.category(ch)[0] != "C" or ch == "\t")
    caption = normalise_caption(line)
    if not caption:
        return "", BLANK
    if len(caption) > max_chars:
        return "", TOO_LONG
    return caption, None


@dataclass
class Drops:
    """Completions seen and dropped, by reason."""

    seen: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {BLANK: 0, TOO_LONG: 0})

    def add(self, reason: str | None) -> None:
        self.seen += 1
        if reason:
            self.dropped[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.dropped.values())

    def describe(self, max_chars: int) -> str:
        return (f"dropped {self.total} of {self.seen} completions ({self.dropped[BLANK]} blank, "
                f"{self.dropped[TOO_LONG]} over {max_chars} characters)")


def finish_row(row: dict, completion: str, max_chars: int, detail: bool) -> dict:
    """One prompt row plus its completion -> a stream row (Ray Data LLM processors' postprocess)."""
    caption, reason = clean_completion(completion, max_chars)
    if reason:
        logger.info("synth captions: prompt %d: dropped a %s completion", int(row["position"]), reason)
    out = {k: int(row[k]) for k in ("chunk", "row", "chunk_rows", "position")}
    out["caption_id"] = caption_id(caption) if caption else EMPTY_CHUNK_ID
    out["caption"] = caption
    if detail:
        out.update({k: str(row[k]) for k in DETAIL_COLUMNS}, dropped=reason or "")
    return out


def finish_batch(batch: dict[str, np.ndarray], completions: list[str], max_chars: int,
                 detail: bool) -> dict[str, np.ndarray]:
    """A batch of prompt rows plus their completions -> stream columns; drops are logged per batch."""
    drops, captions, ids, reasons = Drops(), [], [], []
    for text in completions:
        caption, reason = clean_completion(text, max_chars)
        drops.add(reason)
        captions.append(caption)
        ids.append(caption_id(caption) if caption else EMPTY_CHUNK_ID)
        reasons.append(reason or "")
    if drops.total:
        logger.info("synth captions: %s", drops.describe(max_chars))
    out = {k: np.asarray(batch[k]) for k in ("chunk", "row", "chunk_rows", "position")}
    out["caption_id"] = np.asarray(ids, dtype=np.int64)
    out["caption"] = np.asarray(captions, dtype=object)
    if detail:
        out.update({k: np.asarray(batch[k], dtype=object) for k in DETAIL_COLUMNS})
        out["dropped"] = np.asarray(reasons, dtype=object)
    return out
