"""train.distribution: data_parallel over emulated CPU devices (JAX, in subprocesses), and its errors."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_pipeline_e2e import mlflow_runs, ran_stages

from conftest import REPO, TINY_OVERRIDES, clone_repo, deep_update, run, write_params
from ferflow.core.params import ParamsError, validate_params
from ferflow.model import distribution
from ferflow.model.distribution import DistributionError, Layout, local_share, pad_to_multiple

needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="JAX not installed (requirements-dev.txt pins jax[cpu])"
)
# XLA splits the host CPU into 2 devices; read when JAX initialises, so only subprocesses see it.
TWO_CPU_DEVICES = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def test_distribution_param_accepts_none_and_data_parallel_only():
    assert validate_params({})["train"]["distribution"] == "none"
    assert validate_params({"train": {"distribution": "data_parallel"}})["train"]["distribution"] == "data_parallel"
    with pytest.raises(
        ParamsError, match=r"`train.distribution` = 'mirrored' is not allowed: expected one of none, data_parallel"
    ):
        validate_params({"train": {"distribution": "mirrored"}})


def test_padding_repeats_fewer_images_than_devices_and_shares_are_equal():
    x = np.arange(11, dtype=np.float32).reshape(11, 1)
    y = np.arange(11)
    same_x, _, none_added = pad_to_multiple(x, y, 1, seed=0)
    assert none_added == 0 and same_x is x
    px, py, added = pad_to_multiple(x, y, 4, seed=0)
    assert added == 1 and len(px) == 12 and np.array_equal(px[:11], x) and px[11, 0] == py[11]
    px, py, added = pad_to_multiple(x, y, 8, seed=0)
    assert added == 5 and len(set(py[11:].tolist())) == 5  # distinct repeats
    # two processes of 2 devices each: equal shares whose union is the padded split
    shares = [local_share(Layout("data_parallel", ("cpu:0", "cpu:1", "cpu:2", "cpu:3"), 2, pid), x, y, 0) for pid in (0, 1)]
    assert [len(s[0]) for s in shares] == [6, 6] and all(s[2] == 1 for s in shares)
    assert sorted(np.concatenate([s[1] for s in shares]).tolist()) == sorted(pad_to_multiple(x, y, 4, 0)[1].tolist())


@pytest.mark.parametrize(
    "env, message",
    [
        ({"KERAS_DISTRIBUTION_NUM_PROCESSES": "two"}, "KERAS_DISTRIBUTION_NUM_PROCESSES='two': expected an integer >= 1"),
        (
            {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"},
            "KERAS_DISTRIBUTION_JOB_ADDRESSES is not set",
        ),
        (
            {"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1"},
            "KERAS_DISTRIBUTION_PROCESS_ID is not set",
        ),
        (
            {
                "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
                "KERAS_DISTRIBUTION_JOB_ADDRESSES": "127.0.0.1:1",
                "KERAS_DISTRIBUTION_PROCESS_ID": "2",
            },
            "KERAS_DISTRIBUTION_PROCESS_ID='2': expected an integer >= 0 and <= 1",
        ),
    ],
)
def test_bad_process_environment_is_named(monkeypatch, env, message):
    for name in (distribution.ENV_ADDRESSES, distribution.ENV_NUM_PROCESSES, distribution.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(DistributionError, match=message):
        distribution._initialize_processes()


# the stage's required path options; these two tests stop before any is read or written
UNUSED_PATHS = [
    f"--{name}={name}"
    for name in ("arrays", "label-map", "index", "data-plots", "model", "metrics", "history", "run-file", "work-dir")
]


def test_data_parallel_under_tensorflow_stops_before_training_naming_jax(tmp_path, tiny_params):
    write_params(tiny_params, deep_update(copy.deepcopy(TINY_OVERRIDES), {"train": {"distribution": "data_parallel"}}))
    proc = run(
        [sys.executable, str(REPO / "stages/train.py"), "--params", str(tiny_params), "--no-mlflow", *UNUSED_PATHS],
        tmp_path,
        env={"KERAS_BACKEND": "tensorflow"},
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("train: error:")]
    assert "needs the JAX backend" in line and "KERAS_BACKEND=jax" in line and "'tensorflow'" in line
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


@needs_jax
def test_batch_size_that_does_not_split_over_the_devices_is_refused(tmp_path, tiny_params):
    write_params(
        tiny_params, deep_update(copy.deepcopy(TINY_OVERRIDES), {"train": {"distribution": "data_parallel", "batch_size": 33}})
    )
    proc = run(
        [sys.executable, str(REPO / "stages/train.py"), "--params", str(tiny_params), "--no-mlflow", *UNUSED_PATHS],
        tmp_path,
        env=TWO_CPU_DEVICES,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "`train.batch_size` = 33 does not split over 2 devices" in proc.stderr and "Traceback" not in proc.stderr


# Even split sizes (280 train -> 252 train + 28 val), so no image is repeated and the two
# runs see identical batches: what remains is the order of float32 sums.
COMPARE_OVERRIDES = {
    "data": {"synthetic": {"train_per_class": 40, "test_per_class": 8}},
    "train": {"augment": {"flip": True, "shift": 0.1, "erasing": 0.5}, "dropout_scale": 1.0},
}
# Relative tolerance on per-epoch losses. Not exact: with 2 devices each computes the
# gradient of half the batch and XLA adds the halves (all-reduce), a different order of
# float32 additions than one device's; the rounding differences (~1e-6 per step measured)
# carry through later steps. Accuracies may differ by one image.
LOSS_RTOL = 1e-5


@needs_jax
@pytest.mark.slow
def test_data_parallel_repro_matches_one_device_and_loads_in_tensorflow(tmp_path):
    import keras

    repo = clone_repo(tmp_path / "repo")
    base = deep_update(copy.deepcopy(TINY_OVERRIDES), COMPARE_OVERRIDES)

    def train(mode: str) -> tuple[pd.DataFrame, dict]:
        write_params(repo / "params.yaml", deep_update(copy.deepcopy(base), {"train": {"distribution": mode}}))
        run(["dvc", "repro", "train"], repo, env=TWO_CPU_DEVICES)  # JAX, 2 CPU devices visible
        return pd.read_csv(repo / "metrics/history.csv"), json.loads((repo / "metrics/train.json").read_text())

    one_history, one_train = train("none")
    (repo / "models/model.keras").rename(tmp_path / "one_device.keras")
    two_history, two_train = train("data_parallel")
    second = run(["dvc", "repro"], repo)  # evaluate and export under TensorFlow, the default backend
    assert ran_stages(second.stdout) == ["evaluate", "export"]
    two_eval = json.loads((repo / "metrics/eval.json").read_text())

    assert (one_train["devices"], two_train["devices"]) == (1, 2)
    assert two_train["repeated_images"] == {"train": 0, "val": 0}
    assert len(one_history) == len(two_history) == 2
    for column in ("loss", "val_loss"):
        np.testing.assert_allclose(two_history[column], one_history[column], rtol=LOSS_RTOL, err_msg=column)
    assert np.abs(two_history["val_accuracy"] - one_history["val_accuracy"]).max() <= 1 / 28 + 1e-6
    assert (repo / "models/export/MLmodel").exists()

    # both models in TensorFlow (this process's backend) on the test split
    assert keras.backend.backend() == "tensorflow"
    with np.load(repo / "data/arrays/test.npz", allow_pickle=False) as arrays:
        x_test, y_test = arrays["x"], arrays["y"]

    def test_metrics(path) -> tuple[float, float]:
        probs = keras.models.load_model(path, compile=False).predict(x_test, verbose=0)
        return float((probs.argmax(axis=1) == y_test).mean()), float(-np.log(probs[np.arange(len(y_test)), y_test]).mean())

    one_accuracy, one_loss = test_metrics(tmp_path / "one_device.keras")
    two_accuracy, two_loss = test_metrics(repo / "models/model.keras")
    assert two_accuracy == pytest.approx(two_eval["accuracy"])  # what evaluate measured (tta none)
    assert abs(two_accuracy - one_accuracy) <= 1 / 56 + 1e-6
    assert two_loss == pytest.approx(one_loss, rel=LOSS_RTOL)

    runs = mlflow_runs(repo)
    assert [r["tags"]["distribution"] for r in runs] == ["none", "data_parallel"]
    two = runs[-1]
    assert two["status"] == "FINISHED" and two["tags"]["keras.backend"] == "jax"
    assert two["tags"]["distribution.devices"] == "2" and two["tags"]["distribution.layout"] == "batch:2 over cpu:0,cpu:1"
    assert two["metrics"]["test_accuracy"] == pytest.approx(two_eval["accuracy"], abs=1e-6)  # MLflow keeps 6 decimals
    assert {"loss", "val_loss", "learning_rate"} <= set(two["metrics"])


# Killed (an exception, as a SIGKILL would stop it) right after epoch 2's backup, then rerun.
KILL_THEN_RESUME = """
import json, sys
import numpy as np
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
from ferflow.core.params import TrainParams
from ferflow.model import training
from support import fit as fit_tiny

class Killed(Exception):
    pass

out = sys.argv[1]
p = TrainParams(arch="ferflow_tiny", epochs=4, batch_size=16, early_stopping_patience=10, mixed_precision="float32",
                distribution="data_parallel", augment={"flip": True, "erasing": 0.5})
rng = np.random.default_rng(0)
x = rng.random((67, 48, 48, 1), dtype=np.float32); y = np.arange(67) % 7
log_epoch_end, log_epoch_begin = training.EpochLogger.on_epoch_end, training.EpochLogger.on_epoch_begin

def killed_after_epoch_2(self, epoch, logs=None):
    log_epoch_end(self, epoch, logs)
    if epoch == 1:
        np.savez(out + "/at_kill.npz", *self.model.get_weights())
        raise Killed

def record_start(self, epoch, logs=None):
    if not hasattr(self, "first_epoch"):
        self.first_epoch = epoch
        open(out + "/first_epoch.txt", "w").write(str(epoch + 1))
        np.savez(out + "/at_resume.npz", *self.model.get_weights())
    log_epoch_begin(self, epoch, logs)

def fit():
    return fit_tiny(p, x, y, x[:15], y[:15], out, verbose=0)[1]

training.EpochLogger.on_epoch_end = killed_after_epoch_2
try:
    fit()
except Killed:
    pass
training.EpochLogger.on_epoch_end, training.EpochLogger.on_epoch_begin = log_epoch_end, record_start
summary = fit()
print(json.dumps(summary))
"""


@needs_jax
@pytest.mark.slow
def test_data_parallel_resumes_after_a_kill_from_the_backup(tmp_path):
    env = {**os.environ, **TWO_CPU_DEVICES, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_THEN_RESUME, str(tmp_path), str(REPO)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["resumed"] is True and summary["devices"] == 2 and summary["epochs_run"] == 4
    assert summary["repeated_images"] == {"train": 1, "val": 1}  # 67 and 15 images over 2 devices
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
    assert (tmp_path / "first_epoch.txt").read_text() == "3"
    # the resumed run started at epoch 3 from the distributed weights epoch 2 ended with
    with np.load(tmp_path / "at_kill.npz") as killed, np.load(tmp_path / "at_resume.npz") as resumed:
        assert len(killed.files) == len(resumed.files) > 0
        for name in killed.files:
            np.testing.assert_array_equal(resumed[name], killed[name], err_msg=name)
    assert (tmp_path / "model.keras").exists() and not (tmp_path / "work").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_jax
@pytest.mark.slow
def test_two_processes_train_one_run_and_only_process_0_writes(tmp_path):
    from ferflow.core.classes import FER_CLASSES
    from ferflow.core.params import DataParams
    from ferflow.data.sources.synthetic import SyntheticSource
    from support import prepare_data

    data = tmp_path / "data"
    prepare_data(
        data, SyntheticSource(15, 2, seed=3, classes=list(FER_CLASSES)), DataParams(val_fraction=0.2, dedup="keep", seed=3)
    )
    params = tmp_path / "params.yaml"
    write_params(params, deep_update(copy.deepcopy(TINY_OVERRIDES), {"train": {"distribution": "data_parallel"}}))

    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{free_port()}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
    }
    env.pop("XLA_FLAGS", None)  # one CPU device per process: 2 in all
    procs = []
    for pid in (0, 1):
        out = tmp_path / f"p{pid}"
        cmd = [sys.executable, str(REPO / "stages/train.py"), "--params", str(params), "--arrays", str(data / "arrays")]
        cmd += [
            "--label-map",
            str(data / "label_map.json"),
            "--index",
            str(data / "index.csv"),
            "--data-plots",
            str(data / "plots"),
        ]
        for flag, name in (("--model", "model.keras"), ("--metrics", "train.json"), ("--history", "history.csv")):
            cmd += [flag, str(out / name)]
        cmd += ["--run-file", str(out / "run.json"), "--work-dir", str(out / "work")]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=tmp_path,
                env={**env, "KERAS_DISTRIBUTION_PROCESS_ID": str(pid)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]

    assert not (tmp_path / "p1").exists()  # process 1 wrote nothing
    summary = json.loads((tmp_path / "p0/train.json").read_text())
    assert (summary["devices"], summary["processes"]) == (2, 2)
    assert summary["epochs_run"] == 2 and (tmp_path / "p0/model.keras").exists()
    assert len(pd.read_csv(tmp_path / "p0/history.csv")) == 2

    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run_,) = client.search_runs([client.get_experiment_by_name("ferflow").experiment_id])
    assert run_.data.tags["distribution.processes"] == "2" and run_.data.tags["distribution.devices"] == "2"
    assert run_.info.status == "FINISHED"
