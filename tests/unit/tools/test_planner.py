"""Planner: the cost-model split math, the chosen split, edge cases and its warnings (balance, call
length, generated images never trained on).

Fast and Ray-free: rates come from the FLOP estimate or from small JSON tables written to tmp_path.
"""

import json

import pytest
from repo import CONFIGS

from stablerep_ray.config import load_config
from stablerep_ray.runtime import Need
from stablerep_ray.tools.planner import (
    WAIT_TARGET,
    Budget,
    best_split,
    check_balance,
    check_call_length,
    check_image_use,
    cost_model_ratio,
    estimate_rates,
    evaluate_split,
    fingerprint,
    generation_tflop,
    generators_per_trainer,
    is_sd_family,
    plan,
    rates_for,
)

PAPER = CONFIGS / "paper-vitb16-sd15.yaml"
QUICKSTART = CONFIGS / "quickstart.yaml"


def paper(*overrides):
    return load_config(PAPER, list(overrides))


@pytest.fixture
def no_tables(tmp_path, monkeypatch):
    """An empty results directory: no measured tables, so the estimate is used."""
    monkeypatch.setenv("STABLEREP_BENCH_RESULTS", str(tmp_path))
    return tmp_path


def test_flop_model_matches_the_cost_model():
    assert generation_tflop(50) == pytest.approx(83, abs=0.6)
    assert generation_tflop(25) == pytest.approx(43, abs=0.6)
    assert generation_tflop(20) == pytest.approx(35, abs=0.6)
    assert generation_tflop(20, guidance=False) == pytest.approx(0.805 * 20 + 2.5)
    assert generation_tflop(20, resolution=256) == pytest.approx(generation_tflop(20) / 4)
    # one generated image costs ~330x (20 steps) to ~790x (50 steps) one training view
    assert generation_tflop(20) / 0.105 == pytest.approx(330, rel=0.01)
    assert generation_tflop(50) / 0.105 == pytest.approx(790, rel=0.01)


def test_cost_model_ratio_is_37_to_1_at_20_steps_and_reuse_9():
    assert cost_model_ratio(steps=20, reuse=9) == pytest.approx(37, rel=0.02)
    # pure streaming needs hundreds of generator GPUs per trainer GPU
    assert cost_model_ratio(steps=20, reuse=1) == pytest.approx(330, rel=0.01)
    # n images generated per caption, m used per serve: n/m more generation per trained image
    assert cost_model_ratio(20, 9, images_per_caption=10, group_size=6) == pytest.approx(37 * 10 / 6, rel=0.02)


def test_estimated_rates_give_the_cost_model_ratio(no_tables):
    config = paper("generator.images_per_caption=6")  # n = m: each generated image used R times
    rates = estimate_rates(config, "H100")
    assert rates.estimate and "ESTIMATE" in rates.generator_source and "ESTIMATE" in rates.trainer_source
    k = generators_per_trainer(rates.generator, rates.trainer, 6, 6, 9)
    assert k == pytest.approx(cost_model_ratio(20, 9), rel=1e-6)
    assert k == pytest.approx(37, rel=0.02)
    # peak table: A100 is ~3.2x slower on both sides, the ratio does not change
    a100 = estimate_rates(config, "A100")
    assert rates.generator / a100.generator == pytest.approx(990 / 312)
    assert generators_per_trainer(a100.generator, a100.trainer, 6, 6, 9) == pytest.approx(k)


def test_plan_splits_38_gpus_1_to_37(no_tables):
    config = paper("generator.images_per_caption=6", "stream.reuse=9")  # n = m, R = 9: k = 37
    text = plan(config, gpus=38, gpu_type="H100")
    assert "1 trainer worker + 37 generator actors" in text
    assert "set: generator.num_actors=37 train.num_workers=1" in text
    assert "ESTIMATE" in text and "bottleneck: training" in text
    # twice the budget: two trainer workers
    assert "2 trainer workers + 74 generator actors" in plan(config, gpus=76, gpu_type="H100")


def test_one_gpu_shared_by_a_trainer_and_a_generator(no_tables):
    """Fractional GPUs (train.gpus_per_worker, generator.num_gpus_per_actor): both fit on one GPU, the
    reservation adds up to it, and the planner counts each at its share of the GPU's rate."""
    shared = paper("train.num_workers=1", "train.gpus_per_worker=0.5", "generator.num_actors=1",
                   "generator.num_gpus_per_actor=0.5", "stream.buffer_mb=0")
    need = Need.of(shared)
    assert need.gpus == 1.0 and "1 train workers x (8 CPU, 0.5 GPU)" in need.describe(shared)
    text = plan(shared, gpus=1, gpu_type="H100")
    assert "split of 1 GPUs: 1 trainer worker + 1 generator actor" in text
    whole = plan(paper("train.num_workers=1", "stream.buffer_mb=0"), gpus=1, gpu_type="H100")
    assert "1 GPUs are too few: one trainer worker (1 GPU) and one generator actor (1 GPU) need 2" in whole


def test_best_split_keeps_wait_under_target():
    # generator 1 img/s per actor, trainer 37 img/s, n = m = 1, R = 1: k = 37
    budget = Budget(total=100, trainer_cost=1, actor_cost=1, unit="GPU")
    ok, best = best_split(budget, actor_rate=1.0, worker_rate=37.0, n=1, group_size=1, reuse=1)
    assert ok.wait < WAIT_TARGET
    assert (ok.trainers, ok.actors) == (2, 98)  # 3 trainers need 105.45 actors
    assert ok.trained_images_per_s == pytest.approx(74)
    assert ok.generator_idle == pytest.approx(1 - 74 / 98)
    # fractional actors: half a GPU each, each half as fast
    half = Budget(total=100, trainer_cost=1, actor_cost=0.5, unit="GPU")
    ok_half, _ = best_split(half, actor_rate=0.5, worker_rate=37.0, n=1, group_size=1, reuse=1)
    assert (ok_half.trainers, ok_half.actors) == (2, 196)


def test_evaluate_split_accounts_for_reuse_and_group_sizes():
    split = evaluate_split(trainers=2, actors=3, actor_rate=10.0, worker_rate=100.0, n=5, group_size=4, reuse=2)
    # supply 3*10/5 = 6 captions/s; demand 2*100/(4*2) = 25 captions/s
    assert split.captions_per_s == pytest.approx(6)
    assert split.generated_images_per_s == pytest.approx(30)
    assert split.trained_images_per_s == pytest.approx(48)
    assert split.wait == pytest.approx(1 - 6 / 25)
    assert split.generator_idle == 0


def test_too_few_gpus(no_tables):
    config = paper()
    assert "1 GPUs are too few" in plan(config, gpus=1, gpu_type="H100")
    text = plan(config, gpus=16, gpu_type="H100")
    assert "too few to keep the trainer's data-wait under 5%" in text
    # k = 36.7 at n=10, m=6, R=15: 1 trainer + ceil(0.95 * 36.7) = 35 generators
    assert "Needs >= 36 GPUs" in text
    assert "stream.reuse >= 35" in text
    assert "bottleneck: generation" in text


def test_plan_flags_the_shipped_paper_split(no_tables):
    text = plan(paper(), gpus=128, gpu_type="H100")
    assert "3 trainer workers + 125 generator actors" in text
    assert "current config (96 actors, 32 workers): generation starves the trainer" in text


def test_check_balance_warnings():
    config = paper("generator.num_actors=37", "train.num_workers=1", "generator.images_per_caption=6",
                   "train.batch_size=6", "stream.reuse=9")
    # 37 actors x 1 img/s vs one worker needing 37*... : k = 37 exactly when train_rate = 37 * 6 * 9 / 6
    balanced = 37 * 9.0
    assert check_balance(config, gen_rate=1.0, train_rate=balanced) is None
    starving = check_balance(config, gen_rate=1.0, train_rate=balanced * 2)
    assert starving.startswith("generation starves the trainer") and "~50%" in starving
    assert "generator.num_actors >= 71" in starving and "stream.reuse >= 18" in starving
    idle = check_balance(config, gen_rate=1.0, train_rate=balanced / 2)
    assert idle.startswith("generators idle") and "~50%" in idle and "19 actors suffice" in idle
    # a few % of slack is not worth a warning
    assert check_balance(config, gen_rate=1.0, train_rate=balanced * 0.97) is None
    assert check_balance(config, gen_rate=1.0, train_rate=balanced * 1.03) is None


def test_mixed_devices_and_unknown_configs(no_tables):
    mixed = paper("generator.num_gpus_per_actor=0")
    assert "disagree" in plan(mixed, gpus=8)
    text = plan(load_config(QUICKSTART), gpus=8)
    assert "runs on CPUs" in text and "--measure" in text and "no rate table" in text


def test_sd_family_detection(tmp_path):
    config = paper()
    assert is_sd_family(config.generator)
    for model, expected in [("stabilityai/stable-diffusion-2-1", True), ("CompVis/stable-diffusion-v1-4", True),
                            ("stabilityai/stable-diffusion-xl-base-1.0", False),
                            ("stabilityai/stable-diffusion-3-medium", False)]:
        assert is_sd_family(config.generator.model_copy(update={"model": model})) is expected, model
    local = tmp_path / "pipe"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64], "cross_attention_dim": 32}))
    assert not is_sd_family(config.generator.model_copy(update={"model": str(local)}))
    (local / "unet" / "config.json").write_text(
        json.dumps({"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768}))
    assert is_sd_family(config.generator.model_copy(update={"model": str(local)}))


def test_gpu_table_is_used_and_rescaled(tmp_path):
    (tmp_path / "gpu.json").write_text(json.dumps({
        "device": "NVIDIA H100 80GB HBM3",
        "sd15": [{"steps": 50, "batch": 8, "images_per_s": 5.0}, {"steps": 50, "batch": 16, "images_per_s": 6.0}],
        "vit_b16": [{"batch": 256, "images_per_s": 3000.0}],
    }))
    rates = rates_for(paper(), results=tmp_path)
    assert not rates.estimate and "bench.gpu" in rates.generator_source and "H100" in rates.trainer_source
    # best row (6 img/s at 50 steps) rescaled to the config's 20 steps by F(50)/F(20)
    assert rates.generator == pytest.approx(6.0 * generation_tflop(50) / generation_tflop(20))
    assert rates.trainer == pytest.approx(3000.0)


def test_saved_measurement_is_reused(tmp_path):
    config = load_config(QUICKSTART)
    from stablerep_ray.tools.planner import _device_name

    key = fingerprint(config, _device_name(False))
    (tmp_path / "planner-rates.json").write_text(json.dumps(
        {key: {"config": "quickstart", "generator": 1500.0, "trainer": 60.0, "time": "then"}}))
    rates = rates_for(config, results=tmp_path)
    assert rates.generator == 1500.0 and "measured" in rates.generator_source
    text = plan(config, gpus=8, results=tmp_path)
    # trainer worker needs 60/(4*1) = 15 captions/s = 120 images/s: 0.08 actors; 7 workers + 1 actor
    assert "7 trainer workers + 1 generator actor " in text
    assert "bottleneck: training" in text
    # a different config (other batch per worker) does not match the saved entry
    other = load_config(QUICKSTART, ["train.batch_size=256"])
    assert rates_for(other, results=tmp_path) is None


def test_short_generator_calls_are_flagged(tmp_path):
    """A call of 32 captions x 8 images at 2,400 images/s takes ~107 ms: Ray Data's per-block cost shows."""
    short = load_config(QUICKSTART, ["generator.captions_per_call=32"])
    warning = check_call_length(short, gen_rate=2400.0)
    assert warning.startswith("short generator calls") and "~107 ms" in warning
    assert "generator.captions_per_call >= 256" in warning  # 0.5 s x 2400 / 8 = 150, next power of 2
    assert check_call_length(load_config(QUICKSTART), gen_rate=2400.0) is None  # the shipped 256
    assert check_call_length(paper(), gen_rate=6.0) is None  # SD calls take seconds

    from stablerep_ray.tools.planner import _device_name

    key = fingerprint(short, _device_name(False))
    (tmp_path / "planner-rates.json").write_text(json.dumps(
        {key: {"config": "quickstart", "generator": 2400.0, "trainer": 60.0, "time": "then"}}))
    assert "and short generator calls" in plan(short, gpus=8, results=tmp_path)


def test_generated_images_never_trained_on_are_flagged(no_tables):
    """Each serve draws a fresh m of n: (1 - m/n)^R of the images are never drawn. The paper's n = 10,
    m = 6 at R = 15 uses them all; served once, 40 % of the generation is thrown away."""
    assert check_image_use(paper()) is None
    once = check_image_use(paper("stream.reuse=1"))
    assert once.startswith("generator.images_per_caption: 40% of the generated images are never trained on")
    assert "set it to 6, or stream.reuse to 3 or more" in once  # 0.4^3 = 6.4 % < 10 %
    assert "16%" in check_image_use(paper("stream.reuse=2"))
    assert check_image_use(paper("stream.reuse=1", "generator.images_per_caption=6")) is None
    simclr = paper("stream.reuse=1", "generator.images_per_caption=6", "train.objective=simclr")
    assert "83% of" in check_image_use(simclr) and "set it to 1," in check_image_use(simclr)  # one image a serve
    assert check_image_use(load_config(QUICKSTART)) is None  # the simulator's images cost nothing
    assert check_image_use(load_config(CONFIGS / "tiny-diffusers.yaml")) is None  # the shipped configs
    assert "and generator.images_per_caption: 40%" in plan(paper("stream.reuse=1"), gpus=64)


def test_plan_prints_the_authors_peak_lr_of_the_paper_config():
    """2e-4 x 8256 / 256 / 2: the released code's lr scaling (docs/paper-recipe.md)."""
    assert "peak lr 3.225e-3 (train.lr_scaling=authors" in plan(paper(), gpus=128)
    assert "peak lr 6.450e-3 (train.lr_scaling=linear" in plan(paper("train.lr_scaling=linear"), gpus=128)
