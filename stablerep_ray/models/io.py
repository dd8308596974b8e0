"""A checkpoint's ``model.pt``: ``{"config": Config dict, "model_kwargs": dict, "model": state_dict,
"weights": {name: state_dict}, "eval_weights": name}``, enough to rebuild the exact architecture
without the training code (``load_model``). ``model_kwargs`` are what the objective added to
``build_model``; ``weights`` are other weight sets of the same architecture (SynCLR's EMA teacher) and
``eval_weights`` the set evaluation uses by default ("model": the trained network itself)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config, ConfigError, from_dict
from .vision import StableRepModel, build_model

MODEL_FILE = "model.pt"


def save_model(model: nn.Module, config: Config, directory: str | Path, *, weights: dict[str, nn.Module] | None = None,
               eval_weights: str = "model", **model_kwargs) -> None:
    state = {
        "config": config.model_dump(mode="json"),
        "model_kwargs": model_kwargs,
        "model": _cpu_state(model),
        "weights": {name: _cpu_state(module) for name, module in (weights or {}).items()},
        "eval_weights": eval_weights,
    }
    torch.save(state, Path(directory) / MODEL_FILE)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def weight_names(state: dict) -> list[str]:
    """The weight sets a loaded ``model.pt`` holds: "model" and any extra ones."""
    return ["model", *state.get("weights", {})]


def weights_state(state: dict, weights: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of weight set ``weights`` (None: the file's ``eval_weights``)."""
    name = weights or state.get("eval_weights", "model")
    if name == "model":
        return state["model"]
    if name not in state.get("weights", {}):
        raise ConfigError(f"weights: this checkpoint holds {weight_names(state)}, not {name!r}; pick one of those")
    return state["weights"][name]


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
        inside = sorted(p.parent for p in path.glob(f"*/{MODEL_FILE}")) if path.is_dir() else []
        hint = (f"it is a run directory: pass one of its checkpoints, the last is {inside[-1]}" if inside else
                f"pass a checkpoint directory written by training (it holds {MODEL_FILE})")
        raise ConfigError(f"checkpoint {str(checkpoint)!r}: no {MODEL_FILE} found; {hint}")
    return file


def load_model(checkpoint: str | os.PathLike, weights: str | None = None) -> tuple[StableRepModel, Config]:
    """Rebuild the model saved in a checkpoint directory (or its ``model.pt``) on the CPU, with weight
    set ``weights`` (None: the one evaluation uses by default, e.g. SynCLR's teacher)."""
    state = torch.load(model_file(checkpoint), map_location="cpu", weights_only=False)
    config = from_dict(state["config"])
    model = build_model(config, **state.get("model_kwargs", {}))
    model.load_state_dict(weights_state(state, weights))
    return model.eval(), config


def load_checked_model(checkpoint: str | os.PathLike, weights: str | None = None) -> tuple[StableRepModel, Config]:
    """``load_model`` for files from outside a run (``stablerep-ray eval``): a corrupt file or weights
    that do not fit the stored config become a ConfigError that says so and how to fix it."""
    file = model_file(checkpoint)
    try:
        return load_model(file, weights)
    except ConfigError as err:
        what = "" if str(err).startswith("weights:") else "its config is invalid: "
        raise ConfigError(f"checkpoint {str(file)!r}: {what}{err}") from None
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
