"""Augmentations run on the trainer's device, batched: random resized crop, flip, colour jitter,
grayscale, blur; multi-crop views and patch masks; and the evaluation transform."""

from .batch import BatchAugment, eval_transform, make_generator
from .multicrop import Crops, MultiCrop, random_patch_masks

__all__ = ["BatchAugment", "Crops", "MultiCrop", "eval_transform", "make_generator", "random_patch_masks"]
