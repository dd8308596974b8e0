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
        quoted = []
        for e in chain_of(error):
            text = QUOTED.findall(str(e))
            if isinstance(e, cls) and not text:  # not Ray's copy of a remote one, whose text is a traceback
                return e
            quoted += text
        return cls(quoted[-1]) if quoted else None


def chain_of(error: BaseException) -> list[BaseException]:
    """``error`` and every error behind it, depth first, causes first: what it was raised from or while
    handling, and what Ray carries (a RayTaskError's cause, a Train run's controller and worker failures)."""
    pending, seen = [error], []
    while pending:
        e = pending.pop()
        if e is not None and not any(e is s for s in seen):
            seen.append(e)
            pending += [*getattr(e, "worker_failures", {}).values(), getattr(e, "controller_failure", None),
                        getattr(e, "cause", None), e.__context__, e.__cause__]
    return seen


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
