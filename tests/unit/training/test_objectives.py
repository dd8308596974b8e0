"""Objectives as registered units, run through the one training step on the CPU."""

from __future__ import annotations

import math
import re

import pytest
import torch
from repo import QUICKSTART, ROOT

from stablerep_ray.config import ConfigError, load_config
from stablerep_ray.losses import multi_positive_loss
from stablerep_ray.training.objectives import OBJECTIVES
from stablerep_ray.training.step import TrainStep, synthetic_batch

TINY = ["model.kwargs.depth=1", "model.head_hidden_dim=32", "model.embed_dim=16", "model.text.width=32",
        "model.text.layers=1", "model.text.heads=2", "model.text.context_length=16", "train.batch_size=32",
        "synclr.local_size=16", "synclr.prototypes=64", "synclr.ibot_hidden_dim=32", "synclr.ibot_bottleneck_dim=16",
        "synclr.predictor_hidden_dim=32"]


def _config(objective: str):
    return load_config(QUICKSTART, [*TINY, f"train.objective={objective}"])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains_through_the_one_step(name):
    config = _config(name)
    torch.manual_seed(0)
    step = TrainStep.build(config, torch.device("cpu"), seed=0)
    before = [p.detach().clone() for p in step.model.parameters()]
    captions = config.captions_per_worker_step
    for i in range(2):
        result = step(synthetic_batch(config, captions, seed=i))
        assert torch.isfinite(result.loss)
        assert result.labels.shape[0] == captions * config.group_size == config.train.batch_size // 2
        assert any(k.startswith("loss/") for k in result.metrics)
        assert 0 < float(result.metrics["embed/spread"]) <= 1  # the console's collapse check reads it
        assert all(torch.isfinite(torch.as_tensor(v)) for v in result.metrics.values())
    assert step.step == 2
    changed = [not torch.equal(a, b) for a, b in zip(before, step.model.parameters(), strict=True)]
    assert all(changed), f"{name}: {changed.count(False)} parameter tensors did not train"
    restored = TrainStep.build(config, torch.device("cpu"))
    restored.load_state_dict(step.state_dict())
    assert restored.step == 2 and restored.scheduler.last_epoch == step.scheduler.last_epoch


def test_stablerep_step_minimises_the_multi_positive_loss_of_its_views():
    config = _config("stablerep")
    torch.manual_seed(0)
    step = TrainStep.build(config, torch.device("cpu"), seed=3)
    batch = synthetic_batch(config, config.captions_per_worker_step)
    generator = torch.Generator().manual_seed(3)
    inputs, labels = step.objective.views(torch.from_numpy(batch.images), torch.from_numpy(batch.caption_ids),
                                          step.augment, generator)
    with torch.no_grad():
        expected = multi_positive_loss(step.model(inputs, step.objective.head_chunks), labels,
                                       config.train.temperature)
    assert torch.allclose(step(batch).loss, expected, atol=1e-5)


def test_simclr_positives_are_the_two_views_of_one_image():
    config = _config("simclr")
    assert (config.images_drawn_per_group, config.group_size) == (1, 2)
    step = TrainStep.build(config, torch.device("cpu"))
    batch = synthetic_batch(config, 4)
    inputs, labels = step.objective.views(torch.from_numpy(batch.images), torch.from_numpy(batch.caption_ids),
                                          step.augment, step.generator)
    assert inputs.shape[0] == 8 and labels.tolist() == [0, 1, 2, 3] * 2


def test_unknown_objective_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"train\.objective: unknown objective 'byol'.*simclr"):
        _config("byol")


# The loop, planner, sweeps and benchmarks ask the objective class, never its name.
_NAME_TEST = re.compile(
    r"objective\s*(==|!=)|objective\s+in\s+[(\[{]|(==|!=)\s*['\"](" + "|".join(OBJECTIVES) + r")['\"]"
)


def test_no_code_outside_the_registry_branches_on_an_objective_name():
    registry = ROOT / "stablerep_ray" / "training" / "objectives"
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in ("stablerep_ray", "bench", "jobs")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if registry not in path.parents
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _NAME_TEST.search(line)
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_no_batchnorm_batch_holds_two_images_of_one_caption(name):
    """The head normalises one view of every caption at a time, as the authors' per-view SyncBN (or
    has no batch statistics at all: SynCLR's LayerNorm heads)."""
    config = _config(name)
    step = TrainStep.build(config, torch.device("cpu"))
    if not any(isinstance(m, torch.nn.BatchNorm1d) for m in step.model.modules()):
        assert any(isinstance(m, torch.nn.LayerNorm) for m in step.model.head.modules())
        return
    seen = []
    for module in step.model.head.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    batch = synthetic_batch(config, config.captions_per_worker_step)
    inputs, labels = step.objective.views(torch.from_numpy(batch.images), torch.from_numpy(batch.caption_ids),
                                          step.augment, step.generator)
    for chunk in labels.chunk(step.objective.head_chunks):
        assert len(chunk.unique()) == len(chunk), "two positives in one BatchNorm batch"
    step(batch)
    assert seen and set(seen) == {config.captions_per_worker_step}


def test_stablerep_plus_recovers_a_logit_scale_pushed_past_ln_100():
    config = _config("stablerep_plus")
    step = TrainStep.build(config, torch.device("cpu"))
    model = step.model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000))
    step(synthetic_batch(config, config.captions_per_worker_step))
    assert model.logit_scale.grad.item() != 0, "the scale past the cap still gets a gradient"
    assert model.logit_scale.item() <= math.log(100) + 1e-6, "clamped back in place after the step"
    for i in range(3):
        result = step(synthetic_batch(config, config.captions_per_worker_step, seed=i + 1))
        assert model.logit_scale.grad.item() != 0
    assert 0 <= model.logit_scale.item() <= math.log(100) + 1e-6
    assert result.metrics["logit_scale"] <= 100 + 1e-4


def test_stablerep_plus_contrasts_a_projection_of_the_cls_feature_with_clip_initialised_text():
    config = _config("stablerep_plus")
    torch.manual_seed(0)
    model = TrainStep.build(config, torch.device("cpu")).model
    assert model.image_to_text.in_features == model.encoder.num_features
    assert model.image_to_text.out_features == model.text.projection.out_features == config.model.text.embed_dim
    assert model.text.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.text.positional_embedding.std().item() == pytest.approx(0.01, rel=0.2)
