"""Re-running `stablerep-ray train` on a real run: it says it resumes (from the checkpoint Train
recorded), leaves a finished run alone, and refuses a changed config before doing anything.

One short real run (the quickstart, 1 worker, 1 step); tests/unit/training/test_resume.py covers the
rules on faked runs."""

from pathlib import Path

import pytest
import ray
from repo import QUICKSTART, ROOT

from stablerep_ray.cli import main
from stablerep_ray.config import load_config
from stablerep_ray.training.resume import check_resume

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMALL = ["eval.data=", "generator.captions_per_call=16", "generator.output_size=16", "model.image_size=16",
         "model.kwargs={patch_size: 8, depth: 1}", "train.batch_size=16", "train.num_workers=1",
         "cluster.num_cpus=4", "cluster.num_gpus=0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The quickstart trained to step 1 of 200 through the command; Ray stays up for the module."""
    out = tmp_path_factory.mktemp("resume")
    args = ["train", str(QUICKSTART), "--output-dir", str(out), *[a for s in SMALL for a in ("--set", s)]]
    assert main([*args, "--max-steps", "1"]) == 0
    yield out, args
    ray.shutdown()


def test_a_rerun_resumes_from_the_checkpoint_train_recorded(run, monkeypatch):
    out, _ = run
    monkeypatch.chdir(ROOT)
    config = load_config(QUICKSTART, [f"output_dir={out}", *SMALL])
    resume = check_resume(config, max_steps=2)
    assert (resume.step, resume.finished, resume.changed) == (1, False, ())
    assert Path(resume.checkpoint) == out / "quickstart" / "checkpoint_00000001"
    assert (Path(resume.checkpoint) / "model.pt").is_file()
    assert resume.lines(config, 2) == [f"resuming quickstart from step 1 ({resume.checkpoint})"]


def test_a_finished_run_is_left_alone(run, capsys, monkeypatch):
    out, args = run
    monkeypatch.chdir(ROOT)
    before = sorted(p.name for p in (out / "quickstart").iterdir())
    assert main([*args, "--max-steps", "1"]) == 0
    assert main([*args, "--set", "train.steps=1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "quickstart is already at step 1 (--max-steps 1); nothing to do (raise --max-steps or leave it out)",
        "quickstart already finished at step 1; nothing to do (raise train.steps or use a new name)",
    ]
    assert sorted(p.name for p in (out / "quickstart").iterdir()) == before


def test_a_changed_config_is_refused(run, capsys, monkeypatch):
    out, args = run
    monkeypatch.chdir(ROOT)
    saved = (out / "quickstart" / "config.yaml").read_text()
    assert main([*args, "--set", "train.base_lr=0.001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.base_lr: run 'quickstart' was trained with another config") and \
        "train.base_lr: 0.006 -> 0.001" in err
    assert (out / "quickstart" / "config.yaml").read_text() == saved
