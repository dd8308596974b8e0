"""The caption-synthesis stage as a lazy Ray Dataset: prompt chunks -> language model -> caption rows.

Chunk ``c`` holds prompts ``c * P .. (c + 1) * P - 1`` (P = ``prompts_per_chunk``); small Ray Data tasks
write the prompts of one chunk each, and the configured backend turns them into captions:

* ``template``: the same task fills the prompt kinds by rule (no model);
* ``transformers``: a fixed ``ActorPoolStrategy`` pool of ``TransformersCaptioner`` actors;
* ``http``: Ray Data LLM's HTTP request processor against an OpenAI-compatible completions server;
* ``vllm``: Ray Data LLM's vLLM engine processor (a fixed pool of GPU engine actors).

The result is lazy and streams: chained into the generator pool and the trainer it forms one Ray Data
pipeline, so back-pressure reaches back to the language model (a slow trainer stops it, not the disk).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from ...config import ConfigError, SynthConfig
from .pools import load_pools, with_absolute_paths
from .prompts import make_prompt, template_caption
from .rows import finish_batch, finish_row

# A stream holds this many times the captions a run needs: room for dropped completions.
DROP_ALLOWANCE = 2
# http: retries of a request the server refused for load (429, 503, ...) or lost, with exponential back-off
# from 1 s; a hosted endpoint's momentary hiccup must not end a long run.
HTTP_RETRIES = 4
# vLLM's default gpu_memory_utilization: the fraction of a card's memory one engine may take.
VLLM_MEMORY_SHARE = 0.9


def prompt_columns(cfg: SynthConfig, chunk: int, detail: bool) -> dict[str, np.ndarray]:
    """Chunk ``chunk``'s prompt rows; for the template backend already finished caption rows."""
    pools = load_pools(cfg)
    p = cfg.prompts_per_chunk
    prompts = [make_prompt(pools, cfg, i) for i in range(chunk * p, (chunk + 1) * p)]
    rows = {
        "chunk": np.full(p, chunk, dtype=np.int64),
        "row": np.arange(p, dtype=np.int32),
        "chunk_rows": np.full(p, p, dtype=np.int32),
        "position": np.arange(chunk * p, (chunk + 1) * p, dtype=np.int64),
        "kind": np.asarray([q.kind for q in prompts], dtype=object),
        "concept": np.asarray([q.concept for q in prompts], dtype=object),
    }
    if cfg.backend == "template":
        return finish_batch(rows, [template_caption(q) for q in prompts], cfg.max_chars, detail)
    rows["prompt"] = np.asarray([q.text for q in prompts], dtype=object)
    rows["seed"] = np.asarray([q.seed for q in prompts], dtype=np.int64)
    return rows


def _prompt_chunks(batch: dict, cfg: SynthConfig, start: int, detail: bool) -> Iterator[pa.Table]:
    for offset in batch["id"]:
        yield pa.table(prompt_columns(cfg, start + int(offset), detail))


def num_chunks(cfg: SynthConfig, num_captions: int) -> int:
    return math.ceil(DROP_ALLOWANCE * max(num_captions, 1) / cfg.prompts_per_chunk) + 1


def synth_captions(cfg: SynthConfig, start_chunk: int = 0, num_captions: int = 0, detail: bool = False,
                   chunks: int | None = None):
    """A lazy Ray Dataset of caption rows from stream chunk ``start_chunk`` on, enough for ``num_captions``
    (or exactly ``chunks`` chunks). ``detail`` keeps each row's prompt kind and concept (previews)."""
    import ray.data

    cfg = with_absolute_paths(cfg)
    load_pools(cfg)  # every file problem surfaces here, in the driver
    count = chunks or num_chunks(cfg, num_captions)
    prompts = ray.data.range(count, override_num_blocks=min(count, 200)).map_batches(
        _prompt_chunks, fn_kwargs={"cfg": cfg, "start": start_chunk, "detail": detail}, batch_size=1,
        num_cpus=0.25,
    )
    return BACKEND_STAGES[cfg.backend](prompts, cfg, detail)


def _template(prompts, cfg: SynthConfig, detail: bool):
    return prompts  # the prompt tasks wrote the captions


def _transformers(prompts, cfg: SynthConfig, detail: bool):
    import ray.data

    from .llm import TransformersCaptioner

    return prompts.map_batches(
        TransformersCaptioner, fn_constructor_kwargs={"cfg": cfg, "detail": detail}, batch_size=cfg.batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=cfg.num_gpus_per_actor or None, num_cpus=cfg.num_cpus_per_actor, **_labels(cfg),
    )


def _labels(cfg: SynthConfig) -> dict:
    return {"label_selector": cfg.label_selector} if cfg.label_selector else {}


def completion_request(row: dict, cfg: SynthConfig) -> dict:
    """The OpenAI-compatible /v1/completions body of one prompt row."""
    body = {"prompt": row["prompt"], "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens, "seed": int(row["seed"]), "stop": ["\n"]}
    if cfg.model:
        body["model"] = cfg.model
    return {"payload": body}


def _http_completion(row: dict, cfg: SynthConfig, detail: bool) -> dict:
    choices = (row.get("http_response") or {}).get("choices") or [{}]
    return finish_row(row, choices[0].get("text") or "", cfg.max_chars, detail)


def http_headers(cfg: SynthConfig) -> dict[str, str]:
    if not cfg.api_key_env:
        return {}
    token = os.environ.get(cfg.api_key_env)
    if not token:
        raise ConfigError(f"captions.synth.api_key_env: ${cfg.api_key_env} is not set; export it or clear the key")
    return {"Authorization": f"Bearer {token}"}


def _http(prompts, cfg: SynthConfig, detail: bool):
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    processor = build_processor(
        HttpRequestProcessorConfig(
            url=cfg.url, headers=http_headers(cfg), qps=cfg.qps or None, batch_size=cfg.batch_size,
            concurrency=(cfg.num_actors, cfg.num_actors), max_retries=HTTP_RETRIES,
            http_request_stage={"num_cpus": cfg.num_cpus_per_actor},
        ),
        preprocess=functools.partial(completion_request, cfg=cfg),
        postprocess=functools.partial(_http_completion, cfg=cfg, detail=detail),
        preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25},
    )
    return processor(prompts)


def vllm_request(row: dict, cfg: SynthConfig) -> dict:
    """The prompt and per-request sampling parameters of one prompt row for vLLM's engine."""
    return {"prompt": row["prompt"], "sampling_params": {
        "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
        "seed": int(row["seed"]), "stop": ["\n"]}}


def _vllm_completion(row: dict, cfg: SynthConfig, detail: bool) -> dict:
    return finish_row(row, row.get("generated_text") or "", cfg.max_chars, detail)


def vllm_processor_config(cfg: SynthConfig):
    """vLLMEngineProcessorConfig of a fixed pool: a whole number of GPUs per actor is its tensor-parallel
    size; a fraction is one bundle of that fraction (several engines share a card), whose engine also
    takes that fraction of vLLM's default memory share (it would take 90 % of the card whatever Ray's
    bundle says, and the next engine or generator on the card would find none)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    gpus = cfg.num_gpus_per_actor
    engine = {"tensor_parallel_size": int(gpus) if gpus >= 1 else 1}
    placement = None
    if gpus < 1:
        placement = {"bundles": [{"GPU": gpus, "CPU": cfg.num_cpus_per_actor}]}
        engine["gpu_memory_utilization"] = round(VLLM_MEMORY_SHARE * gpus, 3)
    engine.update(cfg.engine_kwargs)
    return vLLMEngineProcessorConfig(
        model_source=cfg.model, engine_kwargs=engine, batch_size=cfg.batch_size,
        concurrency=(cfg.num_actors, cfg.num_actors), placement_group_config=placement,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,  # raw completion
    )


def check_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "captions.synth.backend: vllm is not installed here (it needs GPUs: pip install 'ray[llm]' on the "
            "GPU nodes and the driver); or use backend transformers, http or template"
        )


def vllm_processor(cfg: SynthConfig, detail: bool = False):
    """The Ray Data LLM processor of the vllm backend (built in the driver; vllm runs in its actors)."""
    from ray.data.llm import build_processor

    processor = build_processor(
        vllm_processor_config(cfg),
        preprocess=functools.partial(vllm_request, cfg=cfg),
        postprocess=functools.partial(_vllm_completion, cfg=cfg, detail=detail),
        preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25},
    )
    if cfg.label_selector:  # the engine stage's own map_batches arguments: Ray Data LLM has no key for it
        processor.stages["vLLMEngineStage"].map_batches_kwargs.update(_labels(cfg))
    return processor


def _vllm(prompts, cfg: SynthConfig, detail: bool):
    check_vllm()
    return vllm_processor(cfg, detail)(prompts)


BACKEND_STAGES = {"template": _template, "transformers": _transformers, "http": _http, "vllm": _vllm}
