"""Tuning stage: Ray Tune sweeps (guidance scale x images per caption, ...) over whole training runs.

Each Tune trial runs one Train run (``trial``); the sweep is planned and checked without Ray
(``plan``), driven by ``run.run_sweep`` and reported as tables, a plot and a best config
(``report``). ``ray_reservations`` works around a Ray Train behaviour and says when it can go.

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

from .plan import DRAW, SEED, SweepPlan, budget_steps, concurrency, plan_sweep, trial_config
from .report import SweepOutputs, write_outputs
from .run import run_sweep, trial_statuses
from .trial import ATTEMPTS_FILE, trial_dirname

__all__ = [
    "ATTEMPTS_FILE", "DRAW", "SEED", "SweepOutputs", "SweepPlan", "budget_steps", "concurrency",
    "plan_sweep", "run_sweep", "trial_config", "trial_dirname", "trial_statuses", "write_outputs",
]
