"""Failure behaviour: kills, resumes, unreachable tracking servers, failing stages, atomic outputs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_OVERRIDES, write_params
from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import DataParams
from ferflow.data.sources.synthetic import SyntheticSource
from support import free_port, prepare_data

TRAIN_ARGS = ["--arrays", "arrays", "--label-map", "label_map.json", "--index", "index.csv", "--data-plots", "plots"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Arrays big enough that one epoch takes a noticeable time (so a kill lands mid-run)."""
    root = tmp_path_factory.mktemp("reliability")
    prepare_data(root, SyntheticSource(120, 4, seed=5, classes=list(FER_CLASSES)), DataParams(dedup="keep", seed=5))
    return root


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW_"))}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", **extra}


def _train_cmd(params: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "stages" / "train.py"), "--params", str(params), *TRAIN_ARGS,
        "--model", str(out / "model.keras"), "--metrics", str(out / "train.json"), "--history", str(out / "history.csv"),
        "--run-file", str(out / "run.json"), "--work-dir", str(out / "work"),
    ]  # fmt: skip


# The train stage, paused at the end of epoch N (after every callback, the per-epoch backup
# included, has run): it writes the marker file, then waits for a `<marker>.go` file that may
# never come. A kill then lands between epochs N and N+1 by construction, not by how fast a
# poll catches it.
PAUSED_TRAIN = """
import runpy, sys, time
from pathlib import Path
import ferflow.model.training as training
marker, after_epoch, stage_argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
logged = training.EpochLogger.on_epoch_end

def on_epoch_end(self, epoch, logs=None):
    logged(self, epoch, logs)
    if epoch + 1 == after_epoch:
        Path(marker).write_text(str(epoch + 1))
        while not Path(marker + ".go").exists():
            time.sleep(0.05)

training.EpochLogger.on_epoch_end = on_epoch_end
sys.argv = stage_argv
sys.path.insert(0, str(Path(stage_argv[0]).parent))  # as running the script would (stages/project_python.py)
runpy.run_path(stage_argv[0], run_name="__main__")
"""


def _paused_train(params: Path, out: Path, workdir: Path, env: Path | dict[str, str], after_epoch: int) -> subprocess.Popen:
    """The train stage, started and waited for until it pauses after `after_epoch` (see PAUSED_TRAIN)."""
    marker = out.parent / f"{out.name}.paused"
    cmd = [sys.executable, "-c", PAUSED_TRAIN, str(marker), str(after_epoch), *_train_cmd(params, out)[1:]]
    env = _env(env) if isinstance(env, Path) else env
    proc = subprocess.Popen(cmd, cwd=workdir, env={**env, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "train ended"
        assert time.monotonic() < deadline, f"training did not reach the end of epoch {after_epoch}"
        time.sleep(0.1)  # only how soon the test notices, not what it tests
    return proc


def _resume_params(path: Path) -> Path:
    overrides = {
        "train": {
            **TINY_OVERRIDES["train"],
            "epochs": 4,
            "batch_size": 16,
            "early_stopping_patience": 10,
            "mixed_precision": "float32",
        }
    }
    write_params(path, overrides)
    return path


def _history_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().strip().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_resumes_from_last_epoch(workdir, tmp_path):
    import mlflow

    params = _resume_params(tmp_path / "params.yaml")
    killed = resumed = tmp_path / "killed"
    clean = tmp_path / "straight"
    proc = _paused_train(params, killed, workdir, tmp_path, after_epoch=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _history_rows(killed / "work" / "history.csv") == 2
    assert (killed / "work" / "backup").exists()
    assert not (killed / "model.keras").exists()  # no half-written model left behind
    run_id = json.loads((killed / "run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "RUNNING"  # SIGKILL cannot be caught

    # DVC deletes a stage's outputs before rerunning it: do the same
    for name in ("run.json", "history.csv", "train.json"):
        (killed / name).unlink(missing_ok=True)
    rerun = subprocess.run(_train_cmd(params, resumed), cwd=workdir, env=_env(tmp_path), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "Epoch 3/4" in log and "Epoch 1/4" not in log and "Epoch 2/4" not in log
    summary = json.loads((resumed / "train.json").read_text())
    assert summary["resumed"] is True and summary["epochs_run"] == 4
    assert [int(r.split(",")[0]) for r in (resumed / "history.csv").read_text().splitlines()[1:]] == [1, 2, 3, 4]
    run = mlflow.MlflowClient().get_run(json.loads((resumed / "run.json").read_text())["run_id"])
    assert run.info.run_id == run_id  # the same run continues
    assert run.info.status == "FINISHED" and run.data.tags["ferflow.resumed"] == "true"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")] == [1, 2, 3, 4]
    assert not (resumed / "work").exists()

    # the same seed without interruption: on CPU with op determinism the weights match
    straight = subprocess.run(_train_cmd(params, clean), cwd=workdir, env=_env(tmp_path), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    import keras

    a = keras.models.load_model(resumed / "model.keras", compile=False).get_weights()
    b = keras.models.load_model(clean / "model.keras", compile=False).get_weights()
    max_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    assert max_diff == 0.0, f"resumed and uninterrupted weights differ by up to {max_diff}"


@pytest.mark.slow
def test_a_backup_cut_short_by_a_kill_resumes_from_the_epoch_before(workdir, tmp_path):
    """Keras writes the per-epoch backup in place: a kill during that write leaves a truncated
    weights file (made here by truncating it after the kill). The rerun falls back to the
    previous epoch's backup instead of failing to load it."""
    params = _resume_params(tmp_path / "params.yaml")
    out = tmp_path / "out"
    proc = _paused_train(params, out, workdir, tmp_path, after_epoch=2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = out / "work" / "backup" / "latest.weights.h5"
    assert (latest.parent / "latest.weights.h5.bkp").exists()  # epoch 1's backup, kept beside it
    with open(latest, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) // 2)
    for name in ("run.json", "history.csv", "train.json"):  # as DVC deletes a stage's outputs
        (out / name).unlink(missing_ok=True)
    rerun = subprocess.run(_train_cmd(params, out), cwd=workdir, env=_env(tmp_path), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "Epoch 2/4" in log and "Epoch 1/4" not in log  # from the backup before the cut one
    summary = json.loads((out / "train.json").read_text())
    assert summary["resumed"] is True and summary["epochs_run"] == 4
    assert (out / "model.keras").stat().st_size > 0 and not (out / "work").exists()


@pytest.mark.slow
def test_params_changed_after_a_kill_discard_the_backup_and_mark_the_orphaned_run_killed(workdir, tmp_path):
    """What a SIGKILL leaves (a RUNNING run recorded in the work dir, a per-epoch backup made
    with other params), built directly so no timing decides it; then the train stage reruns."""
    import mlflow

    from ferflow.core import files

    params = _resume_params(tmp_path / "params.yaml")
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient().create_experiment("ferflow", artifact_location=(tmp_path / "art").as_uri())
    orphan = mlflow.MlflowClient().create_run(experiment, run_name="killed").info.run_id
    (out / "work" / "backup").mkdir(parents=True)
    (out / "work" / "backup" / "training_metadata.json").write_text('{"epoch": 1}')
    files.write_json(out / "work" / "mlflow_run.json", {"run_id": orphan, "tracking_uri": uri, "complete": False})
    files.write_json(out / "work" / "train_params.json", {"learning_rate": 0.5})  # another configuration
    files.write_json(out / "work" / "history.csv", {})  # stale: must not be read as this run's history

    rerun = subprocess.run(_train_cmd(params, out), cwd=workdir, env=_env(tmp_path), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Epoch 1/4" in rerun.stdout + rerun.stderr  # from the start: the backup was not used
    summary = json.loads((out / "train.json").read_text())
    assert summary["resumed"] is False and summary["epochs_run"] == 4
    client = mlflow.MlflowClient()
    assert client.get_run(orphan).info.status == "KILLED"
    new = json.loads((out / "run.json").read_text())["run_id"]
    assert new != orphan and client.get_run(new).info.status == "FINISHED"
    assert "ferflow.resumed" not in client.get_run(new).data.tags
    assert not (out / "work").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_tracking_server_fails_before_the_first_epoch(workdir, tmp_path):
    params = tmp_path / "params.yaml"
    write_params(params, TINY_OVERRIDES)
    uri = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run(
        _train_cmd(params, tmp_path / "out"),
        cwd=workdir,
        env=_env(tmp_path, MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"MLflow tracking store '{uri}' is not reachable" in proc.stderr
    assert "unset MLFLOW_TRACKING_URI" in proc.stderr
    assert "Epoch 1/" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out" / "model.keras").exists()


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_leaves_a_resumable_backup(workdir, tmp_path):
    import mlflow

    params = _resume_params(tmp_path / "params.yaml")
    out = tmp_path / "out"
    proc = _paused_train(params, out, workdir, tmp_path, after_epoch=1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.MlflowClient().get_run(run_id).info.status == "KILLED"
    assert (out / "work" / "backup").exists() and not (out / "model.keras").exists()


@contextlib.contextmanager
def _mlflow_server(port: int, db: Path, cwd: Path) -> Iterator[subprocess.Popen]:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
        cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield server
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.slow
def test_tracking_server_lost_mid_run_keeps_the_trained_model(workdir, tmp_path):
    port = free_port()
    with _mlflow_server(port, tmp_path / "server.db", tmp_path) as server:
        params = _resume_params(tmp_path / "params.yaml")
        out = tmp_path / "out"
        uri = f"http://127.0.0.1:{port}"
        proc = _paused_train(params, out, workdir, _env(tmp_path, MLFLOW_TRACKING_URI=uri), after_epoch=1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        (out.parent / f"{out.name}.paused.go").touch()  # epochs 2-4 log to a server that is gone
        output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "MLflow logging failed at epoch" in output and "training continues" in output
    assert (out / "model.keras").stat().st_size > 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["epochs_run"] == 4 and summary["tracking_error"]

    # completing the run later (docs/team.md): the server is back, evaluate reruns (as `dvc repro` would)
    with _mlflow_server(port, tmp_path / "server.db", tmp_path):
        evaluate = subprocess.run(
            [sys.executable, str(REPO / "stages" / "evaluate.py"), "--params", str(params), "--arrays", "arrays",
             "--label-map", "label_map.json", "--model", str(out / "model.keras"), "--history", str(out / "history.csv"),
             "--run-file", str(out / "run.json"), "--metrics", str(out / "eval.json"),
             "--predictions", str(out / "predictions.csv"), "--plots", str(out / "plots"),
             "--summary", str(out / "summary.json"), "--calibration", str(out / "calibration.json")],
            cwd=workdir, env=_env(tmp_path, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert evaluate.returncode == 0, evaluate.stderr[-3000:]
        import mlflow

        client = mlflow.MlflowClient(uri)
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        completed = client.get_run(run_id)
        assert completed.info.status == "FINISHED" and "test_accuracy" in completed.data.metrics
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [1, 2, 3, 4]  # the lost epochs too


@pytest.fixture
def sqlite_run(tmp_path):
    """A RUNNING run in a fresh sqlite store; the global tracking URI is restored after."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id="0")  # an earlier test's set_experiment would not match the run's
    run_id = mlflow.MlflowClient().create_run("0").info.run_id
    yield run_id
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(before)


@pytest.fixture
def signal_inside_metric_insert():
    """Send this process SIGTERM from inside SQLAlchemy after MLflow's metric INSERT ran and
    before its commit: the moment that left the store locked and the run RUNNING in CI."""
    import sqlalchemy

    sent = []

    def on_execute(conn, cursor, statement, *args):  # noqa: ARG001
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGTERM)

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", on_execute)
    yield sent
    sqlalchemy.event.remove(sqlalchemy.engine.Engine, "after_cursor_execute", on_execute)


def test_sigterm_during_a_metric_write_is_raised_after_it_and_the_run_is_killed(sqlite_run, signal_inside_metric_insert):
    import mlflow

    from ferflow.tracking.signals import interrupts_held, run_status_guard

    mlflow.start_run(run_id=sqlite_run)
    after_write = []
    with pytest.raises(BaseException, match="signal 15") as raised:
        with run_status_guard(sqlite_run):
            with interrupts_held():
                mlflow.log_metrics({"val_accuracy": 0.5, "val_loss": 1.0}, step=1)
                after_write.append(True)  # the section runs to its end before the signal is raised
    assert signal_inside_metric_insert, "the SIGTERM was never sent"
    run = mlflow.MlflowClient().get_run(sqlite_run)
    assert run.info.status == "KILLED"
    assert type(raised.value).__name__ == "_Interrupted" and after_write == [True]
    assert run.data.metrics == {"val_accuracy": 0.5, "val_loss": 1.0}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard put the old handler back


def test_a_second_signal_inside_a_held_section_raises_at_once(sqlite_run):
    from ferflow.tracking.signals import interrupts_held, run_status_guard

    reached = []
    # default_int_handler, or SIG_IGN when pytest was started in the background by a script
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with run_status_guard(sqlite_run):
            with interrupts_held():
                os.kill(os.getpid(), signal.SIGINT)
                reached.append("after first")  # held: execution goes on
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
                reached.append("after second")
    import mlflow

    assert reached == ["after first"]
    assert mlflow.MlflowClient().get_run(sqlite_run).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is handler_before  # the guard put the old handler back
