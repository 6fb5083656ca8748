"""ferflow/serving/mlflow_adapter.py relies on MLflow internals: these tests fail loudly when an
MLflow upgrade moves them (then update the adapter, or drop it if MLflow grew a public way)."""

from __future__ import annotations

import inspect
import json

import mlflow.pyfunc
import mlflow.pyfunc.scoring_server
import pytest
from mlflow.types import ParamSchema, ParamSpec

from ferflow.serving.mlflow_adapter import RequestError, check_params_first

UPGRADE = "MLflow changed what ferflow/serving/mlflow_adapter.py relies on: update the adapter"


def test_mlflow_checks_params_through_the_module_function_the_adapter_wraps():
    assert callable(getattr(mlflow.pyfunc, "_enforce_params_schema", None)), UPGRADE
    callers = inspect.getsource(mlflow.pyfunc.PyFuncModel.predict) + inspect.getsource(mlflow.pyfunc._validate_prediction_input)
    assert "_enforce_params_schema(" in callers, UPGRADE


def test_the_models_own_check_runs_first_and_only_for_its_own_schema(monkeypatch):
    # MLflow's own function (a served model loaded in this process may have wrapped it), restored after the test
    current = mlflow.pyfunc._enforce_params_schema
    monkeypatch.setattr(mlflow.pyfunc, "_enforce_params_schema", getattr(current, "__wrapped__", current))
    seen = []

    def check(params):
        seen.append(params)
        if "bad" in params:
            raise RequestError("unknown param 'bad': expected only a")

    check_params_first(check, {"a"})
    check_params_first(check, {"a"})  # idempotent: wrapped once
    ours, other = ParamSchema([ParamSpec("a", "string", "x")]), ParamSchema([ParamSpec("b", "string", "x")])
    with pytest.raises(RequestError, match="unknown param 'bad'"):
        mlflow.pyfunc._enforce_params_schema({"bad": 1}, ours)
    assert mlflow.pyfunc._enforce_params_schema({"a": "y"}, ours) == {"a": "y"}
    assert mlflow.pyfunc._enforce_params_schema({"b": "z"}, other) == {"b": "z"}
    assert seen == [{"bad": 1}, {"a": "y"}]


def test_the_scoring_server_rewrites_the_message_and_a_request_error_keeps_its_own():
    assert "e.message = " in inspect.getsource(mlflow.pyfunc.scoring_server), UPGRADE
    err = RequestError("row 0: column 'image': not an image")
    err.message = f"Failed to predict data '{'9' * 100_000}'. \nError: {err.message}"  # what the server does
    assert err.message == "row 0: column 'image': not an image"
    body = json.loads(err.serialize_as_json())  # the HTTP 400 body
    assert (body["error_code"], body["message"]) == ("INVALID_PARAMETER_VALUE", "row 0: column 'image': not an image")
