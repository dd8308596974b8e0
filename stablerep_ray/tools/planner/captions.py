"""The caption-synthesis stage in the plan: captions/s its actors write vs captions/s the stream consumes.

With ``captions.source: synth`` a third pool sits in front of the generators. The stream consumes
``min(generator supply, trainer demand)`` captions/s; the language-model pool writes ``num_actors x r``
(``r``: captions/s of one actor, drops excluded). When that is less, the LLM stage is the bottleneck and
both the generators and the trainer wait for it.

``r`` comes from a measurement: ``stablerep-ray synth-captions CONFIG --num N`` times the stage it runs
(the very Ray Data stage a run uses) and saves the steady-state rate under a fingerprint of the settings
it depends on (``bench/results/caption-rates.json``); the template backend is timed here, in-process, in
well under a second. No figure is assumed for a model that was not measured.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ...config import SYNTH_SOURCE, Config, SynthConfig
from .costs import results_dir

RATES_FILE = "caption-rates.json"
STARVED = 0.95  # warn when the LLM stage supplies less than this share of what the stream consumes


@dataclass
class CaptionRate:
    per_actor: float  # captions/s of one language-model actor (template: one prompt task), drops excluded
    source: str


def fingerprint(cfg: SynthConfig) -> str:
    """What one actor's caption rate depends on (not the prompts' seed, the pool size or the labels)."""
    relevant = cfg.model_dump(mode="json", include={
        "backend", "model", "url", "batch_size", "max_tokens", "temperature", "top_p", "num_examples",
        "num_gpus_per_actor", "num_cpus_per_actor", "dtype", "engine_kwargs", "qps"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def save_caption_rate(cfg: SynthConfig, per_actor: float, where: str, results: Path | None = None) -> Path:
    path = (results or results_dir()) / RATES_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved[fingerprint(cfg)] = {"backend": cfg.backend, "model": cfg.model, "captions_per_s_per_actor": per_actor,
                               "where": where, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=2))
    return path


def time_template(cfg: SynthConfig, seconds: float = 0.3) -> float:
    """captions/s of one template prompt task, timed here (chunk after chunk of the stream)."""
    from ...captions.synth.pools import with_absolute_paths
    from ...captions.synth.stream import prompt_columns

    cfg = with_absolute_paths(cfg)
    prompt_columns(cfg, 0, False)  # reads the files once
    chunks, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunks += 1
        prompt_columns(cfg, chunks, False)
    return chunks * cfg.prompts_per_chunk / (time.perf_counter() - start)


def caption_rate(config: Config, results: Path | None = None) -> CaptionRate | None:
    """One actor's rate: a saved measurement, else (template) timed now, else None."""
    if config.captions.source != SYNTH_SOURCE:
        return None
    cfg = config.captions.synth
    path = (results or results_dir()) / RATES_FILE
    entry = (json.loads(path.read_text()) if path.is_file() else {}).get(fingerprint(cfg))
    if entry:
        return CaptionRate(entry["captions_per_s_per_actor"], f"measured {entry['where']} at {entry['time']} ({path})")
    if cfg.backend == "template":
        return CaptionRate(time_template(cfg), "timed now, in-process (one prompt task)")
    return None


def consumed_captions_per_s(config: Config, gen_rate: float, train_rate: float) -> float:
    """captions/s the stream takes: what the generators make, or what the trainer needs if that is less."""
    g, t = config.generator, config.train
    supply = g.num_actors * gen_rate / g.images_per_caption
    demand = t.num_workers * train_rate / (config.group_size * config.stream.reuse)
    return min(supply, demand)


def check_caption_supply(config: Config, rate: CaptionRate, consumed: float) -> str | None:
    """A warning when the language-model pool writes fewer captions/s than the stream consumes, else None."""
    s = config.captions.synth
    supply = s.num_actors * rate.per_actor
    if rate.per_actor <= 0 or supply >= STARVED * consumed:
        return None
    needed = math.ceil(consumed / rate.per_actor - 1e-9)
    return (f"caption synthesis is the bottleneck: {s.num_actors} {s.backend} actors write {supply:.3g} captions/s "
            f"({rate.per_actor:.3g} each, {rate.source}), the generators and trainer would consume "
            f"{consumed:.3g} captions/s, so both wait ~{1 - supply / consumed:.0%} of the time; set "
            f"captions.synth.num_actors >= {needed} (or a larger captions.synth.batch_size)")


def llm_devices(config: Config, unit: str) -> float:
    """GPUs (or CPUs) the language-model pool holds, which the generator/trainer split cannot use."""
    if config.captions.source != SYNTH_SOURCE or not config.captions.synth.uses_model:
        return 0.0
    s = config.captions.synth
    return s.num_actors * (s.num_gpus_per_actor if unit == "GPU" else s.num_cpus_per_actor)


def caption_stage_line(config: Config, consumed: float, results: Path | None = None) -> str | None:
    """The plan's line about the caption stage at ``consumed`` captions/s (None without synth captions)."""
    if config.captions.source != SYNTH_SOURCE:
        return None
    s = config.captions.synth
    rate = caption_rate(config, results)
    if rate is None:
        return (f"captions: {s.backend} backend, {s.num_actors} actors: no measured rate; the split consumes "
                f"{consumed:,.4g} captions/s (measure with `stablerep-ray synth-captions CONFIG --num 2000`)")
    needed = max(1, math.ceil(consumed / rate.per_actor - 1e-9)) if rate.per_actor > 0 else 0
    line = (f"captions: {s.backend} backend at {rate.per_actor:,.4g} captions/s per actor ({rate.source}); "
            f"the split consumes {consumed:,.4g} captions/s -> {needed} actor{'s' * (needed != 1)} needed, "
            f"{s.num_actors} configured")
    warning = check_caption_supply(config, rate, consumed)
    return line + (f"\n  warning: {warning}" if warning else "")
