"""What `stablerep-ray tune` prints: one line per trial event, then a table of the points."""

from types import SimpleNamespace

from ray.tune import Result
from repo import ROOT

from stablerep_ray.config import load_config
from stablerep_ray.sweep import SEED, plan_sweep
from stablerep_ray.sweep.report import SweepOutputs, TrialEvents, collect_rows, print_outputs

SWEEP = ROOT / "configs" / "sweep-quickstart.yaml"


def test_one_line_per_trial_event(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_config(SWEEP, [f"output_dir={tmp_path}"]))
    events = TrialEvents(plan)
    params = {"generator.guidance_scale": 8.0, "stream.images_per_group": 2, SEED: 1}
    trial = SimpleNamespace(trial_id="ab12", config=params, last_result={}, error_file="/sweep/ab12/error.txt")
    events.setup()
    events.on_trial_start(0, [], trial)
    events.on_trial_result(0, [], trial, {"step": 100, "eval/knn_top1": 0.61234, "loss": 3.5})
    trial.last_result = {"step": 100}
    events.on_trial_complete(0, [], trial)  # ASHA stopped it at its grace period
    trial.last_result = {"step": plan.steps}
    events.on_trial_complete(0, [], trial)
    events.on_trial_error(0, [], trial)
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    name = "trial ab12-guidance_scale=8,images_per_group=2,seed=1"
    assert lines == [
        f"{name}: started",
        f"{name}: step 100/200  knn 0.612  loss 3.500",
        f"{name}: stopped by the scheduler at step 100",
        f"{name}: done",
        f"{name}: failed (/sweep/ab12/error.txt)",
    ]


def test_a_trial_that_failed_on_a_refused_config_says_it_in_one_line(tmp_path, monkeypatch, capsys):
    """Tune keeps the trial's error pickled (Ray's copy of Train's error, the refusal inside)."""
    import ray.cloudpickle
    import ray.exceptions
    from ray.train import ControllerError

    from stablerep_ray.config import ConfigError

    monkeypatch.chdir(ROOT)
    refusal = ConfigError("generator.model: org/x is gated on the Hugging Face Hub; accept its terms")
    failed = ray.exceptions.RayTaskError("_run_trial", "Traceback ...", ControllerError(refusal)).as_instanceof_cause()
    (tmp_path / "error.pkl").write_bytes(ray.cloudpickle.dumps(failed))
    events = TrialEvents(plan_sweep(load_config(SWEEP, [f"output_dir={tmp_path}"])))
    events.setup()
    trial = SimpleNamespace(trial_id="cd34", config={"generator.guidance_scale": 1.0, "stream.images_per_group": 2,
                                                     SEED: 0}, pickled_error_file=str(tmp_path / "error.pkl"))
    events.on_trial_error(0, [], trial)
    assert capsys.readouterr().out.split("] ", 1)[1].strip() == (
        f"trial cd34-guidance_scale=1,images_per_group=2,seed=0: failed: {refusal}")
    assert TrialEvents.refused == {"cd34": str(refusal)}


def test_final_table_lines_up_the_points(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_config(SWEEP, [f"output_dir={tmp_path}"]))
    summary = [
        {"generator.guidance_scale": 1.0, "stream.images_per_group": 2, "mean": 0.61, "std": 0.012, "seeds": 2,
         "completed": 2, "trials": 2},
        {"generator.guidance_scale": 8.0, "stream.images_per_group": 4, "mean": None, "std": None, "seeds": 0,
         "completed": 0, "trials": 2},
    ]
    rows = [{"status": "completed"}] * 2 + [{"status": "error"}] * 2
    outputs = SweepOutputs(tmp_path, tmp_path / "results.csv", tmp_path / "summary.csv", None, None, rows, summary,
                           None)
    print_outputs(outputs, plan)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "trials: 2 completed, 2 error",
        "  guidance_scale  images_per_group  eval/knn_top1 (mean +- std)  seeds  full budget",
        "  1.0             2                 0.6100 +- 0.0120             2      2/2",
        "  8.0             4                 n/a                          0      0/2",
    ]


def test_interrupted_trials_are_told_apart_from_scheduler_stops(tmp_path, monkeypatch):
    """After Ctrl-C the trials Tune had not ended read interrupted (or not started), so the table does not
    pass them off as ASHA's decisions; TrialEvents takes their ids at each loop step."""
    monkeypatch.chdir(ROOT)
    plan = plan_sweep(load_config(SWEEP, [f"output_dir={tmp_path}"]))
    events = TrialEvents(plan)
    events.setup()
    live = [SimpleNamespace(trial_id=i, status=s) for i, s in
            (("done", "TERMINATED"), ("asha", "TERMINATED"), ("running", "RUNNING"), ("queued", "PENDING"),
             ("failed", "ERROR"))]
    guidance = {"done": 1.0, "asha": 2.0, "running": 3.0, "queued": 4.0, "failed": 5.0}
    live = [SimpleNamespace(trial_id=t.trial_id, status=t.status,
                            config={"generator.guidance_scale": guidance[t.trial_id], "stream.images_per_group": 2,
                                    SEED: 0}) for t in live]
    events.on_step_end(3, live)
    assert TrialEvents.unfinished == {"running": "RUNNING", "queued": "PENDING"}

    def result(trial, step, error=None):  # as Tune builds it: a trial that never reported has no config
        metrics = {"trial_id": trial.trial_id, "step": step, "config": trial.config} if step else {}
        return Result(metrics=metrics, checkpoint=None, error=error, path=str(tmp_path / f"{trial.trial_id}-x"))

    done, asha, running, queued, failed = live
    results = [result(done, plan.steps), result(asha, 50), result(running, 0), result(queued, 0),
               result(failed, 50, RuntimeError("boom"))]
    assert results[2].config is None
    rows = collect_rows(results, plan, TrialEvents.unfinished, TrialEvents.configs)
    assert [(r["trial_id"], r["status"], r["generator.guidance_scale"]) for r in rows] == [
        ("done", "completed", 1.0), ("asha", "stopped", 2.0), ("running", "interrupted", 3.0),
        ("queued", "not started", 4.0), ("failed", "error", 5.0)]
    assert collect_rows(results, plan)[1]["status"] == "stopped"  # not interrupted: the scheduler's stop
    # without the loop's configs, the never-reported trials still get rows (last, their params empty)
    assert [r["trial_id"] for r in collect_rows(results, plan)][-2:] == ["running", "queued"]


def test_tunes_traceback_of_a_refused_trial_goes_and_others_stay():
    import logging

    import ray.exceptions
    from ray.train import ControllerError

    from stablerep_ray.config import ConfigError
    from stablerep_ray.sweep.run import without_refused_config_traceback

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("ray.tune.execution.tune_controller", logging.ERROR, __file__, 1,
                                 "Trial task failed for trial t", None, (type(error), error, None))

    refused = ray.exceptions.RayTaskError("train", "Traceback ...", ControllerError(ConfigError("x: y"))
                                          ).as_instanceof_cause()
    assert not without_refused_config_traceback(record(refused))
    assert without_refused_config_traceback(record(RuntimeError("CUDA out of memory")))
