"""Re-running a run: decided before Ray starts, and said out loud.

The run ``output_dir/name`` resumes from its latest committed checkpoint. A finished run is reported
and left alone. A config that differs from the one the run was trained with (``config.yaml`` in the
run directory) is refused, naming every differing key, unless the change is one that does not alter
what is learned (``MAY_CHANGE``) or the user passes ``--allow-config-change``; the config a run was
trained with is never overwritten, but kept as ``config.<time>.yaml``.

Light on purpose (no torch, no Ray): ``stablerep-ray train`` calls it right after loading the config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, dump_config, from_dict
from ..config.io import config_diff, read_config_file
from ..storage import latest_checkpoint

CONFIG_FILE = "config.yaml"

# Keys a resumed run may change without --allow-config-change: how long it trains (train.steps: the
# cosine schedule is re-stretched to the new length from the resume step on), where and with what
# resources it runs (and whether it recomputes activations to save memory), how often it logs,
# checkpoints and evaluates, and how the stream is buffered in flight. Everything else changes what is
# learned or what a logged metric means. train.num_workers and train.use_gpu stay refused: they change
# each worker's share of the batch (the projection head's BatchNorm statistics) and, with precision
# "auto", the autocast dtype.
MAY_CHANGE = (
    "output_dir", "train.steps", "cluster", "tune", "model.grad_checkpointing",
    "generator.num_actors", "generator.num_gpus_per_actor", "generator.num_cpus_per_actor",
    "generator.captions_per_call", "generator.label_selector", "generator.channels_last",
    "generator.compile", "generator.vae_slicing", "generator.vae_tiling",
    "stream.prefetch_batches", "stream.object_store_mb", "stream.log_consumed",
    "train.num_cpus_per_worker", "train.gpus_per_worker", "train.label_selector", "train.log_every",
    "train.image_grid_every",
    "train.checkpoint_every", "train.keep_checkpoints", "train.max_failures",
    "eval.data", "eval.every", "eval.batch_size", "eval.online_max_images",
)

Change = tuple[str, Any, Any]


def may_change(key: str) -> bool:
    return any(key == allowed or key.startswith(f"{allowed}.") for allowed in MAY_CHANGE)


def _shown(changes: list[Change]) -> str:
    return ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


@dataclass(frozen=True)
class Resume:
    """What re-running ``config`` means: a new run (step 0), a resume, or a finished run."""

    step: int  # step of the latest committed checkpoint (0: none)
    checkpoint: str  # its path ("" for a new run)
    finished: bool  # nothing left to train up to train.steps / --max-steps
    changed: tuple[Change, ...]  # settings that differ from the run's saved config

    def lines(self, config: Config, max_steps: int | None = None) -> list[str]:
        """What to tell the user before anything starts."""
        if not self.checkpoint:
            return []
        if self.finished:
            if max_steps and self.step < config.train.steps:
                return [f"{config.name} is already at step {self.step} (--max-steps {max_steps}); nothing to do "
                        f"(raise --max-steps or leave it out)"]
            return [f"{config.name} already finished at step {self.step}; nothing to do "
                    f"(raise train.steps or use a new name)"]
        out = [f"resuming {config.name} from step {self.step} ({self.checkpoint})"]
        steps = [c for c in self.changed if c[0] == "train.steps"]
        if steps:
            out.append(f"train.steps {steps[0][1]} -> {steps[0][2]}: the cosine schedule is re-stretched to the "
                       f"new length from step {self.step} on")
        others = [c for c in self.changed if c[0] != "train.steps"]
        if others:
            out.append(f"config changes on resume: {_shown(others)}")
        return out


def saved_config(config: Config) -> dict | None:
    """The config the run ``config.name`` was last trained with (None before its first start), with
    defaults filled in by today's schema so a key added since does not read as a change."""
    path = config.run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    data = read_config_file(path)
    try:
        return from_dict(data).model_dump(mode="json")
    except ConfigError:  # written by an older schema that no longer validates: compare it as written
        return data


def check_resume(config: Config, max_steps: int | None = None, allow_config_change: bool = False) -> Resume:
    """Decide what re-running ``config`` does; a ConfigError (naming every differing key) for a run
    that would resume under a changed config without ``allow_config_change``."""
    saved = saved_config(config)
    changed = config_diff(saved, config.model_dump(mode="json")) if saved else []
    latest = latest_checkpoint(config)
    if latest is None:
        return Resume(0, "", False, tuple(changed))
    path, metrics = latest
    step = int(metrics.get("step", 0))
    refused = [c for c in changed if not may_change(c[0])]
    if refused and not allow_config_change:
        raise ConfigError(
            f"{refused[0][0]}: run {config.name!r} was trained with another config "
            f"({config.run_dir / CONFIG_FILE}; resume point: step {step}): {_shown(refused)}; rerun with that "
            f"config, pick a new run name (--set name=...), or pass --allow-config-change to resume with this one"
        )
    target = min(config.train.steps, max_steps or config.train.steps)
    return Resume(step, path, step >= target, tuple(changed))


def save_run_config(config: Config) -> Path | None:
    """Write ``config`` as the run's ``config.yaml``. A different config already there is kept as
    ``config.<time>.yaml`` (returned), never overwritten."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    path = config.run_dir / CONFIG_FILE
    kept = None
    saved = saved_config(config)
    if saved is not None and config_diff(saved, config.model_dump(mode="json")):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        kept = path.with_name(f"config.{stamp}.yaml")
        n = 1
        while kept.exists():
            kept, n = path.with_name(f"config.{stamp}-{n}.yaml"), n + 1
        path.rename(kept)
    dump_config(config, path)
    return kept
