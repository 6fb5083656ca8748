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
import os
import signal
import threading
from collections.abc import Iterator

from ferflow.core.interrupts import HoldableInterrupt, interrupts_held

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
    error = ""
    try:
        yield
    except (KeyboardInterrupt, _Interrupted):
        status, error = "KILLED", "interrupted"
        raise
    except BaseException as exc:
        status, error = "FAILED", f"{type(exc).__name__}: {exc}"
        raise
    finally:
        try:
            with interrupts_held():
                _end_run(run_id, status)
                _tag_failure(run_id, error)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ inside, the previous values (or absence) restored after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _end_run(run_id: str, status: str) -> None:
    import mlflow

    active = mlflow.active_run()
    # MLflow prints its "View run / View experiment" links on every set_terminated against a
    # server; `end_run` below prints them again for the active run: once is enough
    quiet = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"} if active and active.info.run_id == run_id else {}
    try:
        with _environment(quiet):
            mlflow.MlflowClient().set_terminated(run_id, status=status)
    except Exception as exc:  # the run's own error matters more; say what was not recorded
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, str(exc)[:200])
    with contextlib.suppress(Exception):
        while mlflow.active_run() is not None:
            mlflow.end_run(status=status)


FAILED_STAGE_TAG = "ferflow.failed_stage"
FAILED_ERROR_TAG = "ferflow.failed_error"


def _tag_failure(run_id: str, error: str) -> None:
    """Say which stage failed (evaluate/export reopen the FINISHED training run, so its
    FAILED status alone would blame training); a later success removes the tags."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        if error:
            client.set_tag(run_id, FAILED_STAGE_TAG, os.environ.get("FERFLOW_STAGE", "unknown"))
            client.set_tag(run_id, FAILED_ERROR_TAG, " ".join(error.split())[:500])
        elif FAILED_STAGE_TAG in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, FAILED_STAGE_TAG)
            client.delete_tag(run_id, FAILED_ERROR_TAG)
    except Exception as exc:  # the stage's own outcome matters more
        log.warning("could not tag MLflow run %s with the failed stage: %s", run_id, str(exc)[:200])


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
