"""Several exported models as one that averages their outputs, evaluated and registered like a run.

`ferflow ensemble EXPORT EXPORT... --out DIR`: the members' Keras networks are joined into one
Keras model (`Average` of their outputs), so the result is an ordinary `.keras` file. It then
goes through the pipeline's own evaluate and export code: a temperature fitted on the
validation split, test metrics and plots, an MLflow run (arch `ensemble`) that the leaderboard
ranks, and a registered version promoted by the champion protocol. `ferflow predict`, `watch`,
`demo` and `mlflow models serve` use it like any model. Members must share their classes and
the test set they were evaluated on, which must be the one in --arrays; else one line says why.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferflow.core import files
from ferflow.core.errors import UserError


class EnsembleError(UserError):
    """Members that cannot be averaged (one line saying which and why)."""


@dataclass(frozen=True)
class Member:
    """An exported model directory, as its MLmodel describes it."""

    dir: Path
    keras: Path
    classes: list[str]
    test_set: str | None  # the digest of the test split it was evaluated on
    run_id: str | None  # the MLflow run it was logged to


def read_member(export_dir: str | Path) -> Member:
    """An exported pyfunc directory's Keras file, classes, test set and run (from its MLmodel)."""
    import yaml

    export_dir = Path(export_dir)
    mlmodel = export_dir / "MLmodel"
    if not mlmodel.is_file():
        raise EnsembleError(f"{export_dir}: not an exported ferflow model (no MLmodel file)")
    spec = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {})
    if not {"keras_model", "label_map"} <= set(artifacts):
        raise EnsembleError(f"{mlmodel}: expected artifacts keras_model and label_map (a ferflow export)")
    about = (spec.get("metadata") or {}).get("ferflow") or {}
    classes = list(files.read_json(export_dir / artifacts["label_map"]["path"])["classes"])
    return Member(
        export_dir, export_dir / artifacts["keras_model"]["path"], classes, about.get("test_set"), about.get("mlflow_run_id")
    )


def check_members(members: list[Member], test_set: str) -> None:
    """Refuse fewer than two members, or members with other classes or another test set than `test_set`."""
    if len(members) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)}")
    first = members[0]
    for other in members:
        if other.classes != first.classes:
            raise EnsembleError(f"{other.dir}: classes {other.classes} differ from {first.dir}'s {first.classes}")
        if other.test_set != test_set:
            raise EnsembleError(
                f"{other.dir}: evaluated on test set {str(other.test_set)[:8]}, not on the one in the arrays folder "
                f"({test_set[:8]}): members must be trained and evaluated on the same splits"
            )


def build_ensemble(members: list[Member]) -> Any:
    """One Keras model whose output is the mean of the members' softmax outputs."""
    import keras

    nets = [keras.models.load_model(m.keras, compile=False) for m in members]
    inputs = keras.Input(nets[0].input_shape[1:], name="face")
    outputs = []
    for i, net in enumerate(nets):
        net.name = f"member_{i}"  # functional models need unique layer names; members often share theirs
        outputs.append(net(inputs))
    return keras.Model(inputs, keras.layers.Average(name="mean_softmax")(outputs), name="ensemble")


@dataclass(frozen=True)
class EnsemblePaths:
    """The data the ensemble is calibrated and evaluated on, and the folder it is written to."""

    arrays: Path  # val fits the temperature, test scores the ensemble (the members' test split)
    label_map: Path
    out: Path  # model.keras, run.json, eval.json, calibration.json, predictions.csv, plots/, export/


def make_ensemble(export_dirs: list[Path], paths: EnsemblePaths, params_file: Path) -> dict[str, Any]:
    """Join the members, then evaluate and export the ensemble as the pipeline's stages do
    (with `params_file`'s evaluate, export and serve sections); return export's result."""
    from ferflow.core.params import read_params
    from ferflow.data.arrays import load_label_map, load_split, split_digest
    from ferflow.model.evaluation import EvalPaths
    from ferflow.model.evaluation_run import run_evaluation
    from ferflow.serving.export import ExportPaths, run_export

    params = read_params(params_file)
    x_test, y_test = load_split(paths.arrays, "test")
    members = [read_member(d) for d in export_dirs]
    check_members(members, split_digest(x_test, y_test, load_label_map(paths.label_map)))
    out = paths.out
    out.mkdir(parents=True, exist_ok=True)
    with files.atomic_path(out / "model.keras") as tmp:
        build_ensemble(members).save(tmp)
    _start_run(members, out / "run.json")
    calibration = out / "calibration.json"
    evaluation = EvalPaths(
        paths.arrays, paths.label_map, out / "model.keras", out / "history.csv", out / "run.json", out / "eval.json",
        out / "predictions.csv", out / "plots", None, calibration,
    )  # fmt: skip
    run_evaluation(params.evaluate, evaluation)
    export = ExportPaths(
        paths.arrays, paths.label_map, out / "model.keras", out / "eval.json", out / "export", out / "export.json", calibration
    )
    return run_export(params.export, params.serve, export)


def _start_run(members: list[Member], run_file: Path) -> None:
    """The ensemble's MLflow run (arch `ensemble`, its members' runs and data), recorded in
    `run_file` as the train stage records its run, for evaluate and export to reopen."""
    import mlflow

    from ferflow.tracking.runs import log_params_flat
    from ferflow.tracking.store import configure

    configure()
    client = mlflow.MlflowClient()
    first = client.get_run(members[0].run_id) if members[0].run_id else None
    tags = {"arch": "ensemble", "ferflow.members": ",".join(m.run_id or str(m.dir) for m in members)}
    if first is not None:  # the same data as its members: the leaderboard groups them together
        tags |= {k: v for k, v in first.data.tags.items() if k == "data.hash"}
    with mlflow.start_run(run_name=f"ensemble-of-{len(members)}", tags=tags) as run:
        log_params_flat({"ensemble.members": ",".join(str(m.dir) for m in members), "ensemble.size": len(members)})
        if first is not None:
            log_params_flat({k: v for k, v in first.data.params.items() if k.startswith("data.")})
            if first.inputs and first.inputs.dataset_inputs:
                client.log_inputs(run.info.run_id, datasets=list(first.inputs.dataset_inputs))
        record = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": mlflow.get_tracking_uri()}
        files.write_json(run_file, record | {"complete": True})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("members", nargs="+", type=Path, help="exported model directories (models/export of each run), 2 or more")
    p.add_argument("--out", required=True, type=Path, help="folder for the ensemble's model, metrics, plots and export/")
    p.add_argument("--arrays", type=Path, default=Path("data/arrays"), help="the extract stage's arrays (default: data/arrays)")
    p.add_argument("--label-map", type=Path, default=Path("data/label_map.json"), help="default: data/label_map.json")
    p.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="evaluate/export/serve sections (default: params.yaml)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        result = make_ensemble(args.members, EnsemblePaths(args.arrays, args.label_map, args.out), args.params)
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"ferflow ensemble: error: {exc}", file=sys.stderr)
        return 2
    line = (
        f"ensemble of {len(args.members)} models: test accuracy {result['test_accuracy']:.4f}, exported to {result['export_dir']}"
    )
    if "version" in result:
        line += f"; registered {result['registered_model']} v{result['version']}, champion: v{result['champion_version']}"
    print(line)
    return 0
