"""Checkpoints of a run: the model file, the step's training state, and the stream's resume point.

Every rank reports (Train's report is a barrier); rank 0 attaches the directory. Train V2 uploads it
and only then records it as the latest checkpoint, so a failed or interrupted write leaves the
previous checkpoint as the one a restart resumes from.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import Config
from ..models import MODEL_FILE, save_model
from ..storage import latest_train_result
from ..stream import GroupStream, resume_chunk
from .step import TrainStep

TRAINER_STATE_FILE = "trainer_state.pt"
RESUME_CHUNK = "stream/resume_chunk"


def restore(step: TrainStep, checkpoint) -> tuple[int, int]:
    """Load model, optimiser, schedule and objective state; returns the stream's resume chunk and the
    rows before it that were already served (a resume serves them again). Random draws need no saved
    state: the loop seeds the augmentation and the replay stream from (seed, rank, resume step)."""
    with checkpoint.as_directory() as ckpt_dir:
        model_file = torch.load(Path(ckpt_dir) / MODEL_FILE, map_location=step.device)
        state = torch.load(Path(ckpt_dir) / TRAINER_STATE_FILE, map_location=step.device, weights_only=False)
    step.model.load_state_dict(model_file["model"])
    for name, module in step.objective.extra_weights().items():
        module.load_state_dict(model_file["weights"][name])
    step.load_state_dict(state)
    return state["resume_chunk"], state.get("rows_to_repeat", 0)


def resume_point(stream: GroupStream, previous: int, distributed: bool) -> tuple[int, int]:
    """Where a restart must resume the caption stream: the first chunk not consumed by all workers,
    and how many rows before it were served (and so will be served again after a restart)."""
    states = [stream.progress.state()]
    if distributed:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, stream.progress.state())
    chunk, repeated = resume_chunk(states, previous)
    stream.progress.forget_before(chunk)
    return chunk, repeated


def report_checkpoint(step: TrainStep, resume_at: int, metrics: dict, rank: int, rows_to_repeat: int = 0) -> None:
    """Report ``metrics`` with a checkpoint of the current step (rank 0 writes it). ``rows_to_repeat``:
    rows a resume from this checkpoint serves again (``resume_point``)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            objective = step.objective
            save_model(step.model, step.config, tmp, weights=objective.extra_weights(),
                       eval_weights=objective.eval_weights, **objective.model_kwargs())
            state = {**step.state_dict(), "resume_chunk": resume_at, "rows_to_repeat": rows_to_repeat}
            torch.save(state, Path(tmp) / TRAINER_STATE_FILE)
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step.step:08d}")


def read_resume_chunk(config: Config) -> int:
    """The stream chunk recorded with the run's latest committed checkpoint (0 for a new run)."""
    return int(latest_train_result(config).get(RESUME_CHUNK, 0))
