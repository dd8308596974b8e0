"""Where runs keep their files: local paths or pyarrow filesystem URIs (s3://, gs://), and the
checkpoint snapshot Ray Train writes beside a run's checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from .config import Config

TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def open_filesystem(location: str, what: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI; a bad URI is a ConfigError naming ``what``."""
    import pyarrow.fs as pafs

    from .config import ConfigError

    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for bad URIs
            reason = " ".join(str(err).split())[:200]
            raise ConfigError(
                f"{what}: cannot open {location!r} ({reason}); use a local path or a reachable URI of a "
                f"supported scheme (s3://, gs://, hdfs://)"
            ) from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def storage_path(config: Config) -> str:
    """Train's storage: ``cluster.storage_path``, else the local output directory."""
    return config.cluster.storage_path or str(Path(config.output_dir).expanduser().resolve())


def latest_checkpoint(config: Config) -> tuple[str, dict[str, Any]] | None:
    """(path, reported metrics) of the run's latest committed checkpoint; None for a run with none.

    Read from Train's own checkpoint-manager snapshot, so it always matches the checkpoint that
    ``ray.train.get_checkpoint()`` hands restarted workers.
    """
    import pyarrow.fs as pafs

    location = storage_path(config)
    fs, root = open_filesystem(location, "cluster.storage_path")
    snapshot = f"{root.rstrip('/')}/{config.name}/{TRAIN_SNAPSHOT}"
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(snapshot) as f:
        latest = json.loads(f.read()).get("latest_checkpoint_result")
    if not latest:
        return None
    return f"{location.rstrip('/')}/{config.name}/{latest['checkpoint_dir_name']}", latest.get("metrics", {})


def latest_train_result(config: Config) -> dict[str, Any]:
    """Metrics reported with the run's latest committed checkpoint ({} for a run with none)."""
    latest = latest_checkpoint(config)
    return latest[1] if latest else {}


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON through a temporary file and a rename: readers never see half a file."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_writable(location: str, key: str, remote: bool = True) -> None:
    """Refuse, before anything is written, a storage location that cannot work: a URI whose
    filesystem cannot be opened (unknown scheme, unreachable), a URI where only a local path works
    (``remote=False``), a local path under a file or on a read-only filesystem. Creates nothing."""
    from .config import ConfigError

    if "://" in location and not location.startswith("file://"):
        if not remote:
            raise ConfigError(
                f"{key}: {location} is a URI, but {key} must be a local directory; put remote "
                f"storage in cluster.storage_path"
            )
        open_filesystem(location, key)
        return
    path = Path(location.removeprefix("file://")).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"{key}: {location} cannot be a directory: {existing} is a file; choose another directory"
        )
    _probe_write(existing, location, key)


def _probe_write(directory: Path, location: str, key: str) -> None:
    """Create and remove one temporary file in ``directory`` (the nearest existing part of
    ``location``): permission bits alone do not stop root, read-only mounts do."""
    import tempfile

    from .config import ConfigError

    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(
            f"{key}: {location} is not writable ({err.strerror or err}); choose a writable directory"
        ) from None
