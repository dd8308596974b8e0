"""Re-running a run, decided before Ray starts: resume, finished, refused config change, kept configs.

A run is faked by what a Train run leaves behind: its config.yaml and Train's checkpoint snapshot
(tests/system/test_resume.py does the same on a real run)."""

import json

import pytest
import yaml
from repo import QUICKSTART

from stablerep_ray.cli import main
from stablerep_ray.config import Config, load_config
from stablerep_ray.storage import TRAIN_SNAPSHOT
from stablerep_ray.training.resume import MAY_CHANGE, check_resume, may_change, save_run_config


def fake_run(tmp_path, step):
    config = load_config(QUICKSTART, [f"output_dir={tmp_path}"])
    save_run_config(config)
    latest = {"checkpoint_dir_name": f"checkpoint_{step:08d}", "metrics": {"step": step}}
    snapshot = {"latest_checkpoint_result": latest}
    (config.run_dir / TRAIN_SNAPSHOT).write_text(json.dumps(snapshot))
    return config


def train(tmp_path, *args):
    return main(["train", str(QUICKSTART), "--output-dir", str(tmp_path), *args])


@pytest.mark.parametrize("step,args,message", [
    (200, [], "quickstart already finished at step 200; nothing to do (raise train.steps or use a new name)"),
    (4, ["--max-steps", "4"], "quickstart is already at step 4 (--max-steps 4); nothing to do"),
])
def test_a_finished_run_says_so_and_starts_nothing(tmp_path, capsys, step, args, message):
    import ray

    config = fake_run(tmp_path, step)
    before = sorted(p.name for p in config.run_dir.iterdir())
    assert train(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert out.startswith(message) and "training:" not in out, out
    assert not ray.is_initialized()
    assert sorted(p.name for p in config.run_dir.iterdir()) == before


def test_a_changed_config_is_refused_with_every_differing_key(tmp_path, capsys):
    import ray

    config = fake_run(tmp_path, 4)
    saved = (config.run_dir / "config.yaml").read_text()
    assert train(tmp_path, "--set", "train.base_lr=0.001", "--set", "model.kwargs.depth=3",
                 "--set", "train.log_every=5") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model.kwargs.depth: run 'quickstart' was trained with"), err
    assert "model.kwargs.depth: 4 -> 3, train.base_lr: 0.006 -> 0.001;" in err[0]
    assert "train.log_every" not in err[0] and "--allow-config-change" in err[0] and "step 4" in err[0]
    assert not ray.is_initialized()
    assert (config.run_dir / "config.yaml").read_text() == saved


def test_operational_changes_and_more_steps_resume_and_are_reported(tmp_path):
    fake_run(tmp_path, 4)
    changed = load_config(QUICKSTART, [f"output_dir={tmp_path}/", "train.steps=400", "cluster.num_cpus=6",
                                       "train.log_every=5", "generator.num_actors=2"])
    resume = check_resume(changed, max_steps=None)
    assert (resume.step, resume.finished) == (4, False)
    assert resume.checkpoint == f"{tmp_path}/quickstart/checkpoint_00000004"
    assert resume.lines(changed) == [
        f"resuming quickstart from step 4 ({tmp_path}/quickstart/checkpoint_00000004)",
        "train.steps 200 -> 400: the cosine schedule is re-stretched to the new length from step 4 on",
        f"config changes on resume: cluster.num_cpus: 8 -> 6, generator.num_actors: 1 -> 2, "
        f"output_dir: '{tmp_path}' -> '{tmp_path}/', train.log_every: 10 -> 5",
    ]


def test_allowed_change_keeps_the_config_the_run_was_trained_with(tmp_path):
    config = fake_run(tmp_path, 4)
    old = (config.run_dir / "config.yaml").read_text()
    changed = load_config(QUICKSTART, [f"output_dir={tmp_path}", "train.base_lr=0.001"])
    resume = check_resume(changed, allow_config_change=True)
    assert resume.changed == (("train.base_lr", 0.006, 0.001),) and not resume.finished
    kept = save_run_config(changed)
    assert kept.name.startswith("config.") and kept.name != "config.yaml" and kept.read_text() == old
    assert yaml.safe_load((config.run_dir / "config.yaml").read_text())["train"]["base_lr"] == 0.001
    assert save_run_config(changed) is None, "the same config again archives nothing"
    assert check_resume(changed).changed == ()


def test_a_run_without_a_checkpoint_is_new(tmp_path):
    config = load_config(QUICKSTART, [f"output_dir={tmp_path}"])
    resume = check_resume(config)
    assert (resume.step, resume.checkpoint, resume.finished, resume.lines(config)) == (0, "", False, [])


def test_every_key_that_may_change_exists():
    """A renamed key must not silently drop out of (or linger in) the list of resumable changes."""
    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield f"{prefix}{name}"
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                yield from keys(field.annotation, f"{prefix}{name}.")

    known = set(keys(Config))
    assert set(MAY_CHANGE) <= known, set(MAY_CHANGE) - known
    assert may_change("cluster.storage_path") and may_change("generator.label_selector.ray.io/node-group")
    assert not may_change("train.num_workers") and not may_change("train.steps_extra")


def test_a_resume_takes_lr_and_betas_from_the_new_config():
    """The optimiser's and schedule's state dicts carry the old peak lr and betas; --allow-config-change
    resumes with the new ones, from the checkpoint's step."""
    import torch

    from stablerep_ray.training.optim import lr_multiplier
    from stablerep_ray.training.step import TrainStep, synthetic_batch

    tiny = ["model.kwargs={patch_size: 8, depth: 1}", "train.warmup_steps=2", "train.steps=10"]
    old = load_config(QUICKSTART, tiny)
    new = load_config(QUICKSTART, [*tiny, "train.base_lr=0.012", "train.betas=[0.8, 0.9]", "train.steps=20"])
    first = TrainStep.build(old, torch.device("cpu"))
    for seed in range(3):
        first(synthetic_batch(old, old.captions_per_worker_step, seed))
    resumed = TrainStep.build(new, torch.device("cpu"))
    resumed.load_state_dict(first.state_dict())
    assert resumed.scheduler.base_lrs == [new.peak_lr] * 2 and new.peak_lr == 2 * old.peak_lr
    for group in resumed.optimizer.param_groups:
        assert group["lr"] == new.peak_lr * lr_multiplier(3, new) and group["betas"] == (0.8, 0.9)
    resumed(synthetic_batch(new, new.captions_per_worker_step, 3))
    assert resumed.scheduler.get_last_lr()[0] == pytest.approx(new.peak_lr * lr_multiplier(4, new))
