"""``model.grad_checkpointing``: the same training step, with each block's activations recomputed in the
backward pass instead of kept; refused in one line for a timm model without it; may change on resume."""

import pytest
import torch
from repo import CONFIGS, QUICKSTART

from stablerep_ray.config import ConfigError, load_config
from stablerep_ray.models import create_encoder
from stablerep_ray.training.resume import may_change
from stablerep_ray.training.step import TrainStep, synthetic_batch


def counted(forward, calls: list):
    def run(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    return run


def one_step(config) -> tuple[TrainStep, float, int]:
    """A training step from fixed seeds: the step, its loss and how many times the blocks ran."""
    torch.manual_seed(0)
    step = TrainStep.build(config, torch.device("cpu"), seed=1)
    calls = []
    for block in step.model.encoder.blocks:  # counted in forward itself: torch skips hooks when it recomputes
        block.forward = counted(block.forward, calls)
    result = step(synthetic_batch(config, config.captions_per_worker_step, seed=2))
    return step, result.loss.item(), len(calls)


@pytest.mark.parametrize("config_file", [QUICKSTART, CONFIGS / "synclr-quickstart.yaml"], ids=["stablerep", "synclr"])
def test_a_checkpointed_step_recomputes_the_blocks_and_learns_the_same(config_file):
    """StableRep's plain forward and SynCLR's masked multi-crop one (its own token path; the EMA teacher
    runs without gradients, so it is not recomputed)."""
    overrides = ["train.batch_size=24", "train.num_workers=1"]
    kept, kept_loss, kept_calls = one_step(load_config(config_file, overrides))
    recomputed, loss, calls = one_step(load_config(config_file, [*overrides, "model.grad_checkpointing=true"]))
    depth = len(kept.model.encoder.blocks)
    student_passes = 1 + (kept.config.synclr.local_crops > 0 if kept.config.train.objective == "synclr" else 0)
    assert calls - kept_calls == student_passes * depth  # each block once more per student pass
    assert loss == pytest.approx(kept_loss, rel=1e-6)
    for (name, a), b in zip(kept.model.named_parameters(), recomputed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_timm_model_without_it_is_refused_in_one_line():
    config = load_config(QUICKSTART, ["model.name=convit_tiny", "model.kwargs={}", "model.grad_checkpointing=true"])
    with pytest.raises(ConfigError, match=r"^model\.grad_checkpointing: timm's convit_tiny does not support it; "
                                          r"set it to false$"):
        create_encoder(config.model)


def test_a_resumed_run_may_turn_it_on():
    assert may_change("model.grad_checkpointing") and not may_change("model.name")
