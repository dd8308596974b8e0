"""The sweep driver: plan, check, size admission control, fit (or resume), report.

``run_sweep`` reads top to bottom: the plan is checked before Ray starts (a too-large trial fails
in seconds on a local Ray), --resume is checked against what the directory holds (a changed config
would silently mix two sweeps), then Tune runs with at most as many trials at once as fit the
cluster, and the outputs are written even when some trials failed.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from ..config import Config, ConfigError
from ..config.io import config_diff
from .plan import SweepPlan, concurrency, experiment_path, plan_sweep, sweep_dir, sweep_name
from .ray_reservations import ReleaseStaleReservations
from .report import SweepOutputs, TrialEvents, print_outputs, write_outputs
from .trial import trial_trainable, tune_trial_dirname


def trial_statuses(path: str | os.PathLike) -> dict[str, str]:
    """trial_id -> Tune status (PENDING/RUNNING/TERMINATED/ERROR) from the newest experiment state
    that reads whole (Tune overwrites it without a rename: a running sweep's may be empty or cut)."""
    for state_file in sorted(Path(path).glob("experiment_state-*.json"), reverse=True):
        try:
            return _statuses(json.loads(state_file.read_text()))
        except json.JSONDecodeError:
            continue
    return {}


def _finished(path: str, plan: SweepPlan) -> str:
    """``3 of 8 trials finished; `` from the saved experiment state; empty where it is remote storage.
    Of plan.num_trials: Tune adds trials to its saved state lazily, so the state may list fewer."""
    if "://" in path:
        return ""
    done = sum(s == "TERMINATED" for s in trial_statuses(path).values())
    return f"{done} of {plan.num_trials} trials finished; "


def _statuses(data: dict) -> dict[str, str]:
    out = {}
    for entry in data.get("trial_data", []):
        state = json.loads(entry[0]) if isinstance(entry, list) else entry
        if isinstance(state, str):
            state = json.loads(state)
        out[state.get("trial_id")] = state.get("status")
    return out


class InterruptWatch(logging.Filter):
    """Tune's two warnings about Ctrl-C (or SIGTERM, ``runtime.sigterm_as_ctrl_c``), in the console's
    words: the first, when the signal arrives, becomes one plain line; the second, at the end, is noted
    and dropped, since its advice (``Tuner.restore`` in Python) has a command-line form, ``--resume``,
    which ``run_sweep`` prints."""

    LOGGER = "ray.tune.tune"

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Stop signal received" in message:
            print("stopping: saving the sweep's state and ending its trials (Ctrl-C again skips the save)",
                  flush=True)
            return False
        if "has been interrupted" in message:
            self.interrupted = True
            return False
        return True


TRIAL_FAILURE_LOGGER = "ray.tune.execution.tune_controller"


def without_refused_config_traceback(record: logging.LogRecord) -> bool:
    """Drops Tune's traceback of a trial that failed on a ConfigError: ``TrialEvents`` says it in one line."""
    error = record.exc_info[1] if record.exc_info else None  # logging keeps it as (type, value, traceback)
    return not (error is not None and ConfigError.raised_in(error) is not None)


def _check_resume(config: Config, resume: bool) -> None:
    from ray.tune import Tuner

    directory, path = sweep_dir(config), experiment_path(config)
    saved = directory / "sweep-config.yaml"
    exists = Tuner.can_restore(path) if "://" in path else Path(path).is_dir() and Tuner.can_restore(path)
    if resume and not exists:
        raise ConfigError(
            f"--resume: no interrupted sweep at {path}; run without --resume to start it "
            f"(tune.name / output_dir choose the directory)"
        )
    if not resume and exists:
        raise ConfigError(
            f"tune.name: {path} already holds the sweep {sweep_name(config)!r}; pass --resume to "
            f"finish it, or set tune.name (or output_dir) for a new sweep"
        )
    if resume and saved.is_file():
        before = yaml.safe_load(saved.read_text())
        now = config.model_dump(mode="json")
        changed = [k for k, _, _ in config_diff(before, now) if not k.startswith("cluster.")]
        if changed:
            raise ConfigError(
                f"{changed[0]}: differs from the interrupted sweep's config ({saved}); resume with the "
                f"same config (changed: {', '.join(changed[:8])})"
            )


def _resources_before_ray(config: Config) -> tuple[float, float, str] | None:
    """Local Ray's resources before it starts (None when joining a cluster)."""
    from ..runtime import local_resources, ray_address

    if ray_address(config):
        return None
    cpus, gpus = local_resources(config)
    return cpus, gpus, "the local Ray"


def run_sweep(config: Config, resume: bool = False, captions_per_pass: int | None = None) -> SweepOutputs:
    """Run (or with ``resume`` finish) the sweep declared in ``config.tune``; returns its outputs.
    ``captions_per_pass``: from the CLI's caption check, else counted here, once for all trials."""
    plan = plan_sweep(config)
    _check_resume(config, resume)
    local = _resources_before_ray(config)
    if local:  # fail before Ray starts
        concurrency(plan, *local)

    from ray import tune

    from ..config import dump_config
    from ..console import verbose
    from ..runtime import cluster_capacity, init_ray, sigterm_as_ctrl_c

    init_ray(config)
    cpus, gpus, where = cluster_capacity()
    max_concurrent = concurrency(plan, cpus, gpus, where)
    tc = config.tune
    print(
        f"sweep {plan.name}: {plan.num_trials} trials ({len(plan.points)} points x {len(tc.seeds)} seeds), "
        f"{plan.steps} steps x {config.train.batch_size} images each; one trial needs {plan.need_text}; "
        f"{max_concurrent} at a time on {cpus:g} CPUs / {gpus:g} GPUs"
    )
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        dump_config(config, plan.sweep_dir / "sweep-config.yaml")

    if captions_per_pass is None:
        from ..captions import count_captions_per_pass

        captions_per_pass = count_captions_per_pass(config.captions)
    trainable = trial_trainable(plan, captions_per_pass)
    if not verbose():  # Tune's newer console prints its banner even at verbose=0; TrialEvents says what matters
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if resume:
        path = experiment_path(config)
        print(f"resuming {path}: {_finished(path, plan)}running the rest")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if tc.scheduler.type == "asha":
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(
                time_attr="step", max_t=plan.steps, grace_period=plan.grace_period,
                reduction_factor=tc.scheduler.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=plan.param_space,
            tune_config=tune.TuneConfig(
                metric=tc.metric,
                mode=tc.mode,
                scheduler=scheduler,
                num_samples=1,  # random draws are expanded in param_space (same draw for every seed)
                max_concurrent_trials=max_concurrent,
                trial_dirname_creator=tune_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=plan.name,
                storage_path=plan.storage_path,
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                callbacks=[ReleaseStaleReservations(plan.name), TrialEvents(plan)],
                verbose=1 if verbose() else 0,  # TrialEvents prints one line per trial event instead
            ),
        )
    watch = InterruptWatch()
    logging.getLogger(InterruptWatch.LOGGER).addFilter(watch)
    logging.getLogger(TRIAL_FAILURE_LOGGER).addFilter(without_refused_config_traceback)
    try:
        with sigterm_as_ctrl_c():
            results = tuner.fit()
    finally:
        logging.getLogger(InterruptWatch.LOGGER).removeFilter(watch)
        logging.getLogger(TRIAL_FAILURE_LOGGER).removeFilter(without_refused_config_traceback)
    outputs = write_outputs(results, plan, TrialEvents.unfinished if watch.interrupted else None,
                            TrialEvents.configs)
    outputs.interrupted = watch.interrupted
    import ray

    ray.shutdown()  # the trials' teardown lines come now (after Ctrl-C, a screen of them): the summary last
    print_outputs(outputs, plan)
    if outputs.interrupted:
        print(f"interrupted: {_finished(experiment_path(config), plan)}the same command with --resume runs the rest")
        return outputs
    if outputs.rows and all(r["status"] == "error" for r in outputs.rows):
        if len(set(TrialEvents.refused.values())) == 1 and len(TrialEvents.refused) == len(outputs.rows):
            raise ConfigError(next(iter(TrialEvents.refused.values())))  # every trial refused alike
        raise RuntimeError(f"every trial of {plan.name} failed; see {outputs.results_csv} and the trial logs")
    return outputs
