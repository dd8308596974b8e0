"""Generator backends: config name -> the Ray Data callable class that renders a caption's n images.

Every backend takes a batch with ``caption_id``, ``position`` and ``caption`` columns and adds
``images`` (B, n, S, S, 3) uint8 and ``num_images`` (B,) int32; image j of a row depends only on (seed,
the row's key, j), the caption and the generator settings (``image_seed``). The key is the row's source
position, mixed with its pass over the source from the second pass on (``image_keys``), so a caption
repeated in the source, or read again in a later pass, gets new images. A backend class also answers
``preflight(cfg)`` (checks before Ray starts) and ``tokenizer_source(cfg)`` (where StableRep+ takes its
tokenizer, or None for the built-in word tokenizer). Adding a backend is one module and one line here.
"""

from __future__ import annotations

import importlib

import numpy as np

from ..config import ConfigError, GeneratorConfig

BACKENDS = {
    "diffusers": "stablerep_ray.generation.diffusion:DiffusersGenerator",
    "simulator": "stablerep_ray.tools.simulator:SimulatorGenerator",
}


def _mix(*words: int) -> int:
    """A well-mixed 63-bit integer of ``words``."""
    state = np.random.SeedSequence(list(words)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def image_seed(base_seed: int, key: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of the row with image key ``key``; order independent."""
    return _mix(base_seed, key, index)


def image_keys(batch: dict) -> np.ndarray | None:
    """Each row's image key: its source ``position``, or from the second pass over a repeated source
    on (``source_pass`` > 0) a mix of position and pass: a later pass renders new images of a caption,
    not copies at full price. None for rows without a position."""
    if "position" not in batch:
        return None
    positions = np.asarray(batch["position"], dtype=np.int64)
    passes = batch.get("source_pass")
    if passes is None or not np.any(passes):
        return positions
    return np.array([_mix(p, s) if s else p for p, s in zip(positions.tolist(), np.asarray(passes).tolist(),
                                                              strict=True)], dtype=np.int64)


def generator_class(cfg: GeneratorConfig) -> type:
    """The backend class named by ``generator.backend`` (imported on first use: it may load torch)."""
    try:
        module, name = BACKENDS[cfg.backend].split(":")
    except KeyError:
        raise ConfigError(
            f"generator.backend: unknown backend {cfg.backend!r}; choose one of {sorted(BACKENDS)}"
        ) from None
    return getattr(importlib.import_module(module), name)
