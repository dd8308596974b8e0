"""Evaluation data specs (``eval.data``): what a spec names and whether it can work, without decoding
an image or starting Ray, so the preflight rejects a bad eval set before any GPU is reserved.

A spec is an ImageFolder directory (``root/<class>/*.png|jpg``), a parquet file or directory (image
bytes in ``image`` -- plain binary or a Hugging Face ``{bytes, path}`` struct -- and a ``label``
column, int or str), or ``simulator:<attribute>[:<world>][:train|test][:per_class]`` for the
procedural simulator's held-out set (rendered in that simulator world, ``default`` when not named).
``TRAIN:TEST`` names a memory bank / probe train set and a query set.
"""

from __future__ import annotations

import collections
import os
import re
from typing import NamedTuple

from ..config import SIMULATOR_WORLDS, ConfigError
from ..storage import open_filesystem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
LABEL_COLUMNS = ("label", "labels", "class", "target", "fine_label")
SIMULATOR_PREFIX = "simulator"
SIMULATOR_SPLITS = ("train", "test")
SIMULATOR_PER_CLASS = 50
SIMULATOR_FORM = "simulator:<attribute>[:<world>][:train|test][:per_class]"
SPEC_HELP = (
    "pass an ImageFolder directory (root/<class>/<image>.png|jpg), a parquet file or directory "
    "with an image-bytes column ('image') and a 'label' column, or simulator:<attribute>"
)


# -- parsing ---------------------------------------------------------------------------------------
def _split_items(spec: str) -> list[str]:
    """Split ``A:B`` into dataset items; ``simulator:attr[:world][:split][:n]``, URIs, drives stay whole."""
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
                and len(parts) < 5
                and (tokens[i] in SIMULATOR_SPLITS + SIMULATOR_WORLDS or tokens[i].isdigit())
            ):
                parts.append(tokens[i])
                i += 1
            items.append(":".join(parts))
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if nxt is not None and nxt.startswith("//"):  # scheme://path (s3://, gs://, hdfs://)
            item = f"{tok}:{nxt}"
            i += 2
            if i < len(tokens) and re.match(r"^\d+(/|$)", tokens[i]):  # hdfs://host:8020/path
                item += f":{tokens[i]}"
                i += 1
            items.append(item)
            continue
        if nxt is not None and len(tok) == 1 and tok.isalpha() and nxt[:1] in ("\\", "/"):  # C:\data
            items.append(f"{tok}:{nxt}")
            i += 2
            continue
        items.append(tok)
        i += 1
    return items


class SimulatorSet(NamedTuple):
    attribute: str
    split: str | None
    per_class: int | None
    world: str = "default"


def parse_simulator(spec: str) -> SimulatorSet:
    """``simulator:attr[:world][:split][:per_class]`` -> its parts (None where not given)."""
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != SIMULATOR_PREFIX or not parts[1]:
        raise ConfigError(f"eval data {spec!r}: expected {SIMULATOR_FORM}")
    attribute, split, per_class, world = parts[1], None, None, None
    for part in parts[2:]:
        if part in SIMULATOR_SPLITS and split is None:
            split = part
        elif part in SIMULATOR_WORLDS and world is None:
            world = part
        elif part.isdigit() and per_class is None and int(part) > 0:
            per_class = int(part)
        else:
            raise ConfigError(
                f"eval data {spec!r}: unexpected {part!r}; expected {SIMULATOR_FORM} (worlds: "
                f"{', '.join(SIMULATOR_WORLDS)}), e.g. simulator:shape:test:20"
            )
    return SimulatorSet(attribute, split, per_class, world or "default")


def simulator_spec(attribute: str, split: str, per_class: int | None, world: str = "default") -> str:
    """The canonical spec of a simulator set (the default world is not written)."""
    parts = [SIMULATOR_PREFIX, attribute] + ([world] if world != "default" else []) + [split]
    return ":".join(parts + ([str(per_class)] if per_class else []))


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
        raise ConfigError(f"eval data: empty; {SPEC_HELP}")
    if "://" not in spec and os.path.exists(os.path.expanduser(spec)):
        return spec, None
    items = _split_items(spec)
    if any(not item for item in items) or len(items) > 2:
        raise ConfigError(
            f"eval data {spec!r}: expected DATA or TRAIN:TEST with two datasets (got {len(items)} "
            f"parts: {items}); {SPEC_HELP}"
        )
    if len(items) == 1:
        item = items[0]
        if is_simulator_spec(item):
            attribute, split, per_class, world = parse_simulator(item)
            if split is None:
                return simulator_spec(attribute, "train", per_class, world), simulator_spec(
                    attribute, "test", per_class, world
                )
        return item, None
    out = []
    for item, default_split in zip(items, SIMULATOR_SPLITS, strict=True):
        if is_simulator_spec(item):
            attribute, split, per_class, world = parse_simulator(item)
            item = simulator_spec(attribute, split or default_split, per_class, world)
        out.append(item)
    return out[0], out[1]


# -- locating (no decoding) ------------------------------------------------------------------------
def _is_hidden(rel: str) -> bool:
    return any(p.startswith(".") for p in rel.split("/"))


def locate(spec: str):
    """Resolve a local/URI dataset spec without decoding anything: ``(fs, kind, path, image_files)``
    with kind "folder" (ImageFolder root) or "parquet" (file or directory)."""
    import pyarrow.fs as pafs

    fs, path = open_filesystem(spec, "eval data")
    try:
        info = fs.get_file_info(path)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"eval data {spec!r}: cannot access ({err})") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"eval data {spec!r}: path not found; {SPEC_HELP}")
    if info.type == pafs.FileType.File:
        if not path.lower().endswith(".parquet"):
            raise ConfigError(f"eval data {spec!r}: a single file must be .parquet; {SPEC_HELP}")
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


def images_by_class(spec: str, root: str, files: list[str]) -> dict[str, list[str]]:
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


def open_parquet(spec: str, fs, path: str):
    """(pyarrow dataset, its label column or None): what both the preflight and the loader read."""
    import pyarrow.dataset as pads

    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"eval data {spec!r}: cannot read parquet ({err})") from None
    return dataset, next((c for c in LABEL_COLUMNS if c in dataset.schema.names), None)


def require_two_classes(present: list[str], spec: str) -> None:
    if len(present) < 2:
        raise ConfigError(
            f"eval data {spec!r}: only one class ({present[0] if present else '?'!r}) found; "
            f"classification needs at least two classes -- point at the root that holds one "
            f"subdirectory per class (not a class directory itself), or at data with several labels"
        )


def dataset_class_names(spec: str) -> list[str]:
    """The classes present in a local or URI dataset, from file names or the label column only (no
    image is decoded): the preflight's check that evaluation can work at all."""
    fs, kind, path, images = locate(spec)
    if kind == "folder":
        return sorted(images_by_class(spec, path, images))
    import pyarrow.compute as pc

    dataset, label_col = open_parquet(spec, fs, path)
    if label_col is None:
        raise ConfigError(
            f"eval data {spec!r}: parquet columns {dataset.schema.names} lack a label column "
            f"({' / '.join(LABEL_COLUMNS)}); rename it to 'label'"
        )
    labels = dataset.to_table(columns=[label_col]).column(0)
    return sorted(str(v) for v in pc.unique(labels.drop_null()).to_pylist())


def simulator_attribute(spec: str) -> str:
    """The simulator attribute a ``simulator:...`` spec names (aliases resolved); a ConfigError naming
    the choices when there is none such."""
    from ..tools import simulator

    parsed = parse_simulator(spec)
    attribute = getattr(simulator, "_ALIASES", {}).get(parsed.attribute, parsed.attribute)
    if attribute not in simulator.ATTRIBUTES:
        raise ConfigError(
            f"eval data {spec!r}: unknown simulator attribute {attribute!r}; use one of "
            f"{sorted(simulator.ATTRIBUTES)}, e.g. simulator:shape"
        )
    fixed = dict(simulator.WORLDS[parsed.world].fixed)
    if attribute in fixed:
        varied = [a for a in simulator.ATTRIBUTES if a not in fixed]
        raise ConfigError(
            f"eval data {spec!r}: {attribute} is always {fixed[attribute]!r} in simulator world "
            f"{parsed.world!r}, so there is nothing to classify; use one of {varied}"
        )
    return attribute


def _local_classes(item: str) -> list[str] | None:
    """Check one dataset item; its class names when local (None: simulator or remote)."""
    if is_simulator_spec(item):
        simulator_attribute(item)
        return None
    if "://" in item:
        return None  # remote: checked when loaded
    classes = dataset_class_names(item)
    require_two_classes(classes, item)
    return classes


def check_data_spec(spec: str) -> tuple[str, str | None]:
    """Cheap preflight (no image decoding, no Ray): parse the spec, check simulator attributes,
    that local datasets exist and hold at least two classes, and that a local test set's classes
    occur in its train set. Returns ``parse_data_spec(spec)``; raises ``ConfigError``."""
    train_spec, test_spec = parse_data_spec(spec)
    train = _local_classes(train_spec)
    test = _local_classes(test_spec) if test_spec is not None else None
    unknown = sorted(set(test) - set(train)) if train is not None and test is not None else []
    if unknown:
        raise ConfigError(
            f"eval data {test_spec!r}: test classes {unknown[:10]} do not occur in the train set "
            f"{train_spec!r}; the two sets must share class names"
        )
    return train_spec, test_spec


def check_eval_data(data: str | list[str], simulator_world: str | None = None) -> list[tuple[str, str | None]]:
    """``check_data_spec`` of every set ``eval.data`` names (one spec or a list); an error in a list
    says which entry it is. With ``simulator_world`` (the run's simulator generator renders that
    world), a simulator set of another world is refused: it would score a world never trained on."""
    specs = [data] if isinstance(data, str) else list(data)
    checked = []
    for i, spec in enumerate(specs):
        try:
            checked.append(check_data_spec(spec))
            for item in filter(is_simulator_spec, filter(None, checked[-1]) if simulator_world else ()):
                parsed = parse_simulator(item)
                if parsed.world != simulator_world:
                    raise ConfigError(
                        f"eval data {spec!r} is rendered in simulator world {parsed.world!r} but "
                        f"generator.world is {simulator_world!r}; write simulator:{parsed.attribute}"
                        + ("" if simulator_world == "default" else f":{simulator_world}")
                    )
        except ConfigError as err:
            if isinstance(data, str):
                raise
            raise ConfigError(f"eval.data entry {i + 1} of {len(specs)}: {err}") from None
    return checked


SPLIT_DIRS = ("train", "training", "val", "valid", "validation", "test")


def set_name(spec: str) -> str:
    """A short name for the set a spec names, for metric names: the simulator attribute, else the
    train item's file or directory name without ``.parquet`` (its parent's where it is a split name
    such as ``train``)."""
    item = _split_items(spec.strip())[0]
    if is_simulator_spec(item):
        return parse_simulator(item)[0]
    parts = [p for p in re.split(r"[/\\]", item.split("://", 1)[-1]) if p]
    name = parts[-1].removesuffix(".parquet") if parts else item
    return parts[-2] if name.lower() in SPLIT_DIRS and len(parts) > 1 else name


def set_names(specs: list[str]) -> list[str]:
    """``set_name`` of each spec, made unique with ``-2``, ``-3``, ... in list order."""
    names: list[str] = []
    for spec in specs:
        name, n = set_name(spec), 1
        while (name if n == 1 else f"{name}-{n}") in names:
            n += 1
        names.append(name if n == 1 else f"{name}-{n}")
    return names
