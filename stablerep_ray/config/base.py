"""What every config section shares: the error users see and the strict base model.

Kept apart from ``sections`` so that a section in a module of its own (``synth``, ``tune``) can be
imported by ``sections`` without a cycle.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem a user must fix; the message names the key (or file) and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
