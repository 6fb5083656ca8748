"""MLflow tracking: where the store is, and one run per training pipeline run.

Store: MLFLOW_TRACKING_URI if set, else `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, where <root> is DVC_ROOT when DVC runs the stage (DVC points it at
the main repo also for `dvc exp run --temp/--queue`, whose working copies are deleted),
else the repo root found from the working directory.

Train opens the run and writes its id to `models/run.json`; evaluate and export reopen
that run to add test metrics and the model. Every stage ends the run FINISHED on
success, FAILED when it raises, KILLED on SIGINT/SIGTERM: never left RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ferflow import files

EXPERIMENT_NAME = "ferflow"
RUN_FILE = "models/run.json"


class TrackingError(RuntimeError):
    pass


def find_root(start: str | os.PathLike[str] | None = None) -> Path:
    """DVC_ROOT, else the nearest ancestor of `start` (cwd) holding .dvc or .git."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate
    return here


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
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            experiment_id = client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_location(root))
        else:
            experiment_id = experiment.experiment_id
    except Exception as exc:  # mlflow raises many types for an unreachable store
        raise TrackingError(
            f"MLflow tracking store {uri!r} is not reachable ({type(exc).__name__}: {str(exc)[:300]}). "
            "Start the server, or unset MLFLOW_TRACKING_URI to use the local store "
            f"sqlite:///<repo>/mlflow.db."
        ) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def device_name() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return f"tensorflow:{'gpu:' + gpus[0].name if gpus else 'cpu'}:{platform.processor() or platform.machine()}"
    if backend == "jax":
        import jax

        return f"jax:{jax.devices()[0].platform}"
    return backend


def run_name(arch: str) -> str:
    return os.environ.get("DVC_EXP_NAME") or f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}"


def dvc_tags() -> dict[str, str]:
    return {k.lower().replace("_", "."): os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if os.environ.get(k)}


class _Interrupted(BaseException):
    pass


@contextlib.contextmanager
def run_status_guard(run_id: str) -> Iterator[None]:
    """Inside: SIGTERM raises like Ctrl-C. On exit: FINISHED, FAILED or KILLED, never RUNNING."""
    import mlflow

    def on_term(signum, frame):  # noqa: ARG001
        raise _Interrupted(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            mlflow.MlflowClient().set_terminated(run_id, status=status)
        with contextlib.suppress(Exception):
            while mlflow.active_run() is not None:
                mlflow.end_run(status=status)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def start_training_run(name: str, tags: dict[str, str], run_file: str | os.PathLike[str] = RUN_FILE) -> str:
    """Start (or, after an interrupted train, continue) the run; record its id in run_file."""
    import mlflow

    previous = _resumable_run(run_file)
    if previous:
        run = mlflow.start_run(run_id=previous)
        mlflow.set_tag("ferflow.resumed", "true")
    else:
        run = mlflow.start_run(run_name=name, tags=tags)
    files.write_json(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": mlflow.get_tracking_uri(), "complete": False})
    return run.info.run_id


def _resumable_run(run_file: str | os.PathLike[str]) -> str | None:
    """The run of a training that was interrupted, if its record says so and the store has it."""
    import mlflow

    path = Path(run_file)
    if not path.exists():
        return None
    try:
        record = files.read_json(path)
    except ValueError:
        return None
    if record.get("complete") or not record.get("run_id") or record.get("tracking_uri") != mlflow.get_tracking_uri():
        return None
    try:
        mlflow.MlflowClient().get_run(record["run_id"])
    except Exception:
        return None
    return record["run_id"]


def mark_training_complete(run_file: str | os.PathLike[str] = RUN_FILE) -> None:
    record = files.read_json(run_file)
    record["complete"] = True
    files.write_json(run_file, record)


@contextlib.contextmanager
def resume_run(run_file: str | os.PathLike[str] = RUN_FILE) -> Iterator[str]:
    """Reopen the training run recorded by the train stage (evaluate, export)."""
    import mlflow

    record = files.read_json(run_file)
    run_id = record.get("run_id")
    if not run_id:
        raise TrackingError(f"{run_file}: no run_id (was the train stage run?)")
    configure()
    try:
        mlflow.MlflowClient().get_run(run_id)
    except Exception as exc:
        raise TrackingError(
            f"{run_file}: MLflow run {run_id} is not in the store {mlflow.get_tracking_uri()!r} ({exc}). "
            "Was MLFLOW_TRACKING_URI changed since training? Rerun train with `dvc repro -f train`."
        ) from None
    with run_status_guard(run_id):
        mlflow.start_run(run_id=run_id)
        yield run_id
        mlflow.end_run("FINISHED")


def log_params_flat(params: dict[str, Any]) -> None:
    """Log params, skipping keys already logged with the same value (resumed runs)."""
    import mlflow

    existing = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
    todo = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
    if todo:
        mlflow.log_params(todo)
