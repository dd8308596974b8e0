"""Training stage: a Ray Train V2 TorchTrainer fed by the generation stream.

``train_loop_per_worker`` reads top to bottom: build model and optimiser, restore the last checkpoint,
open ONE long-lived iterator on this worker's shard, then loop: batch of K caption groups -> device
augmentation -> multi-positive (or SimCLR / StableRep+) loss -> step; log, evaluate and checkpoint
every N steps. ``fit`` builds the trainer around it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .augment import BatchAugment
from .config import Config, from_dict
from .losses import image_text_loss, multi_positive_loss
from .model import build_model, save_model
from .stream import GroupStream, resume_chunk

TRAINER_STATE_FILE = "trainer_state.pt"
RESUME_CHUNK = "stream/resume_chunk"


# -- pieces of the loop ----------------------------------------------------------------------------
def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW with lr = base_lr * batch / 256; no weight decay on norms, biases, embeddings, scales."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "positional_embedding"))
        (no_decay if skip else decay).append(param)
    t = config.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.base_lr * t.batch_size / 256,
        betas=t.betas,
    )


def lr_multiplier(step: int, config: Config) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    t = config.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def positives_per_anchor(labels: torch.Tensor) -> float:
    same = labels[:, None] == labels[None, :]
    return float((same.sum(1) - 1).float().mean())


def sample_grid(batch_images: np.ndarray, group_size: int, groups: int = 4) -> torch.Tensor:
    """A (3, H, W) grid: one row per caption group, its images side by side."""
    from torchvision.utils import make_grid

    images = torch.from_numpy(batch_images[: groups * group_size]).permute(0, 3, 1, 2)
    return make_grid(images, nrow=group_size, padding=2)


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


# -- the loop ----------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    config = from_dict(loop_config["config"])
    t = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = world > 1
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.num_cpus_per_worker)))
    torch.manual_seed(t.seed + rank)

    tokenizer = None
    if t.objective == "stablerep_plus":
        from .text import load_tokenizer

        tokenizer = load_tokenizer(config.model.text.tokenizer, config.generator.backend, config.generator.model)
    vocab = tokenizer.vocab_size if tokenizer else 0
    model = build_model(config, vocab).to(device)
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, config))

    start_step, resume_at = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            model.load_state_dict(torch.load(Path(ckpt_dir) / "model.pt", map_location=device)["model"])
            state = torch.load(Path(ckpt_dir) / TRAINER_STATE_FILE, map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, resume_at = state["step"], state["resume_chunk"]
        torch.set_rng_state(state["rng"][rank % len(state["rng"])])
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if distributed else model

    shard = ray.train.get_dataset_shard("train")
    # One iterator for the whole run: every new iteration over a shard restarts the executor.
    stream = GroupStream(
        shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=config.stream.prefetch_batches),
        captions_per_step=config.captions_per_worker_step,
        images_per_group=config.images_drawn_per_group,
        reuse=config.stream.reuse,
        buffer_bytes=int(config.stream.buffer_mb * 2**20),
        seed=t.seed * 1000 + rank + 7919 * start_step,
    )
    augment = BatchAugment(config.augment, config.model.image_size)
    aug_generator = torch.Generator(device).manual_seed(t.seed * 1000 + rank + 7919 * start_step)
    amp_dtype = autocast_dtype(config, device)
    views = 2 if t.objective == "simclr" else 1

    writer = evaluator = mirror = None
    if rank == 0:
        mirror = tensorboard_mirror(config)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(loop_config["tensorboard_dir"], purge_step=start_step or None)
        if config.eval.data:
            from .evaluation import OnlineKNN

            evaluator = OnlineKNN(config)

    consumed_log = None
    if config.stream.log_consumed:
        log_dir = Path(loop_config["run_dir"]) / "consumed"
        log_dir.mkdir(parents=True, exist_ok=True)
        consumed_log = open(log_dir / f"rank{rank}-from{start_step:08d}-{os.getpid()}.jsonl", "a")
    interval_start, interval_wait, interval_steps = time.perf_counter(), 0.0, 0
    end_step = min(t.steps, loop_config.get("max_steps") or t.steps)
    for step in range(start_step, end_step):
        wait_before = stream.wait_seconds
        batch = stream.next_batch()
        group_ids = batch.caption_ids[:: config.images_drawn_per_group]
        if consumed_log:
            record = {"step": step, "keys": batch.keys.tolist(), "ids": group_ids.tolist()}
            consumed_log.write(json.dumps(record) + "\n")
            consumed_log.flush()
        images = torch.from_numpy(batch.images).to(device, non_blocking=True)
        labels = torch.from_numpy(batch.caption_ids).to(device)
        x = torch.cat([augment(images, aug_generator) for _ in range(views)])
        labels = labels.repeat(views)

        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            z = ddp_model(x)
            loss = multi_positive_loss(z, labels, t.temperature, distributed=distributed)
            metrics = {"loss/image": loss.detach()}
            if tokenizer is not None:
                tokens, lengths = tokenizer.encode(batch.captions, config.model.text.context_length)
                text_z = model.encode_text(tokens.to(device), lengths.to(device))
                text_labels = torch.from_numpy(group_ids.copy()).to(device)
                text_loss = image_text_loss(
                    z, labels, text_z, text_labels, model.logit_scale, distributed=distributed
                )
                metrics["loss/image_text"] = text_loss.detach()
                loss = loss + text_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        scheduler.step()
        interval_steps += 1
        interval_wait += stream.wait_seconds - wait_before

        if rank == 0 and (step == start_step or (t.image_grid_every and step % t.image_grid_every == 0)):
            writer.add_image("samples/caption_groups", sample_grid(batch.images, config.images_drawn_per_group), step)
            writer.add_text("samples/captions", "\n\n".join(batch.captions[:4]), step)

        last = step + 1 == end_step
        if (step + 1) % t.log_every == 0 or last:
            elapsed = time.perf_counter() - interval_start
            if rank == 0:
                writer.add_scalar("loss/total", loss.item(), step)
                for name, value in metrics.items():
                    writer.add_scalar(name, float(value), step)
                writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("throughput/images_per_s", interval_steps * t.batch_size / elapsed, step)
                writer.add_scalar("throughput/data_wait_fraction", interval_wait / elapsed, step)
                writer.add_scalar("stream/positives_per_anchor", positives_per_anchor(labels), step)
                writer.add_scalar("stream/buffer_mb", stream.buffer.nbytes / 2**20, step)
                writer.add_scalar("stream/groups_admitted", stream.admitted * world, step)
            interval_start, interval_wait, interval_steps = time.perf_counter(), 0.0, 0

        # Reading the loss syncs the GPU, so the report is built only on steps that evaluate or checkpoint.
        report = {}
        if evaluator and ((config.eval.every and (step + 1) % config.eval.every == 0) or last):
            report.update(evaluator.evaluate(model, device))
            for name, value in report.items():
                writer.add_scalar(name, value, step)
        if (step + 1) % t.checkpoint_every == 0 or last:
            report.update({"step": step + 1, "loss": loss.item()})
            resume_at, repeat = _resume_point(stream, resume_at, distributed)
            report[RESUME_CHUNK] = resume_at
            report["stream/rows_repeated_on_resume"] = repeat
            _report_checkpoint(model, optimizer, scheduler, step + 1, resume_at, config, vocab, report, rank)
            if writer and mirror:
                writer.flush()
                mirror_tensorboard(loop_config["tensorboard_dir"], mirror)
    if writer:
        writer.close()  # the last step checkpointed, and mirrored, above
    if consumed_log:
        consumed_log.close()


def _resume_point(stream: GroupStream, previous: int, distributed: bool) -> tuple[int, int]:
    """Where a restart must resume the caption stream: the first chunk not consumed by all workers."""
    states = [stream.progress.state()]
    if distributed:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, stream.progress.state())
    chunk, repeated = resume_chunk(states, previous)
    stream.progress.forget_before(chunk)
    return chunk, repeated


def _report_checkpoint(model, optimizer, scheduler, step, resume_at, config, vocab, metrics, rank):
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint.

    Train V2 uploads the directory and only then records it as the latest checkpoint, so a failed or
    interrupted write leaves the previous checkpoint as the one a restart resumes from.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_model(model, config, tmp, vocab)
            rng = torch.get_rng_state()
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "resume_chunk": resume_at,
                    "rng": [rng],
                },
                Path(tmp) / TRAINER_STATE_FILE,
            )
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")


# -- the driver side ---------------------------------------------------------------------------------
def storage_path(config: Config) -> str:
    return config.cluster.storage_path or str(Path(config.output_dir).expanduser().resolve())


def tensorboard_mirror(config: Config) -> str | None:
    """``<storage_path>/<name>/tensorboard`` when the run's storage is not its local output dir.

    Rank 0 writes TensorBoard events on whatever node it runs on; on a cluster that is a trainer
    node's disk. Copying them next to the checkpoints (bucket or shared file system) at every
    checkpoint lets users read them from one place, and keeps them when the node goes away.
    """
    storage = storage_path(config)
    if not config.cluster.storage_path or storage == str(Path(config.output_dir).expanduser().resolve()):
        return None
    return f"{storage.rstrip('/')}/{config.name}/tensorboard"


def mirror_tensorboard(local_dir: str, destination: str) -> None:
    """Copy the event files to ``destination``; a storage hiccup warns, never stops training."""
    import pyarrow.fs as pafs

    try:
        fs, path = (pafs.FileSystem.from_uri(destination) if "://" in destination
                    else (pafs.LocalFileSystem(), destination))
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except Exception as err:  # noqa: BLE001 - logs are not worth a failed run
        print(f"warning: could not copy TensorBoard events to {destination}: {err}", flush=True)


def read_resume_chunk(config: Config) -> int:
    """The stream chunk recorded with the run's latest committed checkpoint (0 for a new run).

    Read from Train's own checkpoint-manager snapshot, so it always matches the checkpoint that
    ``ray.train.get_checkpoint()`` hands the restarted workers.
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage_path(config)) if "://" in storage_path(config) else (
        pafs.LocalFileSystem(), storage_path(config)
    )
    snapshot = f"{root}/{config.name}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return 0
    with fs.open_input_stream(snapshot) as f:
        state = json.loads(f.read())
    latest = state.get("latest_checkpoint_result") or {}
    return int(latest.get("metrics", {}).get(RESUME_CHUNK, 0))


def make_trainer(config: Config, max_steps: int | None = None, callbacks: list | None = None,
                 captions_per_pass: int = 0):
    """A TorchTrainer whose dataset is rebuilt from the last checkpoint's stream position on every
    (re)start of the worker group, so a restart neither skips nor regenerates the whole stream."""
    import ray.data
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .generation import build_image_stream

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
    from .config import dump_config

    config.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, config.run_dir / "config.yaml")
    return make_trainer(config, max_steps, captions_per_pass=captions_per_pass).fit()
