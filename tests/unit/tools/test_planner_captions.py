"""Planner: the caption-synthesis stage in front of the generators (rates, held devices, bottleneck warning)."""

from __future__ import annotations

import pytest
from repo import CONFIGS, ROOT

from stablerep_ray.config import load_config
from stablerep_ray.tools.planner import (
    caption_rate,
    check_caption_supply,
    consumed_captions_per_s,
    plan,
    save_caption_rate,
)

LLAMA = CONFIGS / "synclr-captions-llama-sd15.yaml"


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("STABLEREP_BENCH_RESULTS", str(tmp_path))
    monkeypatch.chdir(ROOT)
    return tmp_path


def test_a_measured_caption_rate_is_found_by_its_settings_not_its_pool_size(results):
    config = load_config(LLAMA)
    assert caption_rate(config) is None  # a model never measured: no figure is assumed
    save_caption_rate(config.captions.synth, 40.0, "by a test")
    more_actors = load_config(LLAMA, ["captions.synth.num_actors=7", "captions.synth.seed=3"])
    assert caption_rate(more_actors).per_actor == 40.0
    assert caption_rate(load_config(LLAMA, ["captions.synth.max_tokens=50"])) is None
    template = load_config(CONFIGS / "synclr-captions-quickstart.yaml")
    assert caption_rate(template).per_actor > 100  # timed here, in-process
    assert caption_rate(load_config(CONFIGS / "quickstart.yaml")) is None


def test_the_warning_names_the_actors_the_stage_needs(results):
    config = load_config(LLAMA)
    save_caption_rate(config.captions.synth, 20.0, "by a test")
    rate = caption_rate(config)
    consumed = consumed_captions_per_s(config, gen_rate=11.0, train_rate=4000.0)
    assert consumed == pytest.approx(min(48 * 11.0 / 4, 16 * 4000.0 / (4 * 9)))
    warning = check_caption_supply(config, rate, consumed)
    assert "caption synthesis is the bottleneck: 2 vllm actors write 40 captions/s" in warning
    assert "captions.synth.num_actors >= 7" in warning  # 132 captions/s / 20 per actor
    assert check_caption_supply(load_config(LLAMA, ["captions.synth.num_actors=7"]), rate, consumed) is None


def test_plan_leaves_the_language_model_gpus_out_of_the_split(results):
    config = load_config(LLAMA)
    text = plan(config, gpus=64, gpu_type="H100")
    assert "2 language-model actors hold 2 GPUs; 62 are left to split" in text
    assert "split of 62 GPUs" in text and "no measured rate" in text
    save_caption_rate(config.captions.synth, 10.0, "by a test")
    text = plan(config, gpus=64, gpu_type="H100")
    assert "captions: vllm backend at 10 captions/s per actor" in text
    assert "warning: caption synthesis is the bottleneck" in text
