"""Generator backends: config name -> the Ray Data callable class that renders a caption's n images.

Every backend takes a batch with ``caption_id``, ``position`` and ``caption`` columns and adds
``images`` (B, n, S, S, 3) uint8 and ``num_images`` (B,) int32; image j of the row at source position p
depends only on (seed, p, j), the caption and the generator settings (``image_seed``), so a caption
repeated in the source gets new images. A backend class also answers ``preflight(cfg)``
(checks before Ray starts) and ``tokenizer_source(cfg)`` (where StableRep+ takes its tokenizer, or
None for the built-in word tokenizer). Adding a backend is one module and one line here.
"""

from __future__ import annotations

import importlib

import numpy as np

from ..config import ConfigError, GeneratorConfig

BACKENDS = {
    "diffusers": "stablerep_ray.generation.diffusion:DiffusersGenerator",
    "simulator": "stablerep_ray.tools.simulator:SimulatorGenerator",
}


def image_seed(base_seed: int, position: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of the row at source ``position``; well mixed, order independent."""
    state = np.random.SeedSequence([base_seed, position, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator_class(cfg: GeneratorConfig) -> type:
    """The backend class named by ``generator.backend`` (imported on first use: it may load torch)."""
    try:
        module, name = BACKENDS[cfg.backend].split(":")
    except KeyError:
        raise ConfigError(
            f"generator.backend: unknown backend {cfg.backend!r}; choose one of {sorted(BACKENDS)}"
        ) from None
    return getattr(importlib.import_module(module), name)
