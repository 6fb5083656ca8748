"""End to end: a fresh clone, `dvc repro`, `dvc exp run`, all outputs and the MLflow run."""

from __future__ import annotations

import json
import re
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BIN, TINY_OVERRIDES, clone_repo, run, write_params
from ferflow.core.params import flatten
from ferflow.core.presets import load_preset
from ferflow.model.evaluation_run import SUMMARY_KEYS

STAGES = ("ingest", "index", "extract", "train", "evaluate", "export")
OUTPUTS = (
    "data/ingested/manifest.csv",
    "data/rejected.csv",
    "data/index.csv",
    "data/plots/class_distribution.png",
    "data/plots/samples.png",
    "data/arrays/train.npz",
    "data/arrays/val.npz",
    "data/arrays/test.npz",
    "data/label_map.json",
    "models/model.keras",
    "models/run.json",
    "models/export/MLmodel",
    "metrics/ingest.json",
    "metrics/index.json",
    "metrics/train.json",
    "metrics/history.csv",
    "metrics/eval.json",
    "metrics/summary.json",
    "metrics/predictions.csv",
    "metrics/plots/confusion_matrix.png",
    "metrics/plots/reliability_diagram.png",
    "models/calibration.json",
    "metrics/plots/training_curves.png",
    "metrics/plots/classification_report.txt",
    "metrics/export.json",
)


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def mlflow_runs(repo: Path) -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ferflow")
    return [
        {
            "id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "params": r.data.params,
            "metrics": r.data.metrics,
            "tags": r.data.tags,
            "artifact_uri": r.info.artifact_uri,
        }
        for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    ]


@pytest.mark.slow
def test_fresh_clone_repro_then_noop_then_experiment(tmp_path):
    repo = clone_repo(tmp_path / "repo")
    write_params(repo / "params.yaml", TINY_OVERRIDES)
    run(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qam", "tiny params"], repo)

    first = run(["dvc", "repro"], repo)
    assert ran_stages(first.stdout) == list(STAGES)
    assert "Validating input example" not in first.stdout + first.stderr  # #19.5: routine MLflow INFO
    for rel in OUTPUTS:
        assert (repo / rel).exists() and (repo / rel).stat().st_size > 0, rel

    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert ingest["split_totals"] == {"train": 7 * 30, "test": 7 * 8} and ingest["rejected"] == 0
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert set(evaluation) >= {"accuracy", "loss", "macro_f1", "n_test"} and evaluation["n_test"] == 56
    with np.load(repo / "data/arrays/test.npz", allow_pickle=False) as arrays:
        assert arrays["x"].shape == (56, 48, 48, 1) and arrays["x"].dtype == np.float32
    assert len(pd.read_csv(repo / "metrics/history.csv")) == 2

    (runs,) = [mlflow_runs(repo)]
    assert len(runs) == 1
    r = runs[0]
    assert r["status"] == "FINISHED"
    assert r["params"]["train.epochs"] == "2" and r["params"]["train.arch"] == "ferflow_tiny"
    assert {"test_accuracy", "test_macro_f1", "val_loss", "learning_rate"} <= set(r["metrics"])
    assert abs(r["metrics"]["test_accuracy"] - evaluation["accuracy"]) <= 5e-7  # MLflow keeps 6 decimals
    artifacts = Path(r["artifact_uri"].removeprefix("file://"))
    assert artifacts.is_relative_to(repo / "mlartifacts")
    for rel in (
        "evaluation/confusion_matrix.png",
        "evaluation/reliability_diagram.png",
        "evaluation/training_curves.png",
        "params.yaml",
        "model_summary.txt",
        "dvc.lock",
    ):
        assert (artifacts / rel).exists(), rel
    export = json.loads((repo / "metrics/export.json").read_text())
    assert export["registered_model"] == "ferflow-emotion" and export["version"] == 1

    # nothing changed: nothing runs
    second = run(["dvc", "repro"], repo)
    assert ran_stages(second.stdout) == []

    # an experiment the README's way (a preset's flags, then the user's own: a 1-epoch budget)
    # reruns only the stages whose params changed, into the same store
    flags = run([str(BIN / "ferflow"), "preset", "cpu-quick"], repo).stdout.split()  # what $(...) passes on
    exp = run(["dvc", "exp", "run", "-n", "quick", *flags, "-S", "train.epochs=1"], repo)
    assert ran_stages(exp.stdout) == ["train", "evaluate", "export"]
    runs = mlflow_runs(repo)
    assert len(runs) == 2
    newest = runs[-1]
    assert newest["status"] == "FINISHED" and newest["name"] == "quick"
    assert newest["tags"]["dvc.exp.name"] == newest["name"]
    for key, value in flatten(load_preset("cpu-quick")).items():
        expected = "1" if key == "train.epochs" else str(value)
        assert newest["params"][key].lower() == expected.lower(), key
    assert "dvc.exp.baseline.rev" in newest["tags"]
    with sqlite3.connect(repo / "mlflow.db") as db:
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
    assert versions == 2

    # #19.3: the metrics DVC shows are the compared numbers only; in a 120-column terminal
    # the experiment name and test accuracy are visible, and --only-changed adds the params
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert set(summary) == set(SUMMARY_KEYS) and summary["epochs"] == 1
    # not a terminal, so no pager: the full-width table; a 120-column terminal's pager
    # (less -S) shows the first 120 characters of each line
    shown = run(["dvc", "exp", "show"], repo, env={"COLUMNS": "120"}).stdout.splitlines()
    visible = [line[:120] for line in shown]
    header = next(line for line in visible if "Experiment" in line)
    assert "test_accuracy" in header, "\n".join(visible)
    (quick_row,) = [line for line in visible if "quick" in line]
    assert f"{summary['test_accuracy']:g}"[:5] in quick_row, "\n".join(visible)
    full_header = next(line for line in shown if "Experiment" in line)
    for not_a_metric in ("split_totals", "counts", "best_val_loss", "mlflow_run_id", "n_test", "tta"):
        assert f" {not_a_metric} " not in full_header and f":{not_a_metric}" not in full_header, not_a_metric
    # the README's command: the experiment changed train's inputs, so every dependency hash
    # differs from the baseline's; --drop '.*/|synthetic' hides those columns (`synthetic` is the
    # file that stands for the built-in source), metrics and params stay
    changed = run(["dvc", "exp", "show", "--only-changed", "--drop", ".*/|synthetic"], repo).stdout
    assert "train.epochs" in changed and "test_accuracy" in changed, changed[:3000]
    changed_header = next(line for line in changed.splitlines() if "Experiment" in line)
    for dependency in ("data/arrays", "ferflow/model", "models/model.keras", "synthetic"):
        assert dependency not in changed_header, changed_header
    assert "models/model.keras" in run(["dvc", "exp", "show", "--only-changed"], repo).stdout  # what it hides


@pytest.mark.slow
def test_default_synthetic_task_is_learnable_but_not_linear(tmp_path):
    """The default pipeline (params.yaml as committed) reaches >= 90% test accuracy, while a
    logistic regression on the same raw pixels stays below 60%: a real learning task."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    repo = clone_repo(tmp_path / "repo")
    # up to evaluate: export is covered by the fresh-clone test and adds nothing to this question
    run(["dvc", "repro", "evaluate"], repo, timeout=900)
    cnn_accuracy = json.loads((repo / "metrics/eval.json").read_text())["accuracy"]

    def flat(split: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(repo / f"data/arrays/{split}.npz", allow_pickle=False) as a:
            return a["x"].reshape(len(a["x"]), -1), a["y"]

    x_train, y_train = flat("train")
    x_test, y_test = flat("test")
    # 300 lbfgs iterations stop short of convergence; run to convergence (~3,000, 35 s
    # here) it scores the same on test (16.4% vs 17.1% measured): the cap only saves time.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        linear = LogisticRegression(max_iter=300).fit(x_train, y_train)
    linear_accuracy = float((linear.predict(x_test) == y_test).mean())
    print(f"default CNN test accuracy {cnn_accuracy:.3f}; logistic regression {linear_accuracy:.3f}")
    assert cnn_accuracy >= 0.90
    assert linear_accuracy < 0.60
