"""A local team tracking server: PostgreSQL in its own data folder + `mlflow server` with proxied artifacts.

`ferflow tracking-server` runs it in the foreground for trying the team setup on one machine
(loopback only by default); tests start the same thing once per session. Production
deployments run the same two programs as services: docs/team.md has the exact commands.

Layout of the state folder (kept between starts, so runs and models persist):
    pgdata/        PostgreSQL cluster (owned by the user PostgreSQL runs as)
    artifacts/     MLflow's artifact store, served through the tracking server (`mlflow-artifacts:/`)
    secrets.json   generated database and admin passwords (mode 0600)
    basic_auth.ini MLflow basic-auth config (users in PostgreSQL), written when auth is on
    logs/          postgres.log, mlflow.log

PostgreSQL refuses to run as root; as root, initdb and postgres run through `runuser` as
`FERFLOW_PG_OS_USER`, else as the `postgres` system user that Debian's postgresql package
creates (never a shared user such as `nobody`, whose other processes could reach the cluster).

The mlflow server runs ferflow's MLflow app (`--app-name ferflow` / `ferflow-basic-auth`,
ferflow/tracking/mlflow_app.py): 5xx answers carry a generic message, never the database's
host, port or driver error, which go to logs/mlflow.log only.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.metadata
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ferflow.core import files
from ferflow.core.params import ExportParams
from ferflow.tracking.store import EXPERIMENT_NAME

DB_ROLE = "ferflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
ADMIN_USER = "admin"
REGISTERED_MODEL = ExportParams().registered_model_name  # what the export stage registers by default
PG_OS_USER = "postgres"  # the system user Debian's postgresql package creates
MLFLOW_APPS = {False: "ferflow", True: "ferflow-basic-auth"}  # pyproject.toml's `mlflow.app` entry points, by --auth


class ServerError(RuntimeError):
    pass


def postgres_binary(name: str) -> str | None:
    """`name` (initdb, pg_ctl, postgres) on PATH, else in Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[-3]))
    return versions[-1] if versions else None


def postgres_missing() -> str | None:
    """Why a local PostgreSQL cannot be started here, or None when it can."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if postgres_binary(name) is None]
    if missing:
        return (
            f"PostgreSQL server programs not found ({', '.join(missing)}): install Debian's `postgresql` package "
            "(apt-get install -y postgresql; `.ci/run` does it on CI)"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root and `runuser` is missing: PostgreSQL refuses to run as root"
    try:
        postgres_os_user()
    except ServerError as exc:
        return str(exc)
    return None


def postgres_os_user() -> str | None:
    """The OS user PostgreSQL runs as when this process is root (it refuses root), else None (as ourselves):
    FERFLOW_PG_OS_USER if set, else the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("FERFLOW_PG_OS_USER") or PG_OS_USER
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ServerError(
            f"running as root, PostgreSQL needs an OS user of its own and user {name!r} does not exist: install Debian's "
            "`postgresql` package (it creates `postgres`), or create one (useradd --system ferflow-pg) and set "
            "FERFLOW_PG_OS_USER=ferflow-pg"
        ) from None
    if uid == 0:
        raise ServerError(f"FERFLOW_PG_OS_USER={name!r} is root: PostgreSQL refuses to run as root")
    return name


def mlflow_app_missing(auth: bool) -> str | None:
    """Why ferflow's MLflow app (an entry point of the installed ferflow) is not available, or None."""
    name = MLFLOW_APPS[auth]
    if any(ep.name == name for ep in importlib.metadata.entry_points(group="mlflow.app")):
        return None
    return (
        f"MLflow app {name!r} is not registered: ferflow's entry points come from its installation; "
        "reinstall it (pip install --no-deps -e . ; `make install` does it)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _refuse_a_taken_port(host: str, port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(
                f"{host}:{port} is already in use by another program ({exc.strerror}); stop it or pick another --port"
            ) from None


def _as_postgres_user() -> list[str]:
    """Command prefix that drops root for PostgreSQL (which refuses to run as root)."""
    user = postgres_os_user()
    return ["runuser", "-u", user, "--"] if user else []


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """Files created inside are readable by their owner only (they hold passwords)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def _check(cmd: list[str], what: str, log: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        where = f"; see {log}" if log else ""
        raise ServerError(f"{what} failed (exit {proc.returncode}): {' / '.join(detail)}{where}")


@dataclass
class TeamServer:
    """PostgreSQL + `mlflow server` on `host`; `start()`/`stop()`, or use it as a context manager."""

    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 5000
    pg_port: int = 0  # 0: a free port
    auth: bool = False
    workers: int = 2
    _mlflow: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _pg_started: bool = field(default=False, init=False, repr=False)

    @property
    def pgdata(self) -> Path:
        return self.state_dir / "pgdata"

    @property
    def artifacts(self) -> Path:
        return self.state_dir / "artifacts"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def secrets(self) -> dict[str, str]:
        return files.read_json(self.state_dir / "secrets.json")

    def backend_uri(self, database: str = TRACKING_DB) -> str:
        """SQLAlchemy URI of a database on the cluster; the password travels in PGPASSWORD, not argv."""
        return f"postgresql+psycopg://{DB_ROLE}@127.0.0.1:{self.pg_port}/{database}"

    def start(self) -> TeamServer:
        reason = postgres_missing() or mlflow_app_missing(self.auth)
        if reason:
            raise ServerError(reason)
        _refuse_a_taken_port(self.host, self.port)  # else another server's /health would look like ours
        self.state_dir = self.state_dir.resolve()
        self._make_private_folders()
        self._write_secrets()
        if self.pg_port == 0:
            self.pg_port = free_port()
        try:
            self._start_postgres()
            self._create_databases()
            self._start_mlflow()
            if self.auth:
                self._reserve_project_names()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_private_folders(self) -> None:
        """The state folder and the artifact store for the user who runs the server only (0700);
        the state folder stays traversable (0711) when PostgreSQL runs as another user, who
        owns pgdata/ and logs/ inside it."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o711 if _as_postgres_user() else 0o700)
        for folder in (self.state_dir / "logs", self.artifacts):
            folder.mkdir(mode=0o700, exist_ok=True)
            folder.chmod(0o700)

    def _write_secrets(self) -> None:
        """Generate each password once; later starts reuse them (the cluster and users keep theirs)."""
        path = self.state_dir / "secrets.json"
        current = files.read_json(path) if path.exists() else {}
        wanted = {
            key: current.get(key) or secrets.token_urlsafe(24) for key in ("db_password", "admin_password", "flask_secret_key")
        }
        if wanted != current:
            with _private_files():
                files.write_json(path, wanted)
        os.chmod(path, 0o600)

    def _start_postgres(self) -> None:
        log = self.state_dir / "logs" / "postgres.log"
        prefix = _as_postgres_user()
        if prefix:
            self._hand_cluster_to(prefix[2])
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            pwfile = self.state_dir / "logs" / ".initdb-password"
            with _private_files():
                pwfile.write_text(self.secrets["db_password"] + "\n")
            if prefix:
                shutil.chown(self.pgdata, user=prefix[2])
                shutil.chown(pwfile, user=prefix[2])
            try:
                _check(
                    [*prefix, postgres_binary("initdb"), "-D", str(self.pgdata), "-U", DB_ROLE, "--pwfile", str(pwfile),
                     "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8"],
                    "initdb",
                )  # fmt: skip
            finally:
                pwfile.unlink(missing_ok=True)
        # sockets in the data folder (not /var/run/postgresql, which may not exist or be writable)
        options = f"-p {self.pg_port} -c listen_addresses=127.0.0.1 -k {shlex.quote(str(self.pgdata))}"  # pg_ctl runs it via sh
        _check(
            [
                *prefix,
                postgres_binary("pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ],
            "starting PostgreSQL",
            log,
        )
        self._pg_started = True

    def _hand_cluster_to(self, os_user: str) -> None:
        """As root: the cluster, its log folder and log belong to the user PostgreSQL runs as; a
        cluster an earlier version ran as another user (`nobody`) is handed over, pgdata kept 0700."""
        shutil.chown(self.state_dir / "logs", user=os_user)
        probe = subprocess.run(["runuser", "-u", os_user, "--", "test", "-x", str(self.state_dir)], capture_output=True)
        if probe.returncode != 0:
            raise ServerError(
                f"PostgreSQL runs as user {os_user!r} (it refuses root) and cannot reach {self.state_dir}: "
                "choose a state folder every user can traverse (e.g. under /srv or /tmp), or run as a non-root user"
            )
        uid = pwd.getpwnam(os_user).pw_uid
        log = self.state_dir / "logs" / "postgres.log"
        if log.exists() and log.stat().st_uid != uid:
            shutil.chown(log, user=os_user)
        if self.pgdata.exists() and self.pgdata.stat().st_uid != uid:
            for folder, dirs, names in os.walk(self.pgdata):
                for name in (folder, *(Path(folder) / n for n in dirs + names)):
                    os.chown(name, uid, -1, follow_symlinks=False)
            self.pgdata.chmod(0o700)

    def _connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.pg_port, user=DB_ROLE, password=self.secrets["db_password"], dbname=database,
            autocommit=True, connect_timeout=10,
        )  # fmt: skip

    def _create_databases(self) -> None:
        with self._connect() as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in (TRACKING_DB, AUTH_DB):
                if name not in existing:
                    conn.execute(f'CREATE DATABASE "{name}"')

    def _start_mlflow(self) -> None:
        env = {**os.environ, "PGPASSWORD": self.secrets["db_password"]}
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            "--backend-store-uri", self.backend_uri(),
            "--artifacts-destination", str(self.artifacts),
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
        ]  # fmt: skip
        if self.auth:
            config = self.state_dir / "basic_auth.ini"
            files.write_text(
                config,
                "[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = {self.backend_uri(AUTH_DB)}\n"
                f"admin_username = {ADMIN_USER}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
            )
            env |= {
                "MLFLOW_AUTH_CONFIG_PATH": str(config),
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.secrets["admin_password"],
                # CSRF key; several server nodes must share it
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secrets["flask_secret_key"],
            }
        cmd += ["--app-name", MLFLOW_APPS[self.auth]]  # 5xx bodies name nothing of the database (mlflow_app.py)
        log = self.state_dir / "logs" / "mlflow.log"
        with open(log, "ab") as out:
            self._mlflow = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            # our child first: a 200 counts only while the process we started is alive (the
            # port was free at start, so then it is the one answering)
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200 and self._mlflow.poll() is None:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self._mlflow.poll() is not None:
                tail = " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise ServerError(f"mlflow server exited with {self._mlflow.returncode}: {tail}; see {log}")
            if time.monotonic() > deadline:
                raise ServerError(f"mlflow server did not answer {self.url}/health within 180 s; see {log}")
            time.sleep(0.5)

    def _reserve_project_names(self) -> None:
        """Create the pipeline's experiment and registered model as the admin, so that on a
        fresh server no READ user can create them first and own them (docs/team.md)."""
        import base64
        import json

        token = base64.b64encode(f"{ADMIN_USER}:{self.secrets['admin_password']}".encode()).decode()
        for path, name in (("experiments/create", EXPERIMENT_NAME), ("registered-models/create", REGISTERED_MODEL)):
            request = urllib.request.Request(
                f"{self.url}/api/2.0/mlflow/{path}", data=json.dumps({"name": name}).encode(), method="POST",
                headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
            )  # fmt: skip
            try:
                urllib.request.urlopen(request, timeout=60).close()
            except urllib.error.HTTPError as exc:
                if "RESOURCE_ALREADY_EXISTS" not in exc.read().decode(errors="replace"):
                    raise ServerError(f"reserving {name!r} for the admin failed: HTTP {exc.code}") from None

    def wait(self, poll_s: float = 1.0) -> str:
        """Block until the mlflow server or PostgreSQL ends; return a line saying which."""
        while True:
            if self._mlflow is None or self._mlflow.poll() is not None:
                code = self._mlflow.returncode if self._mlflow is not None else None
                return f"the mlflow server exited ({code}); see {self.state_dir / 'logs' / 'mlflow.log'}"
            if not self._postgres_alive():
                return f"PostgreSQL stopped; see {self.state_dir / 'logs' / 'postgres.log'}"
            time.sleep(poll_s)

    def _postgres_alive(self) -> bool:
        """The postmaster of our cluster is running (its pid file names it; root may signal any user's)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return False
        return True

    def stop_mlflow(self) -> None:
        if self._mlflow is not None and self._mlflow.poll() is None:
            os.killpg(self._mlflow.pid, signal.SIGTERM)
            try:
                self._mlflow.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._mlflow.pid, signal.SIGKILL)
                self._mlflow.wait()
        self._mlflow = None

    def stop(self) -> None:
        self.stop_mlflow()
        if self._pg_started:
            subprocess.run(
                [*_as_postgres_user(), postgres_binary("pg_ctl"), "-D", str(self.pgdata), "-m", "fast", "-w", "stop"],
                capture_output=True,
            )
            self._pg_started = False

    def __enter__(self) -> TeamServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path(".ferflow/team-server"), help="state folder (default: .ferflow/team-server)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5000, help="the tracking server's port (default 5000)")
    p.add_argument("--pg-port", type=int, default=0, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    p.add_argument("--auth", action="store_true", help="MLflow basic-auth (users stored in PostgreSQL)")
    p.add_argument("--workers", type=int, default=2, help="mlflow server worker processes (default 2)")


def run(args: argparse.Namespace) -> int:
    """Start a local team tracking server (PostgreSQL + mlflow server) and wait for Ctrl-C."""
    server = TeamServer(args.dir, args.host, args.port, args.pg_port, args.auth, args.workers)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops both servers cleanly, like Ctrl-C
    try:
        return _serve(server)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _serve(server: TeamServer) -> int:
    try:
        server.start()  # stops what it started if it fails or is interrupted
    except ServerError as exc:
        print(f"tracking-server: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"MLflow tracking server on {server.url} (PostgreSQL on 127.0.0.1:{server.pg_port}, artifacts in {server.artifacts})")
    print(f"  export MLFLOW_TRACKING_URI={server.url}")
    if server.auth:
        print(f"  admin user {ADMIN_USER!r}; its password is admin_password in {server.state_dir / 'secrets.json'}")
        print("  clients: export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...")
    if server.host not in ("127.0.0.1", "localhost", "::1"):
        print("  warning: bound beyond loopback; see docs/team.md for authentication and TLS", file=sys.stderr)
    print(f"Logs in {server.state_dir / 'logs'}. Ctrl-C stops both.", flush=True)  # a pipe or file: seen now, not at exit
    try:
        print(f"tracking-server: error: {server.wait()}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
