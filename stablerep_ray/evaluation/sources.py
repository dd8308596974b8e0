"""Labelled image sets indexed without decoding an image, and the decoding of any rows of one.

:func:`index_source` turns a data spec into an :class:`ImageSource`: for every row, where its image
is (an ImageFolder file; a parquet file and row; a simulator class and index) and its label, read
from directory listings and the label column alone. :func:`read_rows` decodes some rows straight to
the uint8 S x S view the model sees (:func:`eval_pixels`). The Ray Data decode tasks, the in-process
path and the online kNN bank all go through it, so an image exists at its original size only while it
is being decoded, and a set of any size is read in bounded memory.
"""

from __future__ import annotations

import functools
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from ..storage import open_filesystem
from .specs import (
    LABEL_COLUMNS,
    SIMULATOR_PER_CLASS,
    SPEC_HELP,
    images_by_class,
    is_simulator_spec,
    locate,
    open_parquet,
    parse_simulator,
    require_two_classes,
    simulator_attribute,
)

IMAGE_COLUMNS = ("image", "img", "image_bytes", "jpg", "png", "webp", "bytes")
SIMULATOR_IMAGE_SIZE = 64  # render_eval_set's default size: the views are cut from these renders
DECODE_THREADS = 8  # decoding releases the GIL; threads also hide remote-storage latency


@dataclass(frozen=True)
class SourceInfo:
    """What decoding a row needs besides the row itself; small enough to ship with every task."""

    spec: str
    kind: str  # "folder", "parquet" or "simulator"
    image_column: str = ""  # parquet: the column holding the encoded bytes


@dataclass
class ImageSource:
    """A labelled set as an index: per row its file (``paths``; "" for the simulator), its offset
    (row within a parquet file, index within a simulator class; 0 for an ImageFolder file) and label."""

    info: SourceInfo
    paths: np.ndarray  # object (N,)
    offsets: np.ndarray  # int64 (N,)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: np.ndarray) -> ImageSource:
        index = np.asarray(index, dtype=np.int64)
        return ImageSource(
            self.info, self.paths[index], self.offsets[index], self.labels[index], self.class_names
        )

    def read(self, image_size: int, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """uint8 ``(n, S, S, 3)`` eval views of ``rows`` (default: all)."""
        return read_rows(
            self.info, self.paths[rows], self.offsets[rows], self.labels[rows], image_size
        )


# -- indexing (no decoding) ------------------------------------------------------------------------
def balanced_subset(labels: np.ndarray, max_images: int) -> np.ndarray:
    """Deterministic class-balanced subset of at most ``max_images`` rows (round robin over classes)."""
    if not max_images or len(labels) <= max_images:
        return np.arange(len(labels))
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [
        idx[r] for r in range(max(len(p) for p in per_class)) for idx in per_class if r < len(idx)
    ]
    return np.sort(np.asarray(order[:max_images], dtype=np.int64))


def _index_folder(spec: str, root: str, files: list[str]) -> ImageSource:
    by_class = images_by_class(spec, root, files)
    class_names = sorted(by_class)
    paths = [p for c in class_names for p in sorted(by_class[c])]
    labels = [i for i, c in enumerate(class_names) for _ in by_class[c]]
    return ImageSource(
        SourceInfo(spec, "folder"),
        np.asarray(paths, dtype=object),
        np.zeros(len(paths), dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        class_names,
    )


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


def _image_column(spec: str, schema, label_col: str | None) -> str:
    """The column of encoded image bytes: binary, or a Hugging Face ``{bytes, path}`` struct."""
    import pyarrow as pa

    names = schema.names
    column = next((c for c in IMAGE_COLUMNS if c in names), None)
    if column is None and "image.bytes" in names:
        column = "image.bytes"
    if column is None or label_col is None:
        raise ConfigError(
            f"eval data {spec!r}: parquet columns {names} lack an image-bytes column "
            f"({' / '.join(IMAGE_COLUMNS)}) or a label column ({' / '.join(LABEL_COLUMNS)}); "
            f"rename the columns to 'image' and 'label'"
        )
    kind = schema.field(column).type
    if pa.types.is_struct(kind):
        if kind.get_field_index("bytes") < 0:
            raise ConfigError(f"eval data {spec!r}: struct column {column!r} has no 'bytes' field")
        kind = kind.field("bytes").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise ConfigError(
            f"eval data {spec!r}: column {column!r} is {schema.field(column).type}, expected encoded "
            f"image bytes (binary, or a {{bytes, path}} struct as written by Hugging Face datasets)"
        )
    return column


def _index_parquet(spec: str, fs, path: str) -> ImageSource:
    import pyarrow as pa

    dataset, label_col = open_parquet(spec, fs, path)
    column = _image_column(spec, dataset.schema, label_col)
    paths, offsets, labels = [], [], []
    for fragment in dataset.get_fragments():  # file by file: rows are (file, row in file)
        part = fragment.to_table(columns=[label_col]).column(0)
        paths.append(np.full(len(part), fragment.path, dtype=object))
        offsets.append(np.arange(len(part), dtype=np.int64))
        labels.extend(part.chunks)
    if not labels or sum(len(c) for c in labels) == 0:
        raise ConfigError(
            f"eval data {spec!r}: the parquet data has no rows; point at a non-empty split"
        )
    ints, class_names = _parquet_labels(
        spec, pa.chunked_array(labels).combine_chunks(), label_col, dataset.schema
    )
    return ImageSource(
        SourceInfo(spec, "parquet", column),
        np.concatenate(paths),
        np.concatenate(offsets),
        ints,
        class_names,
    )


def _index_simulator(spec: str) -> ImageSource:
    from ..tools import simulator

    attribute = simulator_attribute(spec)
    per_class = parse_simulator(spec)[2] or SIMULATOR_PER_CLASS
    class_names = sorted(simulator.ATTRIBUTES[attribute])
    labels = np.repeat(np.arange(len(class_names), dtype=np.int64), per_class)
    offsets = np.tile(np.arange(per_class, dtype=np.int64), len(class_names))
    paths = np.full(len(labels), "", dtype=object)
    return ImageSource(SourceInfo(spec, "simulator"), paths, offsets, labels, class_names)


def index_source(spec: str, max_images: int = 0) -> ImageSource:
    """Index one labelled set (ImageFolder dir, parquet file/dir, local or URI, or simulator spec)
    without decoding it; ``max_images`` keeps a deterministic class-balanced subset (0: all)."""
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError(f"eval data: empty; {SPEC_HELP}")
    if is_simulator_spec(spec):
        source = _index_simulator(spec)
    else:
        fs, kind, path, images = locate(spec)
        source = (
            _index_folder(spec, path, images) if kind == "folder" else _index_parquet(spec, fs, path)
        )
    source = source.select(balanced_subset(source.labels, max_images))
    if len(source) == 0:
        raise ConfigError(f"eval data {spec!r}: the dataset is empty; {SPEC_HELP}")
    require_two_classes([source.class_names[i] for i in np.unique(source.labels)], spec)
    return source


# -- decoding --------------------------------------------------------------------------------------
def eval_pixels(image: np.ndarray, image_size: int) -> np.ndarray:
    """The uint8 ``S x S`` view the model sees: ``eval_transform``'s resize and centre crop, before
    normalising, rounded to uint8 (as a PIL resize would); an ``S x S`` image is returned unchanged."""
    if image.shape[:2] == (image_size, image_size):
        return image
    import torch

    from ..augment import eval_transform

    view = eval_transform(torch.from_numpy(image)[None], image_size, normalize_output=False)[0]
    return view.mul_(255.0).round_().to(torch.uint8).permute(1, 2, 0).numpy()


def _decode(data: bytes | None, source: str) -> np.ndarray:
    from PIL import Image

    if data is None:
        raise ConfigError(f"{source}: no image bytes; remove the row or fill it in")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)  # writable: torch reads it
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise ConfigError(
            f"{source}: not a readable image ({err}); remove or replace the file"
        ) from None


@functools.lru_cache(maxsize=16)
def _filesystem(spec: str):
    return open_filesystem(spec, "eval data")[0]


def _parquet_blobs(info: SourceInfo, path: str, offsets: np.ndarray) -> list[bytes | None]:
    """The image bytes of rows ``offsets`` of one parquet file, reading only the row groups that
    hold them and only the image column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _filesystem(info.spec).open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        group_of = np.searchsorted(starts, offsets, side="right") - 1
        groups = np.unique(group_of)
        table = reader.read_row_groups(groups.tolist(), columns=[info.image_column])
    read_start = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])  # in the read table
    position = offsets - starts[group_of] + read_start[np.searchsorted(groups, group_of)]
    column = table.column(0).combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.take(pa.array(position)).to_pylist()


def read_rows(
    info: SourceInfo,
    paths: np.ndarray,
    offsets: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    threads: int = DECODE_THREADS,
) -> np.ndarray:
    """Decode rows of a source to uint8 ``(n, S, S, 3)`` eval views, ``threads`` images at a time;
    each image is reduced to ``S x S`` as soon as it is decoded."""
    n = len(paths)
    out = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    if info.kind == "simulator":
        from ..tools.simulator import render_eval_image

        attribute, split, _, world = parse_simulator(info.spec)

        def load(i: int) -> np.ndarray:
            return render_eval_image(
                attribute, int(labels[i]), int(offsets[i]), SIMULATOR_IMAGE_SIZE, 0, split or "train", world
            )
    elif info.kind == "parquet":
        blobs: list = [None] * n
        for path in dict.fromkeys(paths):
            rows = np.flatnonzero(paths == path)
            for i, blob in zip(rows, _parquet_blobs(info, path, offsets[rows]), strict=True):
                blobs[i] = blob

        def load(i: int) -> np.ndarray:
            return _decode(blobs[i], f"{info.spec} ({paths[i]} row {offsets[i]})")
    else:
        fs = _filesystem(info.spec)

        def load(i: int) -> np.ndarray:
            with fs.open_input_file(paths[i]) as f:
                return _decode(f.readall(), paths[i])

    def fill(i: int) -> None:
        out[i] = eval_pixels(load(i), image_size)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(fill, range(n)))
    return out
