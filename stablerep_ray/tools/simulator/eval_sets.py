"""Held-out labelled evaluation sets rendered by the simulator, and writing them as an image folder.

They stand in for "real" labelled photos: a seed space disjoint from generation, nuisance drawn
independently from the prior, no caption modes and no mismatches, so a probe on them measures what
the encoder learned from the generated stream rather than how well it memorised it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .render import render_attributes
from .world import (
    _ALIASES,
    _ATTR_NAMES,
    _ATTR_SIZES,
    _KEY_EVAL,
    ATTRIBUTES,
    World,
    _seq,
    get_world,
)  # fmt: skip

_SPLITS = {"train": 0, "test": 1}


def render_eval_set(
    attribute: str = "shape",
    per_class: int = 50,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    world: str | World = "default",
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A labelled, class-balanced set for linear probes / kNN: ``(images, labels, class_names)``.

    ``images`` uint8 ``(N, size, size, 3)`` with ``N = per_class * num_classes``, ``labels`` int64
    ``(N,)``, ``class_names`` the values of ``attribute`` sorted alphabetically (so labels agree with
    torchvision's ``ImageFolder`` after :func:`write_image_folder`). Each image fixes ``attribute``
    to its class, draws the other attributes uniformly and the nuisance independently from the prior
    (no caption modes, no mismatches, occluders with probability 0.3 per slot), in a seed space
    disjoint from generation; ``split="train"`` and ``"test"`` use disjoint seeds. ``world`` renders
    by that world's rules (its fixed attributes, rotation and occluders), as its generator does.
    """
    attribute = _ALIASES.get(attribute, attribute)
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute: {attribute!r} is not one of {sorted(ATTRIBUTES)}")
    if split not in _SPLITS:
        raise ValueError(f"split: {split!r} is not 'train' or 'test'")
    class_names = sorted(ATTRIBUTES[attribute])
    num_classes = len(class_names)
    images = np.empty((per_class * num_classes, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    for idx in range(len(labels)):
        images[idx] = render_eval_image(
            attribute, int(labels[idx]), idx % per_class, size, seed, split, world
        )
    return images, labels, class_names


def render_eval_image(
    attribute: str,
    label: int,
    index: int,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
    world: str | World = "default",
) -> np.ndarray:
    """Image ``index`` of class ``label`` of :func:`render_eval_set`, alone: a streamed evaluation
    renders any row without the rest of its set."""
    attribute = _ALIASES.get(attribute, attribute)
    a = _ATTR_NAMES.index(attribute)
    world = get_world(world)
    if a in world.fixed_codes:
        raise ValueError(f"attribute: {attribute!r} is fixed in simulator world {world.name!r}; nothing to classify")
    class_names = sorted(ATTRIBUTES[attribute])
    rng = np.random.default_rng(_seq([seed, _SPLITS[split], a, label, index], _KEY_EVAL))
    codes = rng.integers(0, _ATTR_SIZES)
    world.apply_fixed(codes)
    codes[a] = ATTRIBUTES[attribute].index(class_names[label])
    return render_attributes(dict(zip(_ATTR_NAMES, codes.tolist())), size, rng, world=world)


def write_image_folder(root: str | Path, images: np.ndarray, labels: np.ndarray, class_names: list[str]) -> Path:
    """Write ``root/<class_name>/<index>.png`` (torchvision ImageFolder layout); returns ``root``.

    Every class gets a directory, even an empty one. Pass alphabetically sorted ``class_names`` (as
    :func:`render_eval_set` returns) for ImageFolder's labels to equal ``labels``.
    """
    root = Path(root)
    for name in class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for idx, (img, label) in enumerate(zip(images, labels)):
        path = root / class_names[int(label)] / f"{idx:06d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(path)
    return root
