"""The driver side of training: a Ray Train ``TorchTrainer`` around the per-worker loop, fed by the
generation stream."""

from __future__ import annotations

from ..config import Config, dump_config
from ..storage import storage_path
from .checkpoint import read_resume_chunk
from .loop import train_loop_per_worker


def make_trainer(config: Config, max_steps: int | None = None, callbacks: list | None = None,
                 captions_per_pass: int = 0):
    """A TorchTrainer whose dataset is rebuilt from the last checkpoint's stream position on every
    (re)start of the worker group, so a restart neither skips nor regenerates the whole stream."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..generation import build_image_stream

    t = config.train
    tensorboard_dir = config.run_dir / "tensorboard"
    tensorboard_dir.mkdir(parents=True, exist_ok=True)
    scaling = ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.num_cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})},
        label_selector=t.label_selector or None,
    )
    # The driver's DataContext options (a Tune trial's CPU/GPU share) plus the stream's object-store budget.
    current = ray.data.DataContext.get_current().execution_options
    ingest = ExecutionOptions(
        resource_limits=current.resource_limits.copy(object_store_memory=config.stream_object_store_bytes),
        preserve_order=current.preserve_order,
        verbose_progress=current.verbose_progress,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "tensorboard_dir": str(tensorboard_dir),
            "run_dir": str(config.run_dir),
            "max_steps": max_steps,
        },
        scaling_config=scaling,
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path(config),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
        ),
        datasets={
            "train": lambda: build_image_stream(config, read_resume_chunk(config), captions_per_pass)
        },
        dataset_config=DataConfig(execution_options=ingest),
    )


def fit(config: Config, max_steps: int | None = None, captions_per_pass: int = 0):
    """Train (or resume) the run ``config.name``; returns Train's Result. Ray must be initialised."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, config.run_dir / "config.yaml")
    return make_trainer(config, max_steps, captions_per_pass=captions_per_pass).fit()
