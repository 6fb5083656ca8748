"""Unit tests per stage on tiny generated data (package functions, one process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO
from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import DataParams, read_params
from ferflow.data.arrays import ExtractPaths, extract_arrays, load_label_map, load_split, split_digest
from ferflow.data.index import IndexPaths, build_index
from ferflow.data.ingest import pixel_hash
from ferflow.data.preprocessing import prepare_batch
from ferflow.data.sources.synthetic import generate_split
from ferflow.tracking.store import RUNS_VIEW_KEY
from support import fit


def test_synthetic_is_deterministic_and_shaped_like_fer():
    a = list(generate_split("train", 3, seed=7))
    b = list(generate_split("train", 3, seed=7))
    c = list(generate_split("train", 3, seed=8))
    assert [x[0] for x in a] == [name for name in FER_CLASSES for _ in range(3)]
    assert all(p.shape == (48, 48) and p.dtype == np.uint8 for _, _, p in a)
    assert all(np.array_equal(x[2], y[2]) for x, y in zip(a, b))
    assert not all(np.array_equal(x[2], y[2]) for x, y in zip(a, c))
    # train and test streams differ even with the same seed
    test = list(generate_split("test", 3, seed=7))
    assert not any(np.array_equal(x[2], y[2]) for x, y in zip(a, test))


def test_ingest_writes_faces_manifest_and_counts(data_dir):
    metrics = json.loads((data_dir / "ingest.json").read_text())
    assert metrics["counts"]["train"] == dict.fromkeys(FER_CLASSES, 20)
    assert metrics["counts"]["test"] == dict.fromkeys(FER_CLASSES, 6)
    assert metrics["rejected"] == 0 and metrics["total"] == 7 * 26
    assert sorted(p.name for p in (data_dir / "ingested").iterdir()) == ["faces.npy", "manifest.csv"]
    faces = np.load(data_dir / "ingested" / "faces.npy", allow_pickle=False)
    assert faces.dtype == np.uint8 and faces.shape == (7 * 26, 48, 48)
    manifest = pd.read_csv(data_dir / "ingested" / "manifest.csv", dtype={"pixel_hash": str})
    assert manifest["row"].tolist() == list(range(7 * 26))
    # row i of faces.npy is the image of manifest row i, in split, class, id order
    assert [pixel_hash(f) for f in faces] == manifest["pixel_hash"].tolist()
    assert manifest["split"].tolist() == ["train"] * 140 + ["test"] * 42
    assert manifest["label"].tolist()[:140] == [c for c in FER_CLASSES for _ in range(20)]
    assert pd.read_csv(data_dir / "rejected.csv").empty


def test_index_carves_stratified_val_from_train_only(data_dir):
    index = pd.read_csv(data_dir / "index.csv")
    assert list(index.columns) == ["id", "row", "label", "label_id", "split", "pixel_hash", "orig_width", "orig_height", "origin"]
    counts = index.groupby(["split", "label"]).size()
    for c in FER_CLASSES:
        assert counts[("val", c)] == 4  # 20% of 20, per class
        assert counts[("train", c)] == 16
        assert counts[("test", c)] == 6  # test untouched
    assert (index["label_id"] == index["label"].map(FER_CLASSES.index)).all()
    assert (data_dir / "plots" / "class_distribution.png").stat().st_size > 0
    assert (data_dir / "plots" / "samples.png").stat().st_size > 0


def test_val_carve_is_seeded(tmp_path, data_dir):
    for name, seed in (("a", 3), ("b", 4)):
        paths = IndexPaths(data_dir / "ingested", tmp_path / f"{name}.csv", tmp_path / f"{name}.json")
        build_index(paths, DataParams(val_fraction=0.2, dedup="keep", seed=seed))
    a, b = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(data_dir / "index.csv")
    assert a.equals(b)  # same seed, same split
    c = pd.read_csv(tmp_path / "b.csv")
    assert set(a.loc[a.split == "val", "id"]) != set(c.loc[c.split == "val", "id"])


def test_extract_arrays_use_the_serving_preprocessing(data_dir):
    x, y = load_split(data_dir / "arrays", "train")
    assert x.dtype == np.float32 and x.shape == (7 * 16, 48, 48, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == np.int64 and set(y) == set(range(7))
    index = pd.read_csv(data_dir / "index.csv")
    train = index[index.split == "train"]
    faces = np.load(data_dir / "ingested" / "faces.npy")
    np.testing.assert_array_equal(x, prepare_batch(faces[train["row"].to_numpy()]))
    np.testing.assert_array_equal(y, train["label_id"].to_numpy())
    first = faces[train["row"].iloc[0]]
    np.testing.assert_array_equal(x[0], prepare_batch([Image.fromarray(first, "L")])[0])  # as a served PIL image
    assert load_label_map(data_dir / "label_map.json") == list(FER_CLASSES)


def test_extract_writes_in_blocks_what_savez_would(tmp_path, data_dir, monkeypatch):
    import ferflow.data.arrays

    monkeypatch.setattr(ferflow.data.arrays, "BLOCK", 5)  # 112 train faces: 23 blocks, the last one short
    extract_arrays(
        ExtractPaths(data_dir / "index.csv", data_dir / "ingested", tmp_path / "arrays", tmp_path / "lm.json"), FER_CLASSES
    )
    for split in ("train", "val", "test"):
        with np.load(tmp_path / "arrays" / f"{split}.npz") as got, np.load(data_dir / "arrays" / f"{split}.npz") as ref:
            assert sorted(got.files) == ["x", "y"]
            np.testing.assert_array_equal(got["x"], ref["x"])
            np.testing.assert_array_equal(got["y"], ref["y"])


def test_extract_and_index_refuse_rows_that_do_not_match_the_faces(tmp_path, data_dir):
    index = pd.read_csv(data_dir / "index.csv")
    index.loc[3, "row"] = 10_000
    index.to_csv(tmp_path / "index.csv", index=False)
    with pytest.raises(ValueError, match=r"index.csv: row 10000 is not a row of .*faces.npy \(0..181\)"):
        extract_arrays(
            ExtractPaths(tmp_path / "index.csv", data_dir / "ingested", tmp_path / "arrays", tmp_path / "lm.json"), FER_CLASSES
        )
    assert not (tmp_path / "arrays").exists()
    ingested = tmp_path / "ingested"
    ingested.mkdir()
    (ingested / "manifest.csv").write_bytes((data_dir / "ingested" / "manifest.csv").read_bytes())
    np.save(ingested / "faces.npy", np.load(data_dir / "ingested" / "faces.npy")[:-1])
    with pytest.raises(ValueError, match=r"faces.npy: 181 faces but manifest.csv has 182 rows"):
        build_index(IndexPaths(ingested, tmp_path / "i.csv", tmp_path / "i.json"), DataParams(dedup="keep"))


def test_load_split_refuses_pickled_or_malformed_arrays(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "train.npz").write_bytes((tmp_path / "objects.npy").read_bytes())
    with pytest.raises(ValueError):
        load_split(tmp_path, "train")
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 32, 32, 1), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"val.npz: expected x float32 \(N,48,48,1\)"):
        load_split(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="run the extract stage first"):
        load_split(tmp_path, "test")


def _train(data_dir: Path, params_file: Path, out: Path) -> dict:
    from ferflow.model.training_run import TrainPaths, run_training

    params = read_params(params_file)
    paths = TrainPaths(
        params_file, data_dir / "arrays", data_dir / "label_map.json", data_dir / "index.csv", data_dir / "plots",
        out / "model.keras", out / "train.json", out / "history.csv", out / "run.json", out / "work",
    )  # fmt: skip
    return run_training(params.train, params.data, paths)


def _evaluate(data_dir: Path, params_file: Path, out: Path, metrics_json: Path) -> dict:
    from ferflow.model.evaluation import EvalPaths
    from ferflow.model.evaluation_run import run_evaluation

    paths = EvalPaths(
        data_dir / "arrays", data_dir / "label_map.json", out / "model.keras", out / "history.csv", out / "run.json",
        metrics_json, out / "pred.csv", out / "plots", None, out / "calibration.json",
    )  # fmt: skip
    return run_evaluation(read_params(params_file).evaluate, paths)


def test_train_evaluate_export_share_one_mlflow_run(data_dir, tiny_params, tmp_path, monkeypatch):
    import mlflow

    from ferflow.serving.export import ExportPaths, run_export

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    train = _train(data_dir, tiny_params, tmp_path)
    assert train["epochs_run"] == 2 and train["arch"] == "ferflow_tiny"
    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_time_s", "images_per_s"} <= set(
        history.columns
    )
    assert not (tmp_path / "work").exists()  # finished training leaves nothing to resume

    evaluation = _evaluate(data_dir, tiny_params, tmp_path, tmp_path / "eval.json")
    preds = pd.read_csv(tmp_path / "pred.csv")
    assert evaluation["n_test"] == 42
    assert evaluation["accuracy"] == pytest.approx((preds["actual"] == preds["predicted"]).mean())
    assert list(preds.columns[:2]) == ["actual", "predicted"] and len(preds) == 42
    np.testing.assert_allclose(preds[[f"p_{c}" for c in FER_CLASSES]].sum(axis=1), 1.0, atol=1e-3)
    for name in ("confusion_matrix.png", "reliability_diagram.png", "training_curves.png", "classification_report.txt"):
        assert (tmp_path / "plots" / name).stat().st_size > 0
    calibration = json.loads((tmp_path / "calibration.json").read_text())
    assert calibration["fitted_on"] == "val" and calibration["temperature"] == evaluation["temperature"] > 0
    assert 0 <= evaluation["ece_after"] <= 1 and 0 <= evaluation["ece_before"] <= 1

    params = read_params(tiny_params)
    paths = ExportPaths(
        data_dir / "arrays", data_dir / "label_map.json", tmp_path / "model.keras", tmp_path / "eval.json",
        tmp_path / "export", tmp_path / "export.json", tmp_path / "calibration.json",
    )  # fmt: skip
    exported = run_export(params.export, params.serve, paths)
    assert (tmp_path / "export" / "MLmodel").exists()
    assert exported["version"] == 1 and exported["champion"] is True
    # the ONNX file ships with the pyfunc, checked against Keras on the validation split
    assert 0 <= exported["onnx_parity_max_abs_diff"] <= 1e-4
    assert (tmp_path / "export" / "artifacts" / "model.onnx").stat().st_size > 0

    run_id = json.loads((tmp_path / "run.json").read_text())["run_id"]
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["data.seed"] == "42"
    assert run.data.params["evaluate.tta"] == "none" and run.data.params["export.registered_model_name"] == "ferflow-emotion"
    assert {"test_accuracy", "test_macro_f1", "val_accuracy", "learning_rate", "epoch_time_s"} <= set(run.data.metrics)
    assert run.data.metrics["onnx_parity_max_abs_diff"] == round(exported["onnx_parity_max_abs_diff"], 6)
    assert run.data.metrics["temperature"] == round(evaluation["temperature"], 6) and "test_ece_after" in run.data.metrics
    assert (tmp_path / "export" / "artifacts" / "calibration.json").is_file()  # the served model applies it
    # #29 item 6: the MLflow UI shows 6 decimals, not 16
    assert all(round(value, 6) == value for value in run.data.metrics.values()), run.data.metrics
    assert "final_val_accuracy" in run.data.metrics
    assert run.data.tags["arch"] == "ferflow_tiny" and len(run.data.tags["data.hash"]) == 16
    epochs = mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in epochs] == [1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    assert {"evaluation", "model_summary.txt", "params.yaml"} <= artifacts

    # the runs list's Dataset column: each split named after data.source, digest = its content hash
    classes = load_label_map(data_dir / "label_map.json")
    inputs = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): (i.dataset.name, i.dataset.digest)
        for i in run.inputs.dataset_inputs
    }
    assert inputs == {
        context: ("synthetic", split_digest(*load_split(data_dir / "arrays", split), classes))
        for context, split in (("training", "train"), ("validation", "val"), ("test", "test"))
    }
    assert len({digest for _, digest in inputs.values()}) == 3
    # one test-set id: the test dataset's digest is the one export tags and names its alias after
    exported_test_set = json.loads((tmp_path / "export.json").read_text())["test_set"]
    assert inputs["test"][1] == exported_test_set and exported["champion_alias"] == f"champion-{exported_test_set[:8]}"
    # the experiment opens as a training (not GenAI) experiment, with a saved runs view
    tags = mlflow.MlflowClient().get_experiment(run.info.experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"])
    assert view["selectedColumns"][:2] == ["tags.`arch`", "metrics.`test_accuracy`"] and view["orderByAsc"] is False


def test_training_is_deterministic_on_cpu(data_dir, tmp_path):
    """Same params and seed on the same CPU machine -> identical weights and predictions."""
    p = read_params(Path(__file__).resolve().parents[2] / "params.yaml").train
    p = p.model_copy(update={"arch": "ferflow_tiny", "epochs": 2, "batch_size": 32, "mixed_precision": "float32"})
    xt, yt = load_split(data_dir / "arrays", "train")
    xv, yv = load_split(data_dir / "arrays", "val")
    preds = []
    for run in ("a", "b"):
        model, _ = fit(p, xt, yt, xv, yv, tmp_path / run, verbose=0)
        preds.append(model.predict(xv, verbose=0))
    np.testing.assert_array_equal(preds[0], preds[1])


def test_changed_evaluate_params_fork_the_run_instead_of_overwriting_it(data_dir, tiny_params, tmp_path, monkeypatch):
    """An experiment that only changes `evaluate.tta` reuses the model; its test metrics go to a
    new run linked to the training run, never over the old run's metrics and params."""
    import mlflow
    import yaml

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    _train(data_dir, tiny_params, tmp_path)
    train_run = json.loads((tmp_path / "run.json").read_text())["run_id"]
    eval_json = tmp_path / "m" / "eval.json"
    first = _evaluate(data_dir, tiny_params, tmp_path, eval_json)
    assert json.loads(eval_json.read_text())["mlflow_run_id"] == train_run

    params = yaml.safe_load(tiny_params.read_text())
    params["evaluate"]["tta"] = "flip"
    tiny_params.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("DVC_EXP_NAME", "flip-exp")
    second = _evaluate(data_dir, tiny_params, tmp_path, eval_json)
    fork_id = json.loads(eval_json.read_text())["mlflow_run_id"]
    assert fork_id != train_run and second["tta"] == "flip"

    client = mlflow.MlflowClient()
    old, fork = client.get_run(train_run), client.get_run(fork_id)
    assert old.data.params["evaluate.tta"] == "none"
    assert old.data.metrics["test_accuracy"] == pytest.approx(first["accuracy"], abs=1e-6)
    assert fork.data.params["evaluate.tta"] == "flip" and fork.data.params["train.epochs"] == "2"
    assert fork.data.tags["ferflow.train_run_id"] == train_run and fork.info.run_name == "flip-exp"
    assert fork.data.metrics["test_accuracy"] == pytest.approx(second["accuracy"], abs=1e-6)
    assert fork.info.status == old.info.status == "FINISHED"
    assert {i.dataset.digest for i in fork.inputs.dataset_inputs} == {i.dataset.digest for i in old.inputs.dataset_inputs}


def test_dvc_yaml_cmds_name_every_path_the_stage_declares():
    """Paths are written once, in each stage's `cmd`: each path option there is a declared
    dep or output of that stage (the resume backup excepted), and each declared data dep or
    output is passed to the script (none hides behind a default)."""
    import shlex

    import yaml

    stages = yaml.safe_load((Path(__file__).resolve().parents[2] / "dvc.yaml").read_text())["stages"]
    for name, spec in stages.items():
        words = shlex.split(spec["cmd"])
        assert words[:2] == ["python", f"stages/{name}.py"], name
        options = dict(zip(words[2::2], words[3::2]))
        assert all(o.startswith("--") for o in options), (name, words)
        declared = {
            next(iter(e)) if isinstance(e, dict) else e for key in ("deps", "outs", "metrics", "plots") for e in spec.get(key, [])
        }
        data = {d for d in declared if not d.startswith(("stages/", "ferflow/", "${"))}
        passed = {path for option, path in options.items() if option != "--work-dir"}
        assert passed <= declared, (name, passed - declared)
        # export does not read the run file: the evaluate metrics name the run it logged to
        assert data - passed <= ({"models/run.json"} if name == "export" else set()), (name, data - passed)


@pytest.mark.parametrize("name", ["ingest", "train", "export"])
def test_a_stage_under_the_wrong_python_stops_with_what_to_do(name: str, tmp_path: Path) -> None:
    """#19.2: `python` without the project's packages (here: no site-packages, -S) exits 2
    with one line naming the fix, before importing or writing anything."""
    proc = subprocess.run(
        [sys.executable, "-E", "-s", "-S", str(REPO / "stages" / f"{name}.py"), "--params", str(REPO / "params.yaml")],
        cwd=tmp_path, env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{name}: error: this Python ("), proc.stderr
    assert "source .venv/bin/activate" in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_stderr_filter_passes_lines_on_when_its_thread_starts_after_the_stage_ended(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage that fails at once can leave the filter before its thread first runs (seen
    under load): the error line must still reach stderr, not an EBADF in the thread."""
    import threading

    from ferflow.core import noise

    class LateThread(threading.Thread):
        def start(self) -> None:  # held back until join, i.e. after the context has ended
            pass

        def join(self, timeout: float | None = None) -> None:
            super().start()
            super().join(timeout)

    monkeypatch.setattr(noise.threading, "Thread", LateThread)
    with noise.filtered_stderr():
        os.write(2, b"ingest: error: params.yaml: the one line\n")
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on.\n")
    err = capfd.readouterr().err
    assert "ingest: error: params.yaml: the one line" in err and "oneDNN" not in err, err


QUIET_STAGE = """
import os, sys, warnings
from pathlib import Path
import numpy as np
from ferflow.core import stage
from ferflow.core.params import TrainParams

def main(args):
    from ferflow.model import distribution
    from ferflow.model.training import FitOutputs, Splits, fit_model
    os.write(2, b"I0000 00:00:1796231445.427481 12315 port.cc:153] oneDNN custom operations are on.\\n")
    warnings.warn("a real warning stays visible")
    rng = np.random.default_rng(0)
    x, y = rng.random((28, 48, 48, 1), dtype=np.float32), np.arange(28) % 7
    p = TrainParams(arch="ferflow_tiny", epochs=2, batch_size=8, mixed_precision="float32")
    work = Path(sys.argv[1])
    outputs = FitOutputs(work / "m.keras", work / "h.csv", work / "w")
    fit_model(p, Splits(x, y, x[:14], y[:14], 7), outputs, distribution.setup("none", 8))

stage.run(main, None, "train")
"""


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_stage_prints_one_line_per_epoch_and_no_library_noise(tmp_path: Path, backend: str) -> None:
    """#19.5, #29: with output redirected, no per-step progress bar and no TensorFlow/absl/JAX
    start-up lines (JAX's 'Unable to initialize backend tpu'); real warnings still show."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_BACKEND": backend}
    proc = subprocess.run(
        [sys.executable, "-c", QUIET_STAGE, str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("oneDNN", "absl::InitializeLog", "NodeDef mentions", "y_prob values", "libtpu", "initialize backend"):
        assert noise not in proc.stderr, proc.stderr
    assert "a real warning stays visible" in proc.stderr
    assert "\x1b[" not in proc.stdout and "━" not in proc.stdout, proc.stdout[:2000]
    epoch_lines = [line for line in proc.stdout.splitlines() if "val_loss" in line]
    assert len(epoch_lines) == 2, proc.stdout


def test_no_stage_loads_tensorflow_before_its_stderr_filter_is_on() -> None:
    """TensorFlow prints its C++ start-up lines when imported: a stage script that imports it
    at module level does so before `stage.run` filters stderr, and the user sees them (#29)."""
    modules = [
        line.split()[1]
        for script in sorted((REPO / "stages").glob("*.py"))
        for line in script.read_text().splitlines()
        if line.startswith("from ferflow.")
    ]
    code = f"import sys\nfor m in {sorted(set(modules))!r}:\n    __import__(m)\nprint(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert out.stdout.strip() == "[]", out.stdout
