"""Write failures (issue #20 item 6): one line naming the path, stale temp dirs cleaned,
the stage that failed recorded on the MLflow run."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferflow.core import files
from ferflow.core.stage import run

REPO = Path(__file__).resolve().parents[2]


def test_enospc_names_the_file_being_written(tmp_path, monkeypatch):
    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path / 'm.json'}'") as info:
        files.write_json(tmp_path / "m.json", {"a": 1})
    assert info.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # no temp file left


def test_a_stage_that_cannot_write_prints_one_line_naming_the_path(tmp_path, capsys):
    def main(_args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "metrics" / "x.json"))

    with pytest.raises(SystemExit) as info:
        run(main, None, "evaluate")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evaluate: error: {tmp_path / 'metrics' / 'x.json'}: Permission denied"


def as_a_user_who_respects_permissions() -> list[str]:
    """A command prefix under which read-only really is read-only: root (CI) keeps its uid but
    loses the capabilities that override file permissions (util-linux setpriv)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def test_read_only_metrics_folder_is_one_line_in_a_real_stage_process(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics").chmod(0o500)
    code = "from ferflow.core import files; from ferflow.core.stage import run; run(lambda a: files.write_json('metrics/x.json', {}), None, 'evaluate')"
    proc = subprocess.run(
        [*as_a_user_who_respects_permissions(), sys.executable, "-c", code],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    # the output as the stage named it, not the hidden temp file beside it
    assert proc.stderr.strip() == "evaluate: error: metrics/x.json: Permission denied", proc.stderr
    assert os.listdir(tmp_path / "metrics") == []


def test_a_read_only_output_folder_names_the_output_not_its_temp_dir(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models").chmod(0o500)
    code = "from ferflow.core import files; from ferflow.core.stage import run\n"
    code += "def main(_):\n    with files.atomic_dir('models/export') as tmp:\n        (tmp / 'MLmodel').write_text('x')\n"
    code += "run(main, None, 'export')"
    proc = subprocess.run(
        [*as_a_user_who_respects_permissions(), sys.executable, "-c", code],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "export: error: models/export: Permission denied", proc.stderr


def test_temp_dirs_of_a_killed_writer_are_removed_by_the_next_one(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".export.{dead_pid}.abcd1234.tmp"
    stale.mkdir()
    (stale / "MLmodel").write_text("half")
    live = tmp_path / f".export.{os.getpid()}.efgh5678.tmp"  # a writer still running: kept
    live.mkdir()
    with files.atomic_dir(tmp_path / "export") as tmp:
        (tmp / "MLmodel").write_text("whole")
    assert not stale.exists() and live.exists()
    assert (tmp_path / "export" / "MLmodel").read_text() == "whole"


def test_a_later_stage_failing_tags_the_run_with_the_stage(tmp_path, monkeypatch):
    import mlflow

    from ferflow.tracking.signals import run_status_guard

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")
    monkeypatch.setenv("FERFLOW_STAGE", "export")
    with pytest.raises(OSError), run_status_guard(run_id):
        raise OSError(errno.ENOSPC, "No space left on device", "models/export")
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FAILED"
    assert run_info.data.tags["ferflow.failed_stage"] == "export"
    assert "No space left on device" in run_info.data.tags["ferflow.failed_error"]
    with run_status_guard(run_id):  # the rerun succeeds: the failure tags go
        pass
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED" and "ferflow.failed_stage" not in run_info.data.tags


KILLED_MID_WRITE = """
import sys, time
from pathlib import Path
from ferflow.core import files
target, marker = Path(sys.argv[1]), Path(sys.argv[2])
with files.atomic_path(target) as tmp:
    with open(tmp, "wb") as fh:
        fh.write(b"half of the new content")
        fh.flush()
        marker.touch()  # the parent kills the writer now, mid-write
        time.sleep(600)
"""


def test_a_writer_killed_mid_write_leaves_the_old_file_under_the_real_name(tmp_path):
    target, marker = tmp_path / "metrics.json", tmp_path / "writing"
    files.write_json(target, {"accuracy": 0.5})
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE, str(target), str(marker)], env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert files.read_json(target) == {"accuracy": 0.5}  # never the half-written bytes
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".metrics.json.")]
    assert temp.read_bytes() == b"half of the new content"


def test_a_json_file_with_a_key_twice_is_an_error_naming_file_and_key(tmp_path):
    """#30: json.loads keeps the last of two values silently."""
    path = tmp_path / "serve_config.json"
    path.write_text('{"tta": "none", "detect_face": true, "tta": "tencrop"}')
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON \(duplicate key 'tta' \(each key once\)\)"):
        files.read_json(path)
    path.write_text('{"tta": "none", "nested": {"a": 1, "b": 2}}')
    assert files.read_json(path) == {"tta": "none", "nested": {"a": 1, "b": 2}}
