"""Where the MLflow store is, and a fail-fast check that it answers.

MLFLOW_TRACKING_URI if set, else `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, where <root> is DVC_ROOT when DVC runs the stage (DVC points it at
the main repo also for `dvc exp run --temp/--queue`, whose working copies are deleted),
else the repo root found from the working directory.

For an `http(s)://` tracking server the experiment is created without an artifact location,
so the server's own store holds models and plots (docs/team.md); a PostgreSQL/MySQL URI is
probed with a short connect timeout; SQLite runs in WAL mode with a busy timeout so that
parallel queue workers can share it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no first-use lock
    fcntl = None  # type: ignore[assignment]

from ferflow.core.errors import UserError
from ferflow.core.repo import find_root

EXPERIMENT_NAME = "ferflow"

# The runs list a user should see first (README "MLflow UI"): MLflow 3.x keeps a shareable
# runs-table view as the experiment tag `mlflow.sharedViewState.<key>` and opens it for
# `#/experiments/<id>?viewStateShareKey=<key>`; the columns use its `kind.`name`` keys.
RUNS_VIEW_KEY = "ferflow-runs"
RUNS_VIEW_STATE = {
    "selectedColumns": [
        "tags.`arch`",
        "metrics.`test_accuracy`",
        "metrics.`test_macro_f1`",
        "metrics.`best_val_accuracy`",
        "metrics.`train_time_s`",
        "metrics.`epochs_run`",
        "params.`data.source`",
        "params.`evaluate.tta`",
    ],
    "orderByKey": "metrics.`test_accuracy`",
    "orderByAsc": False,
}
EXPERIMENT_TAGS = {
    # without it MLflow 3 guesses the experiment's kind and may open on its GenAI pages
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.experiment.primaryMetric.name": "test_accuracy",
    f"mlflow.sharedViewState.{RUNS_VIEW_KEY}": json.dumps(RUNS_VIEW_STATE, separators=(",", ":")),
}
log = logging.getLogger(__name__)


class TrackingError(UserError):
    """The MLflow store cannot be reached or used."""


def tracking_uri(root: str | os.PathLike[str] | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(root or find_root()) / 'mlflow.db'}"


def is_remote_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def artifact_location(uri: str, root: str | os.PathLike[str] | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: where the store is, never in one working copy.

    An HTTP tracking server chooses (None; e.g. `mlflow-artifacts:/` proxied to its
    --artifacts-destination: a path of this machine would never reach it). A SQLite store keeps
    them in `mlartifacts/` beside its database file: for the default store that is
    `<root>/mlartifacts`; a store shared by several clones (`sqlite:////shared/mlflow.db`) keeps
    them beside itself, not in whichever clone created the experiment. Other database stores:
    `<root>/mlartifacts` (teams use a server, docs/team.md)."""
    if is_remote_server(uri):
        return None
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        database = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
        return (database.parent / "mlartifacts").as_uri()
    return (Path(root or find_root()) / "mlartifacts").as_uri()


def redacted(text: str, uri: str | None = None) -> str:
    """`text` (by default the URI itself) with the URI's password replaced by ***."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(uri or text).password
    except ValueError:
        password = None
    return text.replace(f":{password}@", ":***@").replace(password, "***") if password else text


def _check_database(uri: str) -> None:
    """Connect to a PostgreSQL/MySQL store once with a short timeout: MLflow itself retries a
    refused connection for about 100 s before failing."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        engine.connect().close()
    finally:
        engine.dispose()


def _sqlite_waits_for_locks(uri: str) -> None:
    """Parallel queue workers share one SQLite file: switch it to WAL (readers never block the
    writer) and let every connection wait up to 60 s for the write lock instead of failing
    with "database is locked" after SQLite's default 5 s."""
    import sqlite3

    import sqlalchemy

    global _BUSY_TIMEOUT_HOOKED
    if not _BUSY_TIMEOUT_HOOKED:

        @sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "connect")
        def _busy_timeout(dbapi_connection, _record) -> None:
            if isinstance(dbapi_connection, sqlite3.Connection):
                dbapi_connection.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")

        _BUSY_TIMEOUT_HOOKED = True
    path = uri.removeprefix("sqlite:///")
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000)) as db:
            db.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the database file


SQLITE_BUSY_TIMEOUT_MS = 60_000
_BUSY_TIMEOUT_HOOKED = False
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


def _unreachable(uri: str, exc: BaseException) -> TrackingError:
    # MLflow's REST client reports a refused login as "... failed with error code 401 != 200"
    status = re.search(r"error code (40[13]) != 200", str(exc))
    if status:
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        hint = (
            f"user {who!r} was not accepted or lacks permission: check MLFLOW_TRACKING_PASSWORD and the user's permissions"
            if who
            else "it requires authentication: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        return TrackingError(f"MLflow tracking server {redacted(uri)!r} refused the request (HTTP {status[1]}); {hint}.")
    detail = redacted(" ".join(str(exc).split()), uri)[:300]  # one line, no password
    return TrackingError(
        f"MLflow tracking store {redacted(uri)!r} is not reachable ({type(exc).__name__}: {detail}). "
        "Start the server, or unset MLFLOW_TRACKING_URI to use the local store "
        "sqlite:///<repo>/mlflow.db."
    )


def _create_experiment(client, location: str | None) -> str:
    """Create the project's experiment; parallel workers starting on an empty store race to
    create it, and the losers use the winner's."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(EXPERIMENT_NAME, artifact_location=location, tags=EXPERIMENT_TAGS)
    except MlflowException as exc:
        existing = client.get_experiment_by_name(EXPERIMENT_NAME) if exc.error_code == "RESOURCE_ALREADY_EXISTS" else None
        if existing is None:
            raise
        return existing.experiment_id


def configure(root: str | os.PathLike[str] | None = None) -> str:
    """Point mlflow at the project store, check it answers (fail fast), return the experiment id."""
    import mlflow

    # A server that is down should fail in seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    try:
        # one process at a time creates/upgrades a fresh store's schema and the experiment
        with first_use_lock(uri):
            if scheme in DATABASE_SCHEMES:
                _check_database(uri)
            elif scheme == "sqlite":
                _sqlite_waits_for_locks(uri)
            client = mlflow.MlflowClient()
            experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
            if experiment is None:
                experiment_id = _create_experiment(client, artifact_location(uri, root))
            else:
                experiment_id = experiment.experiment_id
                if is_remote_server(uri) and experiment.artifact_location.startswith("file:"):
                    log.warning(
                        "experiment %r on %s stores artifacts at %s, a path on one machine: other machines will not "
                        "find the models. Unless that path is a shared mount, rename the experiment in the MLflow UI "
                        "so ferflow creates a new one in the server's artifact store.",
                        EXPERIMENT_NAME,
                        redacted(uri),
                        experiment.artifact_location,
                    )
                for key, value in EXPERIMENT_TAGS.items():  # stores made before these tags existed
                    if experiment.tags.get(key) != value:
                        client.set_experiment_tag(experiment_id, key, value)
    except Exception as exc:  # mlflow raises many types for an unusable store
        if re.search(r"error code 40[13] != 200", str(exc)):
            raise _unreachable(uri, exc) from None  # a login problem, named as such
        raise TrackingError(explain_store_error(uri, exc)) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# ---------------------------------------------------------------- first use of a store (#20 item 2)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH[?query]` URI; None for other stores."""
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
    db = sqlite_path(uri)
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
    detail = f"{type(exc).__name__}: {redacted(' '.join(str(exc).split()), uri)[:300]}"
    text = str(exc).lower()
    uri = redacted(uri)  # never print a password
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
