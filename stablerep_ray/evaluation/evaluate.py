"""Entry points: :class:`OnlineKNN` scores the model being trained (rank 0, every ``eval.every``
steps) and :func:`evaluate` scores a saved checkpoint (``stablerep-ray eval``). Both take their knobs
from the schema's ``EvalConfig`` (k, temperature, batch size, image cap), so an offline score and the
online curve of the same run are measured the same way.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from ..config import ConfigError, EvalConfig
from ..models.io import MODEL_FILE, load_checked_model, model_file
from ..storage import open_filesystem, probe_remote, replaced_atomically, write_json_atomic
from .cache import FeatureSet
from .classifiers import classifier_device, knn_accuracy, linear_probe
from .datasets import DEFAULT_TEST_FRACTION, LabelledImages, align_classes, hold_out, load_eval_split
from .features import Progress, compute_feature_sets, extract_features
from .specs import check_data_spec, set_names

METHODS = ("knn", "linear", "both")
KNN_METRIC = "eval/knn_top1"  # the online headline: Tune's default metric, the console's ``knn``


def online_cap(config: EvalConfig) -> int:
    """Images per online set: the smaller of ``eval.max_images`` and ``eval.online_max_images``
    (0 is no cap)."""
    caps = [c for c in (config.max_images, config.online_max_images) if c]
    return min(caps, default=0)


class OnlineKNN:
    """Online kNN monitor for rank 0 of the training loop (``config.eval``).

    Each set of ``eval.data`` (one spec or a list) is decoded once, at construction, into uint8 bank
    and query arrays at the model's input size (``load_eval_split``), each capped at
    ``online_cap(config.eval)`` images, so rank 0 holds ``2 x cap x S^2 x 3`` bytes per set at most,
    whatever the sets' sizes. ``evaluate(model, device)`` takes any module with ``.features(images)``,
    extracts features in-process (no collective: call it on rank 0 only, with the unwrapped model)
    and returns ``{"eval/knn_top1": accuracy}`` of the first set; with several sets also
    ``eval/knn_top1/<name>`` of each (``set_names``), so a run shows every attribute it learns.
    """

    def __init__(self, config):
        self.config = config.eval
        self.image_size = config.model.image_size
        specs = self.config.data_specs
        self.sets = {
            name: load_eval_split(spec, self.image_size, online_cap(self.config), seed=config.train.seed)
            for name, spec in zip(set_names(specs), specs, strict=True)
        }

    def evaluate(
        self, model: torch.nn.Module, device: str | torch.device | None = None
    ) -> dict[str, float]:
        scores = {name: self._score(model, train, test, device) for name, (train, test) in self.sets.items()}
        metrics = {KNN_METRIC: next(iter(scores.values()))}
        if len(scores) > 1:
            metrics.update({f"{KNN_METRIC}/{name}": acc for name, acc in scores.items()})
        return metrics

    def _score(self, model, train: LabelledImages, test: LabelledImages, device) -> float:
        bank, queries = (
            extract_features(model, torch.from_numpy(part.images), self.image_size, self.config.batch_size, device)
            for part in (train, test)
        )
        return knn_accuracy(
            bank,
            train.labels,
            queries,
            test.labels,
            self.config.knn_k,
            self.config.knn_temperature,
            len(train.class_names),
        )


@contextlib.contextmanager
def _ray_session(use_ray: bool | None) -> Iterator[bool]:
    """Whether features come from the Ray actor pool: ``None`` uses Ray when it is already up;
    ``True`` joins the cluster at ``RAY_ADDRESS`` or starts a local Ray when none is up (and
    disconnects afterwards). The caller's SIGTERM handler stays in charge: ``ray.init`` replaces it
    in a driver with ``sys.exit(15)``, which is undone at once (the CLI maps SIGTERM to Ctrl-C)."""
    if use_ray is False:
        yield False
        return
    import ray

    from ..runtime import start_ray

    started = bool(use_ray) and not ray.is_initialized()
    if started:
        before = signal.getsignal(signal.SIGTERM)
        start_ray(os.environ.get("RAY_ADDRESS", ""))
        if threading.current_thread() is threading.main_thread() and before is not None:
            signal.signal(signal.SIGTERM, before)
    try:
        yield ray.is_initialized()
    finally:
        if started:
            ray.shutdown()


def _fetch_model_file(uri: str, directory: Path) -> Path:
    """Copy a URI checkpoint's model.pt to ``directory`` unless the copy there has its size and
    modification time (kept from the source, so the feature cache keys stay valid)."""
    import pyarrow.fs as pafs

    probe_remote(uri, "checkpoint")  # an unreachable store fails in seconds, with its reason
    fs, path = open_filesystem(uri, "checkpoint")
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        path = f"{path.rstrip('/')}/{MODEL_FILE}"
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ConfigError(
            f"checkpoint {uri!r}: no {MODEL_FILE} found there; pass a checkpoint directory written "
            f"by training (it holds {MODEL_FILE})"
        )
    local = directory / MODEL_FILE
    mtime = info.mtime_ns or 0
    if local.is_file() and (local.stat().st_size, local.stat().st_mtime_ns) == (info.size, mtime):
        return local
    directory.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(local) as part:
        with fs.open_input_stream(path) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 2**24)
        if mtime:
            os.utime(part, ns=(mtime, mtime))
    return local


def _checkpoint_file(checkpoint: str | os.PathLike, output) -> tuple[Path, Path]:
    """(local model.pt, results directory). A local checkpoint writes to ``<checkpoint>/eval``; a URI
    (``s3://``, ``gs://``, ``file://``) is copied to ``<output>/checkpoint/`` and writes to
    ``outputs/eval/<checkpoint name>`` unless ``output`` says otherwise."""
    text = str(checkpoint)
    if "://" not in text:
        file = model_file(checkpoint)
        return file, Path(output) if output else file.parent / "eval"
    out_dir = Path(output) if output else Path("outputs", "eval", text.rstrip("/").rsplit("/", 1)[-1])
    return _fetch_model_file(text, out_dir / "checkpoint"), out_dir


def _with_overrides(config: EvalConfig, overrides: dict[str, Any] | None) -> EvalConfig:
    config = config.model_copy()
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        try:
            setattr(config, key, value)  # validated: the section checks assignments
        except ValidationError as err:
            reason = err.errors()[0]["msg"]
            raise ConfigError(f"eval.{key}: {value!r} is invalid ({reason})") from None
    return config


def _score(
    train: FeatureSet,
    test: FeatureSet,
    method: str,
    config: EvalConfig,
    device: torch.device,
    probe_progress: Progress | None = None,
):
    """(metrics, details) of the kNN and/or the linear probe on (train, test) features, computed on
    ``device``; ``probe_progress``: see ``linear_probe``."""
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    train_features, test_features = (torch.as_tensor(s.features).to(device) for s in (train, test))
    if method in ("knn", "both"):
        metrics["knn_top1"] = knn_accuracy(
            train_features,
            train.labels,
            test_features,
            test.labels,
            config.knn_k,
            config.knn_temperature,
            len(train.class_names),
        )
    if method in ("linear", "both"):
        probe = linear_probe(train_features, train.labels, test_features, test.labels, progress=probe_progress,
                             device=device)
        metrics["linear_top1"] = probe["top1"]
        metrics["linear_mean_per_class"] = probe["mean_per_class"]
        metrics["linear_C"] = probe["C"]
        details["linear_val_top1"] = probe["val_top1"]
    return metrics, details


def _write_scalars(out_dir: Path, metrics: dict[str, float], step: int | None) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out_dir))
    try:
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, global_step=step or 0)
    finally:
        writer.close()


def evaluate(
    checkpoint: str | os.PathLike,
    data: str,
    eval_config: EvalConfig | None = None,
    method: str = "knn",
    output: str | os.PathLike | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    use_ray: bool | None = None,
    device: str | torch.device | None = None,
    num_actors: int = 0,
    num_gpus_per_actor: float | None = None,
    weights: str | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    step: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint's frozen CLS features with kNN and/or a linear probe.

    ``checkpoint`` is a local directory (or its model.pt) or a URI (``_checkpoint_file``). ``data``
    is an eval spec (``parse_data_spec``; it overrides ``eval_config.data``), scored with
    ``eval_config``'s kNN k and temperature, batch size and image cap (``None``: the ``eval``
    section of the run that wrote the checkpoint, so offline kNN scores as the run's online kNN did),
    with ``overrides`` ({EvalConfig field: value}, None values skipped) on top. Features are streamed
    through the Ray Data pipeline (``num_actors`` actors, ``num_gpus_per_actor`` GPUs each; see
    ``pool_size``) when ``use_ray`` (default: whether Ray is initialised), else in-process on
    ``device``; both are cached per checkpoint and weight set (``weights``, None: the checkpoint's
    evaluation weights). The kNN and the probe run in this process, on ``device`` (default: its GPU
    if it has one, else the CPU). Writes ``results.json`` and TensorBoard scalars (``eval/knn_top1``,
    ``eval/linear_top1``, ``eval/linear_mean_per_class``) to ``output`` and returns the results dict.
    ``progress(stage, done, total)`` hears how far the stages have got: ``"features"`` in images (see
    ``compute_feature_sets``), ``"linear probe"`` in fits (see ``linear_probe``).
    """
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    started = time.perf_counter()
    train_spec, test_spec = check_data_spec(data)  # cheap: fail before any model or Ray work
    file, out_dir = _checkpoint_file(checkpoint, output)
    model, model_config = load_checked_model(file, weights)  # rejects a bad file up front
    config = _with_overrides(eval_config or model_config.eval, overrides)
    image_size = model_config.model.image_size
    with _ray_session(use_ray) as use_ray:
        sets = compute_feature_sets(
            file,
            [spec for spec in (train_spec, test_spec) if spec is not None],
            image_size=image_size,
            batch_size=config.batch_size,
            max_images=config.max_images,
            use_ray=use_ray,
            model=model,
            device=device,
            num_actors=num_actors,
            num_gpus_per_actor=num_gpus_per_actor,
            cache=cache,
            cache_dir=cache_dir,
            weights=weights,
            progress=functools.partial(progress, "features") if progress else None,
        )
    if test_spec is None:
        tr, te = hold_out(sets[0].labels, data)
        train, test = sets[0].subset(tr), sets[0].subset(te)
    else:
        train, test = sets[0], align_classes(sets[0].class_names, sets[1], test_spec)
    stage = functools.partial(progress, "linear probe") if progress else None
    scorer = classifier_device(device)
    metrics, details = _score(train, test, method, config, scorer, stage)

    out_dir.mkdir(parents=True, exist_ok=True)
    held_out = f"stratified {DEFAULT_TEST_FRACTION:g} split, seed 0"
    results = {
        "method": method,
        "metrics": metrics,
        "checkpoint": str(checkpoint),
        "data": data,
        "train_data": train_spec,
        "test_data": test_spec or f"{train_spec} ({held_out})",
        "num_train": len(train),
        "num_test": len(test),
        "num_classes": len(train.class_names),
        "classes": list(train.class_names),
        "image_size": image_size,
        "feature_dim": int(train.features.shape[1]),
        "knn": {"k": config.knn_k, "temperature": config.knn_temperature},
        "feature_cache": {
            "train": train.cache_path,
            "test": test.cache_path,
            "hit": bool(train.cached and test.cached),
        },
        "features_via": "ray" if use_ray else "in-process",
        "classifiers_on": scorer.type,
        "step": step,
        "seconds": round(time.perf_counter() - started, 3),
        **details,
    }
    write_json_atomic(out_dir / "results.json", results)
    _write_scalars(out_dir, metrics, step)
    results["output"] = str(out_dir)
    return results
