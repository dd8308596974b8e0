"""Frozen-feature evaluation: labelled image loading, CLS features, kNN and the linear probe.

Protocols (paper notes, "Evaluation protocols"):

* **kNN** (DINO): L2-normalised CLS features, cosine similarity to a memory bank (the train set),
  top-k neighbours vote for their class with weight ``exp(sim / T)``; k=20, T=0.07. Cheap enough to
  run online on rank 0 every N steps (``OnlineKNN``, ``online_knn_accuracy``).
* **Linear probe**: logistic regression (L-BFGS, multinomial) on standardised frozen features; the
  regularisation C is chosen from a log grid on a held-out stratified split of *train*, then the
  probe is refitted on the whole train set and scored on test (top-1 and mean per-class accuracy).

Data specs (``EvalConfig.data``): an ImageFolder directory (``root/<class>/*.png|jpg``), a parquet
file or directory (image bytes in ``image`` -- plain binary or a Hugging Face ``{bytes, path}``
struct -- and a ``label`` column, int or str), or ``simulator:<attribute>[:train|test][:per_class]``
for the procedural simulator's held-out set. ``TRAIN:TEST`` names a memory bank / probe train set
and a query set (``parse_data_spec``); with no test set the train set is split 80/20, stratified
and deterministic.

Offline, features come from a Ray Data ``map_batches`` over a fixed-size actor pool (each actor
loads the checkpoint once) and are cached next to the checkpoint as ``features-<hash>.npz``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import ConfigError
from .models import MODEL_FILE, load_model

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
IMAGE_COLUMNS = ("image", "img", "image_bytes", "jpg", "png", "webp", "bytes")
LABEL_COLUMNS = ("label", "labels", "class", "target", "fine_label")
SIMULATOR_PREFIX = "simulator"
SIMULATOR_SPLITS = ("train", "test")
SIMULATOR_PER_CLASS = 50
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))
_SPEC_HELP = (
    "pass an ImageFolder directory (root/<class>/<image>.png|jpg), a parquet file or directory "
    "with an image-bytes column ('image') and a 'label' column, or simulator:<attribute>"
)


# ==================================================================================================
# Labelled images
# ==================================================================================================
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

    def subset(self, index: np.ndarray, spec: str = "") -> "LabelledImages":
        index = np.asarray(index, dtype=np.int64)
        return LabelledImages(self.images[index], self.labels[index], list(self.class_names), spec)


@dataclass
class FeatureSet:
    """Frozen features of a labelled set, in the set's row order."""

    features: np.ndarray  # float32 (N, D)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    cache_path: str | None = None
    cached: bool = False  # True when read from the cache instead of computed

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "FeatureSet":
        index = np.asarray(index, dtype=np.int64)
        return FeatureSet(
            self.features[index],
            self.labels[index],
            list(self.class_names),
            self.cache_path,
            self.cached,
        )


# -- spec parsing ----------------------------------------------------------------------------------
def _split_items(spec: str) -> list[str]:
    """Split ``A:B`` into dataset items; ``simulator:attr[:split][:n]``, URIs, drives stay whole."""
    tokens = spec.split(":")
    items: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == SIMULATOR_PREFIX:
            if i + 1 >= len(tokens) or not tokens[i + 1]:
                raise ConfigError(
                    f"eval data {spec!r}: 'simulator' needs an attribute, e.g. simulator:shape"
                )
            parts = [tok, tokens[i + 1]]
            i += 2
            while (
                i < len(tokens)
                and len(parts) < 4
                and (tokens[i] in SIMULATOR_SPLITS or tokens[i].isdigit())
            ):
                parts.append(tokens[i])
                i += 1
            items.append(":".join(parts))
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt is not None and nxt.startswith(
            "//"
        ):  # scheme://path (s3://, gs://, file://, hdfs://)
            item = f"{tok}:{nxt}"
            i += 2
            if i < len(tokens) and re.match(r"^\d+(/|$)", tokens[i]):  # hdfs://host:8020/path
                item += f":{tokens[i]}"
                i += 1
            items.append(item)
            continue
        if (
            nxt is not None and len(tok) == 1 and tok.isalpha() and nxt[:1] in ("\\", "/")
        ):  # C:\data
            items.append(f"{tok}:{nxt}")
            i += 2
            continue
        items.append(tok)
        i += 1
    return items


def _parse_simulator(spec: str) -> tuple[str, str | None, int | None]:
    """``simulator:attr[:split][:per_class]`` -> (attribute, split or None, per_class or None)."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != SIMULATOR_PREFIX or not parts[1]:
        raise ConfigError(
            f"eval data {spec!r}: expected simulator:<attribute>[:train|test][:per_class]"
        )
    attribute, split, per_class = parts[1], None, None
    for part in parts[2:]:
        if part in SIMULATOR_SPLITS and split is None:
            split = part
        elif part.isdigit() and per_class is None and int(part) > 0:
            per_class = int(part)
        else:
            raise ConfigError(
                f"eval data {spec!r}: unexpected {part!r}; expected "
                f"simulator:<attribute>[:train|test][:per_class], e.g. simulator:shape:test:20"
            )
    return attribute, split, per_class


def _simulator_spec(attribute: str, split: str, per_class: int | None) -> str:
    return ":".join([SIMULATOR_PREFIX, attribute, split] + ([str(per_class)] if per_class else []))


def is_simulator_spec(spec: str) -> bool:
    return spec.split(":", 1)[0] == SIMULATOR_PREFIX


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split an eval data spec into ``(train_spec, test_spec or None)``.

    ``simulator:shape`` -> ``("simulator:shape:train", "simulator:shape:test")``;
    ``simulator:shape:train`` -> ``("simulator:shape:train", None)`` (split later);
    ``dirA:dirB`` -> ``("dirA", "dirB")``; ``s3://b/train:s3://b/test`` keeps the URIs whole;
    a path that exists as given (even with a colon in its name) is one dataset.
    """
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError(f"eval data: empty; {_SPEC_HELP}")
    if "://" not in spec and os.path.exists(os.path.expanduser(spec)):
        return spec, None
    items = _split_items(spec)
    if any(not item for item in items) or len(items) > 2:
        raise ConfigError(
            f"eval data {spec!r}: expected DATA or TRAIN:TEST with two datasets (got {len(items)} "
            f"parts: {items}); {_SPEC_HELP}"
        )
    if len(items) == 1:
        item = items[0]
        if is_simulator_spec(item):
            attribute, split, per_class = _parse_simulator(item)
            if split is None:
                return _simulator_spec(attribute, "train", per_class), _simulator_spec(
                    attribute, "test", per_class
                )
        return item, None
    out = []
    for item, default_split in zip(items, SIMULATOR_SPLITS):
        if is_simulator_spec(item):
            attribute, split, per_class = _parse_simulator(item)
            item = _simulator_spec(attribute, split or default_split, per_class)
        out.append(item)
    return out[0], out[1]


def check_data_spec(spec: str) -> tuple[str, str | None]:
    """Cheap preflight (no image decoding, no Ray): parse the spec, check simulator attributes and
    that local datasets exist and hold at least two classes. Returns ``parse_data_spec(spec)``;
    raises ``ConfigError``."""
    train_spec, test_spec = parse_data_spec(spec)
    for item in (train_spec, test_spec):
        if item is None:
            continue
        if is_simulator_spec(item):
            from .tools import simulator

            attribute, _, _ = _parse_simulator(item)
            attribute = getattr(simulator, "_ALIASES", {}).get(attribute, attribute)
            if attribute not in simulator.ATTRIBUTES:
                raise ConfigError(
                    f"eval data {item!r}: unknown simulator attribute {attribute!r}; use one of "
                    f"{sorted(simulator.ATTRIBUTES)}, e.g. simulator:shape"
                )
            continue
        if "://" in item:
            continue  # remote: checked when loaded
        _require_two_classes(dataset_class_names(item), item)
    return train_spec, test_spec


# -- loading ---------------------------------------------------------------------------------------
def _filesystem(spec: str):
    import pyarrow.fs as pafs

    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad URIs
            raise ConfigError(f"eval data {spec!r}: cannot open this URI ({err})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))


def _is_hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in rel.split("/"))


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


def _read_bytes(fs, path: str) -> bytes:
    with fs.open_input_file(path) as f:
        return f.readall()


def _images_by_class(spec: str, root: str, files: list[str]) -> dict[str, list[str]]:
    """ImageFolder layout: root/<class>/.../<image> -> {class: [paths]}."""
    by_class: dict[str, list[str]] = collections.defaultdict(list)
    at_root = 0
    for path in files:
        parts = path[len(root) :].lstrip("/").split("/")
        if len(parts) < 2:
            at_root += 1
            continue
        by_class[parts[0]].append(path)
    if not by_class:
        raise ConfigError(
            f"eval data {spec!r}: {at_root} images lie directly in the root; an ImageFolder needs one "
            f"subdirectory per class (root/<class>/<image>.png)"
        )
    return by_class


def _load_image_folder(spec, fs, root, files, max_images, image_size, workers) -> LabelledImages:
    by_class = _images_by_class(spec, root, files)
    class_names = sorted(by_class)
    paths = [p for c in class_names for p in sorted(by_class[c])]
    labels = np.asarray([i for i, c in enumerate(class_names) for _ in by_class[c]], dtype=np.int64)
    keep = _balanced_subset(labels, max_images)
    paths, labels = [paths[i] for i in keep], labels[keep]

    def load(path: str) -> np.ndarray:
        return _decode(_read_bytes(fs, path), path)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(load, paths))
    return LabelledImages(_stack(images, image_size), labels, class_names, spec)


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


def _open_parquet(spec: str, fs, path: str):
    """(pyarrow dataset, its label column or None): what both the preflight and the loader read."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"eval data {spec!r}: cannot read parquet ({err})") from None
    return dataset, next((c for c in LABEL_COLUMNS if c in dataset.schema.names), None)


def _load_parquet(spec, fs, path, max_images, image_size, workers) -> LabelledImages:
    import pyarrow as pa

    dataset, label_col = _open_parquet(spec, fs, path)
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
    if labels_arr.null_count:
        raise ConfigError(f"eval data {spec!r}: {labels_arr.null_count} rows have no {label_col!r}")
    if pa.types.is_integer(labels_arr.type):
        labels = labels_arr.to_numpy().astype(np.int64)
        if labels.min() < 0:
            raise ConfigError(
                f"eval data {spec!r}: negative labels in {label_col!r} (unlabelled split?); use a "
                f"labelled split"
            )
        class_names = _hf_class_names(schema, label_col) or [
            str(i) for i in range(int(labels.max()) + 1)
        ]
        if labels.max() >= len(class_names):
            class_names = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        raw = [str(v) for v in labels_arr.to_pylist()]
        class_names = sorted(set(raw))
        lookup = {c: i for i, c in enumerate(class_names)}
        labels = np.asarray([lookup[v] for v in raw], dtype=np.int64)
    keep = _balanced_subset(labels, max_images)
    blobs = images_arr.take(pa.array(keep)).to_pylist()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(
            pool.map(lambda a: _decode(a[1], f"{spec} row {a[0]}"), zip(keep.tolist(), blobs))
        )
    return LabelledImages(_stack(images, image_size), labels[keep], class_names, spec)


def _load_simulator(spec: str, max_images: int, image_size) -> LabelledImages:
    from .tools import simulator

    attribute, split, per_class = _parse_simulator(spec)
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


def _check_labelled(data: LabelledImages, spec: str) -> LabelledImages:
    if len(data) == 0:
        raise ConfigError(f"eval data {spec!r}: the dataset is empty; {_SPEC_HELP}")
    _require_two_classes([data.class_names[i] for i in np.unique(data.labels)], spec)
    return data


def _locate(spec: str):
    """Resolve a local/URI dataset spec without decoding anything: ``(fs, kind, path, image_files)``
    with kind "folder" (ImageFolder root) or "parquet" (file or directory)."""
    import pyarrow.fs as pafs

    fs, path = _filesystem(spec)
    try:
        info = fs.get_file_info(path)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"eval data {spec!r}: cannot access ({err})") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"eval data {spec!r}: path not found; {_SPEC_HELP}")
    if info.type == pafs.FileType.File:
        if not path.lower().endswith(".parquet"):
            raise ConfigError(f"eval data {spec!r}: a single file must be .parquet; {_SPEC_HELP}")
        return fs, "parquet", path, []
    root = path.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File and not _is_hidden(i.path[len(root) :].lstrip("/"))
    ]
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if images:
        return fs, "folder", root, images
    if any(f.lower().endswith(".parquet") for f in files):
        return fs, "parquet", root, []
    raise ConfigError(
        f"eval data {spec!r}: the directory holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
        f".parquet files -- the dataset is empty; expected root/<class>/<image>.png"
    )


def _require_two_classes(present: list[str], spec: str) -> None:
    if len(present) < 2:
        raise ConfigError(
            f"eval data {spec!r}: only one class ({present[0] if present else '?'!r}) found; "
            f"classification needs at least two classes -- point at the root that holds one "
            f"subdirectory per class (not a class directory itself), or at data with several labels"
        )


def dataset_class_names(spec: str) -> list[str]:
    """The classes present in a local or URI dataset, from file names or the label column only (no
    image is decoded): the preflight's check that evaluation can work at all."""
    fs, kind, path, images = _locate(spec)
    if kind == "folder":
        return sorted(_images_by_class(spec, path, images))
    import pyarrow.compute as pc

    dataset, label_col = _open_parquet(spec, fs, path)
    if label_col is None:
        raise ConfigError(
            f"eval data {spec!r}: parquet columns {dataset.schema.names} lack a label column "
            f"({' / '.join(LABEL_COLUMNS)}); rename it to 'label'"
        )
    labels = dataset.to_table(columns=[label_col]).column(0)
    return sorted(str(v) for v in pc.unique(labels.drop_null()).to_pylist())


def load_labelled_images(
    spec: str,
    max_images: int = 0,
    image_size: int | tuple[int, int] | None = None,
    workers: int = 8,
) -> LabelledImages:
    """Load one labelled set: ImageFolder dir, parquet file/dir (local or URI), or simulator spec.

    Images are RGB uint8 of one common size: ``image_size`` (int: square, or (H, W)) if given, else
    the most common size (others are resized to cover it and centre-cropped). ``max_images`` keeps
    a deterministic class-balanced subset (0: all).
    """
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError(f"eval data: empty; {_SPEC_HELP}")
    if is_simulator_spec(spec):
        return _check_labelled(_load_simulator(spec, max_images, image_size), spec)
    fs, kind, path, images = _locate(spec)
    if kind == "folder":
        data = _load_image_folder(spec, fs, path, images, max_images, image_size, workers)
    else:
        data = _load_parquet(spec, fs, path, max_images, image_size, workers)
    return _check_labelled(data, spec)


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


def _align_classes(train_names: list[str], test: LabelledImages | FeatureSet, test_spec: str):
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
    spec: str,
    max_images: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
) -> tuple[LabelledImages, LabelledImages]:
    """``(train, test)`` labelled sets for a (possibly ``TRAIN:TEST``) spec; used by online eval."""
    train_spec, test_spec = parse_data_spec(spec)
    train = load_labelled_images(train_spec, max_images, image_size)
    if test_spec is None:
        tr, te = stratified_split(train.labels, test_fraction, seed)
        if len(te) == 0:
            raise ConfigError(f"eval data {spec!r}: too few images to hold out a test split")
        return train.subset(tr, f"{train_spec}#train"), train.subset(te, f"{train_spec}#test")
    test = load_labelled_images(test_spec, max_images, image_size)
    return train, _align_classes(train.class_names, test, test_spec)


# ==================================================================================================
# Features
# ==================================================================================================
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def extract_features(
    model: torch.nn.Module,
    images_uint8: np.ndarray | torch.Tensor,
    image_size: int,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """CLS features ``(N, D)`` float32 on the CPU for uint8 ``(N, H, W, 3)`` images, in-process.

    Uses ``model.features`` (unwrapping DDP / torch.compile, so rank 0 can call it alone without a
    collective), eval mode and ``no_grad``; bf16 autocast on CUDA. The model's train/eval mode is
    restored afterwards.
    """
    from .augment import eval_transform

    net = _unwrap(model)
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    images = images_uint8 if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size]
                if isinstance(x, np.ndarray):  # copy: Ray hands out read-only (zero-copy) arrays
                    x = torch.from_numpy(np.array(x, copy=True))
                x = x.to(device, non_blocking=True)
                x = eval_transform(x, image_size)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    f = net.features(x)
                out.append(f.float().cpu())
    finally:
        model.train(was_training)
    if out:
        return torch.cat(out)
    dim = getattr(getattr(net, "encoder", None), "num_features", 0)
    return torch.zeros((0, dim), dtype=torch.float32)


def _model_file(checkpoint: str | os.PathLike) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r}: path not found; pass a checkpoint directory "
            f"holding {MODEL_FILE}"
        )
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r}: no {MODEL_FILE} found; pass a checkpoint directory "
            f"written by training (it holds {MODEL_FILE})"
        )
    return file


def load_checked_model(checkpoint: str | os.PathLike):
    """``load_model`` with clear errors for a missing file and a state/architecture mismatch."""
    file = _model_file(checkpoint)
    try:
        return load_model(file)
    except ConfigError as err:
        raise ConfigError(f"checkpoint {str(file)!r}: its config is invalid: {err}") from None
    except Exception as err:  # noqa: BLE001 - torch.load / pickle raise many types
        text = str(err).strip()
        if isinstance(err, RuntimeError) and "state_dict" in text:  # load_state_dict mismatch
            detail = " ".join(line.strip() for line in text.splitlines()[:3])[:400]
            raise ConfigError(
                f"checkpoint {str(file)!r}: the saved weights do not fit the architecture of the "
                f"config stored with them ({detail}); the file was edited or mixes two runs -- "
                f"re-save it with save_model(model, config, dir) from the matching run"
            ) from None
        raise ConfigError(
            f"checkpoint {str(file)!r}: not a readable stablerep-ray model file "
            f"({type(err).__name__}: {text[:300]}); it must hold {{'config', 'model'}} as written "
            f"by save_model -- re-copy the checkpoint or point at another one"
        ) from None


def _checkpoint_image_size(checkpoint) -> int:
    file = _model_file(checkpoint)
    state = torch.load(file, map_location="cpu", weights_only=False)
    try:
        return int(state["config"]["model"]["image_size"])
    except (KeyError, TypeError):
        return 224


def _fingerprint(spec: str) -> Any:
    """Cheap change detector for a data source: simulator specs are deterministic; files use stats."""
    if is_simulator_spec(spec):
        attribute, split, per_class = _parse_simulator(spec)
        return _simulator_spec(attribute, split or "train", per_class or SIMULATOR_PER_CLASS)
    try:
        import pyarrow.fs as pafs

        fs, path = _filesystem(spec)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = [
                i
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File
            ]
            stats = [
                len(infos),
                sum(i.size or 0 for i in infos),
                max((i.mtime_ns or 0 for i in infos), default=0),
            ]
        else:
            stats = [info.size, info.mtime_ns]
        return [path, stats]
    except Exception:  # noqa: BLE001 - the fingerprint is best effort
        return [spec]


def _data_key(data: str | LabelledImages, max_images: int) -> Any:
    if isinstance(data, str):
        return {"spec": _fingerprint(data), "max_images": max_images}
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(data.images).data)
    h.update(np.ascontiguousarray(data.labels).data)
    h.update(json.dumps(data.class_names).encode())
    return {"content": h.hexdigest(), "shape": list(data.images.shape)}


def feature_cache_path(
    checkpoint: str | os.PathLike,
    data: str | LabelledImages,
    image_size: int,
    cache_dir: str | os.PathLike | None = None,
    max_images: int = 0,
) -> Path:
    """``<cache_dir or checkpoint dir>/features-<hash>.npz``; the hash covers the dataset (spec and
    a stat fingerprint, or the content of in-memory data), the image size and the model file."""
    file = _model_file(checkpoint)
    st = file.stat()
    key = {
        "data": _data_key(data, max_images),
        "image_size": int(image_size),
        "model": [str(file.resolve()) if cache_dir else file.name, st.st_size, st.st_mtime_ns],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir or file.parent) / f"features-{digest}.npz"


def _read_cache(path: Path) -> FeatureSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return FeatureSet(
                z["features"].astype(np.float32, copy=False),
                z["labels"].astype(np.int64, copy=False),
                [str(c) for c in z["class_names"]],
                str(path),
                cached=True,
            )
    except Exception as err:  # noqa: BLE001 - a corrupt cache is recomputed
        log.warning("ignoring unreadable feature cache %s (%s)", path, err)
        return None


def _write_cache(path: Path, fs: FeatureSet, meta: dict) -> str | None:
    """Atomic write (temp file in the same directory, then rename); None when not writable."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                features=fs.features.astype(np.float32, copy=False),
                labels=fs.labels,
                class_names=np.asarray(fs.class_names, dtype=np.str_),
                meta=np.asarray(json.dumps(meta, default=str)),
            )
        os.replace(tmp, path)
        return str(path)
    except OSError as err:
        log.warning("could not write the feature cache %s (%s); continuing without it", path, err)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        return None


class _FeatureActor:
    """Ray Data actor: loads the checkpoint once, then maps image batches to CLS features.

    The checkpoint is read from its path when this node sees it (local run, shared storage), else
    from the copy of the file the driver put in the object store (``model_bytes``, a 1-list holding
    an ObjectRef so Ray does not fetch it unless needed).
    """

    def __init__(self, checkpoint: str, image_size: int, batch_size: int, model_bytes=None):
        if os.path.isfile(checkpoint) or not model_bytes:
            model, _ = load_model(checkpoint)
        else:
            import ray

            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / MODEL_FILE).write_bytes(ray.get(model_bytes[0]))
                model, _ = load_model(tmp)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = extract_features(
            self.model, batch["image"], self.image_size, self.batch_size, self.device
        )
        return {"idx": batch["idx"], "features": feats.numpy()}


def _ray_features(
    checkpoint: str,
    images: np.ndarray,
    image_size: int,
    batch_size: int,
    num_actors: int,
    num_gpus_per_actor: float,
    num_cpus_per_actor: float,
) -> np.ndarray:
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, DataContext
    from ray.data.extensions import ArrowTensorArray

    if num_gpus_per_actor > 0:
        have = ray.cluster_resources().get("GPU", 0)
        if have < num_gpus_per_actor:
            raise ConfigError(
                f"num_gpus_per_actor={num_gpus_per_actor}: the Ray cluster has {have} GPUs; lower it "
                f"(0 runs feature extraction on CPUs)"
            )
    n = len(images)
    if n == 0:
        raise ValueError("no images to extract features from")
    rows = max(1, batch_size)
    model_file = _model_file(checkpoint)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    model_bytes = [ray.put(model_file.read_bytes())] if len(nodes) > 1 else None
    tables = [
        pa.table(
            {
                "idx": pa.array(np.arange(s, min(s + rows, n), dtype=np.int64)),
                "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[s : s + rows])),
            }
        )
        for s in range(0, n, rows)
    ]
    ctx = DataContext.get_current()
    old_wait = ctx.wait_for_min_actors_s
    if old_wait is None or old_wait <= 0:
        ctx.wait_for_min_actors_s = 600  # fail instead of hanging when actors cannot be placed
    try:
        ds = ray.data.from_arrow(tables).map_batches(
            _FeatureActor,
            compute=ActorPoolStrategy(size=max(1, num_actors)),
            batch_size=rows,
            num_gpus=num_gpus_per_actor or None,
            num_cpus=num_cpus_per_actor,
            fn_constructor_kwargs={
                "checkpoint": str(model_file.resolve()),
                "image_size": int(image_size),
                "batch_size": rows,
                "model_bytes": model_bytes,
            },
        )
        idx, feats = [], []
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            idx.append(batch["idx"])
            feats.append(batch["features"])
    finally:
        ctx.wait_for_min_actors_s = old_wait
    idx = np.concatenate(idx)
    feats = np.concatenate(feats).astype(np.float32, copy=False)
    out = np.empty_like(feats)
    out[idx] = feats  # Ray Data does not preserve row order across actors
    return out


def compute_feature_sets(
    checkpoint: str | os.PathLike,
    datasets: Sequence[str | LabelledImages],
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    max_images: int = 0,
    use_ray: bool = True,
    model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[FeatureSet]:
    """Features of several labelled sets (specs or in-memory data) for one checkpoint, cached.

    Cache hits return without loading (decoding) the images. The missing sets are extracted in one
    pass when their images share a size (one actor-pool start-up for train and test). ``use_ray``
    runs the Ray Data actor pool, else the model runs in this process (``model`` if given, else
    loaded from the checkpoint).
    """
    image_size = int(image_size or _checkpoint_image_size(checkpoint))
    results: list[FeatureSet | None] = [None] * len(datasets)
    paths: list[Path | None] = [None] * len(datasets)
    for i, data in enumerate(datasets):
        if cache:
            paths[i] = feature_cache_path(checkpoint, data, image_size, cache_dir, max_images)
            results[i] = _read_cache(paths[i])
            if results[i] is not None:
                log.info("feature cache hit: %s", paths[i])
    todo = {
        i: load_labelled_images(data, max_images) if isinstance(data, str) else data
        for i, data in enumerate(datasets)
        if results[i] is None
    }
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, labelled in todo.items():
        groups[labelled.images.shape[1:]].append(i)
    if todo and not use_ray and model is None:
        model, _ = load_checked_model(checkpoint)
        if device is not None or torch.cuda.is_available():
            model = model.to(device or "cuda")
    for members in groups.values():
        start = time.perf_counter()
        images = (
            np.concatenate([todo[i].images for i in members])
            if len(members) > 1
            else todo[members[0]].images
        )
        if use_ray:
            feats = _ray_features(
                str(checkpoint),
                images,
                image_size,
                batch_size,
                num_actors,
                num_gpus_per_actor,
                num_cpus_per_actor,
            )
        else:
            feats = extract_features(model, images, image_size, batch_size, device).numpy()
        offset = 0
        for i in members:
            labelled = todo[i]
            part = feats[offset : offset + len(labelled)]
            offset += len(labelled)
            results[i] = FeatureSet(part, labelled.labels, list(labelled.class_names))
            if paths[i] is not None:
                meta = {
                    "data": datasets[i] if isinstance(datasets[i], str) else labelled.spec,
                    "image_size": image_size,
                    "checkpoint": str(checkpoint),
                    "seconds": time.perf_counter() - start,
                }
                results[i].cache_path = _write_cache(paths[i], results[i], meta)
    return results  # type: ignore[return-value]


def compute_features(
    checkpoint: str | os.PathLike, data: str | LabelledImages, **kwargs
) -> FeatureSet:
    """``compute_feature_sets`` for one set (same keyword arguments)."""
    return compute_feature_sets(checkpoint, [data], **kwargs)[0]


def extract_features_ray(
    checkpoint_dir: str | os.PathLike,
    labelled_images_or_spec: str | LabelledImages,
    image_size: int | None = None,
    batch_size: int = 256,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    max_images: int = 0,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> FeatureSet:
    """Offline features on a fixed-size Ray Data actor pool, cached as ``features-<hash>.npz``."""
    return compute_features(
        checkpoint_dir,
        labelled_images_or_spec,
        image_size=image_size,
        batch_size=batch_size,
        max_images=max_images,
        use_ray=True,
        num_actors=num_actors,
        num_gpus_per_actor=num_gpus_per_actor,
        num_cpus_per_actor=num_cpus_per_actor,
        cache=cache,
        cache_dir=cache_dir,
    )


# ==================================================================================================
# Classifiers
# ==================================================================================================
def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def knn_classify(
    train_features,
    train_labels,
    test_features,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """DINO-style weighted kNN: cosine similarity, top-k neighbours, votes ``exp(sim / T)``.

    Chunked over queries (memory ``chunk_size x N_train``); runs on the train features' device.
    Returns int64 predictions ``(N_test,)``.
    """
    bank = F.normalize(_as_tensor(train_features), dim=1)
    labels = _as_tensor(train_labels, torch.int64).to(bank.device)
    queries = F.normalize(_as_tensor(test_features).to(bank.device), dim=1)
    if len(bank) == 0:
        raise ValueError("knn_classify: the train (memory bank) set is empty")
    if bank.shape[1] != queries.shape[1]:
        raise ValueError(f"feature dims differ: train {bank.shape[1]}, test {queries.shape[1]}")
    num_classes = int(num_classes or int(labels.max()) + 1)
    k = max(1, min(int(k), len(bank)))
    preds = []
    for start in range(0, len(queries), chunk_size):
        sim = queries[start : start + chunk_size] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(sim), num_classes, device=bank.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.int64)


def knn_accuracy(
    train_features,
    train_labels,
    test_features,
    test_labels,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> float:
    """Top-1 accuracy of ``knn_classify`` on the test set."""
    preds = knn_classify(
        train_features, train_labels, test_features, k, temperature, num_classes, chunk_size
    )
    truth = _as_tensor(test_labels, torch.int64)
    return float((preds == truth).float().mean()) if len(truth) else float("nan")


def mean_per_class_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """Average over the classes present in ``labels`` of each class's accuracy (recall)."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float(np.mean([np.mean(preds[labels == c] == c) for c in np.unique(labels)]))


def linear_probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    Cs: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Logistic-regression probe (L-BFGS, multinomial) on standardised features.

    C is chosen from ``Cs`` (default ``logspace(-4, 2, 7)``) by accuracy on a held-out stratified
    ``val_fraction`` of train (scaler fitted on the sub-train part), then the probe is refitted on the
    whole train set. Returns ``top1``, ``mean_per_class``, ``C`` and the ``val_top1`` per C.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def arr(x, dtype):
        return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(
            dtype
        )

    # float64 (L-BFGS converges more reliably), float32 once that would exceed ~800 MB of features.
    n, d = np.shape(train_features)
    dtype = np.float64 if n * d <= 1e8 else np.float32
    Xtr, ytr = arr(train_features, dtype), arr(train_labels, np.int64)
    Xte, yte = arr(test_features, dtype), arr(test_labels, np.int64)
    if len(np.unique(ytr)) < 2:
        raise ValueError("linear_probe: the train set needs at least two classes")
    grid = sorted(float(c) for c in (Cs or DEFAULT_C_GRID))

    # Small problems run single-threaded: there BLAS/OpenMP thread pools only add synchronisation,
    # and on a busy machine their spinning threads made a digits-sized probe 100x slower.
    small = Xtr.shape[0] * Xtr.shape[1] * max(2, len(np.unique(ytr))) < 5e7

    def fit(X, y, C, warm=None):
        clf = warm or LogisticRegression(C=C, max_iter=max_iter, warm_start=True)
        clf.set_params(C=C)
        with warnings.catch_warnings(), threadpool_limits(limits=1 if small else None):
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X, y)
        return clf

    val_scores: dict[str, float] = {}
    best_C = grid[len(grid) // 2] if len(grid) > 1 else grid[0]
    if len(grid) > 1:
        tr, va = stratified_split(ytr, val_fraction, seed)
        if len(va) and len(np.unique(ytr[tr])) >= 2:
            scaler = StandardScaler().fit(Xtr[tr])
            Xa, Xv = scaler.transform(Xtr[tr]), scaler.transform(Xtr[va])
            clf = None
            for (
                C
            ) in grid:  # ascending C with warm starts: each fit starts near the previous optimum
                clf = fit(Xa, ytr[tr], C, clf)
                val_scores[f"{C:g}"] = float(np.mean(clf.predict(Xv) == ytr[va]))
            best = max(val_scores.values())
            best_C = next(C for C in grid if val_scores[f"{C:g}"] == best)  # smallest C among ties
    scaler = StandardScaler().fit(Xtr)
    clf = fit(scaler.transform(Xtr), ytr, best_C)
    preds = clf.predict(scaler.transform(Xte)) if len(Xte) else np.zeros(0, np.int64)
    return {
        "top1": float(np.mean(preds == yte)) if len(yte) else float("nan"),
        "mean_per_class": mean_per_class_accuracy(yte, preds) if len(yte) else float("nan"),
        "C": best_C,
        "val_top1": val_scores,
    }


# ==================================================================================================
# Online (rank 0 during training) and offline entry points
# ==================================================================================================
def online_knn_accuracy(
    model: torch.nn.Module,
    train: LabelledImages,
    test: LabelledImages,
    image_size: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """kNN top-1 of the model being trained on preloaded sets (``load_eval_split``); in-process."""
    bank = extract_features(model, train.images, image_size, batch_size, device)
    queries = extract_features(model, test.images, image_size, batch_size, device)
    return knn_accuracy(
        bank, train.labels, queries, test.labels, k, temperature, len(train.class_names)
    )


class OnlineKNN:
    """Online kNN monitor for rank 0 of the training loop (``config.eval``).

    The labelled sets are loaded once at construction (``load_eval_split``); ``evaluate(model,
    device)`` extracts features in-process (no collective: call it on rank 0 only, with the
    unwrapped model) and returns ``{"eval/knn_top1": accuracy}``.
    """

    def __init__(self, config):
        ev = config.eval
        self.image_size = config.model.image_size
        self.k, self.temperature, self.batch_size = ev.knn_k, ev.knn_temperature, ev.batch_size
        self.train, self.test = load_eval_split(ev.data, ev.max_images, seed=config.train.seed)
        self._train_images = torch.from_numpy(self.train.images)
        self._test_images = torch.from_numpy(self.test.images)

    def evaluate(
        self, model: torch.nn.Module, device: str | torch.device | None = None
    ) -> dict[str, float]:
        bank = extract_features(model, self._train_images, self.image_size, self.batch_size, device)
        queries = extract_features(
            model, self._test_images, self.image_size, self.batch_size, device
        )
        acc = knn_accuracy(
            bank,
            self.train.labels,
            queries,
            self.test.labels,
            self.k,
            self.temperature,
            len(self.train.class_names),
        )
        return {"eval/knn_top1": acc}


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def evaluate(
    checkpoint: str | os.PathLike,
    data: str,
    method: str = "knn",
    output: str | os.PathLike | None = None,
    *,
    use_ray: bool | None = None,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    max_images: int = 0,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    Cs: Sequence[float] | None = None,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: float = 1.0,
    device: str | torch.device | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint's frozen CLS features with kNN and/or a linear probe.

    ``data`` is an eval spec (``parse_data_spec``). Features come from the Ray actor pool when
    ``use_ray`` (default: whether Ray is initialised), else in-process; both are cached per
    checkpoint. Writes ``results.json`` and TensorBoard scalars (``eval/knn_top1``,
    ``eval/linear_top1``, ``eval/linear_mean_per_class``) to ``output`` (default
    ``<checkpoint>/eval``) and returns the results dict.
    """
    if method not in ("knn", "linear", "both"):
        raise ConfigError(f"method: {method!r} is not one of knn, linear, both")
    started = time.perf_counter()
    train_spec, test_spec = check_data_spec(data)  # cheap: fail before any model or Ray work
    model_file = _model_file(checkpoint)
    model, config = load_checked_model(model_file)  # rejects a state/architecture mismatch up front
    image_size = config.model.image_size

    started_ray = False
    if use_ray is None:
        import ray

        use_ray = ray.is_initialized()
    elif use_ray:
        import ray

        if not ray.is_initialized():
            ray.init()
            started_ray = True
    if not use_ray and (device is not None or torch.cuda.is_available()):
        model = model.to(device or "cuda")
    common = dict(
        image_size=image_size,
        batch_size=batch_size,
        max_images=max_images,
        use_ray=use_ray,
        model=model,
        device=device,
        num_actors=num_actors,
        num_gpus_per_actor=num_gpus_per_actor,
        num_cpus_per_actor=num_cpus_per_actor,
        cache=cache,
        cache_dir=cache_dir,
    )
    try:
        if test_spec is None:
            train = compute_features(model_file, train_spec, **common)
            tr, te = stratified_split(train.labels, test_fraction, seed)
            if len(te) == 0:
                raise ConfigError(f"eval data {data!r}: too few images to hold out a test split")
            train, test = train.subset(tr), train.subset(te)
        else:
            train, test = compute_feature_sets(model_file, [train_spec, test_spec], **common)
            test = _align_classes(train.class_names, test, test_spec)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    num_classes = len(train.class_names)
    if method in ("knn", "both"):
        metrics["knn_top1"] = knn_accuracy(
            train.features, train.labels, test.features, test.labels, k, temperature, num_classes
        )
    if method in ("linear", "both"):
        probe = linear_probe(
            train.features, train.labels, test.features, test.labels, Cs=Cs, seed=seed
        )
        metrics["linear_top1"] = probe["top1"]
        metrics["linear_mean_per_class"] = probe["mean_per_class"]
        metrics["linear_C"] = probe["C"]
        details["linear_val_top1"] = probe["val_top1"]

    out_dir = Path(output) if output else model_file.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "method": method,
        "metrics": metrics,
        "checkpoint": str(checkpoint),
        "data": data,
        "train_data": train_spec,
        "test_data": test_spec or f"{train_spec} (stratified {test_fraction:g} split, seed {seed})",
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": num_classes,
        "classes": list(train.class_names),
        "image_size": image_size,
        "feature_dim": int(train.features.shape[1]),
        "knn": {"k": k, "temperature": temperature},
        "feature_cache": {
            "train": train.cache_path,
            "test": test.cache_path,
            "hit": bool(train.cached and test.cached),
        },
        "features_via": "ray" if use_ray else "in-process",
        "step": step,
        "seconds": round(time.perf_counter() - started, 3),
        **details,
    }
    _write_json_atomic(out_dir / "results.json", results)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out_dir))
    try:
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, global_step=step or 0)
    finally:
        writer.close()
    results["output"] = str(out_dir)
    return results
