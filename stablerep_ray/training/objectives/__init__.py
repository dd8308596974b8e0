"""The registry of training objectives: config name -> class. Adding an objective is one module
beside these and one line here; nothing else branches on the name."""

from __future__ import annotations

from .base import Objective
from .simclr import SimCLR
from .stablerep import StableRep
from .stablerep_plus import StableRepPlus
from .synclr import SynCLR

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (StableRep, SimCLR, StableRepPlus, SynCLR)}


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name``; a ValueError naming the choices otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"train.objective: unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}") from None


__all__ = ["OBJECTIVES", "Objective", "get_objective"]
