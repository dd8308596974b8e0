"""The per-worker training loop of the Ray Train ``TorchTrainer``, top to bottom.

Build the training step (objective, model, optimiser), restore the last checkpoint, open ONE
long-lived iterator on this worker's shard, then loop: batch of K caption groups -> the step; log,
evaluate and checkpoint every N steps.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..config import from_dict
from ..console import quiet_train_worker, send_progress
from ..stream import GroupStream
from .checkpoint import RESUME_CHUNK, report_checkpoint, restore, resume_point
from .step import TrainStep, step_memory
from .telemetry import (
    DataWait,
    interval_scalars,
    mirror_tensorboard,
    sample_grid,
    tensorboard_mirror,
    write_hparams,
)


def online_eval(evaluator, step: TrainStep, device) -> dict[str, float]:
    """Online kNN of each module the objective evaluates (``eval/...``, ``eval/student/...``)."""
    scores = {}
    for prefix, module in step.objective.eval_modules(step.model).items():
        for name, value in evaluator.evaluate(module, device).items():
            scores[name.replace("eval", prefix, 1)] = value
    return scores


def build_step(config, device, rank: int, distributed: bool) -> TrainStep:
    """This rank's training step. Every rank starts from the same initial weights: DDP broadcasts only
    the model, and what an objective derives from it (SynCLR's teacher) must match already. Then the
    global generator is seeded per rank."""
    torch.manual_seed(config.train.seed)
    step = TrainStep.build(config, device, distributed=distributed)
    torch.manual_seed(config.train.seed + rank)
    return step


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    quiet_train_worker()
    config = from_dict(loop_config["config"])
    t = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    distributed = world > 1
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.num_cpus_per_worker)))
    step = build_step(config, device, rank, distributed)
    resume_at = repeated = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        resume_at, repeated = restore(step, checkpoint)
    start_step = step.step
    step.generator.manual_seed(t.seed * 1000 + rank + 7919 * start_step)
    if distributed:
        step.forward = ray.train.torch.prepare_model(step.model, move_to_device=False)

    shard = ray.train.get_dataset_shard("train")
    # One iterator for the whole run: every new iteration over a shard restarts the executor.
    stream = GroupStream(
        shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=config.stream.prefetch_batches),
        captions_per_step=config.captions_per_worker_step,
        images_per_group=config.images_drawn_per_group,
        reuse=config.stream.reuse,
        buffer_groups=config.buffer_groups,
        seed=t.seed * 1000 + rank + 7919 * start_step,
    )

    writer = evaluator = mirror = None
    progress = loop_config.get("progress") if rank == 0 else None  # the driver's console (console.py)
    latest_eval: dict[str, float] = {}
    if rank == 0:
        mirror = tensorboard_mirror(config)
        from torch.utils.tensorboard import SummaryWriter

        # After a restart, events past the checkpoint's step came from the lost attempt: TensorBoard drops them.
        writer = SummaryWriter(loop_config["tensorboard_dir"], purge_step=start_step + 1 if start_step else None)
        if start_step:
            writer.add_scalar("stream/rows_repeated_on_resume", repeated, start_step)
        if config.eval.data:
            from ..evaluation import OnlineKNN

            evaluator = OnlineKNN(config)
            if start_step == 0:  # the initial model: the baseline every later point is read against
                latest_eval = online_eval(evaluator, step, device)
                for name, value in latest_eval.items():
                    writer.add_scalar(name, value, 0)

    consumed_log = None
    if config.stream.log_consumed:
        log_dir = Path(loop_config["run_dir"]) / "consumed"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"rank{rank}-from{start_step:08d}-{os.getpid()}.jsonl"
        consumed_log = open(log_file, "a")  # noqa: SIM115 - written every step, closed after the loop
    train_start = interval_start = time.perf_counter()
    interval_steps, data_wait = 0, DataWait(device)
    end_step = min(t.steps, loop_config.get("max_steps") or t.steps)
    out_of_memory = step_memory(config)  # a step that runs out of GPU memory names train.batch_size
    for index in range(start_step, end_step):
        done = index + 1  # the step number TensorBoard and the console show: steps done
        wait_before = stream.wait_seconds
        batch = stream.next_batch()
        data_wait.batch_ready(stream.wait_seconds - wait_before)
        if consumed_log:
            record = {"step": index, "keys": batch.keys.tolist(), "ids": batch.group_ids.tolist()}
            consumed_log.write(json.dumps(record) + "\n")
            consumed_log.flush()
        with out_of_memory:
            result = step(batch)
        interval_steps += 1

        if rank == 0 and (index == start_step or (t.image_grid_every and done % t.image_grid_every == 0)):
            writer.add_image("samples/caption_groups", sample_grid(batch.images, config.images_drawn_per_group), done)
            writer.add_text("samples/captions", "\n\n".join(batch.captions[:4]), done)

        last = done == end_step
        logged = done % t.log_every == 0 or last
        if logged:  # every rank: the loss terms are averaged over ranks
            elapsed = time.perf_counter() - interval_start
            scalars = interval_scalars(step, result, stream, data_wait.take(), elapsed, interval_steps, world,
                                       distributed)
            if rank == 0:
                for name, value in scalars.items():
                    writer.add_scalar(name, value, done)
            interval_start, interval_steps = time.perf_counter(), 0

        # Reading the loss syncs the GPU, so the report is built only on steps that evaluate or checkpoint.
        report, paused = {}, time.perf_counter()
        if evaluator and ((config.eval.every and done % config.eval.every == 0) or last):
            latest_eval = online_eval(evaluator, step, device)
            report.update(latest_eval)
            for name, value in report.items():
                writer.add_scalar(name, value, done)
        if writer and last:  # before the last checkpoint, so its TensorBoard mirror has them too
            write_hparams(writer, config, ["loss/total", *latest_eval])
        if progress is not None and logged:  # (a Queue's truth is its length)
            progress = send_progress(progress, {"step": done, "steps": end_step, "start": start_step,
                                                "train_s": time.perf_counter() - train_start,
                                                "scalars": scalars, "eval": latest_eval})
        if done % t.checkpoint_every == 0 or last:
            report.update({"step": done, "loss": result.loss.item()})
            resume_at, rows_to_repeat = resume_point(stream, resume_at, distributed)
            report[RESUME_CHUNK] = resume_at
            report["stream/rows_repeated_on_resume"] = repeated  # served again because this run resumed; else 0
            report_checkpoint(step, resume_at, report, rank, rows_to_repeat)
            if writer and mirror:
                writer.flush()
                mirror_tensorboard(loop_config["tensorboard_dir"], mirror)
        interval_start += time.perf_counter() - paused  # evaluation and checkpoints are not training throughput
        data_wait.step_done()  # after the step's work and any evaluation's: the device is busy until then
    if writer:
        writer.close()  # the last step checkpointed, and mirrored, above
    if consumed_log:
        consumed_log.close()
