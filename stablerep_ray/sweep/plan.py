"""The sweep plan: every trial config, built and checked before Ray starts.

A mistake in ``tune:`` (a key that does not exist, an m that breaks the equal global batch, a metric
that is never reported, a trial larger than the cluster) should cost a second, not a Ray start and a
round of admitted trials. So the whole space is expanded here, without Ray: grid points, the
pre-drawn values of the random forms (one draw shared by every seed), and each point's trial config.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from ..config import SYNTH_SOURCE, Config, ConfigError, TuneParam, from_dict
from ..config.io import set_dotted_key
from ..storage import storage_path
from ..training.objectives import get_objective

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
TRAIN_DIR = "train"


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

    @property
    def point_keys(self) -> list[str]:
        """The params that identify a point (its seeds share them)."""
        return list(self.config.tune.space) + ([DRAW] if self.draws else [])

    def trial_config(self, params: dict[str, Any], trial_dir: Path | None = None) -> Config:
        return trial_config(self.trial_base, params, self.steps, trial_dir or self.sweep_dir / "_check")


def sweep_name(config: Config) -> str:
    return config.tune.name or f"{config.name}-sweep"


def sweep_dir(config: Config) -> Path:
    return Path(config.output_dir).expanduser().resolve() / sweep_name(config)


def experiment_path(config: Config) -> str:
    """Where Tune keeps the experiment (what --resume restores): Train's storage / <sweep name>."""
    root = storage_path(config)
    if "://" in root:
        return f"{root.rstrip('/')}/{sweep_name(config)}"
    return str(Path(root).expanduser().resolve() / sweep_name(config))


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


def trial_config(base: Config, params: dict[str, Any], steps: int, trial_dir: Path) -> Config:
    """The Config of one trial: base + swept keys + seed keys + budget; its run lives in trial_dir."""
    data = base.model_dump(mode="json", exclude={"tune"})
    for key, value in params.items():
        if key not in (SEED, DRAW):
            set_dotted_key(data, key, value, f"tune.space.{key}")
    if SEED in params:
        for key in base.tune.seed_keys:
            set_dotted_key(data, key, params[SEED], f"tune.seed_keys ({key})")
    data["train"]["steps"] = steps
    data["name"] = TRAIN_DIR
    data["output_dir"] = str(trial_dir)
    if base.cluster.storage_path:  # shared storage: the trial's Train run goes next to its Tune trial
        root = base.cluster.storage_path.rstrip("/")
        data["cluster"]["storage_path"] = f"{root}/{trial_dir.parent.name}/{trial_dir.name}"
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
    if config.captions.source == SYNTH_SOURCE:  # concept, background, texture, example files and a model dir
        from ..captions.synth.pools import with_absolute_paths

        data["captions"]["synth"] = with_absolute_paths(config.captions.synth).model_dump(mode="json")
    data["generator"]["model"] = absolute(config.generator.model)

    def absolute_spec(spec: str) -> str:
        if not spec or Path(spec).exists():
            return absolute(spec)
        from ..evaluation import parse_data_spec

        return ":".join(absolute(s) for s in parse_data_spec(spec) if s)

    eval_data = config.eval.data
    data["eval"]["data"] = (
        [absolute_spec(s) for s in eval_data] if isinstance(eval_data, list) else absolute_spec(eval_data)
    )
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


def _with_value(model: Any, parts: list[str], value: Any) -> Any:
    """A copy of ``model`` with the dotted ``parts`` set, unvalidated; unknown keys leave it as is."""
    head, *rest = parts
    if not isinstance(model, BaseModel) or head not in type(model).model_fields:
        return model
    return model.model_copy(update={head: _with_value(getattr(model, head), rest, value) if rest else value})


def _point_view(config: Config, point: dict[str, Any]) -> Config:
    """``config`` with the point's values and no validation: the sweep-wide batch check must see the
    point before the schema rejects its trial config with a message about that one trial. Keys that
    do not resolve are skipped here; ``trial_config`` names them."""
    for key, value in point.items():
        if key not in (SEED, DRAW):
            config = _with_value(config, key.split("."), value)
    return config


def _check_fair_batch(config: Config, points: list[dict]) -> None:
    """Equal global batch for every m: batch_size must split into whole groups on every worker.
    The group (encoder inputs per caption) is the point's objective's, from the registry."""
    batch = config.train.batch_size
    units = {}
    for point in points:
        view = _point_view(config, point)
        try:
            group = int(get_objective(view.train.objective).inputs_per_group(view))
        except ValueError:
            continue  # an unknown objective: its trial config names it
        workers = int(view.train.num_workers)
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


def _expand(config: Config) -> tuple[list[str], list[str], list[dict], list[dict]]:
    """(grid keys, random keys, draws, points): the grid x the pre-drawn samples of the random forms."""
    tc = config.tune
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
        grid_point = dict(zip(grid_keys, values, strict=True))
        for i, draw in enumerate(draws or [None]):
            points.append({**grid_point, **({DRAW: i, **draw} if draw is not None else {})})
    return grid_keys, random_keys, draws, points


def plan_sweep(config: Config) -> SweepPlan:
    """Expand and check the sweep: every trial config is built and validated here, without Ray."""
    from ray import tune

    from ..runtime import Need

    tc = config.tune
    if not tc.space:
        raise ConfigError(
            "tune.space: declare at least one swept key, e.g. "
            "tune: {space: {generator.guidance_scale: [2.0, 8.0], stream.images_per_group: [2, 4]}}"
        )
    for key in tc.space:
        _check_key(key, tc.seed_keys)
    for key in tc.seed_keys:
        set_dotted_key(config.model_dump(mode="json"), key, 0, f"tune.seed_keys ({key})")
    steps = budget_steps(config)
    grid_keys, random_keys, draws, points = _expand(config)

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
