"""Where runs keep their files: local paths or pyarrow filesystem URIs (s3://, gs://), and the
checkpoint snapshot Ray Train writes beside a run's checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from .config import Config

TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
# How long the check of a remote storage location may take: GCS's client retries an unauthenticated
# read for 15 minutes by default, which looked like a hang before the run's first line.
PROBE_SECONDS = 20


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


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block ends, removed
    when it raises (Ctrl-C included): readers never see half a file, and an interrupted write leaves
    the old file, or none."""
    tmp = path.with_name(f".{path.name}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON that readers never see half-written."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def check_storage(config: Config) -> None:
    """The run's storage, before anything (the resume check included) reads or writes it."""
    check_writable(config.output_dir, "output_dir", remote=False)
    if config.cluster.storage_path:
        check_writable(config.cluster.storage_path, "cluster.storage_path")


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
        probe_remote(location, key)
        return
    path = Path(location.removeprefix("file://")).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"{key}: {location} cannot be a directory: {existing} is a file; choose another directory"
        )
    _probe_write(existing, location, key)


def probe_remote(location: str, key: str) -> None:
    """Open ``location`` and read its metadata once, within ``PROBE_SECONDS``: an unreachable store
    or missing credentials fail here, with the store's reason, not minutes into the run."""
    from .config import ConfigError

    probe = location
    if location.startswith(("gs://", "gcs://")) and "retry_limit_seconds" not in location:
        probe += f"{'&' if '?' in location else '?'}retry_limit_seconds={PROBE_SECONDS}"
    fs, path = open_filesystem(probe, key)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            fs.get_file_info(path)
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 - the store's own reason is what the user needs
            outcome.append(err)

    thread = threading.Thread(target=read, name="storage-probe", daemon=True)  # a hung read is left behind
    thread.start()
    deadline = PROBE_SECONDS * 2
    thread.join(deadline)
    if not outcome:
        raise ConfigError(f"{key}: {location!r} did not answer within {deadline:g} s; check this machine's "
                          f"network and credentials for it, or use a local path")
    if outcome[0] is not None:
        reason = " ".join(str(outcome[0]).split())[:200]
        raise ConfigError(f"{key}: cannot read {location!r} ({reason}); check this machine's credentials and "
                          f"network for it, or use a local path")


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
