"""Where the MLflow store is, and a fail-fast check that it answers.

MLFLOW_TRACKING_URI if set, else `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, where <root> is DVC_ROOT when DVC runs the stage (DVC points it at
the main repo also for `dvc exp run --temp/--queue`, whose working copies are deleted),
else the repo root found from the working directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no first-use lock
    fcntl = None  # type: ignore[assignment]

from ferflow.core.errors import UserError
from ferflow.core.repo import find_root

EXPERIMENT_NAME = "ferflow"
log = logging.getLogger(__name__)


class TrackingError(UserError):
    """The MLflow store cannot be reached or used."""


def tracking_uri(root: str | os.PathLike[str] | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root or find_root()) / 'mlflow.db'}"


def artifact_location(root: str | os.PathLike[str] | None = None) -> str:
    return (Path(root or find_root()) / "mlartifacts").as_uri()


def configure(root: str | os.PathLike[str] | None = None) -> str:
    """Point mlflow at the project store, check it answers (fail fast), return the experiment id."""
    import mlflow

    # A server that is down should fail in seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    try:
        with first_use_lock(uri):
            client = mlflow.MlflowClient()
            experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location(root))
                except mlflow.exceptions.MlflowException as exc:
                    # another clone created it in between (a server has no file lock to share)
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment_id = client.get_experiment_by_name(EXPERIMENT_NAME).experiment_id
            else:
                experiment_id = experiment.experiment_id
    except Exception as exc:  # mlflow raises many types for an unusable store
        raise TrackingError(explain_store_error(uri, exc)) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# ---------------------------------------------------------------- first use of a store (#20 item 2)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


@contextlib.contextmanager
def first_use_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite store across processes (two `dvc exp run` on a fresh
    shared store): MLflow creates and upgrades the schema on first open, and two at once
    fail with `duplicate column name: step` or a half-done migration. A lock file next to
    the database (flock: released by the OS if the holder dies). Other stores: no lock
    (a server creates its schema once, at its own start)."""
    db = _sqlite_path(uri)
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".ferflow-lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


_LOCKED = ("database is locked", "database table is locked")
_CORRUPT = ("file is not a database", "database disk image is malformed", "no such table", "can't locate revision", "migration")
_UNREACHABLE = (
    "connection refused",
    "max retries",
    "failed to establish",
    "name or service not known",
    "timed out",
    "api request",
)


def explain_store_error(uri: str, exc: BaseException) -> str:
    """One line saying why the store cannot be used: locked, corrupt or unreachable."""
    detail = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    text = str(exc).lower()
    if any(k in text for k in _LOCKED):
        return f"MLflow tracking store {uri!r} is locked by another process ({detail}); retry when that run is done."
    if any(k in text for k in _CORRUPT) or type(exc).__name__ in ("DatabaseError", "CommandError"):
        return (
            f"MLflow tracking store {uri!r} is corrupt or of another MLflow version ({detail}); "
            f"move it aside (a new one is created), or run `mlflow db upgrade {uri}` if it is older."
        )
    if any(k in text for k in _UNREACHABLE) or type(exc).__name__ in ("ConnectionError", "Timeout"):
        return (
            f"MLflow tracking store {uri!r} is not reachable ({detail}). "
            "Start the server, or unset MLFLOW_TRACKING_URI to use the local store sqlite:///<repo>/mlflow.db."
        )
    return f"MLflow tracking store {uri!r} cannot be used ({detail})."


# git-tracked files that DVC or the stages rewrite during `dvc repro` (not inputs of a run)
