"""Tiny SDXL, PixArt-alpha and SD3 pipelines stream into training on a real local Ray.

configs/tiny-diffusers.yaml (the real diffusers path) with its model replaced by one tiny family
built offline: the preflight reads the directory's model_index.json, the generator actors load it
with from_pretrained and the model's own settings (SD3 keeps its flow-matching scheduler), and a
train worker trains on its stream shard. One local Ray for the module. The tiny SD 1.5 pipeline
takes the same path in tests/system/test_learning.py (StableRep+ with the pipeline's tokenizer). A
generator actor that refuses its config ends the run at once.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from repo import CONFIGS, ROOT

from stablerep_ray.config import load_config
from stablerep_ray.generation import generator_class
from stablerep_ray.tools.tiny_pipeline import make_tiny_pipeline

pytestmark = [pytest.mark.usefixtures("local_ray"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]
STEPS = 2



@pytest.mark.parametrize("family", ["sdxl", "pixart", "sd3"])
def test_family_streams_into_training(tmp_path, family):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stablerep_ray.training.checkpoint import TRAINER_STATE_FILE
    from stablerep_ray.training.trainer import fit

    model = make_tiny_pipeline(tmp_path / family, family=family)
    config = load_config(CONFIGS / "tiny-diffusers.yaml", [
        f"output_dir={tmp_path}", f"name={family}", f"generator.model={model}", "generator.steps=2",
        f"captions.source={ROOT / 'data' / 'simulator_captions.txt'}", f"train.steps={STEPS}",
        f"train.checkpoint_every={STEPS}", "train.log_every=1", "train.max_failures=0", "train.image_grid_every=0",
        "train.num_workers=1",  # the families differ in the generator only: one worker is enough
    ])
    generator_class(config.generator).preflight(config.generator)

    result = fit(config)
    assert result.error is None, result.error
    state = torch.load(Path(result.checkpoint.path) / TRAINER_STATE_FILE, weights_only=False)
    assert state["step"] == STEPS
    events = EventAccumulator(str(config.run_dir / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss/total")]
    assert len(losses) == STEPS and np.isfinite(losses).all()


def test_a_generator_actor_that_refuses_the_config_ends_the_run_without_a_restart(tmp_path):
    """A check only the loaded pipeline can make (here the safety checker; for a Hub id the preflight
    could not fetch, all of them) fails every restart alike: Train's controller ends the run at the
    first failure (a ControllerError; restarts spent end in a WorkerGroupError), with the refusal."""
    from ray.train import ControllerError

    from stablerep_ray.config import ConfigError
    from stablerep_ray.training.trainer import fit

    model = make_tiny_pipeline(tmp_path / "sd15")
    config = load_config(CONFIGS / "tiny-diffusers.yaml", [
        f"output_dir={tmp_path}", "name=refused", f"generator.model={model}", "generator.safety_checker=true",
        f"captions.source={ROOT / 'data' / 'simulator_captions.txt'}", "train.max_failures=3", "train.num_workers=1",
    ])
    with pytest.raises(ControllerError) as failed:
        fit(config)  # no preflight: it would refuse this before Ray
    assert str(ConfigError.raised_in(failed.value)) == (
        f"generator.safety_checker: {model} has no safety checker; set it to false or use a pipeline that ships one")
