"""What rank 0 writes to TensorBoard during training, and the copy of it kept beside the checkpoints.

Scalars are logged at the number of steps done: step 0 is the initial model, step N the model after N steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..storage import open_filesystem, storage_path

# The config values TensorBoard's HParams tab lists for a run (what sweeps and ablations vary).
HPARAM_KEYS = (
    "train.objective", "model.name", "model.image_size", "generator.backend", "generator.guidance_scale",
    "generator.images_per_caption", "stream.images_per_group", "stream.reuse", "train.batch_size",
    "train.steps", "train.base_lr", "train.weight_decay", "train.temperature", "train.warmup_steps",
    "train.num_workers", "train.seed",
)


class DataWait:
    """Seconds the trainer waited for data in a log interval.

    On a CPU that is the time blocked on the stream. On a GPU the step runs asynchronously: the host
    can block on the stream while the device still works through the last step, which is no wait.
    There it is the device's idle gap, from the end of the last step's work (a CUDA event) to the
    moment the batch was ready (a second event, recorded then), at most the host's blocked time.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.step_end = None
        self.pending: list[tuple[float, torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds = 0.0

    def batch_ready(self, host_seconds: float) -> None:
        """After a batch came from the stream, ``host_seconds`` after the host asked for it."""
        if self.step_end is None:
            self.seconds += host_seconds
            return
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        self.pending.append((host_seconds, self.step_end, ready))

    def step_done(self) -> None:
        """After all of an iteration's device work was queued (the step's, and an evaluation's)."""
        if self.cuda:
            self.step_end = torch.cuda.Event(enable_timing=True)
            self.step_end.record()

    def take(self) -> float:
        """The wait since the last call (reads the events: call where the device is synced anyway)."""
        for host_seconds, step_end, ready in self.pending:
            ready.synchronize()
            self.seconds += min(host_seconds, step_end.elapsed_time(ready) / 1000)
        seconds, self.seconds, self.pending = self.seconds, 0.0, []
        return seconds


def rank_mean(values: dict[str, torch.Tensor | float], device: torch.device, distributed: bool) -> dict[str, float]:
    """Each value averaged over all ranks, in one all_reduce: every rank must call it at the same steps."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).detach().reshape(())
                           for v in values.values()])
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(values, stacked.tolist(), strict=True))


def interval_scalars(step, result, stream, wait_s: float, elapsed_s: float, steps: int, world: int,
                     distributed: bool) -> dict[str, float]:
    """Every scalar of one log interval. The loss and its terms, the data wait and the groups admitted
    are means over ranks (each rank's loss is its own batch's estimate); timing and the stream's buffer
    statistics are this rank's."""
    scalars = {
        "lr": step.scheduler.get_last_lr()[0],
        "throughput/images_per_s": steps * step.config.train.batch_size / elapsed_s,
        "stream/positives_per_anchor": positives_per_anchor(result.labels),
        **stream.stats(world),
    }
    means = rank_mean({"loss/total": result.loss, **result.metrics, "throughput/data_wait_fraction": wait_s / elapsed_s,
                       "stream/groups_admitted": stream.admitted}, step.device, distributed)
    means["stream/groups_admitted"] *= world  # mean x world: the exact total over ranks
    return {**scalars, **means}


def write_hparams(writer, config: Config, metrics: list[str]) -> None:
    """The run's key config values for TensorBoard's HParams tab, scored by the run's own ``metrics``
    scalars (their last values). Written into the run's own event file: ``SummaryWriter.add_hparams``
    would put them in a timestamped sub-run, away from the scalars they refer to."""
    from torch.utils.tensorboard.summary import hparams

    data = config.model_dump(mode="json")
    values = {}
    for key in HPARAM_KEYS:
        value = data
        for part in key.split("."):
            value = value[part]
        values[key] = value
    values["train.peak_lr"] = config.peak_lr
    for summary in hparams(values, dict.fromkeys(metrics, 0.0)):  # (only the metrics' names are written)
        writer.file_writer.add_summary(summary)


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """How far a batch of embeddings is from a single point: sqrt(1 - |mean of the unit vectors|^2).
    1 when they cancel out over the sphere, 0 when every input maps to the same direction (collapse:
    the contrastive loss then sits at log(batch - 1) with no gradient left). Logged as ``embed/*``."""
    mean = torch.nn.functional.normalize(z.detach().float(), dim=1).mean(dim=0)
    return (1 - mean.square().sum()).clamp(min=0).sqrt()


def positives_per_anchor(labels: torch.Tensor) -> float:
    same = labels[:, None] == labels[None, :]
    return float((same.sum(1) - 1).float().mean())


def sample_grid(batch_images: np.ndarray, group_size: int, groups: int = 4) -> torch.Tensor:
    """A (3, H, W) grid: one row per caption group, its images side by side."""
    from torchvision.utils import make_grid

    images = torch.from_numpy(batch_images[: groups * group_size]).permute(0, 3, 1, 2)
    return make_grid(images, nrow=group_size, padding=2)


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
        fs, path = open_filesystem(destination, "cluster.storage_path")
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except Exception as err:  # noqa: BLE001 - logs are not worth a failed run
        print(f"warning: could not copy TensorBoard events to {destination}: {err}", flush=True)
