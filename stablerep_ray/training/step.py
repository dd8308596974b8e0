"""The one training step, shared by the train loop, the planner's rate measurement and the GPU benchmark.

``TrainStep.build`` makes everything a step needs from a config (objective, model, optimiser, schedule,
the objective's augmentation); calling it with a stream ``Batch`` runs: images to the device -> the objective's views
-> forward and loss under autocast -> backward -> gradient clipping -> optimiser and schedule step ->
the objective's after-step hook. Whatever measures a step measures exactly what training runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import Config
from ..memory import NamesSetting
from ..models import build_model
from ..precision import autocast_dtype
from ..stream import Batch
from .objectives import Objective, get_objective
from .objectives.base import Augment, Forward
from .optim import build_optimizer, build_scheduler, follow_config, set_weight_decay


@dataclass
class StepResult:
    loss: torch.Tensor  # detached; reading it syncs the device
    metrics: dict[str, torch.Tensor]
    labels: torch.Tensor  # the labels of the encoder inputs (for stream statistics)


@dataclass
class TrainStep:
    config: Config
    device: torch.device
    objective: Objective
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: Augment
    generator: torch.Generator
    amp_dtype: torch.dtype | None
    step: int = 0
    forward: Forward | None = field(default=None)  # the DDP-wrapped or compiled model; default: model

    @classmethod
    def build(cls, config: Config, device: torch.device, seed: int = 0, distributed: bool = False) -> TrainStep:
        """A fresh objective, model (on ``device``), optimiser and schedule for ``config``.

        Seed torch before calling it: the model's initial weights come from the global generator.
        ``seed`` seeds the augmentation's own generator. ``distributed`` on GPUs makes BatchNorm
        synchronise its statistics across ranks (as the authors' SyncBN).
        """
        objective = get_objective(config.train.objective)(config)
        model = build_model(config, **objective.model_kwargs()).to(device)
        if distributed and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        objective.setup(model)
        optimizer = build_optimizer(model, config)
        return cls(
            config=config,
            device=device,
            objective=objective,
            model=model,
            optimizer=optimizer,
            scheduler=build_scheduler(optimizer, config),
            augment=objective.build_augment(),
            generator=torch.Generator(device).manual_seed(seed),
            amp_dtype=autocast_dtype(config.train.precision, device),
        )

    def __call__(self, batch: Batch) -> StepResult:
        images = torch.from_numpy(batch.images).to(self.device, non_blocking=True)
        caption_ids = torch.from_numpy(batch.caption_ids).to(self.device)
        inputs, labels = self.objective.views(images, caption_ids, self.augment, self.generator)
        amp = self.amp_dtype
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            loss, metrics = self.objective.loss(self.forward or self.model, self.model, inputs, labels, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.train.grad_clip:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
        set_weight_decay(self.optimizer, self.step, self.config)
        self.optimizer.step()
        self.scheduler.step()
        self.objective.after_step(self.model, self.step)
        self.step += 1
        return StepResult(loss.detach(), metrics, labels)

    # -- what a checkpoint keeps beside the model ---------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        follow_config(self.optimizer, self.scheduler, self.config)
        self.objective.load_state_dict(state.get("objective", {}))
        self.step = state["step"]


def step_memory(config: Config):
    """A training step too large for the card names the batch and what bounds it (``memory``)."""
    inputs = config.captions_per_worker_step * config.group_size
    fixes = ["spread it over more workers (train.num_workers)"]
    if not config.model.grad_checkpointing:
        fixes.append("recompute activations in the backward pass (model.grad_checkpointing: true)")
    if config.train.precision == "fp32":
        fixes.append("train in bf16 (train.precision: auto)")
    fixes.append("lower train.batch_size (a different recipe)")
    work = f"a training step on {inputs} inputs per worker ({config.model.name} at {config.model.image_size} px)"
    return NamesSetting("train.batch_size", work, *fixes)


def synthetic_batch(config: Config, captions: int, seed: int = 0) -> Batch:
    """A batch of random stored-size images in the run's group shape, for measuring a step."""
    import numpy as np

    m = config.images_drawn_per_group
    size = config.generator.output_size
    rng = np.random.default_rng(seed)
    return Batch(
        images=rng.integers(0, 256, (captions * m, size, size, 3), dtype=np.uint8),
        caption_ids=np.repeat(np.arange(captions, dtype=np.int64), m),
        captions=[f"caption {i}" for i in range(captions)],
        keys=np.arange(captions, dtype=np.int64),
    )
