"""Augmentations run on the trainer's device, batched: random resized crop, flip, colour jitter,
grayscale, blur; and the evaluation transform."""

from .batch import BatchAugment, eval_transform, make_generator

__all__ = ["BatchAugment", "eval_transform", "make_generator"]
