"""Checks before a run and ``stablerep-ray synth-captions``: see the prompts and captions before training.

The template and transformers backends run here, in-process, on the code their Ray Data stage runs; the
http and vllm backends run their Ray Data LLM stage (a local Ray, or the cluster at ``RAY_ADDRESS``). The
steady-state rate of a model backend is saved for the planner and the train preflight
(``tools/planner/captions.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

from ...config import Config, ConfigError, SynthConfig
from .pools import Pools, load_pools, with_absolute_paths
from .prompts import make_prompt
from .rows import Drops
from .stream import check_vllm, http_headers, prompt_columns, synth_captions


def check_model_path(cfg: SynthConfig) -> None:
    """A local model directory must exist and hold a config.json; a Hub id must name a transformers
    model this machine may read (``hub.hub_configs``: a typo or a gated model refused here)."""
    path = Path(cfg.model).expanduser()
    if cfg.backend == "http":
        return
    if not (path.exists() or cfg.model.startswith((".", "/", "~"))):
        from ...hub import LANGUAGE_MODEL, hub_configs

        hub_configs(cfg.model, LANGUAGE_MODEL)
        return
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"captions.synth.model: {cfg.model} is not a saved causal language model (no config.json); "
            f"give a Hugging Face id or a directory saved with save_pretrained (`stablerep-ray make-tiny-llm DIR`)"
        )


def describe(cfg: SynthConfig, pools: Pools) -> str:
    mix = ", ".join(f"{k} {w:.1%}" for k, w in zip(pools.kinds, pools.kind_weights))
    where = {"template": "rules, no model", "http": cfg.url}.get(cfg.backend, cfg.model)
    files = len(pools.concept_files)
    return (f"captions: synth ({cfg.backend}: {where}), {pools.num_concepts} concepts in {files} "
            f"file{'s' * (files != 1)}, {len(pools.backgrounds)} backgrounds, {len(pools.textures)} textures; "
            f"mix {mix}")


def check_synth(cfg: SynthConfig) -> str:
    """Every check of the caption stage that needs no cluster; returns the preflight's description line."""
    cfg = with_absolute_paths(cfg)
    pools = load_pools(cfg)
    if cfg.backend == "vllm":
        check_vllm()
    if cfg.backend == "http":
        http_headers(cfg)
    if cfg.uses_model:  # last: a Hub id is read over the network
        check_model_path(cfg)
    return describe(cfg, pools)


def _in_process(cfg: SynthConfig, chunks: int) -> Iterator[dict]:
    """Caption rows chunk by chunk, here: the template task's work, or one transformers actor's."""
    captioner = None
    if cfg.backend == "transformers":
        from .llm import TransformersCaptioner

        captioner = TransformersCaptioner(cfg, detail=True)
    for chunk in range(chunks):
        rows = prompt_columns(cfg, chunk, detail=True)
        if captioner is None:
            yield rows
            continue
        for start in range(0, cfg.prompts_per_chunk, cfg.batch_size):
            yield captioner({k: v[start:start + cfg.batch_size] for k, v in rows.items()})


def _through_ray(config: Config, cfg: SynthConfig, chunks: int) -> Iterator[dict]:
    import ray

    from ...runtime import configure_data_context, local_resources, ray_address, start_ray

    if not ray.is_initialized():
        start_ray(ray_address(config), num_cpus=int(local_resources(config)[0]))
        configure_data_context()
    yield from synth_captions(cfg, detail=True, chunks=chunks).iter_batches(batch_size=None, batch_format="numpy")


def preview(config: Config, num: int, output: str | None = None) -> str:
    """Write ``num`` captions (prompts 0..num-1) with their kind and concept; returns the report."""
    cfg = with_absolute_paths(config.captions.synth)
    check_synth(cfg)
    chunks = math.ceil(num / cfg.prompts_per_chunk)
    source = _in_process(cfg, chunks) if cfg.backend in ("template", "transformers") else _through_ray(config, cfg,
                                                                                                       chunks)
    rows: list[dict] = []
    first = None  # (time, rows) when the first batch arrived: the rate excludes model loading
    start = time.perf_counter()
    for batch in source:
        rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
        first = first or (time.perf_counter(), len(rows))
    end = time.perf_counter()
    steady = len(rows) - first[1] if first else 0
    rate = steady / (end - first[0]) if steady and end > first[0] else len(rows) / max(end - start, 1e-9)
    rows = sorted(rows, key=lambda r: int(r["position"]))[:num]
    drops = Drops()
    for row in rows:
        drops.add(row["dropped"] or None)
    lines = []
    if cfg.uses_model:
        prompt = make_prompt(load_pools(cfg), cfg, 0)
        lines += [f"prompt 0 ({prompt.kind}), as the language model reads it:",
                  *[f"  | {line}" for line in prompt.text.splitlines()], ""]
    width = max(len(str(r["concept"])) for r in rows)
    lines += [f"{int(r['position']):>6}  {r['kind']:<18}  {r['concept']:<{width}}  "
              + (r["caption"] if not r["dropped"] else f"(dropped: {r['dropped']})") for r in rows]
    lines.append(f"{len(rows)} prompts ({cfg.backend}): {drops.describe(cfg.max_chars)}; {rate:,.4g} captions/s")
    if cfg.uses_model:
        from ...tools.planner import save_caption_rate

        per_actor = rate / (1 if cfg.backend == "transformers" else cfg.num_actors)
        where = "in-process, one actor" if cfg.backend == "transformers" else f"through Ray, {cfg.num_actors} actors"
        path = save_caption_rate(cfg, per_actor, f"by synth-captions ({where})")
        lines.append(f"saved {per_actor:,.4g} captions/s per actor for the planner and the train preflight: {path}")
    if output:
        lines.append(write_preview(rows, output))
    return "\n".join(lines)


def write_preview(rows: list[dict], output: str) -> str:
    """.txt: the kept captions, one per line (a caption file); otherwise JSON lines with kind and concept."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".txt":
        path.write_text("".join(f"{r['caption']}\n" for r in rows if not r["dropped"]))
    else:
        keys = ("position", "kind", "concept", "caption", "dropped")
        path.write_text("".join(json.dumps({k: _plain(r[k]) for k in keys}) + "\n" for r in rows))
    return f"wrote {path}"


def _plain(value):
    return value.item() if hasattr(value, "item") else value
