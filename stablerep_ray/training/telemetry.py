"""What rank 0 writes to TensorBoard during training, and the copy of it kept beside the checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import Config
from ..storage import open_filesystem, storage_path


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
