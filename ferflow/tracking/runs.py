"""One MLflow run per training pipeline run.

Train opens the run and writes its id to `models/run.json`; evaluate and export reopen
that run to add test metrics and the model. Every stage ends the run FINISHED on
success, FAILED when it raises, KILLED on SIGINT/SIGTERM: never left RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferflow.core import files
from ferflow.tracking.signals import interrupts_held, run_status_guard
from ferflow.tracking.store import TrackingError, configure

PIPELINE_WRITTEN_PATHS = ("dvc.lock", "metrics")


def git_info(root: Path) -> dict[str, str]:
    """Commit and dirtiness of the working copy the stage's code runs from.

    That is the current directory's git work tree when there is one, `root` otherwise:
    `dvc exp run --temp/--queue` runs stages in a temporary clone (HEAD = baseline, the
    experiment's -S changes uncommitted in it) while DVC_ROOT, which callers pass as
    `root`, is the parent repo, whose HEAD and state may have moved on since queueing.
    """

    def git(cwd: str | os.PathLike[str], *args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    workdir: str | os.PathLike[str] = os.getcwd()
    commit = git(workdir, "rev-parse", "HEAD")
    if not commit:
        workdir = root
        commit = git(workdir, "rev-parse", "HEAD")
    # Pipeline outputs tracked by git change as the pipeline runs; only code/params count.
    excludes = [f":(top,exclude){path}" for path in PIPELINE_WRITTEN_PATHS]
    dirty = git(workdir, "status", "--porcelain", "--untracked-files=no", "--", ":(top)", *excludes)
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


EXP_NAMES_TAG = "dvc.exp.names"


def dvc_tags() -> dict[str, str]:
    """dvc.exp.name and dvc.exp.baseline.rev from DVC's environment (absent under plain `dvc repro`);
    dvc.exp.names starts the list of experiments whose results come from this run."""
    tags = {k.lower().replace("_", "."): os.environ[k] for k in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV") if os.environ.get(k)}
    if "dvc.exp.name" in tags:
        tags[EXP_NAMES_TAG] = tags["dvc.exp.name"]
    return tags


def note_experiment(run_id: str) -> None:
    """Add the running DVC experiment to the run's `dvc.exp.names` tag (comma-separated).

    When DVC restores train from its run-cache (same code, data and params as an earlier
    run), no training runs and models/run.json comes back pointing at the run that made
    that model; evaluate and export then reopen that run. This keeps such an experiment
    findable in MLflow: `tags."dvc.exp.names" LIKE '%<name>%'`.
    """
    import mlflow

    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    names = [n for n in tags.get(EXP_NAMES_TAG, tags.get("dvc.exp.name", "")).split(",") if n]
    if name not in names:
        client.set_tag(run_id, EXP_NAMES_TAG, ",".join([*names, name]))


@dataclass(frozen=True)
class TrainingRun:
    """The train stage's side of the pipeline run: start it, or continue the interrupted one
    when training resumes. `resume_file` lives in the training work dir, which DVC does not
    delete (it deletes `run_file`, a stage output, before rerunning)."""

    name: str
    tags: dict[str, str]
    run_file: Path
    resume_file: Path
    resuming: bool


@dataclass(frozen=True)
class StageRun:
    """Evaluate's and export's side: reopen the run `run_id` (recorded in `source`) and log
    the stage's params; forked when it already holds one of them with another value."""

    run_id: str
    stage_params: dict[str, Any]
    source: str


@contextlib.contextmanager
def pipeline_run(opening: TrainingRun | StageRun) -> Iterator[str]:
    """The pipeline's MLflow run, active inside: started, resumed or reopened (or forked) as
    `opening` says, and ended FINISHED, FAILED or KILLED on the way out, never left RUNNING."""
    if isinstance(opening, TrainingRun):
        run_id = _start_training(opening)
        with run_status_guard(run_id):
            yield run_id
    else:
        with _reopen(opening) as run_id:
            yield run_id


def _start_training(opening: TrainingRun) -> str:
    """Start the training run, or continue the interrupted one when training resumes. A run
    left RUNNING by a SIGKILL that will not be resumed (params changed) is marked KILLED."""
    import mlflow

    name, tags, run_file, resume_file = opening.name, opening.tags, opening.run_file, opening.resume_file
    previous = _recorded_run(resume_file)
    if previous and opening.resuming:
        run = mlflow.start_run(run_id=previous)
        mlflow.set_tag("ferflow.resumed", "true")
    else:
        if previous:
            with contextlib.suppress(Exception):
                client = mlflow.MlflowClient()
                if client.get_run(previous).info.status == "RUNNING":
                    client.set_terminated(previous, status="KILLED")
        run = mlflow.start_run(run_name=name, tags=tags)
    record = {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": mlflow.get_tracking_uri(),
        "complete": False,
    }
    files.write_json(resume_file, record)
    files.write_json(run_file, record)
    return run.info.run_id


def _recorded_run(resume_file: str | os.PathLike[str]) -> str | None:
    """The run id of an interrupted training, if recorded for this store and still there."""
    import mlflow

    path = Path(resume_file)
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


def mark_training_complete(run_file: str | os.PathLike[str]) -> None:
    record = files.read_json(run_file)
    record["complete"] = True
    files.write_json(run_file, record)


def backfill_epochs(run_id: str, rows: list[dict[str, Any]]) -> list[int]:
    """Log to run `run_id` the epochs of `rows` (metrics/history.csv) missing from its MLflow
    history, i.e. those trained while the tracking server was unreachable; return their numbers.
    Lets a run whose server went away mid-training be completed by rerunning evaluate."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    missing = [row for row in rows if row["epoch"] not in logged]
    now = int(time.time() * 1000)
    metrics = [
        mlflow.entities.Metric(k, round(float(v), METRIC_DIGITS), now, int(row["epoch"]))
        for row in missing
        for k, v in row.items()
        if k != "epoch"
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)  # the client splits it into batches MLflow accepts
    return [int(row["epoch"]) for row in missing]


def recorded_run_id(run_file: str | os.PathLike[str]) -> str | None:
    """The MLflow run id the train stage recorded (None when it trained without MLflow)."""
    return files.read_json(run_file).get("run_id")


@contextlib.contextmanager
def _reopen(opening: StageRun) -> Iterator[str]:
    """Reopen the pipeline run for evaluate/export and log their params.

    If the run already holds one of the stage's params with another value (e.g. an experiment
    that only changes `evaluate.tta` reuses the trained model), the run is forked instead:
    a new run with the same params/tags/final metrics, the new values, and tag
    `ferflow.train_run_id` pointing at the run that holds the model and training curves.
    MLflow params are immutable, and overwriting test metrics would corrupt the old run.
    """
    import mlflow

    run_id, stage_params, source = opening.run_id, opening.stage_params, opening.source
    configure()
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise TrackingError(
            f"{source}: MLflow run {run_id} is not in the store {mlflow.get_tracking_uri()!r} ({exc}). "
            "Was MLFLOW_TRACKING_URI changed since training? Rerun train with `dvc repro -f train`."
        ) from None
    values = {k: str(v)[:6000] for k, v in stage_params.items()}
    changed = sorted(k for k, v in values.items() if k in run.data.params and run.data.params[k] != v)
    if changed:
        run_id = _fork_run(run, values, changed)
    with run_status_guard(run_id):
        with interrupts_held():
            mlflow.start_run(run_id=run_id)
            note_experiment(run_id)
            log_params_flat(values)
        yield run_id  # the guard ends the run FINISHED (or FAILED/KILLED)


def _fork_run(run, values: dict[str, str], changed: list[str]) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    tags |= dvc_tags() | {"ferflow.train_run_id": run.info.run_id, "ferflow.forked_for": ",".join(changed)}
    name = os.environ.get("DVC_EXP_NAME") or f"{run.info.run_name}+{changed[0].split('.')[-1]}"
    new = client.create_run(run.info.experiment_id, run_name=name, tags=tags)
    params = [mlflow.entities.Param(k, v) for k, v in {**run.data.params, **values}.items()]
    metrics = [mlflow.entities.Metric(k, v, 0, 0) for k, v in run.data.metrics.items() if not k.startswith("test_")]
    client.log_batch(new.info.run_id, metrics=metrics, params=params)  # the client splits it into batches MLflow accepts
    if run.inputs and run.inputs.dataset_inputs:  # the same data: keep the Dataset column filled
        client.log_inputs(new.info.run_id, datasets=list(run.inputs.dataset_inputs))
    return new.info.run_id


METRIC_DIGITS = 6  # what the MLflow UI shows: 0.642153, not 0.6421529054641724


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """`mlflow.log_metrics` of the active run, each value rounded to METRIC_DIGITS decimals."""
    import mlflow

    mlflow.log_metrics({k: round(float(v), METRIC_DIGITS) for k, v in metrics.items()}, step=step)


def log_params_flat(params: dict[str, Any]) -> None:
    """Log params not yet on the active run (a resumed run has them already; values that
    differ are handled by forking in `pipeline_run`)."""
    import mlflow

    with interrupts_held():
        existing = mlflow.MlflowClient().get_run(mlflow.active_run().info.run_id).data.params
        todo = {k: str(v)[:6000] for k, v in params.items() if k not in existing}
        if todo:
            mlflow.log_params(todo)


def log_datasets(source: str, splits: dict[str, tuple[Any, Any, str]]) -> None:
    """Log each split as an MLflow dataset input of the active run (the runs list's Dataset column).

    `splits` maps an MLflow context ("training", "validation", "test") to (images, labels,
    content digest). The dataset's name is the data source as `data.source` names it (a
    path's file or folder name), its digest the split's content hash, its source the path.
    """
    import mlflow
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if source == "synthetic":
        origin: Any = CodeDatasetSource(tags={"generator": "ferflow.data.sources.synthetic"})
        name = source
    else:
        origin = str(Path(source).resolve())  # from_numpy resolves a path to its local-file source
        name = Path(source).name or source
    with interrupts_held(), warnings.catch_warnings():
        # two registered local-file source classes match a path; MLflow warns and picks one
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        for context, (images, labels, digest) in splits.items():
            dataset = mlflow.data.from_numpy(images, targets=labels, source=origin, name=name, digest=digest)
            mlflow.log_input(dataset, context=context)
