"""The feature cache: ``features-<hash>.npz`` beside the checkpoint (or in ``cache_dir``).

Embedding an eval set is the slow part of offline evaluation; the features only change when the
data, the image size or the model file (and its weight set) do, so the key hashes exactly those
(data by a cheap stat fingerprint, never by decoding it). A cache that cannot be read or written is skipped, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..models.io import model_file
from ..storage import open_filesystem, replaced_atomically
from .specs import SIMULATOR_PER_CLASS, is_simulator_spec, parse_simulator, simulator_spec

log = logging.getLogger(__name__)
# How images become model input; features cached under another recipe are not reused. "uint8-view":
# each image decoded alone, reduced to the eval transform's S x S view and rounded to uint8.
PIXELS = "uint8-view"


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

    def subset(self, index: np.ndarray) -> FeatureSet:
        index = np.asarray(index, dtype=np.int64)
        return FeatureSet(
            self.features[index],
            self.labels[index],
            list(self.class_names),
            self.cache_path,
            self.cached,
        )


def _fingerprint(spec: str) -> Any:
    """Cheap change detector for a data source: simulator specs are deterministic; files use stats."""
    if is_simulator_spec(spec):
        attribute, split, per_class, world = parse_simulator(spec)
        return simulator_spec(attribute, split or "train", per_class or SIMULATOR_PER_CLASS, world)
    try:
        import pyarrow.fs as pafs

        fs, path = open_filesystem(spec, "eval data")
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


def feature_cache_path(
    checkpoint: str | os.PathLike,
    spec: str,
    image_size: int,
    cache_dir: str | os.PathLike | None = None,
    max_images: int = 0,
    weights: str | None = None,
) -> Path:
    """``<cache_dir or checkpoint dir>/features-<hash>.npz``; the hash covers the dataset (spec and
    a stat fingerprint), the image cap and size, the pixels' version, the model file and its weight set."""
    file = model_file(checkpoint)
    st = file.stat()
    key = {
        "data": {"spec": _fingerprint(spec), "max_images": max_images},
        "image_size": int(image_size),
        "pixels": PIXELS,
        "model": [str(file.resolve()) if cache_dir else file.name, st.st_size, st.st_mtime_ns],
        "weights": weights,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir or file.parent) / f"features-{digest}.npz"


def read_cache(path: Path) -> FeatureSet | None:
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


def write_cache(path: Path, fs: FeatureSet, meta: dict) -> str | None:
    """Atomic write (temp file in the same directory, then rename); None when not writable."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                features=fs.features.astype(np.float32, copy=False),
                labels=fs.labels,
                class_names=np.asarray(fs.class_names, dtype=np.str_),
                meta=np.asarray(json.dumps(meta, default=str)),
            )
        return str(path)
    except OSError as err:
        log.warning("could not write the feature cache %s (%s); continuing without it", path, err)
        return None
