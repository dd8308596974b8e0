"""The quickstart's console and TensorBoard, from one short run of the real command (output to a file,
as in CI or `ray job logs`), and `stablerep-ray eval` of its checkpoint; a run stopped by Ctrl-C; a
config that a generator actor refuses (its one line).

Console: at most 100 lines, at least 90 % of them carrying information (no progress-bar redraws, blank
cursor lines or raw report dumps), one progress line per log interval, and the summary last.
TensorBoard: the kNN of the initial model at step 0, the loss averaged over ranks, hparams in the
run's own directory, and no resume repetition on a run that never resumed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from repo import QUICKSTART, ROOT
from terminal import DURATION, stop_once

STEPS = 30  # 3 log intervals of 10 steps; kNN at steps 0, 15 and 30
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def noise(line: str) -> bool:
    """A line that tells the reader nothing: blank, a progress-bar (re)draw, cursor movement, a raw dump."""
    text = ANSI_COLOUR.sub("", line)
    return (not text.strip() or "\x1b[A" in text or "\r" in text or re.search(r"\d+%\|", text) is not None
            or "TrainingReport(" in text)


def cli(*args: str, log: Path) -> int:
    with open(log, "w") as out:
        return subprocess.run([sys.executable, "-m", "stablerep_ray.cli", *args], cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, timeout=900).returncode


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("console")
    log = out / "train.log"
    start = time.monotonic()
    rc = cli("train", str(QUICKSTART), "--output-dir", str(out), "--max-steps", str(STEPS),
             "--set", "eval.every=15", "--set", "train.max_failures=0", log=log)
    seconds = time.monotonic() - start
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(["", *lines, f"quickstart --max-steps {STEPS}: {len(lines)} console lines, {seconds:.0f}s"]))
    return SimpleNamespace(rc=rc, lines=lines, run_dir=out / "quickstart")


def test_console_is_short_informative_and_ends_with_the_summary(run):
    text = "\n".join(run.lines)
    assert run.rc == 0, text[-6000:]
    noisy = [line for line in run.lines if noise(line)]
    assert len(run.lines) <= 100, text
    assert len(noisy) <= 0.1 * len(run.lines), noisy
    assert not [line for line in run.lines if "execution finished" in line]  # Ray Data's end of stream
    progress = [line for line in run.lines if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["10/30", "20/30", "30/30"], progress
    assert re.fullmatch(r"step 30/30  loss \d+\.\d{3}  \d+ img/s  wait \d+%  knn 0\.\d{3}", progress[-1])
    summary = run.lines[-5:]
    assert [line.split(":")[0] for line in summary] == ["done", "images", "final", "checkpoint", "tensorboard"]
    assert summary[0].startswith(f"done: step {STEPS}/200 in ")
    assert f"{STEPS * 128:,} consumed ({STEPS} steps x 128)" in summary[1]
    assert summary[3] == f"checkpoint: {run.run_dir / f'checkpoint_{STEPS:08d}'}"


def test_tensorboard_has_the_baseline_rank_mean_loss_and_hparams(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert run.rc == 0
    events = EventAccumulator(str(run.run_dir / "tensorboard"))
    events.Reload()
    knn = events.Scalars("eval/knn_top1")
    assert [e.step for e in knn] == [0, 15, 30]  # step 0: the initial model, before any step
    assert [e.step for e in events.Scalars("loss/total")] == [10, 20, 30]
    saved = json.loads((run.run_dir / f"checkpoint_{STEPS:08d}" / "metrics.json").read_text())
    # the checkpoint's report holds rank 0's own loss; TensorBoard's is the mean over both ranks
    assert events.Scalars("loss/total")[-1].value != pytest.approx(saved["loss"], abs=1e-6)
    assert saved["stream/rows_repeated_on_resume"] == 0  # never resumed
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.objective"].string_value == "stablerep"
    assert start.hparams["train.batch_size"].number_value == 128


@pytest.mark.parametrize("via", ["in-process", "ray"])
def test_eval_prints_scores_and_where_they_went(via, run, tmp_path):
    """Four lines and nothing else, also through Ray's actor pool: no start-up lines, and not the error-level
    line the pool's actors raise in the process that executes the dataset (ray-project/ray#53727)."""
    assert run.rc == 0
    log = tmp_path / "eval.log"
    checkpoint = run.run_dir / f"checkpoint_{STEPS:08d}"
    data = "simulator:color" if via == "in-process" else "simulator:color:40"  # each its own feature cache
    assert cli("eval", "--checkpoint", str(checkpoint), "--data", data, "--output", str(tmp_path),
               *(["--in-process"] if via == "in-process" else []), log=log) == 0
    lines = log.read_text().splitlines()
    print("\n".join(["", *lines]))
    assert re.fullmatch(r"eval: knn_top1 0\.\d{4}", lines[0]), lines
    assert f"features {via};" in lines[1]
    assert lines[2:] == [f"results: {tmp_path}/results.json", f"tensorboard: tensorboard --logdir {tmp_path}"]


def test_ctrl_c_says_how_far_the_run_got_and_that_the_same_command_resumes(tmp_path, monkeypatch):
    """SIGINT to the command's process group, as a terminal's Ctrl-C sends it: exit status 130 and, in
    place of a traceback or silence, the last step, the last checkpoint and what rerunning does."""
    from stablerep_ray.config import load_config
    from stablerep_ray.storage import latest_checkpoint
    from stablerep_ray.training.resume import check_resume

    log, overrides = tmp_path / "train.log", ["eval.data=", "train.log_every=5", "train.checkpoint_every=5"]
    args = ["train", str(QUICKSTART), "--output-dir", str(tmp_path), *[a for s in overrides for a in ("--set", s)]]
    config = load_config(QUICKSTART, [f"output_dir={tmp_path}", *overrides])
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stablerep_ray.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        # A checkpoint is committed a controller poll after its step is logged: stop once one is.
        rc = stop_once(proc, log, "step 10/200", ready=lambda: latest_checkpoint(config) is not None)
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(["", *lines]))
    assert rc == 130, lines[-20:]
    run_dir = tmp_path / "quickstart"
    assert re.fullmatch(rf"interrupted after {DURATION}: last logged step (10|15|20)/200", lines[-3]), lines[-3:]
    checkpoint = re.fullmatch(rf"checkpoint: ({run_dir}/checkpoint_(\d+)) \(step (\d+)\); the same command "
                              r"resumes from it", lines[-2])
    assert checkpoint and int(checkpoint[2]) == int(checkpoint[3]) >= 5, lines[-2]
    assert lines[-1] == f"tensorboard: tensorboard --logdir {run_dir / 'tensorboard'}"
    monkeypatch.chdir(ROOT)
    resume = check_resume(config)
    assert (resume.checkpoint, resume.step) == (checkpoint[1], int(checkpoint[3]))


@pytest.mark.parametrize("via", ["ray", "in-process"])
def test_sigterm_ends_eval_like_ctrl_c(via, run, tmp_path):
    """SIGTERM to the eval driver while features stream, as `ray job stop` sends it: one line and status
    130, as for Ctrl-C, in place of Ray's exit with status 15 and its C++ stack dump (through Ray) or a
    silent death by the signal (in process)."""
    assert run.rc == 0
    log = tmp_path / "eval.log"
    checkpoint = run.run_dir / f"checkpoint_{STEPS:08d}"
    args = ["eval", "--checkpoint", str(checkpoint), "--data", "simulator:color:1000", "--output", str(tmp_path),
            *(["--in-process"] if via == "in-process" else [])]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "stablerep_ray.cli", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        rc = stop_once(proc, log, "features: ", how="sigterm")
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(["", *lines]))
    assert rc == 130, lines[-20:]
    assert lines[-1] == "interrupted: stablerep-ray eval stopped before it finished", lines[-5:]
    assert not [line for line in lines if "SIGTERM" in line or "Traceback" in line], lines
    assert re.fullmatch(r"features: [\d,]+/16,000 images .*", lines[0]), lines
    assert not (tmp_path / "results.json").exists()


def test_a_config_a_generator_actor_refuses_ends_in_its_one_line(tmp_path, monkeypatch):
    """A Hub id the driver could not check (no Hub, no cache: a warning) that no node can load: the
    actor's refusal is the command's last line, status 2, in place of each Ray process's traceback and
    Train's restarts."""
    model = "stablerep-ray-tests/no-such-pipeline"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the same outcome with or without a network, here and in CI
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    log = tmp_path / "train.log"
    rc = cli("train", str(ROOT / "configs" / "tiny-diffusers.yaml"), "--output-dir", str(tmp_path),
             "--set", f"generator.model={model}", log=log)
    lines = log.read_text(errors="replace").splitlines()
    print("\n".join(["", *lines]))
    assert rc == 2 and len(lines) <= 6 and not [line for line in lines if "Traceback" in line], lines
    assert any(line.startswith(f"warning: generator.model: {model} is not checked before start") for line in lines)
    assert re.fullmatch(
        rf"error: generator\.model: {model} is neither a directory nor in the Hugging Face cache of node \S+, and "
        rf"the Hub cannot be reached from there \(HF_HUB_OFFLINE is set\); download it where the Hub is reachable "
        rf"\(`hf download {model}`\) into a cache every node reads \(HF_HOME\), or give a directory",
        lines[-1]), lines[-1]
