"""Leaderboard of the project's MLflow runs: a table, and a PNG of test accuracy vs. training time.

Reads the same store the pipeline writes (MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)
with `search_runs`; one row per training run: run name (the DVC experiment name), arch, data,
test accuracy, macro-F1, parameters, training time, epochs run and status.

Runs are ranked only against runs tested on the same test set (the digest of the run's
MLflow `test` dataset input, else its data hash): one table per test set, so synthetic
and FER-2013 runs never share a ranking. `--markdown` prints the tables for docs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ferflow.core import files
from ferflow.core.params import ExportParams
from ferflow.tracking.runs import EXP_NAMES_TAG
from ferflow.tracking.store import EXPERIMENT_NAME, sqlite_path, tracking_uri

# sort key -> (row attribute, largest first?): the natural "best first" direction of each
SORT_KEYS: dict[str, tuple[str, bool]] = {
    "accuracy": ("test_accuracy", True),
    "macro_f1": ("macro_f1", True),
    "params": ("params", False),
    "train_time": ("train_time_s", False),
    "epochs": ("epochs", True),
    "newest": ("start_time_ms", True),
    "name": ("run_name", False),
}
DEFAULT_PNG = "leaderboard.png"


class LeaderboardError(RuntimeError):
    """The store or experiment to read is missing or unreachable."""


@dataclass
class Row:
    run_id: str
    run_name: str
    arch: str
    data: str  # data.source's file or folder name ("synthetic" for the generator)
    data_hash: str  # the index stage's content hash of all splits
    test_set: str  # content hash of the test split: runs are ranked against the same one only
    test_accuracy: float | None
    macro_f1: float | None
    params: int | None
    train_time_s: float | None
    epochs: int | None
    status: str
    start_time_ms: int
    # every DVC experiment whose results come from this run (run-cache reuse adds names)
    experiments: list[str] = field(default_factory=list)
    params_logged: dict[str, str] = field(default_factory=dict)  # train.* / evaluate.* params of the run
    champion: bool = False  # the run whose model `@champion` serves
    changed: str = ""  # its params that differ from most runs of its table


def mark_changed(rows: list[Row]) -> list[Row]:
    """Fill each row's `changed`: its values of the params that are not the same in every row
    of `rows` (one table), as `key=value` without the section; arch and data have columns."""
    keys = sorted({k for row in rows for k in row.params_logged} - {"train.arch"})
    varying = [k for k in keys if len({row.params_logged.get(k, "") for row in rows}) > 1]
    for row in rows:
        row.changed = " ".join(f"{key.split('.', 1)[1]}={row.params_logged.get(key, '-')}" for key in varying)
    return rows


def _champion_run(client: Any, name: str) -> str | None:
    """The run id of the model version `@champion` of registered model `name`, if any."""
    try:
        return client.get_model_version_by_alias(name, "champion").run_id
    except Exception:  # no registered model, no alias, a store without a registry
        return None


def _metric(metrics: dict[str, float], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None or math.isnan(value) else float(value)


def _epochs_run(client: Any, run_id: str) -> int | None:
    """Epochs actually run, for a run that ended before logging `epochs_run` (a train that
    raised): the last logged step of its loss."""
    history = client.get_metric_history(run_id, "loss")
    return max((m.step for m in history), default=None)


def _test_digest(run: Any) -> str | None:
    """The digest of the run's `test` dataset input (logged by the train stage)."""
    for item in getattr(run.inputs, "dataset_inputs", None) or []:
        if any(t.key == "mlflow.data.context" and t.value == "test" for t in item.tags):
            return item.dataset.digest
    return None


def group_by_test_set(rows: list[Row]) -> list[list[Row]]:
    """Rows split by test set, order kept inside each; the set with the newest run first."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.test_set, []).append(row)
    return sorted(groups.values(), key=lambda group: -max(row.start_time_ms for row in group))


def describe_group(rows: list[Row]) -> str:
    names = sorted({row.data for row in rows})
    digest = rows[0].test_set[:8] or "unknown"
    return f"data {', '.join(names)}, test set {digest} ({len(rows)} run{'s' if len(rows) != 1 else ''})"


def _all_runs(client: Any, experiment_id: str) -> list[Any]:
    """Every run of the experiment, page by page through the client's public page token
    (mlflow.search_runs would read the process-wide tracking URI instead of this client's)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def collect(tracking_uri: str, experiment: str, sort: str = "accuracy", limit: int | None = None) -> list[Row]:
    """The experiment's runs, best first by `sort` (runs lacking that value last), at most `limit`."""
    client, experiment_id = _open_experiment(tracking_uri, experiment)
    rows = [_row(run) for run in _all_runs(client, experiment_id)]
    champion = _champion_run(client, ExportParams().registered_model_name)
    for row in rows:
        row.champion = row.run_id == champion
    attr, largest_first = SORT_KEYS[sort]
    # a run without `epochs_run` (it failed mid-training) has its epochs in its loss history,
    # one query a run: for every such run only when sorting by them, otherwise (below) for the rows shown
    if attr == "epochs":
        for row in rows:
            if row.epochs is None:
                row.epochs = _epochs_run(client, row.run_id)
    present = [row for row in rows if getattr(row, attr) is not None]
    missing = [row for row in rows if getattr(row, attr) is None]
    # ties (and the runs without a value) newest first
    present.sort(key=lambda row: row.start_time_ms, reverse=True)
    present.sort(key=lambda row: getattr(row, attr), reverse=largest_first)
    missing.sort(key=lambda row: row.start_time_ms, reverse=True)
    rows = (present + missing)[:limit] if limit else present + missing
    for row in rows:
        if row.epochs is None:
            row.epochs = _epochs_run(client, row.run_id)
    return rows


def _open_experiment(tracking_uri: str, experiment: str) -> tuple[Any, str]:
    """A client of the store and the experiment's id, or LeaderboardError saying what is missing."""
    import mlflow

    store_file = sqlite_path(tracking_uri)
    if store_file is not None and not store_file.exists():
        # MlflowClient would create an empty database here; say what is wrong instead.
        raise LeaderboardError(f"no MLflow store at {store_file} (run the pipeline first, or pass --tracking-uri)")
    # an unreachable server should fail in seconds, as in the pipeline stages
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
    except Exception as exc:  # mlflow raises many types for an unreachable store
        raise LeaderboardError(
            f"MLflow store {tracking_uri!r} is not reachable ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    if found is None:
        raise LeaderboardError(f"no experiment {experiment!r} in {tracking_uri}")
    return client, found.experiment_id


def _row(r: Any) -> Row:
    """One run as a leaderboard row (epochs None when the run never logged `epochs_run`)."""
    m, tags = r.data.metrics, r.data.tags
    params = _metric(m, "params_count")
    epochs = _metric(m, "epochs_run")
    source = r.data.params.get("data.source", "")
    return Row(
        run_id=r.info.run_id,
        run_name=r.info.run_name or r.info.run_id[:8],
        arch=tags.get("arch") or r.data.params.get("train.arch", "?"),
        data=Path(source).name or source or "?",
        data_hash=tags.get("data.hash", ""),
        test_set=_test_digest(r) or tags.get("data.hash", ""),
        test_accuracy=_metric(m, "test_accuracy"),
        macro_f1=_metric(m, "test_macro_f1"),
        params=int(params) if params is not None else None,
        train_time_s=_metric(m, "train_time_s"),
        epochs=int(epochs) if epochs is not None else None,
        status=r.info.status,
        start_time_ms=int(r.info.start_time or 0),
        experiments=[n for n in tags.get(EXP_NAMES_TAG, tags.get("dvc.exp.name", "")).split(",") if n],
        params_logged={k: v for k, v in r.data.params.items() if k.startswith(("train.", "evaluate."))},
    )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def format_table(rows: list[Row], markdown: bool = False) -> str:
    from tabulate import tabulate

    header = ("#", "run name", "arch", "data", "test acc", "macro-F1", "params", "train time", "epochs", "status", "changed")
    body = [
        (
            str(i),
            row.run_name + (" @champion" if row.champion else ""),
            row.arch,
            f"{row.data}:{row.data_hash[:8]}" if row.data_hash else row.data,
            _fmt(row.test_accuracy, ".4f"),
            _fmt(row.macro_f1, ".4f"),
            _fmt(row.params, ","),
            _fmt_time(row.train_time_s),
            _fmt(row.epochs, "d"),
            row.status,
            row.changed or "-",
        )
        for i, row in enumerate(mark_changed(rows), 1)
    ]
    align = ("right", "left", "left", "left", "right", "right", "right", "right", "right", "left", "left")  # numbers right
    return tabulate(body, headers=header, tablefmt="github" if markdown else "simple", colalign=align, disable_numparse=True)


def plot(rows: list[Row], out: str | os.PathLike[str], title: str = "ferflow leaderboard") -> int:
    """Scatter test accuracy vs. training time, marker area ~ parameters, each point labelled
    with its run name; one colour per arch. Returns how many runs were plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [row for row in rows if row.test_accuracy is not None and row.train_time_s is not None]
    fig, ax = plt.subplots(figsize=(9, 6))
    if points:
        largest = max(row.params or 0 for row in points) or 1
        colours = {arch: f"C{i % 10}" for i, arch in enumerate(sorted({row.arch for row in points}))}
        for arch, colour in colours.items():
            mine = [row for row in points if row.arch == arch]
            ax.scatter(
                [row.train_time_s / 60 for row in mine],
                [row.test_accuracy for row in mine],
                s=[40 + 1200 * (row.params or 0) / largest for row in mine],
                c=colour,
                alpha=0.6,
                edgecolors="black",
                label=arch,
            )
        for row in points:
            ax.annotate(
                f"{row.run_name}\n{_fmt(row.params, ',')} params",
                (row.train_time_s / 60, row.test_accuracy),
                xytext=(6, 6),
                textcoords="offset points",
                fontsize=7,
            )
        ax.legend(title="arch (area ~ params)", fontsize=8, markerscale=0.5)
    else:
        ax.text(0.5, 0.5, "no runs with test accuracy and training time yet", ha="center", va="center", transform=ax.transAxes)
    ax.margins(x=0.2, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return len(points)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db)"
    )
    parser.add_argument("--experiment", default=EXPERIMENT_NAME, help=f"MLflow experiment (default: {EXPERIMENT_NAME})")
    parser.add_argument("--sort", choices=list(SORT_KEYS), default="accuracy", help="order, best first (default: accuracy)")
    parser.add_argument("--limit", type=int, default=20, help="show at most this many runs (0: all; default 20)")
    parser.add_argument(
        "--png", default=DEFAULT_PNG, help=f"write the accuracy vs. training time plot here (default: {DEFAULT_PNG}; '' to skip)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (for docs) instead of text tables")
    parser.add_argument("--data", default=None, help="only runs on this data (data.source's name, or a data hash prefix)")


def run(args: argparse.Namespace) -> int:
    uri = args.tracking_uri or tracking_uri()
    try:
        rows = collect(uri, args.experiment, args.sort)
    except LeaderboardError as exc:
        print(f"leaderboard: error: {exc}", file=sys.stderr)
        return 2
    if args.data:
        rows = [row for row in rows if args.data == row.data or (row.data_hash and row.data_hash.startswith(args.data))]
    groups = [group[: args.limit or None] for group in group_by_test_set(rows)]
    if args.json:
        print(json.dumps([asdict(row) for group in groups for row in group], indent=2))
    elif not groups:
        print(f"no runs in experiment {args.experiment!r} of {uri}" + (f" on data {args.data!r}" if args.data else ""))
    else:
        tables = []
        for group in groups:
            table = format_table(group, markdown=args.markdown)
            if len(groups) > 1:  # name each test set; a single one needs no heading
                table = (f"**{describe_group(group)}**" if args.markdown else describe_group(group)) + "\n\n" + table
            tables.append(table)
        print("\n\n".join(tables))
    if args.png:
        shown = groups[0] if groups else []  # one test set: accuracies on different ones do not compare
        plotted = plot(shown, args.png, f"{args.experiment}: test accuracy vs. training time")
        where = f" of {describe_group(shown)}" if len(groups) > 1 else ""
        print(f"wrote {args.png} ({plotted} runs plotted{where})", file=sys.stderr)
    return 0
