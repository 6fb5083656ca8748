"""First use of a shared MLflow store and errors worded by cause (issue #20 item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ferflow.tracking.store import TrackingError, configure, explain_store_error

REPO = Path(__file__).resolve().parents[2]


def _blocked_on(lock_file: Path) -> int:
    """How many processes wait for the flock on `lock_file` (/proc/locks: `-> FLOCK` lines)."""
    inode = lock_file.stat().st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "-> FLOCK" in line and line.split()[-3].endswith(f":{inode}"))


@pytest.mark.slow
def test_three_first_runs_at_once_on_a_fresh_sqlite_store_all_succeed(tmp_path):
    """Before the lock, 2 of 3 failed ("duplicate column name: step", "_alembic_tmp_tags
    already exists"). The test holds the lock itself until all three wait on it, then lets
    them go at once: the interleaving is forced, not left to timing."""
    import fcntl

    db = tmp_path / "shared.db"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    code = "import sys; from ferflow.tracking.store import configure; print(configure(sys.argv[1]))"
    lock_file = db.with_name(db.name + ".ferflow-lock")
    with open(lock_file, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        deadline = time.monotonic() + 120
        while _blocked_on(lock_file) < 3:
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-500:] for p in procs]
            assert time.monotonic() < deadline, f"{_blocked_on(lock_file)} of 3 first runs wait on the store's lock"
            time.sleep(0.1)
        assert not db.exists(), "a first run touched the store while another held its lock"
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-500:] for _, err in outs]
    assert len({out.split()[-1] for out, _ in outs}) == 1  # one experiment


def test_a_corrupt_store_is_called_corrupt_not_unreachable(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not sqlite" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(TrackingError, match="is corrupt or of another MLflow version") as info:
        configure(tmp_path)
    assert "not reachable" not in str(info.value) and "Start the server" not in str(info.value)


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (Exception("(sqlite3.OperationalError) database is locked"), "is locked by another process"),
        (Exception("(sqlite3.DatabaseError) file is not a database"), "is corrupt"),
        (ConnectionError("HTTPConnectionPool: Max retries exceeded (Connection refused)"), "is not reachable"),
        (Exception("API request to http://127.0.0.1:1/api/2.0 failed"), "is not reachable"),
        (RuntimeError("something else"), "cannot be used"),
    ],
)
def test_store_errors_are_worded_by_cause(error, cause):
    message = explain_store_error("sqlite:///x.db", error)
    assert cause in message and "\n" not in message


def test_a_shared_sqlite_store_keeps_artifacts_beside_itself_not_in_a_clone(tmp_path):
    # issue #20 item 2: clone 2's runs lived in clone 1's mlartifacts/
    from ferflow.tracking.store import artifact_location

    shared = tmp_path / "shared" / "mlflow.db"
    for clone in ("clone1", "clone2"):
        assert artifact_location(f"sqlite:///{shared}", tmp_path / clone) == (tmp_path / "shared" / "mlartifacts").as_uri()
    default = tmp_path / "clone1" / "mlflow.db"  # the project store: <root>/mlartifacts, as before
    assert artifact_location(f"sqlite:///{default}", tmp_path / "clone1") == (tmp_path / "clone1" / "mlartifacts").as_uri()
    assert artifact_location("http://127.0.0.1:5000", tmp_path / "clone1") is None  # the server decides


def test_a_sqlite_store_is_switched_to_wal_with_a_long_busy_timeout(tmp_path, monkeypatch):
    """Parallel queue workers share mlflow.db: WAL (readers never block the writer) and a 60 s
    wait for the write lock on every connection MLflow opens, instead of "database is locked"
    after SQLite's 5 s."""
    import sqlite3

    import mlflow
    import sqlalchemy

    from ferflow.tracking.store import SQLITE_BUSY_TIMEOUT_MS, configure

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    previous = mlflow.get_tracking_uri()
    try:
        configure(tmp_path)
    finally:
        mlflow.set_tracking_uri(previous)
    with sqlite3.connect(db) as plain:
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # stored in the file
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")  # as MLflow's store opens its connections
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS == 60_000
    finally:
        engine.dispose()
