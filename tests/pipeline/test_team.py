"""A team on several machines (docs/team.md), tested for real on loopback.

- one PostgreSQL + `mlflow server` (basic-auth, users in PostgreSQL, proxied artifacts) per
  test session: two queued experiments run by two parallel DVC workers land in it, and the
  champion is served from it after the training clone is deleted;
- fail-fast and clear messages for a PostgreSQL store that is down and for missing or
  wrong credentials;
- data, models and experiments shared through a bare git remote and a DVC directory remote.

Without PostgreSQL's server programs the server tests skip, saying why; under CI=true they fail.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from PIL import Image

from conftest import TINY_OVERRIDES, clone_repo, run, write_params
from ferflow.core.classes import FER_CLASSES
from ferflow.data.sources.synthetic import generate_face
from ferflow.tracking.server import ADMIN_USER, TeamServer, free_port, postgres_binary, postgres_missing
from ferflow.tracking.store import TrackingError, configure

GIT = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
MODEL_NAME = "ferflow-emotion"
SERVER_ARTIFACTS = ("evaluation/confusion_matrix.png", "evaluation/training_curves.png", "model_summary.txt", "params.yaml")


def tiny_project(dest: Path, **data: object) -> Path:
    repo = clone_repo(dest)
    overrides = copy.deepcopy(TINY_OVERRIDES)
    overrides["train"]["epochs"] = 1
    overrides["data"].update(data)
    write_params(repo / "params.yaml", overrides)
    run([*GIT, "commit", "-qam", "tiny params"], repo)
    return repo


def face_png_b64(seed: int = 3) -> str:
    buf = io.BytesIO()
    Image.fromarray(generate_face(np.random.default_rng(seed), "happy")).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(autouse=True)
def patient_client(monkeypatch):
    """MLflow's client gives up on a request after 10 s; a loaded 2-core CI machine running the
    server, PostgreSQL and the suite can take longer than that to answer one."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")


@pytest.fixture(scope="session")
def team_server():
    """PostgreSQL + mlflow server with basic-auth, on loopback, for the whole session."""
    reason = postgres_missing()
    if reason:  # CI installs PostgreSQL (Makefile `system-deps`): there a missing one is a failure
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(reason)
    # as root PostgreSQL runs as the `postgres` system user, which must be able to enter the state folder
    state = Path(tempfile.mkdtemp(prefix="ferflow-team-"))
    state.chmod(0o755)
    server = TeamServer(state, port=free_port(), auth=True, workers=1)
    try:
        with server:
            yield server
    finally:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def as_admin(team_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", team_server.secrets["admin_password"])
    return {
        "MLFLOW_TRACKING_URI": team_server.url,
        "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
        "MLFLOW_TRACKING_PASSWORD": team_server.secrets["admin_password"],
    }


@pytest.fixture
def restore_tracking_uri():
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


# ---------------------------------------------------------------- the store's own checks (no server needed)


def test_experiment_artifacts_go_to_the_server_for_http_and_to_the_repo_for_local_stores(tmp_path):
    from ferflow.tracking.store import artifact_location

    assert artifact_location("http://mlflow.internal:5000", tmp_path) is None  # the server's artifact store decides
    assert artifact_location("https://mlflow.example.com", tmp_path) is None
    assert artifact_location(f"sqlite:///{tmp_path}/mlflow.db", tmp_path) == (tmp_path / "mlartifacts").as_uri()


@pytest.mark.usefixtures("restore_tracking_uri")
def test_postgres_store_that_is_down_fails_fast_naming_the_uri_without_its_password(monkeypatch, tmp_path):
    import sqlalchemy

    uri = f"postgresql+psycopg://ferflow:s3cret-pw@127.0.0.1:{free_port()}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    attempts = []

    def count(_dialect, _record, _args, kwargs):
        attempts.append(kwargs.get("connect_timeout"))

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "do_connect", count)
    try:
        with pytest.raises(TrackingError) as err:
            configure(tmp_path)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "do_connect", count)
    # fails fast by construction: one connection attempt with a 10 s timeout, never MLflow's
    # own store, which retries a refused connection for ~100 s
    assert attempts == [10]
    message = str(err.value)
    assert "postgresql+psycopg://ferflow:***@127.0.0.1:" in message and "is not reachable" in message
    assert "s3cret-pw" not in message and "\n" not in message


@pytest.mark.usefixtures("restore_tracking_uri")
def test_workers_racing_to_create_the_experiment_all_use_the_one_created(tmp_path, monkeypatch):
    """Two queue workers on an empty store: both look the experiment up, find none, create it;
    the loser got RESOURCE_ALREADY_EXISTS and failed its experiment (seen with `-j 2`)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    winner = mlflow.MlflowClient(uri).create_experiment("ferflow")
    real_lookup = mlflow.MlflowClient.get_experiment_by_name
    lookups = []

    def lookup_before_the_winner_created_it(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else real_lookup(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", lookup_before_the_winner_created_it)
    assert configure(tmp_path) == winner and len(lookups) == 2


# ---------------------------------------------------------------- against the team server


@pytest.mark.usefixtures("restore_tracking_uri")
def test_server_refuses_clients_without_or_with_wrong_credentials_naming_the_variables(team_server, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.url)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(
        TrackingError, match=r"refused the request \(HTTP 401\).*set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    ):
        configure(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(TrackingError, match=r"user 'admin' was not accepted.*check MLFLOW_TRACKING_PASSWORD"):
        configure(tmp_path)
    # stages print this TrackingError as one line and exit 2, like the unreachable server in
    # tests/pipeline/test_reliability.py::test_unreachable_tracking_server_fails_before_the_first_epoch


def test_a_teammate_account_created_as_docs_team_md_shows_can_log_runs_once_granted_edit(team_server, as_admin, monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    name, password = f"ana{free_port()}", secrets.token_urlsafe(16)
    auth = get_app_client("basic-auth", tracking_uri=team_server.url)  # as admin (as_admin's variables)
    auth.create_user(username=name, password=password)
    experiment_id = mlflow.MlflowClient(team_server.url).create_experiment(f"permissions-{name}")
    model = mlflow.MlflowClient(team_server.url).create_registered_model(f"model-{name}").name

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    teammate = mlflow.MlflowClient(team_server.url)
    assert teammate.get_experiment(experiment_id).name == f"permissions-{name}"  # default_permission = READ
    with pytest.raises(MlflowException, match="403"):
        teammate.create_run(experiment_id)
    with pytest.raises(MlflowException, match="403"):
        teammate.set_registered_model_tag(model, "owner", name)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", as_admin["MLFLOW_TRACKING_PASSWORD"])
    auth.grant_user_permission(name, "experiment", experiment_id, "EDIT")
    auth.grant_user_permission(name, "registered_model", model, "EDIT")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    run_id = teammate.create_run(experiment_id).info.run_id
    teammate.log_metric(run_id, "test_accuracy", 0.5)
    teammate.set_terminated(run_id, "FINISHED")
    assert teammate.get_run(run_id).info.status == "FINISHED"
    teammate.set_registered_model_tag(model, "owner", name)
    assert teammate.get_registered_model(model).tags["owner"] == name


@pytest.mark.usefixtures("restore_tracking_uri")
def test_wrong_database_password_fails_fast_without_printing_it(team_server, monkeypatch, tmp_path):
    uri = f"postgresql+psycopg://ferflow:wrong-pw@127.0.0.1:{team_server.pg_port}/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError, match="password authentication failed") as err:
        configure(tmp_path)
    assert "wrong-pw" not in str(err.value) and f"ferflow:***@127.0.0.1:{team_server.pg_port}" in str(err.value)


@pytest.mark.slow
def test_two_parallel_workers_log_everything_to_the_team_server_and_the_champion_outlives_the_clone(
    team_server, as_admin, tmp_path
):
    import mlflow

    from support import local_server

    repo = tiny_project(tmp_path / "clone-a")
    run(["dvc", "exp", "run", "--queue", "-S", "train.seed=7,8"], repo, env=as_admin)
    run(["dvc", "queue", "start", "-j", "2"], repo, env=as_admin)
    deadline = time.monotonic() + 600
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not re.search(r"\b(Queued|Running|Preparing)\b", status):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    run(["dvc", "queue", "stop"], repo)
    assert status.count("Success") == 2, status

    exp_names = set(run(["dvc", "exp", "list", "--name-only"], repo).stdout.split())
    client = mlflow.MlflowClient(team_server.url)
    experiment = client.get_experiment_by_name("ferflow")
    assert experiment.artifact_location.startswith("mlflow-artifacts:/")  # the server's store, not a path of clone A
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_name for r in runs} == exp_names and len(runs) == 2
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["dvc.exp.name"] == r.info.run_name
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")] == [1]
        assert {"test_accuracy", "test_macro_f1", "train_time_s"} <= set(r.data.metrics)
        listed = {a.path for a in client.list_artifacts(r.info.run_id)} | {
            a.path for a in client.list_artifacts(r.info.run_id, "evaluation")
        }
        assert set(SERVER_ARTIFACTS) <= listed
        stored = list(team_server.artifacts.rglob(f"{r.info.run_id}/artifacts/evaluation/confusion_matrix.png"))
        assert len(stored) == 1 and stored[0].stat().st_size > 0  # in the server's --artifacts-destination
    assert not (repo / "mlartifacts").exists() and not (repo / "mlflow.db").exists()

    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert len(versions) == 2 and {v.run_id for v in versions} <= {r.info.run_id for r in runs}
    # two exports raced to move the alias: the better model holds it (no lost update)
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert float(champion.tags["test_accuracy"]) == max(float(v.tags["test_accuracy"]) for v in versions)

    shutil.rmtree(repo)  # the training clone is gone: the model must come from the server
    other = tmp_path / "clone-b"
    other.mkdir()
    with local_server(f"models:/{MODEL_NAME}@champion", env=as_admin, log_path=other / "serve.log") as url:
        response = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": face_png_b64()}]}, timeout=120)
    assert response.status_code == 200, response.text[:2000]
    (row,) = response.json()["predictions"]
    assert row["label"] in FER_CLASSES and 0 < row["confidence"] <= 1


# ---------------------------------------------------------------- git + DVC remotes (no server needed)


def write_fer_zip(path: Path, train_per_class: int, test_per_class: int) -> Path:
    """A FER-2013-style zip (train/<class>/*.png, test/<class>/*.png) of synthetic faces."""
    rng = np.random.default_rng(11)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for name in FER_CLASSES:
                for i in range(count):
                    buf = io.BytesIO()
                    Image.fromarray(generate_face(rng, name)).save(buf, format="PNG")
                    zf.writestr(f"{split}/{name}/{i:04d}.png", buf.getvalue())
    return path


@pytest.mark.slow
def test_fresh_clone_gets_data_model_and_experiment_through_git_and_dvc_remotes_without_training(tmp_path):
    import mlflow

    origin, store = tmp_path / "origin.git", tmp_path / "dvc-store"
    run(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    a = tiny_project(tmp_path / "a", source="data/faces.zip")
    # the dataset lives in the repo, versioned by DVC: `data.source` means the same on every machine
    write_fer_zip(a / "data" / "faces.zip", train_per_class=30, test_per_class=8)
    run(["dvc", "add", "data/faces.zip"], a)
    run(["dvc", "remote", "add", "-d", "shared", str(store)], a)
    run([*GIT, "add", "data/faces.zip.dvc", "data/.gitignore", ".dvc/config"], a)
    run([*GIT, "commit", "-qm", "dataset under DVC, shared remote"], a)
    run(["git", "remote", "add", "origin", str(origin)], a)
    run(["git", "push", "-q", "origin", "HEAD"], a)
    run(["dvc", "push"], a)

    run(["dvc", "exp", "run", "-n", "shared-exp"], a)
    run(["dvc", "exp", "push", "origin", "shared-exp"], a)
    run(["dvc", "push"], a)

    b = tmp_path / "b"
    run(["git", "clone", "-q", str(origin), str(b)], tmp_path)
    assert not (b / "data" / "faces.zip").exists() and not (b / "models").exists()
    run(["dvc", "exp", "pull", "origin", "shared-exp"], b)
    run(["dvc", "exp", "apply", "shared-exp"], b)
    run(["dvc", "pull"], b)
    for rel in ("data/faces.zip", "models/model.keras", "data/arrays/test.npz"):
        assert (b / rel).read_bytes() == (a / rel).read_bytes(), rel
    for rel in ("metrics/eval.json", "metrics/train.json"):
        assert json.loads((b / rel).read_text()) == json.loads((a / rel).read_text()), rel
    assert yaml.safe_load((b / "params.yaml").read_text())["data"]["source"] == "data/faces.zip"

    out = run(["dvc", "repro"], b).stdout
    assert "Running stage" not in out and "up to date" in out, out
    model = mlflow.pyfunc.load_model(str(b / "models" / "export"))  # B serves what A trained
    (label,) = model.predict(pd.DataFrame({"image": [face_png_b64()]}))["label"]
    assert label in FER_CLASSES


# ---------------------------------------------------------------- the `ferflow tracking-server` command


def test_tracking_server_command_without_postgresql_says_what_to_install(tmp_path, monkeypatch, capsys):
    from ferflow import cli
    from ferflow.tracking import server

    monkeypatch.setattr(server, "postgres_binary", lambda _name: None)
    assert cli.main(["tracking-server", "--dir", str(tmp_path / "state")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tracking-server: error: PostgreSQL server programs not found (initdb, pg_ctl, postgres)")
    assert "apt-get install -y postgresql" in line


@pytest.mark.skipif(os.geteuid() != 0 or bool(postgres_missing()), reason="needs root and PostgreSQL's server programs")
def test_as_root_a_state_folder_postgres_cannot_enter_is_refused_naming_the_user(tmp_path, capsys, monkeypatch):
    from ferflow import cli

    monkeypatch.delenv("FERFLOW_PG_OS_USER", raising=False)
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)  # pytest's tmp_path is 0700 too: `postgres` cannot enter it
    assert cli.main(["tracking-server", "--dir", str(hidden / "state"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "PostgreSQL runs as user 'postgres' (it refuses root) and cannot reach" in err and "Traceback" not in err
    assert not (hidden / "state" / "pgdata").exists()


@pytest.mark.usefixtures("as_admin")
def test_the_project_names_are_reserved_for_the_admin_and_the_folders_are_private(team_server, monkeypatch):
    """#30 item 3: on a fresh server a READ user could create `ferflow` / `ferflow-emotion`
    before the pipeline did, and own them; artifacts/ was world-readable."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    admin = mlflow.MlflowClient(team_server.url)
    experiment = admin.get_experiment_by_name("ferflow")
    assert experiment is not None and admin.get_registered_model("ferflow-emotion").name == "ferflow-emotion"
    name, password = f"late{free_port()}", secrets.token_urlsafe(16)
    get_app_client("basic-auth", tracking_uri=team_server.url).create_user(username=name, password=password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", name)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    reader = mlflow.MlflowClient(team_server.url)
    with pytest.raises(MlflowException, match="already exists"):
        reader.create_experiment("ferflow")
    with pytest.raises(MlflowException, match="403"):  # READ: it may look, not log
        reader.create_run(experiment.experiment_id)
    with pytest.raises(MlflowException, match="403"):
        reader.set_registered_model_tag("ferflow-emotion", "owner", name)
    assert team_server.artifacts.stat().st_mode & 0o777 == 0o700
    assert (team_server.state_dir / "logs").stat().st_mode & 0o077 == 0
    assert team_server.state_dir.stat().st_mode & 0o777 == (0o711 if os.geteuid() == 0 else 0o700)


def test_a_port_another_program_holds_is_refused_before_anything_starts(tmp_path, capsys):
    """#30 item 3: its own `mlflow server` failed to bind, and another server's /health made it report ready."""
    import socket

    from ferflow import cli

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert cli.main(["tracking-server", "--dir", str(tmp_path / "state"), "--port", str(port)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"tracking-server: error: 127.0.0.1:{port} is already in use by another program")
    assert not (tmp_path / "state").exists()


def test_the_server_command_stops_with_one_line_when_postgres_or_mlflow_dies(tmp_path, capsys, monkeypatch):
    """#30 item 3: PostgreSQL dying went unnoticed (the server kept running, /health said 200)."""
    import subprocess
    import sys

    from ferflow.tracking import server as team

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    state = tmp_path / "state"
    (state / "pgdata").mkdir(parents=True)
    pid_file = state / "pgdata" / "postmaster.pid"
    server = TeamServer(state, port=free_port())
    server._mlflow = alive
    try:
        pid_file.write_text(f"{gone.stdout.strip()}\n{state / 'pgdata'}\n")  # its postmaster is gone
        assert server.wait(poll_s=0.01).startswith("PostgreSQL stopped; see ")
        pid_file.write_text(f"{os.getpid()}\n")  # PostgreSQL alive, the mlflow server dies
        alive.kill()
        alive.wait()
        assert server.wait(poll_s=0.01).startswith("the mlflow server exited (-9)")
    finally:
        alive.kill()

    # the command: one line on stderr, exit 1, everything it started stopped
    pid_file.write_text(f"{gone.stdout.strip()}\n")
    stopped = []
    monkeypatch.setattr(
        team.TeamServer, "start", lambda self: setattr(self, "_mlflow", subprocess.Popen(["sleep", "60"])) or self
    )
    monkeypatch.setattr(team.TeamServer, "stop", lambda self: stopped.append(self._mlflow.kill()))
    assert cli_main(["tracking-server", "--dir", str(state)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tracking-server: error: PostgreSQL stopped; see ") and stopped


def cli_main(argv: list[str]) -> int:
    from ferflow import cli

    return cli.main(argv)


# ---------------------------------------------------------------- #30: database errors and the PostgreSQL OS user


def _stop_postgres_under(server: TeamServer) -> None:
    """PostgreSQL dies under a running mlflow server (`-m immediate`: as a crash would)."""
    from ferflow.tracking.server import _as_postgres_user

    run([*_as_postgres_user(), postgres_binary("pg_ctl"), "-D", str(server.pgdata), "-m", "immediate", "-w", "stop"], Path.cwd())


def _assert_no_database_detail(response: requests.Response, server: TeamServer) -> None:
    for detail in ("psycopg", "OperationalError", "Connection refused", "127.0.0.1", str(server.pg_port), "sqlalche"):
        assert detail not in response.text, (response.status_code, response.text[:500])


def test_database_errors_never_reach_a_caller_in_a_response_body():
    """#30: with PostgreSQL down, MLflow answered 503 with the database's host, port and driver
    error, with basic-auth to any caller sending credentials (checking them needs the database),
    without auth to everyone. No watch runs here (TeamServer, not the command): the window
    stays open as long as the test needs, so nothing races."""
    from ferflow.tracking.mlflow_app import UNAVAILABLE_MESSAGE

    reason = postgres_missing()
    if reason:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(reason)
    state = Path(tempfile.mkdtemp(prefix="ferflow-down-"))
    state.chmod(0o755)  # as root, PostgreSQL's own user enters it
    server = TeamServer(state, port=free_port(), auth=True, workers=1)
    api = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    generic = {"error_code": "TEMPORARILY_UNAVAILABLE", "message": UNAVAILABLE_MESSAGE}
    try:
        server.start()
        admin = base64.b64encode(f"{ADMIN_USER}:{server.secrets['admin_password']}".encode()).decode()
        assert requests.get(api, headers={"Authorization": f"Basic {admin}"}, timeout=60).status_code == 200
        _stop_postgres_under(server)
        anonymous = requests.get(api, timeout=60)
        assert anonymous.status_code == 401
        _assert_no_database_detail(anonymous, server)
        for user, password in ((ADMIN_USER, server.secrets["admin_password"]), ("mallory", "guess")):
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            answer = requests.get(api, headers={"Authorization": f"Basic {token}"}, timeout=60)
            assert answer.status_code == 503 and answer.json() == generic, answer.text[:500]
            _assert_no_database_detail(answer, server)

        # without --auth (its own MLflow app): every caller is anonymous
        server.stop_mlflow()
        server._start_postgres()
        server.auth = False
        server._start_mlflow()
        assert requests.get(api, timeout=60).status_code == 200
        _stop_postgres_under(server)
        answer = requests.get(api, timeout=60)
        assert answer.status_code == 503 and answer.json() == generic, answer.text[:500]
        _assert_no_database_detail(answer, server)
    finally:
        server.stop()
        log = (state / "logs" / "mlflow.log").read_text(errors="replace") if (state / "logs" / "mlflow.log").exists() else ""
        shutil.rmtree(state, ignore_errors=True)
    # the details stay in the server's log, for whoever runs it
    assert log.count("HTTP 503 on GET /api/2.0/mlflow/experiments/search; answered with a generic message") >= 3
    assert f"port {server.pg_port} failed: Connection refused" in log


def test_postgres_runs_as_its_own_os_user_and_the_folders_are_private(team_server):
    """#30: as root PostgreSQL ran as the shared `nobody`; now as the `postgres` system user
    (FERFLOW_PG_OS_USER overrides), as ourselves when not root."""
    import pwd

    pg_user = os.environ.get("FERFLOW_PG_OS_USER") or "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.getuid()).pw_name
    pg_uid = pwd.getpwnam(pg_user).pw_uid
    postmaster = int((team_server.pgdata / "postmaster.pid").read_text().split()[0])
    assert os.stat(f"/proc/{postmaster}").st_uid == pg_uid != pwd.getpwnam("nobody").pw_uid
    assert team_server.pgdata.stat().st_uid == pg_uid and team_server.pgdata.stat().st_mode & 0o777 == 0o700
    assert (team_server.state_dir / "logs").stat().st_uid == pg_uid
    for folder in (team_server.state_dir / "logs", team_server.artifacts):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    assert team_server.artifacts.stat().st_uid == os.getuid()
    assert team_server.state_dir.stat().st_mode & 0o777 == (0o711 if os.geteuid() == 0 else 0o700)


def test_the_postgres_os_user_is_dedicated_overridable_and_never_a_missing_or_root_user(monkeypatch):
    from ferflow.tracking import server as team

    users = {"postgres": 101, "ferflow-pg": 990, "root": 0}
    monkeypatch.setattr(team.pwd, "getpwnam", lambda name: type("pw", (), {"pw_uid": users[name]}))
    monkeypatch.delenv("FERFLOW_PG_OS_USER", raising=False)
    monkeypatch.setattr(team.os, "geteuid", lambda: 1000)
    assert team.postgres_os_user() is None and team._as_postgres_user() == []  # not root: PostgreSQL runs as us
    monkeypatch.setattr(team.os, "geteuid", lambda: 0)
    assert team._as_postgres_user() == ["runuser", "-u", "postgres", "--"]
    monkeypatch.setenv("FERFLOW_PG_OS_USER", "ferflow-pg")
    assert team.postgres_os_user() == "ferflow-pg"
    monkeypatch.setenv("FERFLOW_PG_OS_USER", "root")
    with pytest.raises(team.ServerError, match="is root"):
        team.postgres_os_user()
    monkeypatch.delenv("FERFLOW_PG_OS_USER")
    del users["postgres"]  # no Debian package: refused, never `nobody`
    with pytest.raises(team.ServerError, match=r"user 'postgres' does not exist: install Debian's `postgresql` package"):
        team.postgres_os_user()


@pytest.mark.skipif(os.geteuid() != 0 or bool(postgres_missing()), reason="needs root and PostgreSQL's server programs")
def test_a_cluster_an_earlier_version_ran_as_nobody_is_handed_to_the_postgres_user(monkeypatch):
    import pwd

    monkeypatch.delenv("FERFLOW_PG_OS_USER", raising=False)
    state = Path(tempfile.mkdtemp(prefix="ferflow-owner-"))
    try:
        state.chmod(0o711)
        (state / "logs").mkdir(mode=0o700)
        (state / "pgdata" / "base").mkdir(parents=True)
        (state / "pgdata" / "base" / "1").write_text("x")
        (state / "logs" / "postgres.log").write_text("")
        for path in (
            state / "pgdata",
            state / "pgdata" / "base",
            state / "pgdata" / "base" / "1",
            state / "logs" / "postgres.log",
        ):
            shutil.chown(path, user="nobody")
        TeamServer(state)._hand_cluster_to("postgres")
        uid = pwd.getpwnam("postgres").pw_uid
        assert {p.stat().st_uid for p in [state / "pgdata", *(state / "pgdata").rglob("*")]} == {uid}
        assert (state / "logs" / "postgres.log").stat().st_uid == uid and (state / "logs").stat().st_uid == uid
        assert (state / "pgdata").stat().st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_without_ferflows_mlflow_app_registered_the_command_says_to_reinstall(tmp_path, monkeypatch, capsys):
    """The apps are entry points of the installed ferflow: a checkout used without `pip install -e .`
    (or installed before they existed) would not have them."""
    from ferflow import cli
    from ferflow.tracking import server as team

    monkeypatch.setattr(team, "postgres_missing", lambda: None)
    monkeypatch.setattr(team.importlib.metadata, "entry_points", lambda group: [])  # noqa: ARG005
    assert cli.main(["tracking-server", "--dir", str(tmp_path / "state"), "--port", str(free_port()), "--auth"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("tracking-server: error: MLflow app 'ferflow-basic-auth' is not registered") and "pip install" in line
    assert not (tmp_path / "state").exists()
