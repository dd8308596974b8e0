"""Multi-crop views (DINO, SynCLR) and random patch masks (iBOT), batched on the trainer's device.

Every drawn image gets ``global_count`` crops at the model's input size and ``local_count`` small
crops from a smaller area range; each crop is a full ``BatchAugment`` draw (crop, flip, jitter, blur)
of its own. Crops come out view-major: crop c of every image, then crop c + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AugmentConfig
from .batch import BatchAugment


@dataclass
class Crops:
    global_crops: torch.Tensor  # (global_count * B, 3, S, S)
    local_crops: torch.Tensor | None  # (local_count * B, 3, s, s), None without local crops


class MultiCrop:
    """``MultiCrop(...)(images, generator) -> Crops`` for a uint8 ``(B, H, W, 3)`` batch."""

    def __init__(self, cfg: AugmentConfig, global_size: int, global_scale: tuple[float, float],
                 global_count: int, local_size: int, local_scale: tuple[float, float], local_count: int):
        self.global_augment = BatchAugment(cfg.model_copy(update={"crop_scale": global_scale}), global_size)
        self.local_augment = BatchAugment(cfg.model_copy(update={"crop_scale": local_scale}), local_size)
        self.global_count, self.local_count = global_count, local_count

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> Crops:
        global_crops = torch.cat([self.global_augment(images, generator) for _ in range(self.global_count)])
        local_crops = None
        if self.local_count:
            local_crops = torch.cat([self.local_augment(images, generator) for _ in range(self.local_count)])
        return Crops(global_crops, local_crops)


def random_patch_masks(count: int, patches: int, probability: float, ratio: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``(count, patches)`` bool: each crop is masked with ``probability``; a masked crop has
    ``round(ratio x patches)`` (at least one) of its patches chosen uniformly at random."""
    device = generator.device if generator is not None else torch.device("cpu")
    masked = torch.rand(count, generator=generator, device=device) < probability
    ranks = torch.rand(count, patches, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    per_crop = max(1, round(ratio * patches))
    return (ranks < per_crop) & masked[:, None]
