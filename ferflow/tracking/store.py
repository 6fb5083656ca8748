"""Where the MLflow store is, and a fail-fast check that it answers.

MLFLOW_TRACKING_URI if set, else `sqlite:///<root>/mlflow.db` with artifacts in
`<root>/mlartifacts`, where <root> is DVC_ROOT when DVC runs the stage (DVC points it at
the main repo also for `dvc exp run --temp/--queue`, whose working copies are deleted),
else the repo root found from the working directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

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
            experiment_id = client.create_experiment(
                EXPERIMENT_NAME, artifact_location=artifact_location(root), tags=EXPERIMENT_TAGS
            )
        else:
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():  # stores made before these tags existed
                if experiment.tags.get(key) != value:
                    client.set_experiment_tag(experiment_id, key, value)
    except Exception as exc:  # mlflow raises many types for an unreachable store
        raise TrackingError(
            f"MLflow tracking store {uri!r} is not reachable ({type(exc).__name__}: {str(exc)[:300]}). "
            "Start the server, or unset MLFLOW_TRACKING_URI to use the local store "
            f"sqlite:///<repo>/mlflow.db."
        ) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# git-tracked files that DVC or the stages rewrite during `dvc repro` (not inputs of a run)
