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

from ferflow.core.signals import HoldableInterrupt, interrupts_held

log = logging.getLogger(__name__)


class _Interrupted(BaseException):
    pass


@contextlib.contextmanager
def run_status_guard(run_id: str) -> Iterator[None]:
    """Inside: SIGTERM raises like Ctrl-C. On exit: FINISHED, FAILED or KILLED, never RUNNING.

    SIGINT and SIGTERM arriving inside `interrupts_held` sections (the MLflow writes)
    are raised when the section ends, so the final status update finds the store unlocked.
    """
    previous = {}
    if _main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, HoldableInterrupt(_Interrupted))
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, HoldableInterrupt(KeyboardInterrupt))
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
