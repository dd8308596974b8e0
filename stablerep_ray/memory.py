"""Running out of GPU memory, said as the setting to change.

The same batch runs out of memory again on every retry: Ray Train would restart the run
``train.max_failures`` times and Ray Data would retry the task, each time to the same end, and then print
a long traceback. Each place that puts a batch or a model on the GPU runs under ``NamesSetting``, which
turns torch's out-of-memory error into a ConfigError naming the key that sized the work and what to
change; a ConfigError ends the run at once with that line (``trainer.stop_on_config_error``, the CLI).
"""

from __future__ import annotations

import re

import torch

from .config import ConfigError

# Parts of torch's CUDA out-of-memory message worth one line: the request, the card, its other tenants.
_SIZE = r"[\d.]+ (?:[KMGT]iB|bytes)"
_ASKED = re.compile(rf"Tried to allocate ({_SIZE})")
_CARD = re.compile(rf"total capac\w* of ({_SIZE}) of which ({_SIZE}) is free")
_OTHER_PROCESS = re.compile(rf"Process \d+ has {_SIZE} memory in use")  # this process: "this process has"


def memory_state(message: str) -> str:
    """What torch's out-of-memory ``message`` says about the request and the card, in a few words."""
    parts = []
    if asked := _ASKED.search(message):
        parts.append(f"asked for {asked[1]}")
    if card := _CARD.search(message):
        parts.append(f"{card[2]} free of {card[1]}")
    if others := len(_OTHER_PROCESS.findall(message)):
        parts.append(f"{others} other process{'es' if others > 1 else ''} on the card")
    return ", ".join(parts)


class NamesSetting:
    """A context manager, reusable (a loop builds it once), that re-raises a CUDA out-of-memory error
    inside it as ``key: <work> ran out of GPU memory (<state>); <fix>, <fix> or <fix>``, keeping torch's
    error (and its memory summary) as the cause."""

    def __init__(self, key: str, work: str, *fixes: str):
        self.key, self.work, self.fixes = key, work, fixes

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, traceback) -> None:
        if isinstance(err, torch.OutOfMemoryError):
            state = memory_state(str(err))
            fixes = self.fixes
            fix = " or ".join([", ".join(fixes[:-1]), fixes[-1]] if len(fixes) > 1 else fixes)
            raise ConfigError(f"{self.key}: {self.work} ran out of GPU memory{f' ({state})' if state else ''}; "
                              f"{fix}") from err


def larger_share(section: str) -> str:
    """The fix of an actor whose share of a card is too small for its model or its work."""
    return f"give each actor a larger share of a GPU ({section}.num_gpus_per_actor)"


def loading_model(section: str, model: str, dtype: str) -> NamesSetting:
    """A model too large for an actor's share of a card: the share to raise, and half precision if not."""
    fixes = [larger_share(section)]
    if dtype == "fp32":
        fixes.append(f"load it in half precision ({section}.dtype: auto)")
    return NamesSetting(f"{section}.num_gpus_per_actor", f"loading {model}", *fixes)
