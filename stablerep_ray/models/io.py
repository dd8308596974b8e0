"""A checkpoint's ``model.pt``: ``{"config": Config dict, "model_kwargs": dict, "model": state_dict}``,
enough to rebuild the exact architecture without the training code (``load_model``). ``model_kwargs``
are what the objective added to ``build_model`` (StableRep+'s text vocabulary size)."""

from __future__ import annotations

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


def load_model(checkpoint: str | Path) -> tuple[StableRepModel, Config]:
    """Rebuild the model saved in a checkpoint directory (or its ``model.pt``) on the CPU."""
    path = Path(checkpoint)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{checkpoint}: no {MODEL_FILE} found; pass a checkpoint directory")
    state = torch.load(file, map_location="cpu", weights_only=False)
    config = from_dict(state["config"])
    model = build_model(config, **state.get("model_kwargs", {}))
    model.load_state_dict(state["model"])
    return model.eval(), config
