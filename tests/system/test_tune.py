"""Ray Tune sweeps: `stablerep-ray tune` (stablerep_ray/sweep/).

* The sweep is planned and checked before Ray starts: swept keys exist, the global image batch is the
  same for every m, every report carries the metric, one trial fits the cluster (else the command
  exits within seconds saying what a trial needs).
* Outputs (results table, summary, plot, best config) are computed from Tune's results.
* On a real Ray head (`ray start --head --block`, our own instance): a 4-trial sweep (guidance
  {1, 8} x m {2, 4}) on a cluster sized for exactly 2 trials runs 2 at a time; its driver is
  SIGKILLed after the first trial finished and `--resume` finishes the rest without rerunning it;
  every trial's TensorBoard holds the kNN scalar, the plot, the table and best-config.yaml exist.
  Ctrl-C (SIGINT) ends a sweep with its outputs, exit status 130 and the `--resume` command.

Set STABLEREP_TUNE_TESTS=unit to skip the Ray part.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from local_head import LocalHead, clean_env
from repo import ROOT
from terminal import stop_once

from stablerep_ray.config import ConfigError, load_config
from stablerep_ray.sweep import (
    ATTEMPTS_FILE,
    DRAW,
    SEED,
    budget_steps,
    concurrency,
    plan_sweep,
    trial_config,
    trial_statuses,
    write_outputs,
)

SWEEP = ROOT / "configs" / "sweep-quickstart.yaml"

# Tiny trials: 1 train worker + 1 generator actor + 1 reader + 0.5 driver = 3.5 CPUs.
TINY = [
    "train.num_workers=1", "train.batch_size=16", "train.warmup_steps=1", "train.log_every=1",
    "train.image_grid_every=3", "train.checkpoint_every=3", "train.keep_checkpoints=2",
    "train.max_failures=0", "generator.images_per_caption=4", "generator.output_size=32",
    "generator.captions_per_call=8", "stream.buffer_mb=32", "stream.prefetch_batches=1",
    "model.image_size=32", "model.kwargs={patch_size: 8, depth: 1}", "model.head_hidden_dim=64",
    "model.embed_dim=32", "eval.data=simulator:color:8", "eval.every=3", "eval.batch_size=64",
    "tune.seeds=1", "tune.budget.steps=6", "tune.scheduler.grace_period=3",
]
TRIAL_CPUS = 3.5


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, f"output_dir={tmp_path}", *extra]


# -- planning: no Ray ----------------------------------------------------------------------------
def test_shipped_sweep_plans():
    config = load_config(SWEEP)
    plan = plan_sweep(config)
    assert plan.num_trials == 8 and len(plan.points) == 4 and plan.steps == 200
    assert plan.need_cpus == 4.5 and plan.need_gpus == 0
    assert "tune.driver_cpus" in plan.need_text
    assert concurrency(plan, config.cluster.num_cpus, 0, "the local Ray") == 2
    # every trial: equal global batch and budget, whole groups on every worker
    for point in plan.points:
        trial = plan.trial_config({**point, SEED: 1})
        assert trial.train.batch_size == 128 and trial.train.steps == 200
        assert trial.train.seed == trial.generator.seed == 1
        assert trial.generator.guidance_scale == point["generator.guidance_scale"]
        assert trial.captions_per_worker_step * trial.group_size * trial.train.num_workers == 128


def test_random_forms_draw_once_for_all_seeds(tmp_path):
    from ray.tune.search.variant_generator import generate_variants

    config = load_config(SWEEP, [
        f"output_dir={tmp_path}", "tune.seeds=3", "tune.num_samples=2",
        "tune.space={generator.guidance_scale: [1.0, 8.0], train.base_lr: {loguniform: [1e-4, 1e-2]},"
        " train.temperature: {choice: [0.05, 0.1]}}",
    ])
    plan = plan_sweep(config)
    assert len(plan.points) == 4 and plan.num_trials == 12
    variants = [v for _, v in generate_variants(plan.param_space)]
    assert len(variants) == 12
    by_draw: dict[int, set] = {}
    for v in variants:
        by_draw.setdefault(v[DRAW], set()).add((v["train.base_lr"], v["train.temperature"]))
        assert 1e-4 <= v["train.base_lr"] <= 1e-2
    assert all(len(values) == 1 for values in by_draw.values())  # same draw for every seed / w
    assert plan_sweep(config).draws == plan.draws  # tune.search_seed: reproducible


BAD = [
    (["tune.space={stream.images_per_group: [2, 3]}"], ["tune.space.stream.images_per_group",
                                                       "train.batch_size=128", "constant", "multiple of 12"]),
    (["tune.space={train.batch_size: [64, 128]}"], ["tune.space.train.batch_size: cannot be swept"]),
    (["tune.space={generator.guidance_scal: [1, 2]}"], ["generator.guidance_scal: unknown key"]),
    (["tune.space={generatr.guidance_scale: [1, 2]}"], ["tune.space.generatr.guidance_scale", "not a config section"]),
    (["tune.space={train.seed: [1, 2]}"], ["tune.space.train.seed", "tune.seeds"]),
    (["tune.space={}"], ["tune.space: declare"]),
    (["train.checkpoint_every=30"], ["train.checkpoint_every", "eval.every"]),
    (["eval.data="], ["eval.data", "eval/knn_top1"]),
    (["tune.budget={images: 1000}"], ["tune.budget.images", "multiple of 128"]),
    (["tune.num_samples=3"], ["tune.num_samples", "tune.seeds"]),
    (["tune.scheduler.grace_period=500"], ["tune.scheduler.grace_period"]),
    (["tune.space={stream.images_per_group: [2, 16]}"], ["stream.images_per_group", "images_per_caption"]),
]


@pytest.mark.parametrize("overrides,expected", BAD)
def test_bad_sweeps_fail_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        plan_sweep(load_config(SWEEP, overrides))
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_bad_space_forms_are_config_errors():
    for space, text in [
        ("{generator.guidance_scale: {grid: [1], uniform: [1, 2]}}", "exactly one of"),
        ("{generator.guidance_scale: {uniform: [3, 2]}}", "low < high"),
        ("{train.base_lr: {loguniform: [0, 1]}}", "0 < low"),
    ]:
        with pytest.raises(ConfigError, match=text):
            load_config(SWEEP, [f"tune.space={space}"])


def test_budget_in_images_equals_steps():
    config = load_config(SWEEP, ["tune.budget={images: 25600}"])
    assert budget_steps(config) == 200 == plan_sweep(config).steps


def test_capacity_and_gpu_admission():
    plan = plan_sweep(load_config(SWEEP))
    assert concurrency(plan, 13.4, 0, "the cluster") == 2
    assert concurrency(plan, 13.5, 0, "the cluster") == 3
    with pytest.raises(ConfigError) as err:
        concurrency(plan, 4, 0, "the local Ray")
    assert "4.5 CPUs" in str(err.value) and "cluster.num_cpus" in str(err.value)
    gpu = plan_sweep(load_config(SWEEP, ["train.use_gpu=true", "generator.num_gpus_per_actor=1"]))
    assert gpu.need_gpus == 3
    assert concurrency(gpu, 64, 8, "the cluster") == 2  # GPUs bind first
    with pytest.raises(ConfigError, match="GPUs"):
        concurrency(gpu, 64, 2, "the cluster")
    capped = plan_sweep(load_config(SWEEP, ["tune.max_concurrent_trials=1"]))
    assert concurrency(capped, 64, 0, "the cluster") == 1


def test_trial_config_is_self_contained(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(SWEEP, ["output_dir=out-rel"])
    plan = plan_sweep(config)
    trial = trial_config(plan.trial_base, {"stream.images_per_group": 2, SEED: 3}, 7, tmp_path / "t1")
    assert Path(trial.captions.source).is_absolute() and Path(trial.captions.source).is_file()
    assert trial.run_dir == tmp_path / "t1" / "train"
    assert (trial.stream.images_per_group, trial.train.steps, trial.train.seed) == (2, 7, 3)
    assert plan.sweep_dir == ROOT / "out-rel" / "sweep-quickstart"


def _fake_result(trial_id, w, m, seed, knn, step, tmp_path):
    """What collect_rows reads from a ray.tune.Result."""
    return SimpleNamespace(
        config={"generator.guidance_scale": w, "stream.images_per_group": m, SEED: seed},
        metrics={"trial_id": trial_id, "step": step, "eval/knn_top1": knn, "loss": 1.0},
        metrics_dataframe=None, path=str(tmp_path / trial_id), error=None,
    )


def test_outputs_table_plot_and_best_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config(SWEEP, [f"output_dir={tmp_path}"])
    plan = plan_sweep(config)
    plan.sweep_dir.mkdir(parents=True)
    results, i = [], 0
    for w, base in ((1.0, 0.30), (8.0, 0.50)):
        for m, bonus in ((2, 0.0), (4, 0.05)):
            for seed in (0, 1):
                step = 100 if (w, m) == (8.0, 4) and seed else 200  # one stopped early by ASHA
                results.append(_fake_result(f"t{i}", w, m, seed, base + bonus + 0.01 * seed, step, tmp_path))
                i += 1
    out = write_outputs(results, plan)
    rows = list(csv.DictReader(out.results_csv.open()))
    assert len(rows) == 8 and {r["status"] for r in rows} == {"completed", "stopped"}
    assert {"generator.guidance_scale", "stream.images_per_group", "seed", "eval/knn_top1", "step"} <= set(rows[0])
    summary = {(s["generator.guidance_scale"], s["stream.images_per_group"]): s for s in out.summary}
    assert summary[(1.0, 4)]["mean"] == pytest.approx(0.355) and summary[(1.0, 4)]["seeds"] == 2
    assert summary[(1.0, 4)]["std"] == pytest.approx(0.00707, abs=1e-4)
    # best = highest mean among points whose trials ran the whole budget: (8, 2), not (8, 4)
    assert (out.best["generator.guidance_scale"], out.best["stream.images_per_group"]) == (8.0, 2)
    assert out.plot.is_file() and out.plot.read_bytes()[:4] == b"\x89PNG"
    best = load_config(out.best_config)  # what `stablerep-ray train best-config.yaml` loads
    assert (best.generator.guidance_scale, best.stream.images_per_group, best.train.steps) == (8.0, 2, 200)
    assert best.captions.source == config.captions.source  # paths as the user wrote them
    assert best.tune.space == {}


# -- fail fast before Ray starts ---------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stablerep_ray.cli", "tune", *args]


def test_too_small_for_one_trial_fails_before_ray_starts(tmp_path):
    """The check itself: once the config is loaded, a sweep whose trial cannot fit is rejected in
    well under a second, and no Ray is started."""
    import ray

    from stablerep_ray.sweep import run_sweep

    # 3 CPUs hold the trial itself (the train preflight passes) but not its 0.5-CPU Tune driver.
    config = load_config(SWEEP, tiny(tmp_path, "cluster.num_cpus=3"))
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        run_sweep(config)
    assert time.monotonic() - start < 5
    assert not ray.is_initialized()
    assert "= 3.5 CPUs" in str(err.value) and "has 3 CPUs" in str(err.value)


def test_too_small_for_one_trial_exits_within_seconds(tmp_path):
    """The command: exit code 2 and what one trial needs, before Ray starts. Its time is mostly the
    interpreter and the preflight's imports (torch, timm), which a loaded machine stretches."""
    start = time.monotonic()
    proc = subprocess.run(
        _cli(str(SWEEP), *[f"--set={o}" for o in tiny(tmp_path, "cluster.num_cpus=3")]),
        cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "needs 1 train workers x (1 CPU) + 1 generator actors" in proc.stderr, proc.stderr
    assert "= 3.5 CPUs" in proc.stderr and "has 3 CPUs" in proc.stderr and "cluster.num_cpus" in proc.stderr
    assert "Ray runtime started" not in proc.stderr + proc.stdout
    assert not (tmp_path / "sweep-quickstart").exists()
    print(f"too-small sweep: command exited in {elapsed:.1f}s (interpreter start and imports included)")


# -- a real sweep on our own Ray head ---------------------------------------------------------------
needs_ray = pytest.mark.skipif(os.environ.get("STABLEREP_TUNE_TESTS") == "unit", reason="unit tests only")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # Exactly 2 trials fit: 2 x 3.5 = 7 <= 8 < 3 x 3.5.
    head = LocalHead(tmp_path_factory.mktemp("ray_head"), num_cpus=8, args=("--include-dashboard=false",))
    try:
        head.wait_until(head.started, timeout=240, what="ray head")
        yield head
    finally:
        head.stop()


def _start_sweep(head: LocalHead, out: Path, log: Path, resume: bool = False) -> subprocess.Popen:
    args = [str(SWEEP), *(["--resume"] if resume else []),
            *[f"--set={o}" for o in tiny(out, "tune.scheduler.type=none")]]
    return subprocess.Popen(
        _cli(*args), cwd=ROOT, env=head.env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the SIGKILL below reaches only this driver
    )


def _snapshot(trial_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file of a trial's Train run (checkpoints, config, TensorBoard) with size and mtime."""
    return {str(p.relative_to(trial_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted((trial_dir / "train").rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def interrupted_sweep(ray_head, tmp_path_factory):
    """A 4-trial sweep, 2 at a time; its driver is SIGKILLed once a trial has finished, then
    `--resume` finishes it. Returns what the assertions need."""
    out = tmp_path_factory.mktemp("sweep")
    sweep = out / "sweep-quickstart"
    log = out / "driver.log"
    t0 = time.monotonic()
    driver = _start_sweep(ray_head, out, log)
    finished: set[str] = set()
    try:
        deadline = time.monotonic() + 1500
        while time.monotonic() < deadline and driver.poll() is None:
            statuses = trial_statuses(sweep) if sweep.is_dir() else {}
            finished = {t for t, s in statuses.items() if s == "TERMINATED"}
            if finished:
                break
            time.sleep(2)
        assert finished, f"no trial finished (driver rc={driver.poll()}): {log.read_text()[-4000:]}"
        assert len(finished) < 4, "the sweep finished before it could be interrupted"
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver's own process group only
        driver.wait(timeout=30)
    killed_at, first_run_s = time.time(), time.monotonic() - t0
    dirs = {p.name.split("-", 1)[0]: p for p in sweep.iterdir() if p.is_dir()}
    before = {t: (_snapshot(dirs[t]), (dirs[t] / ATTEMPTS_FILE).read_text()) for t in finished}
    with open(log, "a") as f:
        f.write(f"\n==== killed after {first_run_s:.0f}s with {sorted(finished)} finished; resuming ====\n")

    t1 = time.monotonic()
    resumed = _start_sweep(ray_head, out, log, resume=True)
    try:
        rc = resumed.wait(timeout=1800)
    finally:
        if resumed.poll() is None:
            os.killpg(resumed.pid, signal.SIGKILL)
    resume_s = time.monotonic() - t1
    print(f"\ninterrupted sweep: first driver {first_run_s:.0f}s (killed with {len(finished)} of 4 "
          f"finished), resumed driver {resume_s:.0f}s")
    return SimpleNamespace(sweep=sweep, log=log, rc=rc, finished=finished, before=before, killed_at=killed_at,
                           output=log.read_text(errors="replace"))


@needs_ray
def test_resume_finishes_without_rerunning_finished_trials(interrupted_sweep):
    s = interrupted_sweep
    assert s.rc == 0, s.output[-6000:]
    assert "resuming" in s.output and f"{len(s.finished)} of 4 trials finished" in s.output
    statuses = trial_statuses(s.sweep)
    assert len(statuses) == 4 and set(statuses.values()) == {"TERMINATED"}, statuses
    dirs = {p.name.split("-", 1)[0]: p for p in s.sweep.iterdir() if p.is_dir()}
    assert len(dirs) == 4
    for trial_id in s.finished:
        snapshot, attempts = s.before[trial_id]
        assert (dirs[trial_id] / ATTEMPTS_FILE).read_text() == attempts  # never started again
        assert _snapshot(dirs[trial_id]) == snapshot  # checkpoints / TensorBoard untouched
        assert len(attempts.splitlines()) == 2  # one start, one end
    rows = list(csv.DictReader((s.sweep / "results.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "completed" and r["step"] == "6" for r in rows), rows


@needs_ray
def test_two_trials_at_a_time(interrupted_sweep):
    s = interrupted_sweep
    assert "2 at a time on 8 CPUs" in s.output
    intervals = []
    for attempts in s.sweep.glob(f"*/{ATTEMPTS_FILE}"):
        start = None
        for line in attempts.read_text().splitlines():
            event = json.loads(line)
            if "start" in event:
                if start is not None:  # an attempt the kill cut short
                    intervals.append((start, s.killed_at))
                start = event["start"]
            elif "end" in event:
                intervals.append((start, event["end"]))
                start = None
        if start is not None:
            intervals.append((start, s.killed_at))
    running_at = [sum(a <= t < b for a, b in intervals) for t, _ in intervals]
    assert max(running_at) == 2, intervals  # two at once, never three


@needs_ray
def test_outputs_and_tensorboard(interrupted_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = interrupted_sweep
    assert s.rc == 0, s.output[-6000:]
    rows = list(csv.DictReader((s.sweep / "results.csv").open()))
    points = {(float(r["generator.guidance_scale"]), int(r["stream.images_per_group"])) for r in rows}
    assert points == {(1.0, 2), (1.0, 4), (8.0, 2), (8.0, 4)}
    assert all(0 <= float(r["eval/knn_top1"]) <= 1 for r in rows)
    plot = s.sweep / "eval_knn_top1_vs_guidance.png"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    best = load_config(s.sweep / "best-config.yaml")
    assert best.train.steps == 6 and best.tune.space == {}
    for path in ("results table", "plot", "best config", "tensorboard --logdir"):
        assert path in s.output
    # A trial the kill caught while starting can leave Tune a second directory (name + "_<hash>") on
    # resume; each trial's events must be in one of its directories.
    trial_dirs: dict[str, list[Path]] = {}
    for path in sorted(p for p in s.sweep.iterdir() if p.is_dir()):
        trial_dirs.setdefault(path.name.split("-", 1)[0], []).append(path)
    assert len(trial_dirs) == 4, sorted(trial_dirs)
    for paths in trial_dirs.values():
        tune_knn, tune_hparams, train_scalars, train_images = [], set(), set(), set()
        for trial_dir in paths:
            tune_events = EventAccumulator(str(trial_dir))  # Tune's per-trial scalars + hparams
            tune_events.Reload()
            if "ray/tune/eval/knn_top1" in tune_events.Tags()["scalars"]:
                tune_knn += tune_events.Scalars("ray/tune/eval/knn_top1")
            # Tune writes hparams when a trial ends: the directory of an attempt the kill cut short has none.
            with contextlib.suppress(KeyError):
                tune_hparams |= set(tune_events.PluginTagToContent("hparams"))
            if (trial_dir / "train" / "tensorboard").is_dir():
                train_events = EventAccumulator(str(trial_dir / "train" / "tensorboard"), size_guidance={"images": 0})
                train_events.Reload()  # the trial's own Train TensorBoard: kNN curve and sample-image grids
                train_scalars |= set(train_events.Tags()["scalars"])
                train_images |= set(train_events.Tags()["images"])
        assert tune_knn and all(0 <= e.value <= 1 for e in tune_knn), paths
        assert "_hparams_/session_start_info" in tune_hparams, paths
        assert "eval/knn_top1" in train_scalars and "samples/caption_groups" in train_images, paths
    best_text = (s.sweep / "best-config.yaml").read_text()
    assert yaml.safe_load(best_text)["name"] == "sweep-quickstart-best"


@needs_ray
def test_too_small_for_the_cluster_fails_right_after_connecting(ray_head, tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        _cli(str(SWEEP), *[f"--set={o}" for o in tiny(tmp_path, "generator.num_actors=6")]),
        cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "6 generator actors" in proc.stderr and "= 8.5 CPUs" in proc.stderr and "has 8 CPUs" in proc.stderr
    assert not list(tmp_path.glob("sweep-quickstart/*/"))  # no trial started
    print(f"too-small sweep rejected by the cluster check in {time.monotonic() - start:.1f}s")


@needs_ray
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_ctrl_c_ends_the_sweep_with_its_outputs_and_the_resume_command(how, ray_head, tmp_path):
    """Once trials run, SIGINT to the driver's process group, as a terminal's Ctrl-C sends it, or SIGTERM
    to the driver, as `ray job stop` does: Tune saves its state and stops them; the command writes what it
    has, says that --resume runs the rest (not Tune's Python advice) and exits with status 130."""
    log = tmp_path / "driver.log"
    rc = stop_once(_start_sweep(ray_head, tmp_path, log), log, ": started", how)
    output = log.read_text(errors="replace")
    print(output)
    lines = output.splitlines()
    assert rc == 130, output[-6000:]
    assert "stopping: saving the sweep's state and ending its trials" in output and "Stop signal" not in output
    assert re.fullmatch(r"interrupted: [0-3] of 4 trials finished; the same command with --resume runs the rest",
                        lines[-1]), lines[-3:]
    assert "Tuner.restore" not in output
    assert set(trial_statuses(tmp_path / "sweep-quickstart").values()) & {"RUNNING", "PENDING"}
    statuses = [row["status"] for row in csv.DictReader((tmp_path / "sweep-quickstart" / "results.csv").open())]
    assert "interrupted" in statuses and set(statuses) <= {"completed", "interrupted", "not started"}, statuses
