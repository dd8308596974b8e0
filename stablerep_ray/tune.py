"""Tuning stage: Ray Tune sweeps (guidance scale x images per caption, ...) over whole training runs.

Train V2 pattern: each trial is a *function trainable* (``_run_trial``) that applies the trial's
parameters to the base config, builds the trial's own generation stream and fits a TorchTrainer with
``TuneReportCallback`` (rank-0 metrics -> Tune). ``run_sweep`` reads top to bottom:

1. ``plan_sweep``: expand the declared space (``tune:`` section) into every trial config and check
   each before Ray starts (keys exist, equal global batch for every m, metric reported, resources);
2. start/join Ray, size the admission control (max_concurrent_trials = capacity // per-trial need);
3. ``Tuner.fit()`` (or ``Tuner.restore(...).fit()`` with ``--resume``);
4. ``write_outputs``: results table, summary, plot of the metric vs guidance scale per m, best config.

Layout of a sweep directory (``output_dir/<tune.name>``)::

    experiment_state-*.json, tuner.pkl, ...   Tune's experiment state (what --resume restores)
    sweep-config.yaml                         the config the sweep was started with
    <trial_id>-<params>/                      one per trial: Tune's result.json, progress.csv and
        events.out.tfevents.*                 TensorBoard scalars + hparams,
        attempts.jsonl                        one line per start of the trial function,
        train/                                the trial's Train run: checkpoints, config.yaml and
            tensorboard/                      its own TensorBoard (scalars, sample-image grids)
    results.csv, summary.csv, <metric>_vs_guidance.png, best-config.yaml
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ray import tune as ray_tune
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from .config import Config, ConfigError, TuneParam, from_dict

GUIDANCE_KEY = "generator.guidance_scale"
M_KEY = "stream.images_per_group"
SEED = "seed"  # trial-config key holding the trial's seed
DRAW = "draw"  # trial-config key: index of the random draw (only with random forms)
RANDOM_FORMS = ("choice", "uniform", "loguniform", "randint")
# Keys a sweep must not vary: fairness (equal global batch and budget), bookkeeping, or the sweep itself.
FIXED_KEYS = {
    "train.batch_size": "the global image batch is held constant so every trial sees the same images "
    "per step (captions per batch = batch / m)",
    "train.steps": "the budget is tune.budget (equal for every trial)",
    "name": "each trial's name is derived from its Tune trial id",
    "output_dir": "trials live inside the sweep directory",
}
FIXED_PREFIXES = ("cluster.", "tune.")
ATTEMPTS_FILE = "attempts.jsonl"
TRAIN_DIR = "train"


# -- the plan: every trial config, checked before Ray starts --------------------------------------
@dataclass
class SweepPlan:
    config: Config  # as given (relative paths kept): the base of best-config.yaml
    trial_base: Config  # local paths made absolute (Tune runs trials in their own working dirs)
    sweep_dir: Path
    steps: int  # the budget of every trial, in optimiser steps
    param_space: dict[str, Any]  # Tune's param_space
    points: list[dict[str, Any]]  # every point of the space (params without the seed)
    draws: list[dict[str, Any]]  # pre-drawn values of the random forms
    need_cpus: float  # resources one trial holds at once (max over the space), driver included
    need_gpus: float
    need_text: str  # what the largest trial needs, in words
    grace_period: int
    storage_path: str = ""  # Tune's storage_path
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.sweep_dir.name

    @property
    def num_trials(self) -> int:
        return len(self.points) * len(self.config.tune.seeds)

    def trial_config(self, params: dict[str, Any], trial_dir: Path | None = None) -> Config:
        return trial_config(self.trial_base, params, self.steps, trial_dir or self.sweep_dir / "_check")


def sweep_name(config: Config) -> str:
    return config.tune.name or f"{config.name}-sweep"


def sweep_dir(config: Config) -> Path:
    return Path(config.output_dir).expanduser().resolve() / sweep_name(config)


def budget_steps(config: Config) -> int:
    """Optimiser steps every trial runs: tune.budget.steps, or images / global batch, or train.steps."""
    budget, batch = config.tune.budget, config.train.batch_size
    if budget.images:
        if budget.images % batch:
            raise ConfigError(
                f"tune.budget.images: {budget.images} images is not a whole number of steps of "
                f"train.batch_size={batch} images; use a multiple of {batch}, e.g. "
                f"{max(1, round(budget.images / batch)) * batch}"
            )
        return budget.images // batch
    return budget.steps or config.train.steps


def set_key(data: dict, key: str, value: Any, where: str) -> None:
    """Set dotted ``key`` in a nested config dict; ``where`` names the setting for errors."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            raise ConfigError(
                f"{where}: {'.'.join(parts[: i + 1])!r} is not a config section; check the spelling "
                f"(`stablerep-ray config-reference` lists all keys)"
            )
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
    node[parts[-1]] = value


def trial_config(base: Config, params: dict[str, Any], steps: int, trial_dir: Path) -> Config:
    """The Config of one trial: base + swept keys + seed keys + budget; its run lives in trial_dir."""
    data = base.model_dump(mode="json", exclude={"tune"})
    for key, value in params.items():
        if key not in (SEED, DRAW):
            set_key(data, key, value, f"tune.space.{key}")
    if SEED in params:
        for key in base.tune.seed_keys:
            set_key(data, key, params[SEED], f"tune.seed_keys ({key})")
    data["train"]["steps"] = steps
    data["name"] = TRAIN_DIR
    data["output_dir"] = str(trial_dir)
    if base.cluster.storage_path:  # shared storage: the trial's Train run goes next to its Tune trial
        data["cluster"]["storage_path"] = f"{base.cluster.storage_path.rstrip('/')}/{trial_dir.parent.name}/{trial_dir.name}"
    try:
        return from_dict(data)
    except ConfigError as err:
        shown = {k: v for k, v in params.items() if k != DRAW}
        raise ConfigError(f"tune.space: the point {shown} gives an invalid trial config: {err}") from None


def _absolute_paths(config: Config) -> Config:
    """Local relative paths -> absolute: Tune starts each trial in its own working directory."""

    def absolute(path: str) -> str:
        if not path or "://" in path or path.startswith("simulator:"):
            return path
        p = Path(path).expanduser()
        return str(p.resolve()) if p.exists() else path

    data = config.model_dump(mode="json")
    data["output_dir"] = str(Path(config.output_dir).expanduser().resolve())
    data["captions"]["source"] = absolute(config.captions.source)
    data["generator"]["model"] = absolute(config.generator.model)
    if config.eval.data and not Path(config.eval.data).exists():
        from .evaluation import parse_data_spec

        train_spec, test_spec = parse_data_spec(config.eval.data)
        data["eval"]["data"] = ":".join(absolute(s) for s in (train_spec, test_spec) if s)
    else:
        data["eval"]["data"] = absolute(config.eval.data)
    if config.cluster.storage_path and "://" not in config.cluster.storage_path:
        data["cluster"]["storage_path"] = str(Path(config.cluster.storage_path).expanduser().resolve())
    return from_dict(data)


def _draw(param: TuneParam, rng: np.random.Generator) -> Any:
    form = param.form
    if form == "choice":
        return param.choice[int(rng.integers(len(param.choice)))]
    low, high = getattr(param, form)
    if form == "uniform":
        return float(rng.uniform(low, high))
    if form == "loguniform":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(low, high))


def _drawn_value(config: dict, key: str, draws: list[dict]) -> Any:
    """tune.sample_from: the value of ``key`` in the trial's draw (same draw for every seed)."""
    return draws[config[DRAW]][key]


def _check_key(key: str, seed_keys: list[str]) -> None:
    if key in FIXED_KEYS or key.startswith(FIXED_PREFIXES):
        why = FIXED_KEYS.get(key, "it configures the sweep itself")
        raise ConfigError(f"tune.space.{key}: cannot be swept: {why}")
    if key in seed_keys:
        raise ConfigError(f"tune.space.{key}: is a seed key; list the seeds in tune.seeds instead")


def _check_fair_batch(config: Config, points: list[dict]) -> None:
    """Equal global batch for every m: batch_size must split into whole groups on every worker."""
    batch = config.train.batch_size
    units = {}
    for point in points:
        m = int(point.get(M_KEY, config.stream.images_per_group))
        objective = point.get("train.objective", config.train.objective)
        group = 2 if objective == "simclr" else m
        workers = int(point.get("train.num_workers", config.train.num_workers))
        units[(group, workers)] = group * workers
    bad = sorted({(g, w) for (g, w), unit in units.items() if batch % unit})
    if bad:
        lcm = math.lcm(*units.values())
        m_values = sorted({g for g, _ in units})
        key = M_KEY if M_KEY in config.tune.space else "train.batch_size"
        g, w = bad[0]
        raise ConfigError(
            f"{'tune.space.' if key == M_KEY else ''}{key}: train.batch_size={batch} must be divisible "
            f"by m x train.num_workers for every m in the sweep (m = {m_values}); m={g} with {w} "
            f"workers needs a multiple of {g * w}. The global image batch is held constant across m "
            f"(captions per batch = batch / m) so trials compare at equal images seen: set "
            f"train.batch_size to a multiple of {lcm}, e.g. {max(lcm, round(batch / lcm) * lcm)}"
        )


def _check_metric_reported(config: Config, metric: str) -> None:
    """Tune only sees what ray.train.report sends: checkpoint steps and the last step. Every report
    must carry the metric (ASHA compares trials at report steps)."""
    if not metric.startswith("eval/"):
        return
    if not config.eval.data:
        raise ConfigError(
            f"eval.data: tune.metric={metric} comes from the online kNN evaluation; set eval.data "
            f"(e.g. simulator:shape) or choose another tune.metric (e.g. loss, mode min)"
        )
    t, every = config.train, config.eval.every
    if t.checkpoint_every >= t.steps:
        return  # one report, at the end, where the evaluation always runs
    if not every or t.checkpoint_every % every:
        raise ConfigError(
            f"train.checkpoint_every: Tune receives metrics at checkpoint steps "
            f"(every {t.checkpoint_every}) but {metric} is computed every eval.every={every} steps"
            f"{' (only at the end)' if not every else ''}; make train.checkpoint_every a multiple of "
            f"eval.every (e.g. set both to {every or t.checkpoint_every}) so every report carries {metric}"
        )


def plan_sweep(config: Config) -> SweepPlan:
    """Expand and check the sweep: every trial config is built and validated here, without Ray."""
    from ray import tune

    from .runtime import Need

    tc = config.tune
    if not tc.space:
        raise ConfigError(
            "tune.space: declare at least one swept key, e.g. "
            "tune: {space: {generator.guidance_scale: [2.0, 8.0], stream.images_per_group: [2, 4]}}"
        )
    for key in tc.space:
        _check_key(key, tc.seed_keys)
    for key in tc.seed_keys:
        set_key(config.model_dump(mode="json"), key, 0, f"tune.seed_keys ({key})")
    steps = budget_steps(config)
    grid_keys = [k for k, p in tc.space.items() if p.form == "grid"]
    random_keys = [k for k, p in tc.space.items() if p.form in RANDOM_FORMS]
    if tc.num_samples > 1 and not random_keys:
        raise ConfigError(
            f"tune.num_samples: {tc.num_samples} draws of a space without random forms would repeat "
            f"identical trials; list repeats as tune.seeds (mean and spread over seeds)"
        )
    rng = np.random.default_rng(tc.search_seed)
    draws = [{k: _draw(tc.space[k], rng) for k in random_keys} for _ in range(tc.num_samples)] if random_keys else []

    points = []
    for values in itertools.product(*(tc.space[k].grid for k in grid_keys)):
        grid_point = dict(zip(grid_keys, values))
        for i, draw in enumerate(draws or [None]):
            points.append({**grid_point, **({DRAW: i, **draw} if draw is not None else {})})

    base = _absolute_paths(config)
    _check_fair_batch(config, points)
    need_cpus, need_gpus, need_text = 0.0, 0.0, ""
    for point in points:
        trial = trial_config(base, {**point, SEED: tc.seeds[0]}, steps, sweep_dir(config) / "_check")
        _check_metric_reported(trial, tc.metric)
        need = Need.of(trial)
        cpus = need.cpus + tc.driver_cpus
        if (need.gpus, cpus) > (need_gpus, need_cpus):
            need_cpus, need_gpus = cpus, need.gpus
            need_text = (
                f"{need.describe(trial).rsplit(' = ', 1)[0]} + {tc.driver_cpus:g} CPU trial driver "
                f"(tune.driver_cpus) = {cpus:g} CPUs, {need.gpus:g} GPUs"
            )

    grace = tc.scheduler.grace_period or max(1, steps // 4)
    if tc.scheduler.type == "asha" and grace > steps:
        raise ConfigError(
            f"tune.scheduler.grace_period: {grace} steps exceeds the budget of {steps} steps; lower it "
            f"or set tune.scheduler.type=none"
        )

    space: dict[str, Any] = {k: tune.grid_search(list(tc.space[k].grid)) for k in grid_keys}
    if draws:
        space[DRAW] = tune.grid_search(list(range(len(draws))))
        for key in random_keys:
            space[key] = tune.sample_from(functools.partial(_drawn_value, key=key, draws=draws))
    space[SEED] = tune.grid_search(list(tc.seeds))
    storage = experiment_path(config).rsplit("/", 1)[0]
    return SweepPlan(
        config=config, trial_base=base, sweep_dir=sweep_dir(config), steps=steps, param_space=space,
        points=points, draws=draws, need_cpus=need_cpus, need_gpus=need_gpus, need_text=need_text,
        grace_period=grace, storage_path=storage,
    )


def concurrency(plan: SweepPlan, cpus: float, gpus: float, where: str) -> int:
    """Trials that fit at once (admission control); ConfigError when not even one trial fits."""
    eps = 1e-9
    if plan.need_gpus > gpus + eps or plan.need_cpus > cpus + eps:
        short = "GPUs" if plan.need_gpus > gpus + eps else "CPUs"
        local = where == "the local Ray"
        raise ConfigError(
            f"train.num_workers: one trial of the sweep needs {plan.need_text} at once, but {where} "
            f"has {cpus:g} CPUs and {gpus:g} GPUs (too few {short}); lower train.num_workers / "
            f"generator.num_actors / tune.driver_cpus"
            + (" or raise cluster.num_cpus (logical CPUs of the local Ray)" if local and short == "CPUs" else "")
        )
    fit = int((cpus + eps) // plan.need_cpus)
    if plan.need_gpus > 0:
        fit = min(fit, int((gpus + eps) // plan.need_gpus))
    asked = plan.config.tune.max_concurrent_trials
    return min(fit, asked) if asked else fit


# -- one trial -------------------------------------------------------------------------------------
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


def _tune_trial_dirname(trial) -> str:
    return trial_dirname(trial.trial_id, trial.config)


def _completed(config: Config) -> dict | None:
    """The last report of a Train run that already reached its final step (None otherwise)."""
    from .storage import storage_path

    snapshot = Path(storage_path(config)) / config.name / "checkpoint_manager_snapshot.json"
    if "://" in storage_path(config) or not snapshot.is_file():
        return None
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("metrics", {})
    return latest if int(latest.get("step", 0)) >= config.train.steps else None


def _run_trial(params: dict[str, Any], plan: dict[str, Any]) -> None:
    """The Tune function trainable: this trial's config -> its own stream -> TorchTrainer.fit()."""
    import ray.data
    import ray.tune
    from ray.data import ExecutionResources
    from ray.tune.integration.ray_train import TuneReportCallback

    from .config import dump_config
    from .runtime import Need, configure_data_context
    from .training.trainer import make_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    trial_dir = Path(plan["sweep_dir"]) / trial_dirname(trial_id, params)
    config = trial_config(from_dict(plan["trial_base"]), params, plan["steps"], trial_dir)
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with open(trial_dir / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps({"start": time.time(), "pid": os.getpid()}) + "\n")

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
    recorder = TrainReservationRecorder(_reservation_key(plan["sweep"], trial_id))
    trainer = make_trainer(
        config, callbacks=[TuneReportCallback(), recorder], captions_per_pass=plan["captions_per_pass"]
    )
    trainer.fit()
    with open(trial_dir / ATTEMPTS_FILE, "a") as f:
        f.write(json.dumps({"end": time.time(), "pid": os.getpid()}) + "\n")


# -- stale Train reservations ------------------------------------------------------------------------
# When Tune stops a trial (ASHA, errors) it ends the trial's actor; the TorchTrainer's controller dies
# with it, but the placement group the controller made for its worker group belongs to the *job* and
# outlives it. Train's own PlacementGroupCleaner needs the State API (absent with a minimal dashboard)
# and a unique Ray instance per host, so on a shared or dashboard-less Ray the reservation leaks and
# the next admitted trial waits forever. So: the trial's controller records its actor id and worker
# placement groups in the GCS key-value store, and the sweep driver removes any that are still there
# once the trial is over and its controller is gone.
_KV_NAMESPACE = "stablerep_ray.tune"


def _reservation_key(sweep: str, trial_id: str) -> bytes:
    return f"{sweep}/{trial_id}".encode()


def _kv_record(key: bytes) -> dict:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(key, namespace=_KV_NAMESPACE)
    return json.loads(raw) if raw else {}


class TrainReservationRecorder(ControllerCallback, WorkerGroupCallback):
    """Train V2 controller / worker-group callback (runs in the trial's TrainController): records the
    controller's actor id and each worker-group placement group under ``key``."""

    def __init__(self, key: bytes):
        self.key = key

    def _update(self, **changes) -> None:
        from ray.experimental import internal_kv

        record = _kv_record(self.key)
        if "pg" in changes:
            record.setdefault("pgs", []).append(changes.pop("pg"))
        record.update(changes)
        internal_kv._internal_kv_put(self.key, json.dumps(record), overwrite=True, namespace=_KV_NAMESPACE)

    def after_controller_start(self, train_run_context) -> None:
        import ray

        self._update(controller=ray.get_runtime_context().get_actor_id())

    def after_worker_group_start(self, worker_group) -> None:
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        self._update(pg=pg.id.hex())


def _actor_alive(actor_id: str) -> bool:
    import ray

    info = ray._private.state.actors(actor_id=actor_id)  # GCS actor table: no dashboard needed
    return bool(info) and info.get("State") != "DEAD"


def _release(record: dict) -> float:
    """Remove the record's placement groups that still exist; returns the CPUs released."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    released = 0.0
    for pg_hex in record.get("pgs", []):
        pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
        table = ray.util.placement_group_table(pg)
        if table and table.get("state") not in (None, "REMOVED"):
            ray.util.remove_placement_group(pg)
            released += sum(b.get("CPU", 0) for b in table.get("bundles", {}).values())
    return released


class ReleaseStaleReservations(ray_tune.Callback):
    """Tune callback (sweep driver): once a trial is over and its TrainController has exited,
    remove the trial's Train worker placement groups that are still reserved."""

    def __init__(self, sweep: str, give_up_s: float = 120.0):
        self.sweep, self.give_up_s = sweep, give_up_s
        self.pending: dict[str, float] = {}
        self.released: list[tuple[str, float]] = []
        self._last_check = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.pending[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.pending[trial.trial_id] = time.monotonic()

    def on_step_begin(self, iteration, trials, **info):
        if self.pending and time.monotonic() - getattr(self, "_last_check", 0.0) > 2:
            self._last_check = time.monotonic()
            self.sweep_pending()

    def on_experiment_end(self, trials, **info):
        # No waiting here: once the driver's job ends, Ray removes the job's placement groups.
        self.sweep_pending()

    def sweep_pending(self) -> None:
        from ray.experimental import internal_kv

        for trial_id, since in list(self.pending.items()):
            key = _reservation_key(self.sweep, trial_id)
            try:
                record = _kv_record(key)
                waited = time.monotonic() - since
                controller = record.get("controller")
                if controller and _actor_alive(controller) and waited < self.give_up_s:
                    continue  # still shutting down (a normal end removes its own group)
                if not record and waited < 10:
                    continue  # the record may still be on its way
                cpus = _release(record)
                if cpus:
                    self.released.append((trial_id, cpus))
                    print(f"released a stale Train reservation of trial {trial_id} ({cpus:g} CPUs)")
                internal_kv._internal_kv_del(key, namespace=_KV_NAMESPACE)
            except Exception as err:  # noqa: BLE001 - never let cleanup stop the sweep
                print(f"warning: could not check trial {trial_id}'s Train reservation: {err}")
            self.pending.pop(trial_id, None)



# -- results ---------------------------------------------------------------------------------------
def trial_statuses(path: str | os.PathLike) -> dict[str, str]:
    """trial_id -> Tune status (PENDING/RUNNING/TERMINATED/ERROR) from the newest experiment state."""
    states = sorted(Path(path).glob("experiment_state-*.json"))
    if not states:
        return {}
    data = json.loads(states[-1].read_text())
    out = {}
    for entry in data.get("trial_data", []):
        state = json.loads(entry[0]) if isinstance(entry, list) else entry
        if isinstance(state, str):
            state = json.loads(state)
        out[state.get("trial_id")] = state.get("status")
    return out


def _point_key(row: dict, keys: list[str]) -> tuple:
    return tuple(row.get(k) for k in keys)


def collect_rows(results, plan: SweepPlan) -> list[dict[str, Any]]:
    """One row per trial: params, seed, final metric, steps, status."""
    tc, metric = plan.config.tune, plan.config.tune.metric
    keys = list(tc.space) + ([DRAW] if plan.draws else [])
    rows = []
    for result in results:
        params = result.config or {}
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("-", 1)[0]
        step = int(metrics.get("step", 0) or 0)
        status = "error" if result.error else ("completed" if step >= plan.steps else "stopped")
        history = None
        try:
            frame = result.metrics_dataframe
            if frame is not None and metric in frame:
                history = [float(v) for v in frame[metric].dropna()]
        except Exception:  # noqa: BLE001 - a missing progress file only costs the best-so-far column
            history = None
        final = metrics.get(metric)
        best = (max if tc.mode == "max" else min)(history) if history else final
        rows.append({
            "trial_id": trial_id,
            **{k: params.get(k) for k in keys},
            "seed": params.get(SEED),
            metric: final,
            f"best {metric}": best,
            "step": step,
            "images_seen": step * plan.config.train.batch_size,
            "loss": metrics.get("loss"),
            "status": status,
            "error": str(result.error).splitlines()[0][:200] if result.error else "",
            "trial_dir": str(Path(result.path)) if result.path else "",
        })
    return sorted(rows, key=lambda r: (_point_key(r, keys), r["seed"]))


def summarize(rows: list[dict], plan: SweepPlan) -> list[dict[str, Any]]:
    """Mean and spread (sample std) of the final metric over the seeds of each point."""
    tc, metric = plan.config.tune, plan.config.tune.metric
    keys = list(tc.space) + ([DRAW] if plan.draws else [])
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_point_key(row, keys), []).append(row)
    summary = []
    for key, members in groups.items():
        values = [float(r[metric]) for r in members if r[metric] is not None and not r["error"]]
        summary.append({
            **dict(zip(keys, key)),
            "mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0 if values else None,
            "seeds": len(values),
            "completed": sum(r["status"] == "completed" for r in members),
            "trials": len(members),
        })
    return summary


def best_point(summary: list[dict], plan: SweepPlan) -> dict | None:
    """Best mean over seeds, among points whose trials all ran the full budget (if any did)."""
    scored = [s for s in summary if s["mean"] is not None]
    full = [s for s in scored if s["completed"] == s["trials"]]
    pool = full or scored
    if not pool:
        return None
    sign = 1 if plan.config.tune.mode == "max" else -1
    return max(pool, key=lambda s: sign * s["mean"])


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_metric(summary: list[dict], plan: SweepPlan, path: Path) -> None:
    """Metric vs guidance scale, one line per m: mean over seeds, error bars = spread over seeds.
    Where other swept keys vary, each (w, m) shows its best point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, metric = plan.config, plan.config.tune.metric
    sign = 1 if cfg.tune.mode == "max" else -1
    cells: dict[tuple, dict] = {}
    for s in summary:
        if s["mean"] is None:
            continue
        w = float(s.get(GUIDANCE_KEY, cfg.generator.guidance_scale))
        m = int(s.get(M_KEY, cfg.stream.images_per_group))
        if (w, m) not in cells or sign * s["mean"] > sign * cells[(w, m)]["mean"]:
            cells[(w, m)] = s
    others = [k for k in cfg.tune.space if k not in (GUIDANCE_KEY, M_KEY)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in sorted({m for _, m in cells}):
        xs = sorted(w for w, mm in cells if mm == m)
        ys = [cells[(w, m)]["mean"] for w in xs]
        es = [cells[(w, m)]["std"] for w in xs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=f"m = {m} images / caption")
    ax.set_xlabel("guidance scale w (generator.guidance_scale)")
    ax.set_ylabel(metric)
    seeds = len(cfg.tune.seeds)
    title = f"{plan.name}: mean over {seeds} seed{'s' if seeds > 1 else ''}, bars = std"
    if others:
        title += f"\n(best over {', '.join(others)})"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_best_config(best: dict, plan: SweepPlan, path: Path) -> None:
    """The best point applied to the sweep's base config: a train config, ready to run."""
    cfg = plan.config
    data = cfg.model_dump(mode="json", exclude={"tune"})
    params = {k: best[k] for k in cfg.tune.space}
    for key, value in params.items():
        set_key(data, key, value, f"tune.space.{key}")
    data["train"]["steps"] = plan.steps
    data["name"] = f"{plan.name}-best"
    from_dict(data)  # it must load as a train config
    metric = cfg.tune.metric
    header = (
        f"# Best point of sweep {plan.name} ({plan.sweep_dir}):\n"
        f"#   {', '.join(f'{k}={v}' for k, v in params.items())}\n"
        f"#   {metric} = {best['mean']:.4f} +- {best['std']:.4f} (mean +- std over {best['seeds']} "
        f"seed{'s' if best['seeds'] != 1 else ''}, {plan.steps} steps of {cfg.train.batch_size} images)\n"
        f"# Train it: stablerep-ray train {path.name}\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


@dataclass
class SweepOutputs:
    sweep_dir: Path
    results_csv: Path
    summary_csv: Path
    plot: Path | None
    best_config: Path | None
    rows: list[dict]
    summary: list[dict]
    best: dict | None


def write_outputs(results, plan: SweepPlan) -> SweepOutputs:
    rows = collect_rows(results, plan)
    summary = summarize(rows, plan)
    out = plan.sweep_dir
    results_csv, summary_csv = out / "results.csv", out / "summary.csv"
    _write_csv(results_csv, rows)
    _write_csv(summary_csv, summary)
    plot = out / f"{re.sub(r'[^A-Za-z0-9]+', '_', plan.config.tune.metric).strip('_')}_vs_guidance.png"
    if any(s["mean"] is not None for s in summary):
        plot_metric(summary, plan, plot)
    else:
        plot = None
    best = best_point(summary, plan)
    best_config = out / "best-config.yaml" if best else None
    if best:
        write_best_config(best, plan, best_config)
    return SweepOutputs(out, results_csv, summary_csv, plot, best_config, rows, summary, best)


# -- the driver ------------------------------------------------------------------------------------
def _diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def experiment_path(config: Config) -> str:
    """Where Tune keeps the experiment (what --resume restores): storage_path/<sweep name>."""
    storage = config.cluster.storage_path
    if storage and "://" in storage:
        return f"{storage.rstrip('/')}/{sweep_name(config)}"
    return str(Path(storage).expanduser().resolve() / sweep_name(config)) if storage else str(sweep_dir(config))


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
        changed = [k for k in _diff_keys(before, now) if not k.startswith("cluster.")]
        if changed:
            raise ConfigError(
                f"{changed[0]}: differs from the interrupted sweep's config ({saved}); resume with the "
                f"same config (changed: {', '.join(changed[:8])})"
            )


def _resources_before_ray(config: Config) -> tuple[float, float, str] | None:
    """Local Ray's resources before it starts (None when joining a cluster)."""
    from .runtime import local_resources, ray_address

    if ray_address(config):
        return None
    cpus, gpus = local_resources(config)
    return cpus, gpus, "the local Ray"


def run_sweep(config: Config, resume: bool = False, captions_per_pass: int = 0) -> SweepOutputs:
    """Run (or with ``resume`` finish) the sweep declared in ``config.tune``; returns its outputs."""
    plan = plan_sweep(config)
    _check_resume(config, resume)
    local = _resources_before_ray(config)
    if local:  # fail before Ray starts
        concurrency(plan, *local)

    from ray import tune

    from .config import dump_config
    from .runtime import cluster_capacity, init_ray

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

    trainable = tune.with_resources(
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
        {"CPU": tc.driver_cpus},
    )
    if resume:
        path = experiment_path(config)
        statuses = trial_statuses(path) if "://" not in path else {}
        done = sum(s == "TERMINATED" for s in statuses.values())
        print(f"resuming {path}: {done} of {len(statuses)} trials finished; running the rest")
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
                trial_dirname_creator=_tune_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=plan.name,
                storage_path=plan.storage_path,
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                callbacks=[ReleaseStaleReservations(plan.name)],
                verbose=1,
            ),
        )
    results = tuner.fit()
    outputs = write_outputs(results, plan)
    _print_outputs(outputs, plan)
    if outputs.rows and all(r["status"] == "error" for r in outputs.rows):
        raise RuntimeError(f"every trial of {plan.name} failed; see {outputs.results_csv} and the trial logs")
    return outputs


def _print_outputs(outputs: SweepOutputs, plan: SweepPlan) -> None:
    metric = plan.config.tune.metric
    counts = {}
    for row in outputs.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"trials: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}")
    for s in outputs.summary:
        point = ", ".join(f"{k}={s[k]}" for k in plan.config.tune.space)
        value = "n/a" if s["mean"] is None else f"{s['mean']:.4f} +- {s['std']:.4f}"
        print(f"  {point}: {metric} {value} ({s['seeds']} seeds)")
    print(f"results table: {outputs.results_csv}")
    print(f"summary (mean/std over seeds): {outputs.summary_csv}")
    if outputs.plot:
        print(f"plot: {outputs.plot}")
    if outputs.best_config:
        print(f"best config: {outputs.best_config}  (stablerep-ray train {outputs.best_config})")
    print(f"tensorboard: tensorboard --logdir {outputs.sweep_dir}")
