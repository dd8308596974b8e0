"""Frozen CLS features: the one path from uint8 images to features for a model.

:func:`extract_features` is that path; everything else calls it: the online kNN on rank 0, the
benchmarks, and :func:`compute_feature_sets`, the offline pass that runs it either in this process or
on a fixed-size Ray Data actor pool (each actor loads the checkpoint once) and caches the result next
to the checkpoint (``features-<hash>.npz``, see :mod:`.cache`), so re-scoring a checkpoint with
another classifier does not decode or embed anything again.
"""

from __future__ import annotations

import collections
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..models.io import MODEL_FILE, load_checked_model, load_model, model_file
from .cache import FeatureSet, feature_cache_path, read_cache, write_cache
from .datasets import LabelledImages, load_labelled_images

log = logging.getLogger(__name__)


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


# -- Ray Data actor pool ---------------------------------------------------------------------------
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
    checkpoint: str | os.PathLike,
    images: np.ndarray,
    image_size: int,
    batch_size: int,
    num_actors: int,
    num_gpus_per_actor: float,
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
    file = model_file(checkpoint)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    model_bytes = [ray.put(file.read_bytes())] if len(nodes) > 1 else None
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
            num_cpus=1,
            fn_constructor_kwargs={
                "checkpoint": str(file.resolve()),
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


# -- offline: several sets, cached -----------------------------------------------------------------
def _checkpoint_image_size(checkpoint) -> int:
    state = torch.load(model_file(checkpoint), map_location="cpu", weights_only=False)
    try:
        return int(state["config"]["model"]["image_size"])
    except (KeyError, TypeError):
        return 224


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
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> list[FeatureSet]:
    """Features of several labelled sets (specs or in-memory data) for one checkpoint, cached.

    Cache hits return without loading (decoding) the images. The missing sets are extracted in one
    pass when their images share a size (one actor-pool start-up for train and test). ``use_ray``
    runs the Ray Data actor pool, else the model runs in this process (``model`` if given, else
    loaded from the checkpoint; on ``device``, else CUDA when there is one).
    """
    image_size = int(image_size or _checkpoint_image_size(checkpoint))
    results: list[FeatureSet | None] = [None] * len(datasets)
    paths: list[Path | None] = [None] * len(datasets)
    for i, data in enumerate(datasets):
        if cache:
            paths[i] = feature_cache_path(checkpoint, data, image_size, cache_dir, max_images)
            results[i] = read_cache(paths[i])
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
    if todo and not use_ray:
        model = model if model is not None else load_checked_model(checkpoint)[0]
        if device is not None or torch.cuda.is_available():
            model = model.to(device or "cuda")
    for members in groups.values():
        start = time.perf_counter()
        images = (  # one set: no copy
            np.concatenate([todo[i].images for i in members])
            if len(members) > 1
            else todo[members[0]].images
        )
        if use_ray:
            feats = _ray_features(
                checkpoint, images, image_size, batch_size, num_actors, num_gpus_per_actor
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
                results[i].cache_path = write_cache(paths[i], results[i], meta)
    return results  # type: ignore[return-value]
