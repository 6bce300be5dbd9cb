"""Fault injection for the tests of a destination's preparation: a step replaced by a
failure, or a failure right after the real step (its resource then exists and must be
cleaned up)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def instead(exc: BaseException) -> Callable[..., Any]:
    """A stand-in for a step that raises ``exc`` and does nothing else."""
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return fail


def after(real: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    """The real (async) step runs, then ``exc`` comes."""
    async def fail(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise exc
    return fail
