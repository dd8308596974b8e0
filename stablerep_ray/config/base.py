"""What every config section shares: the error users see and the strict base model.

Kept apart from ``sections`` so that a section in a module of its own (``synth``, ``tune``) can be
imported by ``sections`` without a cycle.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# How a ConfigError reads in a remote traceback, which Ray passes on as text.
QUOTED = re.compile(r"stablerep_ray\.config\.base\.ConfigError: (.+)")


class ConfigError(ValueError):
    """A configuration problem a user must fix; the message names the key (or file) and the fix."""

    @classmethod
    def raised_in(cls, error: BaseException) -> ConfigError | None:
        """The ConfigError behind ``error``, which Ray raised for a task, actor or Train worker (or run)
        that failed: one of its causes, or the last one that its text or its causes' text quotes."""
        pending, seen, quoted = [error], set(), []
        while pending:
            e = pending.pop()
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            text = QUOTED.findall(str(e))
            if isinstance(e, cls) and not text:  # not Ray's copy of a remote one, whose text is a traceback
                return e
            quoted += text
            pending += [e.__cause__, e.__context__, getattr(e, "cause", None),  # RayTaskError's
                        getattr(e, "controller_failure", None), *getattr(e, "worker_failures", {}).values()]
        return cls(quoted[-1]) if quoted else None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
