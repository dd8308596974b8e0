"""The language-model backends without Ray: per-prompt seeded sampling, the transformers actor's rows, the
bodies sent to an OpenAI-compatible server, and the vLLM processor built from the installed Ray API."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from repo import CONFIGS, ROOT

from stablerep_ray.captions.synth.llm import CausalLM, TransformersCaptioner, _SeededSampling
from stablerep_ray.captions.synth.pools import with_absolute_paths
from stablerep_ray.captions.synth.stream import completion_request, http_headers, prompt_columns, vllm_request
from stablerep_ray.config import ConfigError, load_config

SYNTH_QUICKSTART = CONFIGS / "synclr-captions-quickstart.yaml"
LLAMA = CONFIGS / "synclr-captions-llama-sd15.yaml"


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from stablerep_ray.cli import main

    directory = tmp_path_factory.mktemp("llm") / "tiny-llm"
    assert main(["make-tiny-llm", str(directory)]) == 0
    return directory


def synth(*overrides):
    return with_absolute_paths(load_config(SYNTH_QUICKSTART, list(overrides)).captions.synth)


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_seeded_sampling_draws_from_the_tempered_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().expand(4000, 4).clone()
    sampler = _SeededSampling(list(range(4000)), prompt_length=3, temperature=1.0, top_p=0.7, steps=1)
    out = sampler(torch.zeros(4000, 3, dtype=torch.long), scores)
    choice = out.argmax(-1)
    assert torch.isinf(out).sum(-1).eq(3).all()  # one finite score a row: generate's greedy pick is the draw
    share = torch.bincount(choice, minlength=4).double() / 4000
    assert share[0] == pytest.approx(0.625, abs=0.03) and share[1] == pytest.approx(0.375, abs=0.03)
    assert share[2:].sum() == 0  # outside the top-p = 0.7 nucleus
    greedy = _SeededSampling([1, 2], 3, temperature=0.0, top_p=0.9, steps=1)(torch.zeros(2, 3, dtype=torch.long),
                                                                            scores[:2])
    assert greedy.argmax(-1).tolist() == [0, 0]


def test_a_completion_depends_on_its_prompt_and_seed_not_on_its_batch(tiny_llm):
    lm = CausalLM(str(tiny_llm))
    prompts = ["red star =>", "a much longer prompt, with a background =>", "blue ring, next to =>"]
    together = lm.complete(prompts, [11, 12, 13], 0.8, 0.9, 10)
    alone = [lm.complete([p], [s], 0.8, 0.9, 10)[0] for p, s in zip(prompts, [11, 12, 13])]
    assert together == alone
    assert lm.complete(prompts[:1], [14], 0.8, 0.9, 10) != together[:1]
    assert all("\n" not in text for text in together)  # generation stops at the first newline


def test_the_transformers_actor_turns_prompt_rows_into_stream_rows(tiny_llm):
    cfg = synth("captions.synth.backend=transformers", f"captions.synth.model={tiny_llm}",
                "captions.synth.max_tokens=8", "captions.synth.prompts_per_chunk=6")
    rows = prompt_columns(cfg, 2, detail=False)
    assert {"prompt", "seed"} <= set(rows) and rows["prompt"][0].endswith(" =>")
    out = TransformersCaptioner(cfg)(rows)
    assert set(out) == {"chunk", "row", "chunk_rows", "caption_id", "position", "caption"}
    assert list(out["position"]) == list(range(12, 18)) and set(out["chunk"]) == {2}


def test_http_requests_are_openai_completions_with_a_seed_and_a_newline_stop(monkeypatch):
    cfg = synth("captions.synth.backend=http", "captions.synth.url=http://h:1/v1/completions",
                "captions.synth.model=llama", "captions.synth.api_key_env=SYNTH_TEST_KEY")
    rows = prompt_columns(cfg, 0, detail=False)
    row = {k: v[0] for k, v in rows.items()}
    body = completion_request(row, cfg)["payload"]
    assert body == {"prompt": row["prompt"], "temperature": 0.8, "top_p": 0.9, "max_tokens": 100,
                    "seed": int(row["seed"]), "stop": ["\n"], "model": "llama"}
    monkeypatch.delenv("SYNTH_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"captions.synth.api_key_env: \$SYNTH_TEST_KEY is not set"):
        http_headers(cfg)
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-1")
    assert http_headers(cfg) == {"Authorization": "Bearer sk-1"}


def test_the_vllm_processor_is_a_fixed_pool_of_raw_completion_engines():
    from stablerep_ray.captions.synth.stream import vllm_processor_config

    cfg = load_config(LLAMA).captions.synth
    config = vllm_processor_config(cfg)
    assert config.model_source == cfg.model and config.concurrency == (2, 2)  # fixed, not autoscaling 1..n
    assert config.engine_kwargs["tensor_parallel_size"] == 1 and config.engine_kwargs["max_model_len"] == 2048
    assert config.chat_template_stage is False and config.tokenize_stage is False  # raw completion of "input =>"
    assert config.placement_group_config is None
    shared = vllm_processor_config(cfg.model_copy(update={"num_gpus_per_actor": 0.5}))
    assert shared.placement_group_config["bundles"][0]["GPU"] == 0.5
    assert shared.engine_kwargs["gpu_memory_utilization"] == 0.45  # half of vLLM's 0.9: two engines fit a card
    assert "gpu_memory_utilization" not in config.engine_kwargs  # a whole card: vLLM's own default
    given = cfg.model_copy(update={"num_gpus_per_actor": 0.5, "engine_kwargs": {"gpu_memory_utilization": 0.3}})
    assert vllm_processor_config(given).engine_kwargs["gpu_memory_utilization"] == 0.3  # the config's wins
    assert vllm_processor_config(cfg.model_copy(update={"num_gpus_per_actor": 2})).engine_kwargs[
        "tensor_parallel_size"] == 2
    params = vllm_request({"prompt": "p =>", "seed": np.int64(7)}, cfg)["sampling_params"]
    assert params == {"temperature": 0.8, "top_p": 0.9, "max_tokens": 100, "seed": 7, "stop": ["\n"]}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_without_vllm_the_preflight_fails_fast_with_one_line():
    from stablerep_ray.captions.synth.preview import check_synth

    with pytest.raises(ConfigError, match="captions.synth.backend: vllm is not installed here"):
        check_synth(load_config(LLAMA).captions.synth)


def test_a_missing_local_model_directory_is_refused_before_ray_starts(tmp_path):
    from stablerep_ray.captions.synth.preview import check_synth

    with pytest.raises(ConfigError, match=r"captions.synth.model: .* \(no config.json\)"):
        check_synth(synth("captions.synth.backend=transformers", f"captions.synth.model={tmp_path}"))


def test_the_language_model_pool_counts_in_the_run_s_resources(tiny_llm):
    from stablerep_ray.runtime import Need

    plain = Need.of(load_config(SYNTH_QUICKSTART))
    with_llm = Need.of(load_config(SYNTH_QUICKSTART, [
        "captions.synth.backend=transformers", f"captions.synth.model={tiny_llm}", "captions.synth.num_actors=2",
        "captions.synth.num_cpus_per_actor=1.5"]))
    assert with_llm.cpus == plain.cpus + 3 and with_llm.gpus == plain.gpus
    assert Need.of(load_config(LLAMA)).gpus == 16 + 48 + 2
