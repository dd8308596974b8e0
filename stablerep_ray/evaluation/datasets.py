"""Labelled evaluation images in memory: decoded once from an ImageFolder, parquet or the simulator to
uint8 arrays of one common size, so both the online kNN (rank 0, every N steps) and the offline
feature pass see exactly the same pixels. With no test set the train set is split 80/20, stratified
and deterministic."""

from __future__ import annotations

import collections
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..config import ConfigError
from .specs import (
    LABEL_COLUMNS,
    SIMULATOR_PER_CLASS,
    SPEC_HELP,
    images_by_class,
    is_simulator_spec,
    locate,
    open_parquet,
    parse_data_spec,
    parse_simulator,
    require_two_classes,
)

if TYPE_CHECKING:
    from .cache import FeatureSet

IMAGE_COLUMNS = ("image", "img", "image_bytes", "jpg", "png", "webp", "bytes")
DEFAULT_TEST_FRACTION = 0.2
DECODE_WORKERS = 8


@dataclass
class LabelledImages:
    """A labelled evaluation set held in memory: uint8 ``(N, H, W, 3)`` images, int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    spec: str = ""  # where it came from (part of the feature-cache key); "" for in-memory data

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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: np.ndarray, spec: str = "") -> LabelledImages:
        index = np.asarray(index, dtype=np.int64)
        return LabelledImages(self.images[index], self.labels[index], list(self.class_names), spec)


# -- decoding --------------------------------------------------------------------------------------
def _balanced_subset(labels: np.ndarray, max_images: int) -> np.ndarray:
    """Deterministic class-balanced subset of at most ``max_images`` rows (round robin over classes)."""
    if not max_images or len(labels) <= max_images:
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [
        idx[r] for r in range(max(len(p) for p in per_class)) for idx in per_class if r < len(idx)
    ]
    return np.sort(np.asarray(order[:max_images], dtype=np.int64))


def _decode(data: bytes, source: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise ConfigError(
            f"{source}: not a readable image ({err}); remove or replace the file"
        ) from None


def _decode_all(items: list, decode) -> list[np.ndarray]:
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
        return list(pool.map(decode, items))


def _fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (keeping aspect, bicubic) so the image covers ``size`` = (H, W), then centre-crop."""
    h, w = image.shape[:2]
    H, W = size
    if (h, w) == (H, W):
        return image
    from PIL import Image

    scale = max(H / h, W / w)
    nh, nw = max(H, math.ceil(h * scale - 1e-6)), max(W, math.ceil(w * scale - 1e-6))
    out = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    top, left = (nh - H) // 2, (nw - W) // 2
    return np.ascontiguousarray(out[top : top + H, left : left + W])


def _stack(images: list[np.ndarray], image_size: int | tuple[int, int] | None) -> np.ndarray:
    if isinstance(image_size, int):
        target = (image_size, image_size)
    elif image_size:
        target = tuple(image_size)
    else:  # the most common size (ties: the larger one)
        counts = collections.Counter(img.shape[:2] for img in images)
        target = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    return (
        np.stack([_fit(img, target) for img in images])
        if images
        else np.zeros((0, *target, 3), np.uint8)
    )


# -- sources ---------------------------------------------------------------------------------------
def _load_image_folder(spec, fs, root, files, max_images, image_size) -> LabelledImages:
    by_class = images_by_class(spec, root, files)
    class_names = sorted(by_class)
    paths = [p for c in class_names for p in sorted(by_class[c])]
    labels = np.asarray([i for i, c in enumerate(class_names) for _ in by_class[c]], dtype=np.int64)
    keep = _balanced_subset(labels, max_images)
    paths, labels = [paths[i] for i in keep], labels[keep]

    def load(path: str) -> np.ndarray:
        with fs.open_input_file(path) as f:
            return _decode(f.readall(), path)

    return LabelledImages(_stack(_decode_all(paths, load), image_size), labels, class_names, spec)


def _hf_class_names(schema, column: str) -> list[str] | None:
    """ClassLabel names stored by Hugging Face datasets in the parquet schema metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta)["info"]["features"][column]
        names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
        return [str(n) for n in names] if names else None
    except (KeyError, TypeError, ValueError):
        return None


def _parquet_labels(spec, labels_arr, label_col, schema) -> tuple[np.ndarray, list[str]]:
    """Int labels (class names from Hugging Face metadata, else "0".."K-1") or str labels (sorted)."""
    import pyarrow as pa

    if labels_arr.null_count:
        raise ConfigError(f"eval data {spec!r}: {labels_arr.null_count} rows have no {label_col!r}")
    if not pa.types.is_integer(labels_arr.type):
        raw = [str(v) for v in labels_arr.to_pylist()]
        class_names = sorted(set(raw))
        lookup = {c: i for i, c in enumerate(class_names)}
        return np.asarray([lookup[v] for v in raw], dtype=np.int64), class_names
    labels = labels_arr.to_numpy().astype(np.int64)
    if labels.min() < 0:
        raise ConfigError(
            f"eval data {spec!r}: negative labels in {label_col!r} (unlabelled split?); use a "
            f"labelled split"
        )
    class_names = _hf_class_names(schema, label_col) or []
    if labels.max() >= len(class_names):
        class_names = [str(i) for i in range(int(labels.max()) + 1)]
    return labels, class_names


def _load_parquet(spec, fs, path, max_images, image_size) -> LabelledImages:
    import pyarrow as pa

    dataset, label_col = open_parquet(spec, fs, path)
    schema = dataset.schema
    names = schema.names
    image_col = next((c for c in IMAGE_COLUMNS if c in names), None)
    if image_col is None and "image.bytes" in names:
        image_col = "image.bytes"
    if image_col is None or label_col is None:
        raise ConfigError(
            f"eval data {spec!r}: parquet columns {names} lack an image-bytes column "
            f"({' / '.join(IMAGE_COLUMNS)}) or a label column ({' / '.join(LABEL_COLUMNS)}); "
            f"rename the columns to 'image' and 'label'"
        )
    table = dataset.to_table(columns=[image_col, label_col])
    if table.num_rows == 0:
        raise ConfigError(
            f"eval data {spec!r}: the parquet data has no rows; point at a non-empty split"
        )
    images_arr = table.column(image_col).combine_chunks()
    if pa.types.is_struct(images_arr.type):
        if images_arr.type.get_field_index("bytes") < 0:
            raise ConfigError(
                f"eval data {spec!r}: struct column {image_col!r} has no 'bytes' field"
            )
        images_arr = images_arr.field("bytes")
    if not (pa.types.is_binary(images_arr.type) or pa.types.is_large_binary(images_arr.type)):
        raise ConfigError(
            f"eval data {spec!r}: column {image_col!r} is {images_arr.type}, expected encoded image "
            f"bytes (binary, or a {{bytes, path}} struct as written by Hugging Face datasets)"
        )
    if images_arr.null_count:
        raise ConfigError(f"eval data {spec!r}: {images_arr.null_count} rows have no image bytes")
    labels_arr = table.column(label_col).combine_chunks()
    labels, class_names = _parquet_labels(spec, labels_arr, label_col, schema)
    keep = _balanced_subset(labels, max_images)
    blobs = images_arr.take(pa.array(keep)).to_pylist()
    images = _decode_all(
        list(zip(keep.tolist(), blobs, strict=True)), lambda a: _decode(a[1], f"{spec} row {a[0]}")
    )
    return LabelledImages(_stack(images, image_size), labels[keep], class_names, spec)


def _load_simulator(spec: str, max_images: int, image_size) -> LabelledImages:
    from ..tools import simulator

    attribute, split, per_class = parse_simulator(spec)
    try:
        images, labels, class_names = simulator.render_eval_set(
            attribute=attribute,
            per_class=per_class or SIMULATOR_PER_CLASS,
            split=split or "train",
            **({"size": image_size} if isinstance(image_size, int) else {}),
        )
    except (ValueError, KeyError) as err:
        raise ConfigError(f"eval data {spec!r}: {err}") from None
    data = LabelledImages(np.asarray(images, dtype=np.uint8), labels, class_names, spec)
    keep = _balanced_subset(data.labels, max_images)
    return data if len(keep) == len(data) else data.subset(keep, spec)


def load_labelled_images(
    spec: str,
    max_images: int = 0,
    image_size: int | tuple[int, int] | None = None,
) -> LabelledImages:
    """Load one labelled set: ImageFolder dir, parquet file/dir (local or URI), or simulator spec.

    Images are RGB uint8 of one common size: ``image_size`` (int: square, or (H, W)) if given, else
    the most common size (others are resized to cover it and centre-cropped). ``max_images`` keeps
    a deterministic class-balanced subset (0: all).
    """
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError(f"eval data: empty; {SPEC_HELP}")
    if is_simulator_spec(spec):
        data = _load_simulator(spec, max_images, image_size)
    else:
        fs, kind, path, images = locate(spec)
        if kind == "folder":
            data = _load_image_folder(spec, fs, path, images, max_images, image_size)
        else:
            data = _load_parquet(spec, fs, path, max_images, image_size)
    if len(data) == 0:
        raise ConfigError(f"eval data {spec!r}: the dataset is empty; {SPEC_HELP}")
    require_two_classes([data.class_names[i] for i in np.unique(data.labels)], spec)
    return data


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
    spec: str, max_images: int = 0, seed: int = 0
) -> tuple[LabelledImages, LabelledImages]:
    """``(train, test)`` labelled sets for a (possibly ``TRAIN:TEST``) spec; used by online eval."""
    train_spec, test_spec = parse_data_spec(spec)
    train = load_labelled_images(train_spec, max_images)
    if test_spec is None:
        tr, te = hold_out(train.labels, spec, seed)
        return train.subset(tr, f"{train_spec}#train"), train.subset(te, f"{train_spec}#test")
    test = load_labelled_images(test_spec, max_images)
    return train, align_classes(train.class_names, test, test_spec)
