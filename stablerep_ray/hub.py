"""Models named by a Hugging Face Hub id (a diffusers pipeline, a caption language model): their small
config files fetched before Ray starts, so a Hub id gets the checks a local directory gets, and a Hub
failure (a typo, a gated model, no network) said in one line, by the driver and by each actor alike."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from .config import ConfigError
from .config.base import chain_of


class HubModel(NamedTuple):
    """A kind of model the config names: its key, the file that marks its repositories, and the other
    files the checks read."""

    key: str
    marker: str
    kind: str
    configs: tuple[str, ...] = ()


# A pipeline has one of the two denoiser configs.
PIPELINE = HubModel("generator.model", "model_index.json", "diffusers pipeline",
                    ("scheduler/scheduler_config.json", "unet/config.json", "transformer/config.json"))
LANGUAGE_MODEL = HubModel("captions.synth.model", "config.json", "transformers model")
PROBE_TIMEOUT_S = 5.0  # huggingface_hub retries a failed connection 5 times over 23 s: probe once first
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_configs(model: str, spec: HubModel) -> Path | None:
    """The folder of ``model``'s ``spec.marker`` file and those of ``spec.configs`` it has (a snapshot in
    the Hugging Face cache), fetched from the Hub, or read from the cache where the Hub cannot be
    reached or HF_HUB_OFFLINE is set; None, with a warning, where neither has them: each actor then
    tries its own."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    reachable = hub_reachable()
    try:
        index = Path(hf_hub_download(model, spec.marker, local_files_only=not reachable))
    except Exception as err:
        why = unreachable_reason(err)
        if why is not None:
            print(f"warning: {spec.key}: {model} is not checked before start: this machine's Hugging Face "
                  f"cache does not hold it and the Hub cannot be reached ({why}); each actor loads it "
                  f"from its own node's cache or the Hub", file=sys.stderr)
            return None
        refusal = hub_refusal(model, err, "this machine", spec)
        if refusal is None:
            raise
        raise refusal from None
    for name in spec.configs:  # one not in this model, or not fetched, leaves its check out
        with contextlib.suppress(EntryNotFoundError, OSError):
            hf_hub_download(model, name, local_files_only=not reachable)
    return index.parent


@contextlib.contextmanager
def loading(model: str, spec: HubModel) -> Iterator[bool]:
    """Around the ``from_pretrained`` calls of ``model`` on this node: yields their ``local_files_only``,
    true for a Hub id with no connection to the Hub (they then fail, or load the cached copy, at once
    rather than retrying the connection for 23 s), and turns a Hub failure into its one-line
    ConfigError (which ends the run at the first actor that raises it)."""
    try:
        yield not Path(model).expanduser().exists() and not hub_reachable()
    except Exception as err:
        refusal = hub_refusal(model, err, f"node {socket.gethostname()}", spec)
        if refusal is None:
            raise
        raise refusal from None


def hub_reachable() -> bool:
    """Whether this node may ask the Hub: HF_HUB_OFFLINE unset, and the Hub's host takes a connection
    (always assumed behind a proxy, which is what a connection would reach)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    parts = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def hub_refusal(model: str, error: BaseException, where: str, spec: HubModel) -> ConfigError | None:
    """The one line for a Hub failure behind ``error`` (a ``from_pretrained`` or ``hf_hub_download`` of
    ``model``, a ``spec`` model, on ``where``), or None for any other error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
    )

    login = "`hf auth login`, or HF_TOKEN in the environment of every node"
    causes = chain_of(error)
    for e in causes:
        if isinstance(e, GatedRepoError):
            return ConfigError(
                f"{spec.key}: {model} is gated on the Hugging Face Hub and the token of {where} has no "
                f"access to it; accept its terms at {constants.ENDPOINT}/{model} and log in with that account "
                f"({login})"
            )
        if isinstance(e, RepositoryNotFoundError):
            return ConfigError(
                f"{spec.key}: {model} is neither a directory nor a Hub repository that {where} can see; "
                f"check the path or the id (organisation/name), or log in for a private repository ({login})"
            )
        if isinstance(e, HFValidationError):
            return ConfigError(
                f"{spec.key}: {model} is neither a directory nor a valid Hub id ({str(e).splitlines()[0]}); "
                f"check the path or the id (organisation/name)"
            )
        if isinstance(e, RemoteEntryNotFoundError):
            return ConfigError(
                f"{spec.key}: {model} on the Hugging Face Hub has no {spec.marker}, so it is not a {spec.kind} "
                f"repository; use the model's {spec.kind.split()[0]} repository"
            )
    reason = unreachable_reason(error)
    if reason is None:
        return None
    return ConfigError(
        f"{spec.key}: {model} is neither a directory nor in the Hugging Face cache of {where}, and the Hub "
        f"cannot be reached from there ({reason}); download it where the Hub is reachable "
        f"(`hf download {model}`) into a cache every node reads (HF_HOME), or give a directory"
    )


def unreachable_reason(error: BaseException) -> str | None:
    """Why the Hub could not be asked, where ``error`` says that the cache lacks the files and the Hub
    could not be reached (HF_HUB_OFFLINE, or the first error of the connection); None otherwise."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    causes = chain_of(error)
    if not any(isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) for e in causes):
        return None
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    root = next(e for e in causes if e.__cause__ is None and e.__context__ is None)
    if isinstance(root, LocalEntryNotFoundError):  # told to read the cache only: the probe found no Hub
        return f"no connection to {constants.ENDPOINT}"
    return f"{type(root).__name__}: {str(root).splitlines()[0]}" if str(root) else type(root).__name__

