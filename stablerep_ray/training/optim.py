"""Optimiser and schedules: AdamW, linear warm-up then cosine decay of the lr, and an optional cosine
schedule of the weight decay."""

from __future__ import annotations

import math

import torch

from ..config import Config


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW at ``config.peak_lr``. As in StableRep's released code, every weight decays but norms,
    biases and scalars (one-dimensional parameters); the CLS token and position embeddings decay too."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    t = config.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.peak_lr,
        betas=t.betas,
    )


def lr_multiplier(step: int, config: Config) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    t = config.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def weight_decay_at(step: int, config: Config) -> float:
    """The weight decay of step ``step``: constant, or a half cosine to ``train.weight_decay_end``."""
    t = config.train
    if t.weight_decay_end is None:
        return t.weight_decay
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, t.steps) / t.steps))
    return t.weight_decay_end + (t.weight_decay - t.weight_decay_end) * cosine


def set_weight_decay(optimizer: torch.optim.Optimizer, step: int, config: Config) -> None:
    """Apply ``weight_decay_at(step)`` to the decayed parameter group (the first, see build_optimizer)."""
    optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, config)


def build_scheduler(optimizer: torch.optim.Optimizer, config: Config) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, config))


def follow_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                  config: Config) -> None:
    """After loading a checkpoint's optimiser and schedule, take the peak lr and betas from ``config``:
    the state dicts carry the old run's (a resume with ``--allow-config-change`` may change them, and a
    changed ``train.steps`` moves the schedule). The moments and the step count stay the checkpoint's."""
    step = scheduler.last_epoch
    scheduler.base_lrs = [config.peak_lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.peak_lr
        group["lr"] = config.peak_lr * lr_multiplier(step, config)
        group["betas"] = tuple(config.train.betas)


def describe_lr(config: Config) -> str:
    """The peak lr and where it comes from, e.g. 'peak lr 3.225e-3 (train.lr_scaling=authors of ...)'."""
    t = config.train
    peak = f"{config.peak_lr:.4g}" if config.peak_lr >= 0.01 else f"{config.peak_lr:.3e}".replace("e-0", "e-")
    return f"peak lr {peak} (train.lr_scaling={t.lr_scaling} of base_lr {t.base_lr:g} at batch {t.batch_size})"
