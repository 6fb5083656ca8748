"""Interrupts held back across a critical section (an MLflow write).

`interrupts_held` marks the section; `HoldableInterrupt` is the SIGINT/SIGTERM handler
that keeps a signal arriving inside one for the section's end. The handler is installed
by `ferflow.tracking.signals.run_status_guard`; outside it, sections hold nothing back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class _Hold:
    depth = 0  # nesting of `interrupts_held` sections in the main thread
    pending: BaseException | None = None


class HoldableInterrupt:
    """SIGINT/SIGTERM handler: raise `exception`, or inside `interrupts_held` keep it for
    the section's end. A second signal raises at once, so a hung upload cannot swallow it."""

    def __init__(self, exception: type[BaseException]):
        self.exception = exception

    def __call__(self, signum, frame) -> None:
        if _Hold.depth > 0 and _Hold.pending is None:
            _Hold.pending = self.exception(f"signal {signum}, raised after the MLflow write it arrived in")
            return
        raise self.exception(f"signal {signum}")


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Wrap MLflow writes made inside `run_status_guard`: a SIGINT/SIGTERM arriving there
    is raised when the section ends. Raised mid-write, it would leave the sqlite store's
    write lock held, the final KILLED update would fail and the run would stay RUNNING."""
    _Hold.depth += 1
    try:
        yield
    finally:
        _Hold.depth -= 1
        if _Hold.depth == 0 and _Hold.pending is not None:
            held, _Hold.pending = _Hold.pending, None
            raise held
