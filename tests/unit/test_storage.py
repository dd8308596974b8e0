"""A remote storage location is checked by one metadata read, bounded in time: a store that refuses
fails with its reason, one that never answers fails after the deadline, not minutes into the run."""

import threading

import pytest

from stablerep_ray import storage
from stablerep_ray.config import ConfigError


class Store:
    """A filesystem whose metadata read answers, refuses, or hangs until released."""

    def __init__(self, behaviour: str):
        self.behaviour, self.release = behaviour, threading.Event()

    def get_file_info(self, path):
        if self.behaviour == "refuses":
            raise OSError("Could not create a OAuth2 access token")
        if self.behaviour == "hangs":
            self.release.wait(30)


class Opened(list):
    """The URIs the probe opened; each opens ``store``."""

    store: Store


@pytest.fixture
def opened(monkeypatch):
    uris = Opened()
    monkeypatch.setattr(storage, "PROBE_SECONDS", 0.2)

    def open_filesystem(location, what):
        uris.append(location)
        return uris.store, location.split("://", 1)[1]

    monkeypatch.setattr(storage, "open_filesystem", open_filesystem)
    return uris


def test_a_store_that_answers_passes_and_gcs_retries_are_bounded(opened):
    opened.store = Store("answers")
    storage.check_writable("gs://bucket/runs", "cluster.storage_path")
    storage.check_writable("s3://bucket/runs?region=eu-west-1", "cluster.storage_path")
    assert opened == ["gs://bucket/runs?retry_limit_seconds=0.2", "s3://bucket/runs?region=eu-west-1"]


def test_a_store_that_refuses_fails_with_its_reason(opened):
    opened.store = Store("refuses")
    with pytest.raises(ConfigError, match=r"^cluster.storage_path: cannot read 'gs://bucket/runs' \(Could not "
                                          r"create a OAuth2 access token\); check this machine's credentials"):
        storage.check_writable("gs://bucket/runs", "cluster.storage_path")


def test_a_store_that_never_answers_fails_after_the_deadline(opened):
    opened.store = Store("hangs")
    try:
        with pytest.raises(ConfigError, match=r"^checkpoint: 's3://bucket/ckpt' did not answer within 0.4 s"):
            storage.probe_remote("s3://bucket/ckpt", "checkpoint")
    finally:
        opened.store.release.set()
