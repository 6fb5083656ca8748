"""The two places where ferflow's served model needs MLflow behaviour that has no public API.

Both exist so that a bad request gets a short 400 naming what is wrong, instead of what
MLflow would send: every use of MLflow internals is here, and
tests/unit/test_mlflow_adapter.py fails loudly when an MLflow upgrade moves what they rely on.

1. `RequestError.message` keeps the first message set. The scoring server rewrites
   `e.message` of a failed predict to "Failed to predict data '<repr of the whole request>'.
   Error: ..." (mlflow/pyfunc/scoring_server), megabytes for a pixel tensor in front of a
   one-line reason.
2. `check_params_first` runs the model's own params check before MLflow's params-schema
   check. MLflow validates params against the signature before the model sees them:
   unknown ones are dropped with only a log line, a bad type fails with a repr of the whole
   request. There is no hook for a model to see the raw params, so the schema check (the
   module function `mlflow.pyfunc._enforce_params_schema`, looked up at call time) is wrapped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Set
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class RequestError(MlflowException, ValueError):
    """A bad request; the message names the row, field and what was expected (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    # Keep the first message set: it already names row, field and expectation (see 1. above).
    @property
    def message(self) -> str:
        return self._request_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_request_message"):
            self._request_message = value


def check_params_first(check: Callable[[Any], None], names: Set[str]) -> None:
    """In this process, call `check(params)` before MLflow's params-schema check of any model
    whose params schema has exactly the params `names` (see 2. above). Idempotent. If
    MLflow renames the function, nothing is wrapped and tests/unit/test_mlflow_adapter.py fails."""
    import mlflow.pyfunc as pyfunc_module

    original = getattr(pyfunc_module, "_enforce_params_schema", None)
    if original is None or getattr(original, "ferflow_guard", False):
        return

    @functools.wraps(original)  # keeps MLflow's own function as `enforce.__wrapped__`
    def enforce(params: Any, schema: Any) -> Any:
        if schema is not None and {p.name for p in schema.params} == set(names):
            check(params)
        return original(params, schema)

    enforce.ferflow_guard = True  # type: ignore[attr-defined]
    pyfunc_module._enforce_params_schema = enforce
