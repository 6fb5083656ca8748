"""Signal handling for MLflow runs: a run never stays RUNNING after SIGINT/SIGTERM.

Python's default SIGTERM handling kills the process without unwinding, so the run's
final status would never be written; SIGINT arriving in the middle of a sqlite write
would leave the store locked. The guard below exists for those two reasons: MLflow's
own `with mlflow.start_run()` only sets the status for exceptions that unwind, and has
no way to hold a signal until a write is done.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)


class _Interrupted(BaseException):
    pass


class _Hold:
    depth = 0  # nesting of `interrupts_held` sections in the main thread
    pending: BaseException | None = None


class _HoldableInterrupt:
    """SIGINT/SIGTERM handler: raise `exception`, or inside `interrupts_held` keep it for
    the section's end. A second signal raises at once, so a hung upload cannot swallow it."""

    def __init__(self, exception: type[BaseException]):
        self.exception = exception

    def __call__(self, signum, frame) -> None:  # noqa: ARG002
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


@contextlib.contextmanager
def run_status_guard(run_id: str) -> Iterator[None]:
    """Inside: SIGTERM raises like Ctrl-C. On exit: FINISHED, FAILED or KILLED, never RUNNING.

    SIGINT and SIGTERM arriving inside `interrupts_held` sections (the MLflow writes)
    are raised when the section ends, so the final status update finds the store unlocked.
    """
    previous = {}
    if _main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _HoldableInterrupt(_Interrupted))
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _HoldableInterrupt(KeyboardInterrupt))
    status = "FINISHED"
    try:
        yield
    except (KeyboardInterrupt, _Interrupted):
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            with interrupts_held():
                _end_run(run_id, status)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _end_run(run_id: str, status: str) -> None:
    import mlflow

    try:
        mlflow.MlflowClient().set_terminated(run_id, status=status)
    except Exception as exc:  # the run's own error matters more; say what was not recorded
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(exc)[:200])
    with contextlib.suppress(Exception):
        while mlflow.active_run() is not None:
            mlflow.end_run(status=status)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
