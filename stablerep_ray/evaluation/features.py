"""Frozen CLS features: the one path from uint8 images to features for a model.

:func:`extract_features` is that path; everything else calls it: the online kNN on rank 0, the
benchmarks, and :func:`compute_feature_sets`, the offline pass. That pass streams each set: Ray Data
decode tasks turn blocks of ``batch_size`` indexed rows (:mod:`.sources`) into uint8 eval views, and
a fixed-size actor pool (each actor loads the checkpoint once, on a GPU when given one) turns them into
features, executed by a split coordinator actor while this process only collects the features; or,
without Ray, the same blocks are decoded and embedded one after another in this process.
Either way memory holds a few blocks and the features, never the set's images. The result is cached
next to the checkpoint (``features-<hash>.npz``, see :mod:`.cache`), so re-scoring a checkpoint with
another classifier does not decode or embed anything again.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..memory import NamesSetting
from ..models.io import MODEL_FILE, load_checked_model, load_model, model_file
from .cache import FeatureSet, feature_cache_path, read_cache, write_cache
from .sources import ImageSource, SourceInfo, index_source, read_rows

log = logging.getLogger(__name__)

#: ``progress(done, total)``: images embedded so far, of the pass's total.
Progress = Callable[[int, int], None]


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
    from ..augment import eval_transform

    net = _unwrap(model)
    if device is None:
        param = next(net.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    images = images_uint8 if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    work = f"feature extraction of {batch_size} images at {image_size} px"
    try:
        with torch.no_grad(), NamesSetting("eval.batch_size", work, "lower eval.batch_size (eval's --batch-size)"):
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


# -- Ray Data: decode tasks, then the actor pool ----------------------------------------------------
def _decode_block(batch: dict[str, np.ndarray], infos: list[SourceInfo], image_size: int) -> dict:
    """Ray Data task: a block of indexed rows (of one or more sets) -> their uint8 eval views."""
    images = np.empty((len(batch["idx"]), image_size, image_size, 3), dtype=np.uint8)
    for s in np.unique(batch["set"]):
        rows = batch["set"] == s
        images[rows] = read_rows(
            infos[s], batch["path"][rows], batch["offset"][rows], batch["label"][rows], image_size
        )
    return {"idx": batch["idx"], "image": images}


class _FeatureActor:
    """Ray Data actor: loads the checkpoint once, then maps image batches to CLS features.

    The checkpoint is read from its path when this node sees it (local run, shared storage), else
    from the copy of the file the driver put in the object store (``model_bytes``, a 1-list holding
    an ObjectRef so Ray does not fetch it unless needed).
    """

    def __init__(self, checkpoint: str, image_size: int, batch_size: int, model_bytes=None, weights=None):
        if os.path.isfile(checkpoint) or not model_bytes:
            model, _ = load_model(checkpoint, weights)
        else:
            import ray

            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / MODEL_FILE).write_bytes(ray.get(model_bytes[0]))
                model, _ = load_model(tmp, weights)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.image_size = image_size
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = extract_features(
            self.model, batch["image"], self.image_size, self.batch_size, self.device
        )
        return {"idx": batch["idx"], "features": feats.numpy()}


def _manifest(sources: Sequence[ImageSource], rows: int) -> list:
    """The sets' rows as Arrow tables of ``rows`` rows (one decode block each): global index, set,
    file, offset, label. Paths travel with their rows, so no task receives a whole set's index."""
    import pyarrow as pa

    tables, base = [], 0
    for s, source in enumerate(sources):
        for start in range(0, len(source), rows):
            stop = min(start + rows, len(source))
            tables.append(pa.table({
                "idx": pa.array(np.arange(base + start, base + stop, dtype=np.int64)),
                "set": pa.array(np.full(stop - start, s, dtype=np.int32)),
                "path": pa.array(source.paths[start:stop].tolist(), pa.string()),
                "offset": pa.array(source.offsets[start:stop]),
                "label": pa.array(source.labels[start:stop]),
            }))
        base += len(source)
    return tables


def pool_size(num_actors: int, num_gpus_per_actor: float | None) -> tuple[int, float]:
    """(actors, GPUs each) for the connected cluster: ``num_gpus_per_actor`` None takes 1 GPU per
    actor when the cluster has GPUs, else 0; ``num_actors`` 0 takes one actor per free GPU share
    (decode tasks run on the CPUs), or half the free CPUs without GPUs (Ray Data then fuses decoding
    into the actors, whose resources equal a decode task's). Free, not total: an actor sized for a
    GPU that this job's driver (``--entrypoint-num-gpus``) or another run holds would only wait."""
    import ray

    resources, free = ray.cluster_resources(), ray.available_resources()
    have = resources.get("GPU", 0)
    gpus = (1.0 if have else 0.0) if num_gpus_per_actor is None else float(num_gpus_per_actor)
    if gpus > have:
        raise ConfigError(
            f"num_gpus_per_actor={gpus:g}: the Ray cluster has {have:g} GPUs; lower it (0 runs feature "
            f"extraction on CPUs)"
        )
    if not num_actors:
        num_actors = int(free.get("GPU", 0) // gpus) if gpus else int(free.get("CPU", 1) // 2)
    return max(1, num_actors), gpus


def _user_error(err: BaseException) -> ConfigError | None:
    """The ConfigError (unreadable image, missing bytes) a Ray task raised, as one line again: Ray
    Data hands the driver a UserCodeException that keeps only the traceback's text."""
    found = re.findall(r"(?m)\bConfigError: (.+)$", str(err))
    return ConfigError(found[-1].strip()) if found else None


def _ray_features(
    checkpoint: Path,
    sources: Sequence[ImageSource],
    image_size: int,
    batch_size: int,
    num_actors: int,
    num_gpus_per_actor: float | None,
    weights: str | None,
    progress: Progress | None = None,
) -> np.ndarray:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    num_actors, num_gpus = pool_size(num_actors, num_gpus_per_actor)
    n = sum(len(s) for s in sources)
    rows = max(1, batch_size)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    model_bytes = [ray.put(checkpoint.read_bytes())] if len(nodes) > 1 else None
    ctx = DataContext.get_current()
    old_wait, old_limits = ctx.wait_for_min_actors_s, ctx.execution_options.resource_limits
    if old_wait is None or old_wait <= 0:
        ctx.wait_for_min_actors_s = 600  # fail instead of hanging when actors cannot be placed
    # Decoded blocks wait for the actors in the object store: a budget of a few blocks per actor keeps
    # that queue (and so memory) the same for any set size.
    block = rows * image_size * image_size * 3
    ctx.execution_options.resource_limits = old_limits.copy(
        object_store_memory=max(2**28, 4 * (num_actors + 2) * block)
    )
    out: np.ndarray | None = None
    try:
        ds = ray.data.from_arrow(_manifest(sources, rows)).map_batches(
            _decode_block,
            fn_kwargs={"infos": [s.info for s in sources], "image_size": int(image_size)},
            batch_size=None,
            batch_format="numpy",
            num_cpus=1,
        ).map_batches(
            _FeatureActor,
            compute=ActorPoolStrategy(size=num_actors),
            batch_size=rows,
            batch_format="numpy",
            num_gpus=num_gpus or None,
            num_cpus=1,
            fn_constructor_kwargs={
                "checkpoint": str(checkpoint.resolve()),
                "image_size": int(image_size),
                "batch_size": rows,
                "model_bytes": model_bytes,
                "weights": weights,
            },
        )
        done = 0
        # Executed by a split coordinator actor, not in this process: the actor pool's start-up lines
        # (ray-project/ray#53727) come forwarded, where runtime.drop_forwarded_noise removes them.
        (stream,) = ds.streaming_split(1)
        for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
            feats = batch["features"]
            if out is None:
                out = np.empty((n, feats.shape[1]), dtype=np.float32)
            out[batch["idx"]] = feats  # Ray Data does not keep row order across actors
            done += len(feats)
            if progress:
                progress(done, n)
    except Exception as err:
        user = _user_error(err)
        if user is None:
            raise
        raise user from None
    finally:
        ctx.wait_for_min_actors_s = old_wait
        ctx.execution_options.resource_limits = old_limits
    return out


def _local_features(
    model: torch.nn.Module,
    sources: Sequence[ImageSource],
    image_size: int,
    batch_size: int,
    device: str | torch.device | None,
    progress: Progress | None = None,
) -> np.ndarray:
    """The in-process path: decode a block, embed it, next block; memory holds one block."""
    n, done, parts = sum(len(s) for s in sources), 0, []
    for source in sources:
        for start in range(0, len(source), batch_size):
            parts.append(extract_features(model, source.read(image_size, slice(start, start + batch_size)),
                                          image_size, batch_size, device).numpy())
            done += len(parts[-1])
            if progress:
                progress(done, n)
    return np.concatenate(parts)


# -- offline: several sets, cached -----------------------------------------------------------------
def _checkpoint_image_size(checkpoint) -> int:
    state = torch.load(model_file(checkpoint), map_location="cpu", weights_only=False)
    try:
        return int(state["config"]["model"]["image_size"])
    except (KeyError, TypeError):
        return 224


def compute_feature_sets(
    checkpoint: str | os.PathLike,
    datasets: Sequence[str],
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    max_images: int = 0,
    use_ray: bool = True,
    model: torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    num_actors: int = 0,
    num_gpus_per_actor: float | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    weights: str | None = None,
    progress: Progress | None = None,
) -> list[FeatureSet]:
    """Features of several labelled sets (data specs) for one checkpoint, cached.

    Cache hits return without indexing or decoding anything. The missing sets are streamed in one
    pass (one actor-pool start-up for train and test). ``use_ray`` runs the Ray Data pipeline
    (``pool_size`` reads ``num_actors`` and ``num_gpus_per_actor``), else the model runs in this
    process (``model`` if given, else loaded from the checkpoint; on ``device``, else CUDA when there
    is one). ``weights`` names the checkpoint's weight set (None: the one evaluation uses).
    ``progress(done, total)`` is called with the images embedded so far, after every block.
    """
    file = model_file(checkpoint)
    image_size = int(image_size or _checkpoint_image_size(file))
    results: list[FeatureSet | None] = [None] * len(datasets)
    paths: list[Path | None] = [None] * len(datasets)
    for i, spec in enumerate(datasets):
        if cache:
            paths[i] = feature_cache_path(file, spec, image_size, cache_dir, max_images, weights)
            results[i] = read_cache(paths[i])
            if results[i] is not None:
                log.info("feature cache hit: %s", paths[i])
    todo = [i for i in range(len(datasets)) if results[i] is None]
    if not todo:
        return results  # type: ignore[return-value]
    sources = [index_source(datasets[i], max_images) for i in todo]
    start = time.perf_counter()
    if use_ray:
        feats = _ray_features(
            file, sources, image_size, batch_size, num_actors, num_gpus_per_actor, weights, progress
        )
    else:
        model = model if model is not None else load_checked_model(file, weights)[0]
        if device is not None or torch.cuda.is_available():
            model = model.to(device or "cuda")
        feats = _local_features(model, sources, image_size, batch_size, device, progress)
    offset = 0
    for i, source in zip(todo, sources, strict=True):
        part = feats[offset : offset + len(source)]
        offset += len(source)
        results[i] = FeatureSet(part, source.labels, list(source.class_names))
        if paths[i] is not None:
            meta = {
                "data": datasets[i],
                "image_size": image_size,
                "checkpoint": str(checkpoint),
                "weights": weights,
                "seconds": time.perf_counter() - start,
            }
            results[i].cache_path = write_cache(paths[i], results[i], meta)
    return results  # type: ignore[return-value]
