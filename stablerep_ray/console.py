"""What the commands print: one progress line per log interval, a summary at the end, and Ray kept quiet.

Rank 0 of the training loop sends one record per log interval to a small queue actor; the driver
prints it as a line. The driver owns the console, so the lines carry no ``(RayTrainWorker pid=...)``
prefix and read the same locally, in ``ray job logs`` and in CI. ``--verbose`` (or
``STABLEREP_RAY_VERBOSE=1``) gives back Ray's own INFO logs and per-operator progress bars.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

VERBOSE_ENV = "STABLEREP_RAY_VERBOSE"
#: An ``embed/*`` spread (telemetry.embedding_spread) below this: every input maps to about one direction
#: (mean pairwise cosine above ~0.9975), whatever the loss does.
COLLAPSED_SPREAD = 0.05
#: Stuck: over the last STUCK_RECORDS log records a loss term moved by less than STUCK_FLATNESS of its
#: value while a spread stayed under STUCK_SPREAD. Measured (docs/learning.md, "Collapse"): SynCLR stuck
#: in the simple world's shape-only warm-up reads its contrastive term at ln 127 +- 0.001 with spreads of
#: 0.05-0.09; live runs stay above 0.12 (StableRep in that warm-up, its loss within 0.3 % of ln 127 for
#: 60 steps before it finds shape) and at 0.5-0.8 elsewhere. Both conditions, so that neither a slow
#: start with spread-out embeddings nor bunched embeddings under a moving loss is called stuck.
STUCK_RECORDS = 5
STUCK_FLATNESS = 1e-3
STUCK_SPREAD = 0.1


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def interactive() -> bool:
    """Whether stdout is a terminal: progress bars redraw in place there, and as new lines anywhere else."""
    return sys.stdout.isatty()


def duration(seconds: float) -> str:
    """``1h02m``, ``1m40s``, ``12s``."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def metric_label(name: str) -> str:
    """``eval/knn_top1`` -> ``knn``, ``eval/student/knn_top1`` -> ``student/knn``, ``eval/knn_top1/shape`` ->
    ``knn/shape``: what a console line shows."""
    return name.removeprefix("eval/").replace("_top1", "", 1)


def eval_parts(scores: dict[str, float], label: Callable[[str], str], digits: int) -> list[str]:
    """One part per metric, ``knn 0.612``; a metric scored on several sets (``eval/knn_top1/color`` beside
    ``eval/knn_top1``, which repeats the first set) shows the sets instead: ``knn color 0.830 shape 0.210``."""
    parts = []
    for name, value in scores.items():
        if any(name.startswith(f"{other}/") for other in scores):
            continue  # one set of a metric: shown with it
        sets = [(n.removeprefix(f"{name}/"), v) for n, v in scores.items() if n.startswith(f"{name}/")]
        shown = " ".join(f"{s} {v:.{digits}f}" for s, v in sets) if sets else f"{value:.{digits}f}"
        parts.append(f"{label(name)} {shown}")
    return parts


def progress_line(record: dict[str, Any]) -> str:
    """``step 50/200  loss 4.121  312 img/s  wait 3%  knn 0.612  eta 1m40s``."""
    step, steps, scalars = record["step"], record["steps"], record["scalars"]
    parts = [
        f"step {step}/{steps}",
        f"loss {scalars['loss/total']:.3f}",
        f"{scalars['throughput/images_per_s']:.0f} img/s",
        f"wait {scalars['throughput/data_wait_fraction']:.0%}",
    ]
    parts += eval_parts(record["eval"], metric_label, 3)
    done = step - record["start"]
    if step < steps and done > 0:
        parts.append(f"eta {duration(record['train_s'] / done * (steps - step))}")
    return "  ".join(parts)


def collapse_warning(records: list[dict[str, Any]]) -> str | None:
    """The line that says a run has collapsed or is stuck, given its log records so far; None while it
    is live."""
    step, scalars = records[-1]["step"], records[-1]["scalars"]
    low = [f"{name} {value:.3f}" for name, value in scalars.items()
           if name.startswith("embed/") and value < COLLAPSED_SPREAD]
    if low:
        return (f"warning: step {step}: the embeddings have collapsed to one point ({', '.join(low)}; "
                f"1 = spread out): the contrastive loss has no gradient left and this run will not learn "
                f"from here (docs/learning.md, 'Collapse')")
    window = [r["scalars"] for r in records[-STUCK_RECORDS:]]
    if len(window) < STUCK_RECORDS:
        return None
    spreads = [name for name in scalars if name.startswith("embed/")
               and all(s.get(name, 1.0) < STUCK_SPREAD for s in window)]
    flat = [name for name in scalars if name.startswith("loss/") and name != "loss/total"
            and _moved(name, window) < STUCK_FLATNESS]
    if not (spreads and flat):
        return None
    since = records[-STUCK_RECORDS]["step"]
    spread_range = ", ".join(f"{n} {min(s[n] for s in window):.2f}-{max(s[n] for s in window):.2f}" for n in spreads)
    return (f"warning: step {step}: the run is stuck: {flat[0]} has stayed at {scalars[flat[0]]:.3f} since step "
            f"{since} while the embeddings sit near one point ({spread_range}; 1 = spread out): it is not "
            f"learning (docs/learning.md, 'Collapse')")


def _moved(name: str, window: list[dict[str, float]]) -> float:
    """How far a scalar moved over the window, relative to its size (inf where a record lacks it)."""
    values = [s.get(name) for s in window]
    if None in values:
        return float("inf")
    return (max(values) - min(values)) / max(abs(max(values)), 1e-12)


def quiet_train_worker() -> None:
    """Drop the INFO line Ray Train's workers log for every report (its raw metrics dict). Its logger is
    named by a file path, so Train's own log level (``RunConfig.logging_config``) does not reach it."""
    if not verbose():
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def send_progress(queue, record: dict[str, Any]):
    """Rank 0's side: hand one record to the driver. Returns the queue, or None once it is gone (a
    console that went away never stops training)."""
    try:
        queue.put_nowait(record)
        return queue
    except Exception:  # noqa: BLE001 - the driver's console is optional to the run
        return None


class TrainConsole:
    """The driver's side of a training run: prints rank 0's records as they come, then a summary.

    ``with TrainConsole(config) as console: fit(..., progress=console.queue)``; ``console.summary``
    after the run. The queue actor takes no CPU, so it never competes with the run for resources.
    """

    def __init__(self, config):
        self.config = config
        self.records: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.queue = None
        self.collapsed: str | None = None  # the first collapse warning, repeated in the summary
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrainConsole:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self._thread = threading.Thread(target=self._pump, name="train-console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        try:
            while not self.queue.empty():
                self._print(self.queue.get_nowait())
            self.queue.shutdown()
        except Exception:  # noqa: BLE001 - with Ray gone, what the run raised is what the user must see
            pass

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                record = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - Ray going down under the thread ends the console, not the run
                return
            self._print(record)

    def _print(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        echo(progress_line(record))
        if not self.collapsed:  # said once: no need to look again
            self.collapsed = collapse_warning(self.records)
            if self.collapsed:
                echo(self.collapsed)

    def summary(self, result) -> list[str]:
        """The end-of-run lines: steps, images, times, throughput, final metrics, where things went."""
        config, t = self.config, self.config.train
        wall = time.perf_counter() - self.started
        lines = []
        if self.records:
            last = self.records[-1]
            step, start, scalars = last["step"], last["start"], last["scalars"]
            consumed = (step - start) * t.batch_size
            groups = scalars["stream/groups_admitted"]
            resumed = f", resumed at step {start}" if start else ""
            lines += [
                f"done: step {step}/{t.steps}{resumed} in {duration(wall)} "
                f"({duration(last['train_s'])} training, {duration(wall - last['train_s'])} start-up and end)",
                f"images: {groups * config.generator.images_per_caption:,.0f} generated ({groups:,.0f} captions x "
                f"{config.generator.images_per_caption}), {consumed:,} consumed ({step - start} steps x "
                f"{t.batch_size}), {consumed / max(last['train_s'], 1e-9):.0f} img/s",
                "final: " + "  ".join(
                    [f"loss {scalars['loss/total']:.3f} (mean over {t.num_workers} workers)"]
                    + eval_parts(last["eval"], str, 4)
                ),
            ]
        else:
            lines.append(f"done: no training step run in {duration(wall)} (the run had reached its last step)")
        if self.collapsed:
            lines.append(self.collapsed)
        checkpoint = result.checkpoint.path if result.checkpoint else "none"
        return [*lines, f"checkpoint: {checkpoint}", self.tensorboard_line]

    def interrupted(self, checkpoint: tuple[str, dict] | None) -> list[str]:
        """What a run stopped before its end (Ctrl-C) prints: how far it got and what rerunning does."""
        t, wall = self.config.train, time.perf_counter() - self.started
        step = self.records[-1]["step"] if self.records else 0
        lines = [f"interrupted after {duration(wall)}: last logged step {step}/{t.steps}"]
        if checkpoint:
            path, metrics = checkpoint
            lines.append(f"checkpoint: {path} (step {int(metrics.get('step', 0))}); the same command resumes from it")
        else:
            lines.append(f"checkpoint: none yet (train.checkpoint_every={t.checkpoint_every}); "
                         f"the same command starts over")
        return [*lines, self.tensorboard_line]

    @property
    def tensorboard_line(self) -> str:
        """The last line of either ending: the command that shows the run."""
        return f"tensorboard: tensorboard --logdir {self.config.run_dir / 'tensorboard'}"


def echo(line: str) -> None:
    """Print one line without tearing Ray Data's progress bar in a terminal."""
    if interactive():
        from ray.experimental.tqdm_ray import safe_print

        safe_print(line, flush=True)
    else:
        print(line, flush=True)


class EvalProgress:
    """``eval``'s lines while it works, per stage: ``features: 4,096/24,000 images  410 img/s  eta 44s``
    while it embeds the sets, ``linear probe: 3/8 fits  eta 2m10s`` while it fits the probe. At most one
    line every ``every_s`` seconds a stage, so a stage of a few seconds prints none. Rates count from a
    stage's first call (for the features, the first block: the actors' start-up does not stretch the ETA)."""

    #: stage -> (what it counts, its rate's unit; None: a rate per second too slow to be worth a figure)
    UNITS = {"features": ("images", "img/s"), "linear probe": ("fits", None)}

    def __init__(self, every_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self.first: dict[str, tuple[float, int]] = {}  # stage -> (time, done) at its first call
        self.last_line: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage not in self.first:
            self.first[stage], self.last_line[stage] = (now, done), now
            return
        if done >= total or now - self.last_line[stage] < self.every_s:
            return
        self.last_line[stage] = now
        since, done_then = self.first[stage]
        rate = (done - done_then) / max(now - since, 1e-9)
        counted, rate_unit = self.UNITS[stage]
        parts = [f"{stage}: {done:,}/{total:,} {counted}"]
        if rate_unit:
            parts.append(f"{rate:.0f} {rate_unit}")
        if rate > 0:
            parts.append(f"eta {duration((total - done) / rate)}")
        print("  ".join(parts), flush=True)


def eval_summary(results: dict[str, Any]) -> list[str]:
    """What ``stablerep-ray eval`` prints: the scores, what they were measured on, and where they went."""
    metrics = results.get("metrics", {})
    knn = results.get("knn", {})
    scores = "  ".join(  # accuracies to 4 decimals; the probe's C as chosen from its grid (1e-04 .. 100)
        f"{name} {value:g}" if name == "linear_C" else f"{name} {value:.4f}" if isinstance(value, float)
        else f"{name} {value}" for name, value in metrics.items()
    )
    cache = results.get("feature_cache", {})
    return [
        f"eval: {scores}",
        f"  {results['num_train']:,} train / {results['num_test']:,} test images, {results['num_classes']} "
        f"classes ({results['test_data']}); kNN k={knn.get('k')}, T={knn.get('temperature')}; features "
        f"{results['features_via']}{', cached' if cache.get('hit') else ''}; classifiers on "
        f"{results.get('classifiers_on', 'cpu')}; {duration(results['seconds'])}",
        f"results: {results['output']}/results.json",
        f"tensorboard: tensorboard --logdir {results['output']}",
    ]
