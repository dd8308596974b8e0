"""Labelled evaluation images in memory, for sets small enough to hold: the online kNN's bank and
queries (rank 0, every N steps). Images are held only as the uint8 ``S x S`` views the model sees,
decoded by :mod:`.sources` image by image, never held at their original size. With no test set the train
set is split 80/20, stratified and deterministic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import ConfigError
from .sources import ImageSource, index_source
from .specs import parse_data_spec

if TYPE_CHECKING:
    from .cache import FeatureSet

DEFAULT_TEST_FRACTION = 0.2


@dataclass
class LabelledImages:
    """A labelled evaluation set held in memory: uint8 ``(N, H, W, 3)`` images, int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.class_names = [str(c) for c in self.class_names]
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def load_labelled_images(spec: str, max_images: int = 0, *, image_size: int) -> LabelledImages:
    """One labelled set (ImageFolder dir, parquet file/dir, local or URI, or simulator spec) in
    memory, as the uint8 ``image_size`` x ``image_size`` views the model sees (``eval_pixels``);
    ``max_images`` keeps a deterministic class-balanced subset (0: all)."""
    return _load(index_source(spec, max_images), image_size)


def _load(source: ImageSource, image_size: int) -> LabelledImages:
    return LabelledImages(source.read(image_size), source.labels, source.class_names)


# -- train / test ----------------------------------------------------------------------------------
def stratified_split(
    labels: np.ndarray, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified ``(train_index, test_index)``; every class keeps >= 1 train row and
    classes with >= 2 rows put >= 1 in test."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = (
            0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(test_fraction * len(idx)))))
        )
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def hold_out(labels: np.ndarray, spec: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``stratified_split`` of a set given without a test set; a ConfigError if nothing is held out."""
    train, test = stratified_split(labels, DEFAULT_TEST_FRACTION, seed)
    if len(test) == 0:
        raise ConfigError(f"eval data {spec!r}: too few images to hold out a test split")
    return train, test


def align_classes(
    train_names: list[str], test: LabelledImages | FeatureSet, test_spec: str
) -> LabelledImages | FeatureSet:
    """Re-index the test labels into the train class list by name."""
    if list(test.class_names) == list(train_names):
        return test
    lookup = {c: i for i, c in enumerate(train_names)}
    present = {test.class_names[i] for i in np.unique(test.labels)}
    unknown = sorted(present - set(lookup))
    if unknown:
        raise ConfigError(
            f"eval data {test_spec!r}: test classes {unknown[:10]} do not occur in the train set; "
            f"the two sets must share class names"
        )
    mapping = np.asarray([lookup.get(c, -1) for c in test.class_names], dtype=np.int64)
    test.labels = mapping[test.labels]
    test.class_names = list(train_names)
    return test


def load_eval_split(
    spec: str, image_size: int, max_images: int = 0, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """``(train, test)`` labelled sets for a (possibly ``TRAIN:TEST``) spec, each capped at
    ``max_images``; what the online kNN holds. A set without a test set is split before decoding."""
    train_spec, test_spec = parse_data_spec(spec)
    train = index_source(train_spec, max_images)
    if test_spec is None:
        tr, te = hold_out(train.labels, spec, seed)
        return _load(train.select(tr), image_size), _load(train.select(te), image_size)
    test = _load(index_source(test_spec, max_images), image_size)
    return _load(train, image_size), align_classes(train.class_names, test, test_spec)
