"""Multi-crop views (DINO, SynCLR) and random patch masks (iBOT), batched on the trainer's device.

Every drawn image gets ``global_count`` crops at the model's input size and ``local_count`` small
crops from a smaller area range; each crop is a full ``BatchAugment`` draw (crop, flip, jitter, blur,
solarize) of its own. Global crops follow DINO's pair of recipes (one always blurred; one rarely
blurred, sometimes solarized): an image's first global crop takes a recipe at random, its next one
the next recipe, so two global crops of an image are one of each. Crops come out view-major: crop c
of every image, then crop c + 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import AugmentConfig
from .batch import AugmentParams, BatchAugment


@dataclass
class Crops:
    global_crops: torch.Tensor  # (global_count * B, 3, S, S)
    local_crops: torch.Tensor | None  # (local_count * B, 3, s, s), None without local crops


class MultiCrop:
    """``MultiCrop(...)(images, generator) -> Crops`` for a uint8 ``(B, H, W, 3)`` batch.

    ``global_recipes``: the augmentation settings global crops take in turn (each with its own
    ``crop_scale``); ``local_recipe``: the local crops' settings.
    """

    def __init__(self, global_recipes: Sequence[AugmentConfig], global_size: int, global_count: int,
                 local_recipe: AugmentConfig, local_size: int, local_count: int):
        self.global_augments = [BatchAugment(recipe, global_size) for recipe in global_recipes]
        self.local_augment = BatchAugment(local_recipe, local_size)
        self.global_count, self.local_count = global_count, local_count

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> Crops:
        batch, height, width = images.shape[:3]
        device = generator.device if generator is not None else torch.device("cpu")
        recipes = len(self.global_augments)
        first = (torch.rand(batch, generator=generator, device=device) * recipes).long().clamp_(max=recipes - 1)
        global_crops = []
        for c in range(self.global_count):
            drawn = [augment.sample(batch, height, width, generator) for augment in self.global_augments]
            params = AugmentParams.select((first + c) % recipes, drawn)
            global_crops.append(self.global_augments[0].apply(images, params))
        local_crops = None
        if self.local_count:
            local_crops = torch.cat([self.local_augment(images, generator) for _ in range(self.local_count)])
        return Crops(torch.cat(global_crops), local_crops)


def random_patch_masks(count: int, patches: int, probability: float, ratio: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """``(count, patches)`` bool: ``probability x count`` crops, chosen at random, are masked (a
    fixed share of the batch, as the authors' collate masks; the fraction is rounded up or down at
    random, so it is exact on average); a masked crop has ``round(ratio x patches)`` (at least one)
    of its patches chosen uniformly at random."""
    device = generator.device if generator is not None else torch.device("cpu")
    masked_count = (torch.rand((), generator=generator, device=device) + probability * count).floor()  # no host sync
    crops = torch.rand(count, generator=generator, device=device).argsort().argsort()
    masked = crops < masked_count
    ranks = torch.rand(count, patches, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    per_crop = max(1, round(ratio * patches))
    return (ranks < per_crop) & masked[:, None]
