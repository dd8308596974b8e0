"""The ``tune`` section: what a Ray Tune sweep varies, how long each trial runs, how trials are stopped."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .sections import _Section


class TuneParam(_Section):
    """One swept key of ``tune.space``: exactly one form. A bare list is short for ``grid``."""

    grid: list[Any] | None = Field(None, description="Run every value (Tune grid_search).")
    choice: list[Any] | None = Field(None, description="Draw uniformly from these values (num_samples draws).")
    uniform: tuple[float, float] | None = Field(None, description="Draw uniformly in [low, high].")
    loguniform: tuple[float, float] | None = Field(None, description="Draw log-uniformly in [low, high].")
    randint: tuple[int, int] | None = Field(None, description="Draw an integer in [low, high) (high excluded).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"grid": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _one_form(self) -> TuneParam:
        forms = [name for name in TuneParam.model_fields if getattr(self, name) is not None]
        if len(forms) != 1:
            raise ValueError(
                "give exactly one of grid / choice / uniform / loguniform / randint "
                f"(got {forms or 'none'}), e.g. {{grid: [2.0, 8.0]}}"
            )
        form = forms[0]
        value = getattr(self, form)
        if form in ("grid", "choice") and not value:
            raise ValueError(f"{form}: list at least one value")
        if form in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{form}: need low < high, got {list(value)}")
        if form == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: need 0 < low, got {list(value)}")
        return self

    @property
    def form(self) -> str:
        return next(name for name in TuneParam.model_fields if getattr(self, name) is not None)


class TuneBudgetConfig(_Section):
    steps: int = Field(0, ge=0, description="Optimiser steps per trial, equal for all trials; 0: train.steps.")
    images: int = Field(
        0,
        ge=0,
        description="Images seen per trial instead of steps: steps = images / train.batch_size "
        "(the global batch is the same for every trial).",
    )

    @model_validator(mode="after")
    def _one_unit(self) -> TuneBudgetConfig:
        if self.steps and self.images:
            raise ValueError("set either steps or images, not both")
        return self


class TuneSchedulerConfig(_Section):
    type: Literal["asha", "none"] = Field(
        "asha", description="'asha': early-stop weak trials (ASHA); 'none': every trial runs its budget."
    )
    grace_period: int = Field(
        0, ge=0, description="Steps every trial runs before ASHA may stop it; 0: a quarter of the budget."
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="ASHA keeps the best 1/reduction_factor of the trials at each rung."
    )


class TuneConfig(_Section):
    name: str = Field(
        "", description="Sweep name: output_dir/name holds the Tune experiment; empty: '<name>-sweep'."
    )
    space: dict[str, TuneParam] = Field(
        default_factory=dict,
        description="Swept keys (dotted config keys, e.g. generator.guidance_scale) -> "
        "{grid|choice|uniform|loguniform|randint: ...}; a bare list is a grid.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        description="Every point runs once per seed (an int N means seeds 0..N-1); results report the "
        "mean and spread over seeds.",
    )
    seed_keys: list[str] = Field(
        default_factory=lambda: ["train.seed", "generator.seed"],
        description="Config keys set to the trial's seed.",
    )
    num_samples: int = Field(
        1, gt=0, description="Draws of the random forms (choice/uniform/...); each draw runs the whole grid."
    )
    search_seed: int = Field(0, ge=0, description="Seed of those draws (a sweep is reproducible).")
    metric: str = Field("eval/knn_top1", description="Reported metric to compare trials by.")
    mode: Literal["max", "min"] = Field("max", description="Whether a larger metric is better.")
    budget: TuneBudgetConfig = Field(default_factory=TuneBudgetConfig)
    scheduler: TuneSchedulerConfig = Field(default_factory=TuneSchedulerConfig)
    max_concurrent_trials: int = Field(
        0, ge=0, description="Trials at once; 0: as many as fit the cluster (a larger value is lowered)."
    )
    driver_cpus: float = Field(
        0.5, gt=0, description="CPUs reserved for each trial's driver (the Tune function that fits it)."
    )
    max_failures: int = Field(0, ge=0, description="Tune-level restarts of a failed trial.")

    @model_validator(mode="before")
    @classmethod
    def _seed_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("seeds"), int):
            if data["seeds"] < 1:
                raise ValueError(f"seeds: need at least 1 seed, got {data['seeds']}")
            data = {**data, "seeds": list(range(data["seeds"]))}
        return data

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if not self.seeds:
            raise ValueError("seeds: list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: seeds repeat in {self.seeds}")
        return self
