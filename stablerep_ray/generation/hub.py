"""Pipelines named by a Hugging Face Hub id: their small config files fetched before Ray starts, so a
Hub id gets the checks a local directory gets, and a Hub failure (a typo, a gated model, no network)
said in one line, by the driver and by each generator actor alike."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ..config import ConfigError

# What the checks read besides model_index.json (a pipeline has one of the two denoiser configs).
CONFIG_FILES = ("scheduler/scheduler_config.json", "unet/config.json", "transformer/config.json")
PROBE_TIMEOUT_S = 5.0  # huggingface_hub retries a failed connection 5 times over 23 s: probe once first
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_configs(model: str) -> Path | None:
    """The folder of ``model``'s model_index.json and those of ``CONFIG_FILES`` it has (a snapshot in the
    Hugging Face cache), fetched from the Hub, or read from the cache where the Hub cannot be reached
    or HF_HUB_OFFLINE is set; None, with a warning, where neither has them: each actor then tries its own."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    reachable = not constants.is_offline_mode() and hub_answers(constants.ENDPOINT)
    try:
        index = Path(hf_hub_download(model, "model_index.json", local_files_only=not reachable))
    except Exception as err:
        why = unreachable_reason(err)
        if why is not None:
            why = why if reachable or constants.is_offline_mode() else f"no connection to {constants.ENDPOINT}"
            print(f"warning: generator.model: {model} is not checked before start: this machine's Hugging Face "
                  f"cache does not hold it and the Hub cannot be reached ({why}); each generator actor loads it "
                  f"from its own node's cache or the Hub", file=sys.stderr)
            return None
        refusal = hub_refusal(model, err, "this machine")
        if refusal is None:
            raise
        raise refusal from None
    for name in CONFIG_FILES:  # one not in this pipeline, or not fetched, leaves its check out
        with contextlib.suppress(EntryNotFoundError, OSError):
            hf_hub_download(model, name, local_files_only=not reachable)
    return index.parent


def hub_answers(endpoint: str) -> bool:
    """Whether the Hub's host takes a connection (always true behind a proxy, which is what is reached)."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def hub_refusal(model: str, error: BaseException, where: str) -> ConfigError | None:
    """The one line for a Hub failure behind ``error`` (a ``from_pretrained`` or ``hf_hub_download`` of
    ``model`` on ``where``), or None for any other error."""
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
                f"generator.model: {model} is gated on the Hugging Face Hub and the token of {where} has no "
                f"access to it; accept its terms at {constants.ENDPOINT}/{model} and log in with that account "
                f"({login})"
            )
        if isinstance(e, RepositoryNotFoundError):
            return ConfigError(
                f"generator.model: {model} is neither a directory nor a Hub repository that {where} can see; "
                f"check the path or the id (organisation/name), or log in for a private repository ({login})"
            )
        if isinstance(e, HFValidationError):
            return ConfigError(
                f"generator.model: {model} is neither a directory nor a valid Hub id ({str(e).splitlines()[0]}); "
                f"check the path or the id (organisation/name)"
            )
        if isinstance(e, RemoteEntryNotFoundError):
            return ConfigError(
                f"generator.model: {model} on the Hugging Face Hub has no model_index.json, so it is not a "
                f"diffusers pipeline repository; use the model's diffusers repository"
            )
    reason = unreachable_reason(error)
    if reason is None:
        return None
    return ConfigError(
        f"generator.model: {model} is neither a directory nor in the Hugging Face cache of {where}, and the "
        f"Hub cannot be reached from there ({reason}); download it where the Hub is reachable "
        f"(`hf download {model}`) into a cache every node reads (HF_HOME), or give a pipeline directory"
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
    return f"{type(root).__name__}: {str(root).splitlines()[0]}" if str(root) else type(root).__name__


def chain_of(error: BaseException) -> list[BaseException]:
    """``error`` and every error it was raised from or while handling, depth first, causes first
    (diffusers raises its own error from the connection error, while handling the cache miss)."""
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        if e is not None and not any(e is s for s in seen):
            seen.append(e)
            pending += [e.__context__, e.__cause__]
    return seen
