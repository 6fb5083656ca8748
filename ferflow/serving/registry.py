"""The registry's champion protocol: which registered version `@champion` serves.

Champions are kept per test set: each version is tagged with its test accuracy and a
content hash of the test split and classes; alias `champion-<hash8>` moves to it only when
it beats that alias's holder (or `export.force_champion` is true), and `champion` points at
the champion of the test set exported last, so `models:/<name>@champion` serves the best
model of the data set the user trained on last (docs/serving.md). Concurrent exporters
converge: each re-checks after moving an alias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ferflow.serving.packaging import quiet_mlflow_pyfunc

CHAMPION = "champion"
ACCURACY_TAG = "test_accuracy"
ACCURACY_DIGITS = 6  # the precision stored on a version, and the one accuracies are compared at
TEST_SET_TAG = "test_set"
CLASSES_TAG = "classes"
CONVERGE_ROUNDS = 20  # re-checks after moving an alias; each concurrent exporter needs at most one


def stored_accuracy(accuracy: float) -> float:
    """The accuracy as the version tag stores it: comparisons use this on both sides, so
    re-exporting the same model is a tie, not a win over itself."""
    return round(float(accuracy), ACCURACY_DIGITS)


def should_promote(test_accuracy: float, champion_accuracy: float | None, force: bool) -> bool:
    """Move `champion` when forced, when there is none, when its accuracy is unknown, or
    when the new model is strictly better at the stored precision (a tie keeps the serving model)."""
    if force or champion_accuracy is None or not math.isfinite(champion_accuracy):
        return True
    return stored_accuracy(test_accuracy) > stored_accuracy(champion_accuracy)


def dataset_alias(test_set: str) -> str:
    """The per-test-set champion alias, e.g. `champion-3f2a9c01`."""
    return f"{CHAMPION}-{test_set[:8]}"


def _accuracy(mv: Any) -> float:
    try:
        return float(mv.tags.get(ACCURACY_TAG, "nan"))
    except ValueError:
        return float("nan")


def _version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model or alias yet
        return None


def current_champion(client: Any, name: str, alias: str = CHAMPION) -> dict[str, Any] | None:
    """{'version', 'test_accuracy', 'test_set'} of the version holding `alias`, or None."""
    mv = _version_by_alias(client, name, alias)
    if mv is None:
        return None
    return {"version": int(mv.version), "test_accuracy": _accuracy(mv), "test_set": mv.tags.get(TEST_SET_TAG)}


def _best_since(client: Any, name: str, test_set: str, holder: Any | None) -> Any:
    """The version that should hold the test set's alias: the holder unless a version
    registered after it, on the same test set, is strictly better; among equally good
    newer ones the earliest. Versions before the holder were already compared (or a
    forced champion overrode them)."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}' and tags.{TEST_SET_TAG}='{test_set}'", page_token=token)
        versions += [mv for mv in page if math.isfinite(_accuracy(mv))]
        token = page.token
        if not token:
            break
    since = int(holder.version) if holder is not None else 0
    candidates = sorted((mv for mv in versions if int(mv.version) > since), key=lambda mv: int(mv.version))
    best = holder
    for mv in candidates:
        if best is None or should_promote(_accuracy(mv), _accuracy(best), False):
            best = mv
    return best


def _converge_dataset_alias(client: Any, name: str, test_set: str) -> int:
    """Move the test set's alias to the best version, then re-check after each move: another
    exporter may have moved it between our read and our write. Every exporter tags its
    version before it reads, so the last one to move the alias has seen every version;
    the loop ends when a read after our last write agrees with it. Safe on any store
    (SQLite or a server) without a lock."""
    alias = dataset_alias(test_set)
    for _ in range(CONVERGE_ROUNDS):
        holder = _version_by_alias(client, name, alias)
        best = _best_since(client, name, test_set, holder)
        if holder is not None and int(best.version) == int(holder.version):
            return int(holder.version)
        client.set_registered_model_alias(name, alias, str(best.version))
    raise RuntimeError(f"registered model {name!r}: alias {alias!r} kept moving for {CONVERGE_ROUNDS} rounds")


def _point_champion_at(client: Any, name: str, test_set: str) -> int:
    """`champion` follows the champion of the test set exported last: a user who trains on a
    new data set serves that data set's best model. Re-checked after the move, like above."""
    for _ in range(CONVERGE_ROUNDS):
        target = _version_by_alias(client, name, dataset_alias(test_set))
        holder = _version_by_alias(client, name, CHAMPION)
        if holder is not None and int(holder.version) == int(target.version):
            return int(target.version)
        client.set_registered_model_alias(name, CHAMPION, str(target.version))
    raise RuntimeError(f"registered model {name!r}: alias {CHAMPION!r} kept moving for {CONVERGE_ROUNDS} rounds")


@dataclass(frozen=True)
class Evaluated:
    """What a model's evaluation says about it, as the champion protocol compares it."""

    test_accuracy: float
    test_set: str  # the content digest of the test split and classes
    classes: list[str]


def promote(client: Any, name: str, version: int, evaluated: Evaluated, force: bool) -> dict[str, Any]:
    """Tag registered `version` with its test accuracy, test set and classes; move the alias
    `champion-<test set>` to it if it beats that alias's holder (only models evaluated on the
    same test set compete), then point `champion` at that test set's champion."""
    test_accuracy, test_set = evaluated.test_accuracy, evaluated.test_set
    if not math.isfinite(test_accuracy):
        raise ValueError(f"test accuracy must be a finite number, got {test_accuracy!r}")
    previous = current_champion(client, name, dataset_alias(test_set))
    # tags first: a concurrent exporter must see this version before it compares
    for key, value in {
        ACCURACY_TAG: f"{stored_accuracy(test_accuracy):.{ACCURACY_DIGITS}f}",
        TEST_SET_TAG: test_set,
        CLASSES_TAG: ",".join(evaluated.classes),
    }.items():
        client.set_model_version_tag(name, str(version), key, value)
    if force:
        client.set_registered_model_alias(name, dataset_alias(test_set), str(version))
    dataset_champion = _converge_dataset_alias(client, name, test_set)
    return {
        "registered_model": name,
        "version": version,
        "test_set": test_set,
        "champion": dataset_champion == version,
        "champion_alias": dataset_alias(test_set),
        "champion_alias_version": dataset_champion,
        "champion_version": _point_champion_at(client, name, test_set),
        "previous_champion": previous,
    }


PROMOTION_DESCRIPTION = (
    "Facial-expression CNNs from the ferflow DVC pipeline (one version per export stage). "
    "Alias `champion-<test set hash8>` holds the most accurate version on that test set; a version "
    "takes it only when strictly better (a tie keeps the serving model; export.force_champion moves it). "
    "`champion` points at the champion of the test set exported last: serve models:/<name>@champion."
)


def describe_version(client: Any, name: str, version: int, test_accuracy: float) -> None:
    """Give the registry page what a reader looks for: per version the arch, data set, test
    accuracy and run name (from the active run); on the model, how versions are promoted."""
    import mlflow

    run = client.get_run(mlflow.active_run().info.run_id)
    params = run.data.params
    text = (
        f"arch {params.get('train.arch', '?')}, data {params.get('data.source', '?')}, "
        f"test accuracy {test_accuracy:.4f}, run {run.info.run_name}"
    )
    client.update_model_version(name, str(version), description=text)
    client.update_registered_model(name, description=PROMOTION_DESCRIPTION)


def register_and_promote(run_kwargs: dict[str, Any], name: str, evaluated: Evaluated, force: bool) -> dict[str, Any]:
    """Log the model to the active run, register a version and `promote` it."""
    import mlflow

    if not math.isfinite(evaluated.test_accuracy):
        raise ValueError(f"test accuracy must be a finite number, got {evaluated.test_accuracy!r}")
    quiet_mlflow_pyfunc()
    info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **run_kwargs)
    version = int(info.registered_model_version)
    client = mlflow.MlflowClient()
    result = promote(client, name, version, evaluated, force)
    describe_version(client, name, version, evaluated.test_accuracy)
    mlflow.set_tag("ferflow.registered_version", f"{name}/{version}")
    return result | {"model_uri": info.model_uri}
