"""What a sweep tells its user: one console line per trial event while it runs, then results and
summary tables, the plot and the best config.

Trials are compared by their final metric, averaged over seeds (the spread over seeds shows
whether a difference between points is real). Points whose trials ASHA stopped early rank behind
points that ran the whole budget, so best-config.yaml is a point that was trained as it will be.
"""

from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from ray import tune as ray_tune

from ..config import ConfigError, from_dict
from ..config.io import set_dotted_key
from ..console import duration, metric_label
from .plan import GUIDANCE_KEY, M_KEY, SEED, SweepPlan
from .trial import trial_dirname


class TrialEvents(ray_tune.Callback):
    """Tune callback on the sweep driver: one line per trial start, report, end or failure, in place of
    Tune's periodic status tables."""

    # Trial id -> Tune status of the trials not ended at the last loop step, taken before Tune's cleanup
    # marks every live trial TERMINATED: after Ctrl-C, the trials it interrupted (not those the scheduler
    # stopped). On the class: on --resume Tune runs an unpickled copy of the callback, not this instance.
    unfinished: ClassVar[dict[str, str]] = {}
    # Trial id -> its point and seed, for every trial the loop has held: a trial that never reported
    # (queued when Ctrl-C came, or failed at start-up) has no config in its ray.tune.Result.
    configs: ClassVar[dict[str, dict[str, Any]]] = {}
    # Trial id -> the ConfigError line of each trial that failed on one.
    refused: ClassVar[dict[str, str]] = {}

    def __init__(self, plan: SweepPlan):
        self.metric, self.steps = plan.config.tune.metric, plan.steps
        self.started = time.monotonic()

    def setup(self, **info) -> None:  # also on --resume, in the new driver
        self.started = time.monotonic()
        TrialEvents.unfinished, TrialEvents.configs, TrialEvents.refused = {}, {}, {}

    def on_step_end(self, iteration, trials, **info) -> None:
        TrialEvents.unfinished = {t.trial_id: t.status for t in trials if t.status not in ("TERMINATED", "ERROR")}
        TrialEvents.configs = {t.trial_id: t.config for t in trials}

    def _say(self, trial, text: str) -> None:
        print(f"[{duration(time.monotonic() - self.started)}] trial {trial_dirname(trial.trial_id, trial.config)}: "
              f"{text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._say(trial, "started")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        parts = [f"step {result.get('step')}/{self.steps}"]
        if isinstance(result.get(self.metric), (int, float)):
            parts.append(f"{metric_label(self.metric)} {result[self.metric]:.3f}")
        if isinstance(result.get("loss"), (int, float)):
            parts.append(f"loss {result['loss']:.3f}")
        self._say(trial, "  ".join(parts))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        step = int(trial.last_result.get("step", 0) or 0)
        self._say(trial, "done" if step >= self.steps else f"stopped by the scheduler at step {step}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        refused = refusal_of(trial)
        if refused is not None:
            TrialEvents.refused[trial.trial_id] = str(refused)
        self._say(trial, f"failed: {refused}" if refused else f"failed ({trial.error_file or 'see the log above'})")


def refusal_of(trial) -> ConfigError | None:
    """The ConfigError that failed ``trial`` (an actor or worker that refused its config), from the error
    Tune saved in the trial's local directory; None for any other failure."""
    import ray.cloudpickle

    try:
        with open(trial.pickled_error_file, "rb") as f:
            return ConfigError.raised_in(ray.cloudpickle.load(f))
    except Exception:  # noqa: BLE001 - no file, or one that does not unpickle here: say where it is instead
        return None


def _point_key(row: dict, keys: list[str]) -> tuple:
    return tuple(row.get(k) for k in keys)


def _order(row: dict, keys: list[str]) -> tuple:
    """Rows by point, then seed; a value missing (None) sorts last rather than failing the comparison."""
    return tuple((v is None, 0 if v is None else v) for v in (*_point_key(row, keys), row["seed"]))


def _status(error, trial_id: str, step: int, plan: SweepPlan, interrupted: dict[str, str]) -> str:
    if error:
        return "error"
    if step >= plan.steps:
        return "completed"
    if trial_id in interrupted:
        return "not started" if interrupted[trial_id] == "PENDING" and not step else "interrupted"
    return "stopped"  # by the scheduler (ASHA)


def collect_rows(results, plan: SweepPlan, interrupted: dict[str, str] | None = None,
                 configs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per trial: params, seed, final metric, steps, status: completed, stopped (by the
    scheduler), error, or for the trials in ``interrupted`` (id -> Tune status) interrupted / not started.
    ``configs`` (id -> config, ``TrialEvents.configs``) gives the params of trials that never reported."""
    tc, metric = plan.config.tune, plan.config.tune.metric
    keys = plan.point_keys
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name.split("-", 1)[0]
        params = result.config or (configs or {}).get(trial_id) or {}
        step = int(metrics.get("step", 0) or 0)
        status = _status(result.error, trial_id, step, plan, interrupted or {})
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
    return sorted(rows, key=lambda r: _order(r, keys))


def summarize(rows: list[dict], plan: SweepPlan) -> list[dict[str, Any]]:
    """Mean and spread (sample std) of the final metric over the seeds of each point."""
    metric, keys = plan.config.tune.metric, plan.point_keys
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_point_key(row, keys), []).append(row)
    summary = []
    for key, members in groups.items():
        values = [float(r[metric]) for r in members if r[metric] is not None and not r["error"]]
        summary.append({
            **dict(zip(keys, key, strict=True)),
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
        set_dotted_key(data, key, value, f"tune.space.{key}")
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
    interrupted: bool = False  # stopped by Ctrl-C: the rest runs with --resume


def write_outputs(results, plan: SweepPlan, interrupted: dict[str, str] | None = None,
                  configs: dict[str, dict[str, Any]] | None = None) -> SweepOutputs:
    """``interrupted``: the trials a Ctrl-C ended, id -> Tune status (``TrialEvents.unfinished``);
    ``configs``: every trial's params (``TrialEvents.configs``)."""
    rows = collect_rows(results, plan, interrupted, configs)
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


def print_outputs(outputs: SweepOutputs, plan: SweepPlan) -> None:
    metric = plan.config.tune.metric
    counts = {}
    for row in outputs.rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    print(f"trials: {', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}")
    keys = list(plan.config.tune.space)
    table = [[k.rsplit(".", 1)[-1] for k in keys] + [f"{metric} (mean +- std)", "seeds", "full budget"]]
    for s in outputs.summary:
        value = "n/a" if s["mean"] is None else f"{s['mean']:.4f} +- {s['std']:.4f}"
        table.append([str(s[k]) for k in keys] + [value, str(s["seeds"]), f"{s['completed']}/{s['trials']}"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"results table: {outputs.results_csv}")
    print(f"summary (mean/std over seeds): {outputs.summary_csv}")
    if outputs.plot:
        print(f"plot: {outputs.plot}")
    if outputs.best_config:
        print(f"best config: {outputs.best_config}  (stablerep-ray train {outputs.best_config})")
    print(f"tensorboard: tensorboard --logdir {outputs.sweep_dir}")
