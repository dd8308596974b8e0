"""The driver side of training: a Ray Train ``TorchTrainer`` around the per-worker loop, fed by the
generation stream."""

from __future__ import annotations

from ..config import Config, ConfigError
from ..storage import storage_path
from .checkpoint import read_resume_chunk
from .loop import train_loop_per_worker
from .resume import save_run_config

DATA_CONSOLE_OPTIONS = ("enable_progress_bars", "enable_operator_progress_bars", "print_on_execution_start")


def stop_on_config_error():
    """A Train callback that ends the run at the first worker failure caused by a ConfigError (a
    generator actor refusing its model or settings): each of ``train.max_failures`` restarts would fail
    the same way. Raised in Train's controller, the error fails the run without a retry."""
    from ray.train import UserCallback

    class StopOnConfigError(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            for error in worker_exceptions.values():
                found = ConfigError.raised_in(error)
                if found is not None:
                    raise found

    return StopOnConfigError()


def make_trainer(config: Config, max_steps: int | None = None, callbacks: list | None = None,
                 captions_per_pass: int | None = None, progress=None):
    """A TorchTrainer whose dataset is rebuilt from the last checkpoint's stream position on every
    (re)start of the worker group, so a restart neither skips nor regenerates the whole stream.
    ``progress``: a ``ray.util.queue.Queue`` that rank 0 sends its log-interval records to
    (``console.TrainConsole``). ``captions_per_pass``: from the caller's caption check (the CLI's
    preflight), else counted here (``count_captions_per_pass``)."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..captions import count_captions_per_pass
    from ..console import verbose
    from ..generation import build_image_stream

    if captions_per_pass is None:
        captions_per_pass = count_captions_per_pass(config.captions)
    t = config.train
    tensorboard_dir = config.run_dir / "tensorboard"
    tensorboard_dir.mkdir(parents=True, exist_ok=True)
    scaling = ScalingConfig(
        num_workers=t.num_workers,
        use_gpu=t.use_gpu,
        resources_per_worker={"CPU": t.num_cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})},
        label_selector=t.label_selector or None,
    )
    # The driver's DataContext options (a Tune trial's CPU/GPU share) plus the stream's object-store budget.
    current = ray.data.DataContext.get_current().execution_options
    ingest = ExecutionOptions(
        resource_limits=current.resource_limits.copy(object_store_memory=config.stream_object_store_bytes),
        preserve_order=config.stream.keep_order,  # build_image_stream says why
        verbose_progress=current.verbose_progress,
    )
    # Train builds the dataset in its controller, whose own DataContext never saw the driver's console
    # choices (runtime.configure_data_context): the stream carries them itself.
    driver = ray.data.DataContext.get_current()
    console = {key: getattr(driver, key) for key in DATA_CONSOLE_OPTIONS}

    def train_stream():
        stream = build_image_stream(config, read_resume_chunk(config), captions_per_pass)
        for key, value in console.items():
            setattr(stream.context, key, value)
        return stream

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(mode="json"),
            "tensorboard_dir": str(tensorboard_dir),
            "run_dir": str(config.run_dir),
            "max_steps": max_steps,
            "progress": progress,
        },
        scaling_config=scaling,
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path(config),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=[stop_on_config_error(), *(callbacks or [])],
            # Train's INFO lines (worker-group start, every report's raw metrics) only with --verbose.
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
        datasets={"train": train_stream},
        dataset_config=DataConfig(execution_options=ingest),
    )


def fit(config: Config, max_steps: int | None = None, captions_per_pass: int | None = None, progress=None):
    """Train (or resume) the run ``config.name``; returns Train's Result. Ray must be initialised.
    ``stablerep-ray train`` has checked the resume (``resume.check_resume``) before Ray started."""
    kept = save_run_config(config)
    if kept:
        print(f"config: {config.run_dir / 'config.yaml'} (the previous one is kept as {kept.name})")
    return make_trainer(config, max_steps, captions_per_pass=captions_per_pass, progress=progress).fit()
