"""One Tune trial = one whole Train run.

Train V2 pattern: a trial is a *function trainable* that builds the trial's config, its own
generation stream and a TorchTrainer with ``TuneReportCallback`` (rank-0 metrics -> Tune). The
trial reserves only its driver CPUs with Tune; Train and Ray Data place the workers and generator
actors themselves, and the sweep's admission control (``plan.concurrency``) keeps them within the
cluster. Trial directories are named from the trial id and params so --resume finds them again.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from ..config import Config, from_dict
from ..storage import latest_train_result
from .plan import DRAW, SEED, SweepPlan, trial_config
from .ray_reservations import TrainReservationRecorder, reservation_key

ATTEMPTS_FILE = "attempts.jsonl"


def trial_dirname(trial_id: str, params: dict[str, Any]) -> str:
    """``<trial_id>-guidance_scale=2,images_per_group=4,seed=0``: stable across --resume."""
    keys = [k for k in params if k not in (SEED, DRAW)]
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    if len(set(short.values())) < len(keys):
        short = {k: k for k in keys}

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    parts = [f"{short[k]}={fmt(params[k])}" for k in keys]
    parts += [f"{k}={params[k]}" for k in (DRAW, SEED) if k in params]
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", f"{trial_id}-{','.join(parts)}")
    return name[:120]


def tune_trial_dirname(trial) -> str:
    """Tune's ``trial_dirname_creator``."""
    return trial_dirname(trial.trial_id, trial.config)


def _completed(config: Config) -> dict | None:
    """The last report of a Train run that already reached its final step (None otherwise)."""
    latest = latest_train_result(config)
    return latest if int(latest.get("step", 0)) >= config.train.steps else None


def _log_attempt(trial_dir: Path, event: str) -> None:
    """One line per start / end of the trial function (tests and users see restarts)."""
    with open(trial_dir / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps({event: time.time(), "pid": os.getpid()}) + "\n")


def _run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """The Tune function trainable: this trial's config -> its own stream -> TorchTrainer.fit().

    Its name is part of a sweep's saved state: ``Tuner.restore`` (--resume) requires the same name.
    """
    import ray.data
    import ray.tune
    from ray.data import ExecutionResources
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..config import dump_config
    from ..runtime import Need, configure_data_context
    from ..training.trainer import make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(plan["sweep_dir"]) / trial_dirname(trial_id, params)
    config = trial_config(from_dict(plan["trial_base"]), params, plan["steps"], trial_dir)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    _log_attempt(trial_dir, "start")

    finished = _completed(config)
    if finished is not None:
        # Interrupted between the run's last checkpoint and Tune recording the trial as finished:
        # the run is complete; hand Tune its final report instead of training again.
        ray.tune.report({k: v for k, v in finished.items() if isinstance(v, (int, float))})
        return
    dump_config(config, config.run_dir / "config.yaml")

    # This trial's Ray Data stream budgets only its own share (generator actors + caption reader):
    # concurrent trials' executors otherwise each plan against the whole cluster.
    configure_data_context()
    need, g, t = Need.of(config), config.generator, config.train
    data_cpus = need.cpus - t.num_workers * t.num_cpus_per_worker
    data_gpus = g.num_actors * g.num_gpus_per_actor
    ray.data.DataContext.get_current().execution_options.resource_limits = ExecutionResources(
        cpu=data_cpus, gpu=data_gpus
    )
    recorder = TrainReservationRecorder(reservation_key(plan["sweep"], trial_id))
    trainer = make_trainer(
        config, callbacks=[TuneReportCallback(), recorder], captions_per_pass=plan["captions_per_pass"]
    )
    trainer.fit()
    _log_attempt(trial_dir, "end")


def trial_trainable(plan: SweepPlan, captions_per_pass: int):
    """The trainable Tune runs: ``_run_trial`` with the plan bound, holding ``tune.driver_cpus``."""
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(
            _run_trial,
            plan={
                "trial_base": plan.trial_base.model_dump(mode="json"),
                "sweep_dir": str(plan.sweep_dir),
                "sweep": plan.name,
                "steps": plan.steps,
                "captions_per_pass": captions_per_pass,
            },
        ),
        {"CPU": plan.config.tune.driver_cpus},
    )
