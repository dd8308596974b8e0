"""A checkpoint's ``model.pt``: ``{"config": Config dict, "model_kwargs": dict, "model": state_dict}``,
enough to rebuild the exact architecture without the training code (``load_model``). ``model_kwargs``
are what the objective added to ``build_model`` (StableRep+'s text vocabulary size)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, ConfigError, from_dict
from .vision import StableRepModel, build_model

MODEL_FILE = "model.pt"


def save_model(model: nn.Module, config: Config, directory: str | Path, **model_kwargs) -> None:
    state = {
        "config": config.model_dump(mode="json"),
        "model_kwargs": model_kwargs,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(state, Path(directory) / MODEL_FILE)


def model_file(checkpoint: str | os.PathLike) -> Path:
    """The ``model.pt`` of a checkpoint directory (or the file itself); a ConfigError saying what is
    missing otherwise."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r}: path not found; pass a checkpoint directory "
            f"holding {MODEL_FILE}"
        )
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(
            f"checkpoint {str(checkpoint)!r}: no {MODEL_FILE} found; pass a checkpoint directory "
            f"written by training (it holds {MODEL_FILE})"
        )
    return file


def load_model(checkpoint: str | os.PathLike) -> tuple[StableRepModel, Config]:
    """Rebuild the model saved in a checkpoint directory (or its ``model.pt``) on the CPU."""
    state = torch.load(model_file(checkpoint), map_location="cpu", weights_only=False)
    config = from_dict(state["config"])
    model = build_model(config, **state.get("model_kwargs", {}))
    model.load_state_dict(state["model"])
    return model.eval(), config


def load_checked_model(checkpoint: str | os.PathLike) -> tuple[StableRepModel, Config]:
    """``load_model`` for files from outside a run (``stablerep-ray eval``): a corrupt file or weights
    that do not fit the stored config become a ConfigError that says so and how to fix it."""
    file = model_file(checkpoint)
    try:
        return load_model(file)
    except ConfigError as err:
        raise ConfigError(f"checkpoint {str(file)!r}: its config is invalid: {err}") from None
    except Exception as err:  # noqa: BLE001 - torch.load / pickle raise many types
        text = str(err).strip()
        if isinstance(err, RuntimeError) and "state_dict" in text:  # load_state_dict mismatch
            detail = " ".join(line.strip() for line in text.splitlines()[:3])[:400]
            raise ConfigError(
                f"checkpoint {str(file)!r}: the saved weights do not fit the architecture of the "
                f"config stored with them ({detail}); the file was edited or mixes two runs -- "
                f"re-save it with save_model(model, config, dir) from the matching run"
            ) from None
        raise ConfigError(
            f"checkpoint {str(file)!r}: not a readable stablerep-ray model file "
            f"({type(err).__name__}: {text[:300]}); it must hold {{'config', 'model'}} as written "
            f"by save_model -- re-copy the checkpoint or point at another one"
        ) from None
