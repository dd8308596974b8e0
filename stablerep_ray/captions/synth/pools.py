"""What prompts are drawn from: concept lists, backgrounds, textures, relations and example pools.

Read once per process (driver, prompt tasks) from ``captions.synth``; every problem a file can have
is a ``ConfigError`` naming the key and the file, raised by the train preflight before Ray starts.
Files may be local paths or URIs, so large lists (a file of ImageNet-21k class names with their
backgrounds) live next to the rest of a cluster's data.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ...config import ConfigError, SynthConfig
from ...config.synth import PROMPT_KINDS
from ...storage import open_filesystem
from .examples import EXAMPLES, SEPARATOR

KEY = "captions.synth"


@dataclass(frozen=True)
class Pools:
    concept_files: tuple[tuple[str, ...], ...]  # the concepts of each file
    file_weights: np.ndarray  # share of foreground prompts per file (sums to 1)
    own_backgrounds: dict[str, tuple[str, ...]]  # concept -> its backgrounds (JSON concept files)
    backgrounds: tuple[str, ...]  # the backgrounds file, else every concept's own backgrounds
    textures: tuple[str, ...]
    relations: tuple[str, ...]
    examples: dict[str, tuple[str, ...]]  # prompt kind -> "input => caption" lines
    kinds: tuple[str, ...]  # prompt kinds with a positive weight ...
    kind_weights: np.ndarray  # ... and their normalised weights

    @property
    def num_concepts(self) -> int:
        return sum(len(names) for names in self.concept_files)


def _read(location: str, key: str) -> str:
    import pyarrow.fs as pafs

    fs, path = open_filesystem(location, key)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ConfigError(f"{key}: {location} does not exist; check the path")
    with fs.open_input_stream(path) as raw:
        data = raw.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}: {location}: byte {err.start} is not UTF-8; re-encode the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """Non-blank lines, outer space stripped; a line starting with '#' is a comment."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _is_json(location: str) -> bool:
    return Path(location.split("?", 1)[0]).suffix.lower() == ".json"


def read_concepts(location: str, key: str) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """(concepts, concept -> its own backgrounds) of one file: .txt lines or a JSON object/list."""
    text = _read(location, key)
    if not _is_json(location):
        names, own = _lines(text), {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{key}: {location}: invalid JSON ({err.msg}, line {err.lineno})") from None
        if isinstance(data, list):
            data = dict.fromkeys(data, [])
        ok = isinstance(data, dict) and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(b, str) for b in v) for k, v in data.items()
        )
        if not ok:
            raise ConfigError(
                f"{key}: {location} must hold a JSON object of concept -> list of backgrounds (or a list of "
                f"concepts), e.g. {{\"golden retriever\": [\"a snowy park\", \"a kitchen\"]}}"
            )
        names = [k.strip() for k in data if k.strip()]
        own = {k.strip(): tuple(b.strip() for b in v if b.strip()) for k, v in data.items() if k.strip()}
        own = {k: v for k, v in own.items() if v}
    if not names:
        raise ConfigError(f"{key}: {location} holds no concepts; one per line (or a JSON object of concepts)")
    return names, own


def read_examples(location: str) -> dict[str, tuple[str, ...]]:
    """A user's example pools: prompt kind -> 'input => caption' lines (JSON or YAML)."""
    key = f"{KEY}.examples"
    try:
        data = yaml.safe_load(_read(location, key))
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: {location}: not valid JSON or YAML ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ConfigError(f"{key}: {location} must map prompt kinds to lists of 'input => caption' lines")
    unknown = sorted(set(data) - set(PROMPT_KINDS))
    if unknown:
        raise ConfigError(f"{key}: {location}: unknown prompt kinds {unknown}; use {list(PROMPT_KINDS)}")
    pools = {}
    for kind, lines in data.items():
        bad = [line for line in lines if not isinstance(line, str) or SEPARATOR.strip() not in line]
        if bad:
            raise ConfigError(f"{key}: {location}: {kind}: {bad[0]!r} is not an 'input => caption' line")
        pools[kind] = tuple(" ".join(line.split()) for line in lines)
    return pools


def build_pools(cfg: SynthConfig) -> Pools:
    """Read and check every file ``cfg`` names; the checks depend on the prompt kinds the mix uses."""
    kinds = tuple(k for k in PROMPT_KINDS if cfg.mix.get(k, 0) > 0)
    weights = np.array([cfg.mix[k] for k in kinds], dtype=np.float64)
    files, own = [], {}
    for location in cfg.concepts:
        names, backgrounds = read_concepts(location, f"{KEY}.concepts")
        files.append(tuple(dict.fromkeys(names)))  # repeated lines count once
        own.update(backgrounds)
    file_weights = np.array(cfg.concept_weights or [1.0] * len(files), dtype=np.float64)
    backgrounds = tuple(_lines(_read(cfg.backgrounds, f"{KEY}.backgrounds"))) if cfg.backgrounds else ()
    if cfg.backgrounds and not backgrounds:
        raise ConfigError(f"{KEY}.backgrounds: {cfg.backgrounds} holds no backgrounds; one per line")
    textures = tuple(_lines(_read(cfg.textures, f"{KEY}.textures"))) if cfg.textures else ()
    if "texture" in kinds and not textures:
        raise ConfigError(f"{KEY}.textures: {cfg.textures} holds no textures; one per line")
    if "concept_background" in kinds and not backgrounds:
        lacking = [c for names in files for c in names if c not in own]
        if lacking:
            raise ConfigError(
                f"{KEY}.backgrounds: {len(lacking)} concepts (e.g. {lacking[0]!r}) have no backgrounds of their own "
                f"for concept_background prompts; set a backgrounds file, or give them backgrounds in a JSON file"
            )
    if "background" in kinds and not backgrounds:
        backgrounds = tuple(dict.fromkeys(b for names in own.values() for b in names))
        if not backgrounds:
            raise ConfigError(f"{KEY}.backgrounds: the mix uses background prompts; set a backgrounds file")
    examples = {kind: EXAMPLES[kind] for kind in PROMPT_KINDS}
    if cfg.examples:
        examples.update(read_examples(cfg.examples))
    if cfg.uses_model:
        short = [k for k in kinds if len(examples[k]) < cfg.num_examples]
        if short:
            raise ConfigError(
                f"{KEY}.examples: the {short[0]} pool has {len(examples[short[0]])} examples, fewer than "
                f"captions.synth.num_examples={cfg.num_examples}; add examples or lower num_examples"
            )
    return Pools(
        concept_files=tuple(files),
        file_weights=file_weights / file_weights.sum() if files else file_weights,
        own_backgrounds=own,
        backgrounds=backgrounds,
        textures=textures,
        relations=tuple(cfg.relations),
        examples=examples,
        kinds=kinds,
        kind_weights=weights / weights.sum(),
    )


@functools.lru_cache(maxsize=4)
def _pools_of(cfg_json: str) -> Pools:
    return build_pools(SynthConfig.model_validate_json(cfg_json))


def load_pools(cfg: SynthConfig) -> Pools:
    """The pools of ``cfg``, read once per process."""
    return _pools_of(cfg.model_dump_json())


def with_absolute_paths(cfg: SynthConfig) -> SynthConfig:
    """``cfg`` with its local relative paths made absolute here, so Ray workers and Tune trials (whose
    working directory differs) read the same files."""

    def absolute(location: str) -> str:
        if not location or "://" in location:
            return location
        return str(Path(location).expanduser().resolve())

    return cfg.model_copy(update={
        "concepts": [absolute(c) for c in cfg.concepts],
        "backgrounds": absolute(cfg.backgrounds),
        "textures": absolute(cfg.textures),
        "examples": absolute(cfg.examples),
        "model": absolute(cfg.model) if cfg.model and Path(cfg.model).expanduser().exists() else cfg.model,
    })
