"""One reading of the ``"auto"`` precision settings: bf16 on a GPU, fp32 elsewhere."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of a ``"auto" | "fp32" | "fp16" | "bf16"`` setting on ``device``."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    return DTYPES[name]


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a setting, or None where it means plain fp32 (autocast off)."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype
