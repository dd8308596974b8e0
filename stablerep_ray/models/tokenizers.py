"""Tokenizers for StableRep+'s text tower.

Every tokenizer returns ``(tokens, lengths)``: each row is start token, caption ids, end-of-text
token, then zero padding; ``lengths`` counts tokens up to and including the end token, which is where
the text tower reads its feature. Captions are truncated so the end token always fits.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Protocol

import torch

from ..config import ConfigError, GeneratorConfig

_KEY = "model.text.tokenizer"


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, captions: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, context_length) int64 tokens and (B,) int64 lengths (end-token index + 1)."""
        ...


def _max_caption_tokens(context_length: int) -> int:
    if context_length < 2:
        raise ValueError(
            f"context_length must leave room for start and end tokens (got {context_length})"
        )
    return context_length - 2


def _pack(
    ids: list[list[int]], start: int, end: int, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame each id list with start/end tokens, truncating the ids so the end token always fits."""
    keep = _max_caption_tokens(context_length)
    tokens = torch.zeros(len(ids), context_length, dtype=torch.long)
    lengths = torch.empty(len(ids), dtype=torch.long)
    for row, caption_ids in enumerate(ids):
        framed = [start, *caption_ids[:keep], end]
        tokens[row, : len(framed)] = torch.tensor(framed, dtype=torch.long)
        lengths[row] = len(framed)
    return tokens, lengths


class WordTokenizer:
    """Lower-cased words hashed into a fixed number of buckets.

    Needs no fitting and no files, and is identical on every worker and across restarts (crc32, not
    Python's salted ``hash``); used with the offline simulator. Colliding words share an id, which
    is harmless for captions from a small vocabulary.
    """

    PAD, START, END = 0, 1, 2
    _SPECIALS = 3
    _WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script)

    def __init__(self, buckets: int = 4096):
        self.buckets = buckets
        self.vocab_size = self._SPECIALS + buckets

    def word_id(self, word: str) -> int:
        return self._SPECIALS + zlib.crc32(word.encode()) % self.buckets

    def encode(self, captions: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [[self.word_id(w) for w in self._WORD.findall(c.lower())] for c in captions]
        return _pack(ids, self.START, self.END, context_length)


class HFTokenizer:
    """A CLIP BPE tokenizer (``transformers.CLIPTokenizer``), e.g. the generator pipeline's own.

    ``subfolder=None`` accepts both a tokenizer directory/id and a diffusers pipeline, whose
    tokenizer lives in ``tokenizer/``. Loading is checked: transformers builds an empty tokenizer
    from a directory without vocabulary files instead of failing.
    """

    def __init__(self, path: str, subfolder: str | None = None):
        self.path = path
        self._tokenizer = _load_clip_tokenizer(path, subfolder)
        self.vocab_size = len(self._tokenizer)
        self._start = self._tokenizer.bos_token_id
        self._end = self._tokenizer.eos_token_id

    def encode(self, captions: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        max_length = _max_caption_tokens(context_length)
        captions = list(captions)
        ids = (  # transformers fails on an empty batch
            self._tokenizer(
                captions, add_special_tokens=False, truncation=True, max_length=max_length
            )["input_ids"]
            if captions
            else []
        )
        return _pack(ids, self._start, self._end, context_length)


def load_tokenizer(tokenizer: str, generator: GeneratorConfig) -> Tokenizer:
    """The configured tokenizer: an explicit path/id, else the generator backend's, else words."""
    if tokenizer:
        return HFTokenizer(tokenizer)
    from ..generation import generator_class

    source = generator_class(generator).tokenizer_source(generator)
    if source is None:
        return WordTokenizer()
    path, subfolder = source
    if not path:
        raise ConfigError(f"{_KEY}: empty, and there is no generator.model pipeline to take it from")
    return HFTokenizer(path, subfolder=subfolder)


_VOCAB_FILES = ("tokenizer.json", "vocab.json")


def _load_clip_tokenizer(path: str, subfolder: str | None):
    from transformers import CLIPTokenizer

    subfolders = [subfolder] if subfolder is not None else ["", "tokenizer"]
    local = Path(path).expanduser()
    if local.is_dir():
        searched = [local / s for s in subfolders]
        found = [s for s in subfolders if any((local / s / f).is_file() for f in _VOCAB_FILES)]
        if not found:
            raise ConfigError(
                f"{_KEY}: no {' or '.join(_VOCAB_FILES)} in {' or '.join(map(str, searched))}"
            )
        path, subfolders = str(local), found[:1]
    elif local.is_absolute() or path.startswith("."):
        raise ConfigError(f"{_KEY}: {path} is not a directory; set it to a tokenizer dir or hub id")
    errors = []
    for sub in subfolders:
        try:
            loaded = CLIPTokenizer.from_pretrained(path, subfolder=sub)
        except (OSError, ValueError) as err:
            errors.append(str(err))
            continue
        if len(loaded) > 3 and loaded.bos_token_id is not None and loaded.eos_token_id is not None:
            return loaded
        errors.append(f"no vocabulary found{f' in subfolder {sub!r}' if sub else ''}")
    raise ConfigError(f"{_KEY}: cannot load a CLIP tokenizer from {path!r} ({'; '.join(errors)})")
