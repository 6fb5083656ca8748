"""ferflow's MLflow server apps: MLflow's own, with server errors kept out of response bodies.

When PostgreSQL is down, MLflow's server answers API calls with HTTP 503 and a body that
names the database host, port and driver error (`psycopg.OperationalError ... connection to
server at "127.0.0.1", port ... failed`); with basic-auth this reaches every caller that sends
any credentials, since checking them needs the database. MLflow has no setting for that body.
These apps answer every 5xx with MLflow's error shape and a generic message instead, and
write the original body to the server's log (stderr; `logs/mlflow.log` under
`ferflow tracking-server`).

They are registered in pyproject.toml under MLflow's documented `mlflow.app` entry-point group
(the mechanism `--app-name basic-auth` itself uses), so `pip install -e .` makes them
available to `mlflow server --app-name ferflow` / `--app-name ferflow-basic-auth`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
from typing import Any

UNAVAILABLE_MESSAGE = "the tracking store is unavailable; the server log has the details"
INTERNAL_MESSAGE = "the tracking server failed to answer; the server log has the details"

_logger = logging.getLogger("ferflow.tracking.mlflow_app")


def _log_to_stderr() -> None:
    """The original errors go to the worker's stderr, which `mlflow server` passes on to its log."""
    if not _logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _logger.addHandler(handler)
        _logger.setLevel(logging.INFO)
        _logger.propagate = False


def generic_error_body(status: int, original: bytes) -> bytes:
    """MLflow's error JSON ({"error_code", "message"}) with a message that names nothing of the
    server's: the original error code is kept when it is one (a protobuf enum name, no detail)."""
    code = "TEMPORARILY_UNAVAILABLE" if status == 503 else "INTERNAL_ERROR"
    try:
        parsed = json.loads(original)
        if isinstance(parsed, dict) and isinstance(parsed.get("error_code"), str) and parsed["error_code"].isidentifier():
            code = parsed["error_code"]
    except (ValueError, UnicodeDecodeError):
        pass
    message = UNAVAILABLE_MESSAGE if status == 503 else INTERNAL_MESSAGE
    return json.dumps({"error_code": code, "message": message}).encode()


def _log_original(method: str, path: str, status: int, body: bytes) -> None:
    text = body.decode("utf-8", errors="replace").strip() or "(empty body)"
    _logger.error("HTTP %d on %s %s; answered with a generic message; original body: %s", status, method, path, text)


def _hide_flask_errors(flask_app: Any) -> Any:
    """A Flask `after_request` hook: runs for error-handler responses too (MlflowException's 503)."""

    @flask_app.after_request
    def _generic_5xx_body(response: Any) -> Any:
        if response.status_code >= 500:
            from flask import request

            original = response.get_data()
            _log_original(request.method, request.path, response.status_code, original)
            response.set_data(generic_error_body(response.status_code, original))
            response.mimetype = "application/json"
        return response

    return flask_app


def _hide_asgi_errors(fastapi_app: Any) -> Any:
    """An HTTP middleware on the outermost (FastAPI) app: covers the Flask routes it mounts and
    its own (artifacts, OTel, gateway, jobs)."""
    from starlette.responses import Response

    @fastapi_app.middleware("http")
    async def _generic_5xx_body(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        if response.status_code < 500:
            return response
        original = b"".join([chunk async for chunk in response.body_iterator])
        _log_original(request.method, request.url.path, response.status_code, original)
        return Response(generic_error_body(response.status_code, original), status_code=response.status_code,
                        media_type="application/json")  # fmt: skip

    return fastapi_app


def _hide_errors(app: Any) -> Any:
    _log_to_stderr()
    from flask import Flask

    return _hide_flask_errors(app) if isinstance(app, Flask) else _hide_asgi_errors(app)


def _served_by_uvicorn() -> bool:
    # Not public: `mlflow server` tells its workers which server runs them in _MLFLOW_SGI_NAME
    # (mlflow.server.auth.create_app reads the same variable to choose FastAPI over Flask).
    return os.environ.get("_MLFLOW_SGI_NAME", "uvicorn") == "uvicorn"


def create_app() -> Any:
    """`mlflow server --app-name ferflow`: MLflow's app (FastAPI under uvicorn, else Flask)."""
    if _served_by_uvicorn():
        from mlflow.server.fastapi_app import app as fastapi_app  # what `mlflow server` serves without --app-name

        return _hide_errors(fastapi_app)
    from mlflow.server import app as flask_app

    return _hide_errors(flask_app)


def create_basic_auth_app() -> Any:
    """`mlflow server --app-name ferflow-basic-auth`: MLflow's basic-auth app (`mlflow.server.auth:create_app`).

    `mlflow server` bootstraps the auth database (migrations, the admin user) before its workers
    start only for the app named `basic-auth`; for any other name each worker does it in
    create_app, so the workers take turns here (a lock on the auth config file) instead of
    migrating a fresh database at the same time."""
    from mlflow.server.auth import create_app as create_auth_app

    config = os.environ.get("MLFLOW_AUTH_CONFIG_PATH")
    if not config:
        return _hide_errors(create_auth_app())
    with open(config) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _hide_errors(create_auth_app())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
