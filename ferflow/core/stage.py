"""Shared plumbing for `stages/*.py`: path options, logging and clean error exits."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ferflow.core.errors import UserError
from ferflow.core.noise import NATIVE_NOISE, filtered_stderr  # noqa: F401  (stages and the CLI use them from here)
from ferflow.core.params import ParamsError

# TensorFlow's C++ start-up chatter (oneDNN notes, CPU feature lists) hides the stage's
# own output; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow's per-file "Downloading artifacts" bars (export validates the model it logs)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

log = logging.getLogger("ferflow")
QUIET_LOGGERS = ("matplotlib", "jax", "absl", "tensorflow", "tf2onnx", "mlflow.store.db")

# Errors that are the user's to fix: print one clear line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ParamsError, UserError, FileNotFoundError, ValueError)


def parser(description: str, *paths: str) -> argparse.ArgumentParser:
    """`--params` plus one required `--<path>` option (a Path) per name: the paths are
    written once, in the stage's `cmd` in dvc.yaml, never as defaults here."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    for name in paths:
        p.add_argument(f"--{name}", type=Path, required=True)
    return p


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace, name: str, collect_garbage: bool = True) -> None:
    """Run a stage's main; user errors exit 2 with `<stage>: error: <message>`.

    `collect_garbage=False` turns Python's cyclic garbage collector off for the stage:
    the data stages build one object per image (32k on FER-2013) that live to the end,
    and the collector re-scans them all again and again as they accumulate (a third of
    the ingest stage's time); they create almost no cycles, and the process ends soon.
    """
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    # libraries' INFO lines are not the user's business: matplotlib's "generated new
    # fontManager", JAX's "Unable to initialize backend 'tpu'", absl's notes, MLflow's
    # "Creating initial MLflow database tables..." when the first run creates the store
    for library in QUIET_LOGGERS:
        logging.getLogger(library).setLevel(logging.WARNING)
    os.environ["FERFLOW_STAGE"] = name  # a failure is recorded on the MLflow run with the stage's name
    if not collect_garbage:
        gc.disable()
    with filtered_stderr():
        try:
            main(args)
        except USER_ERRORS as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:  # a read-only folder, a full disk: the environment's to fix, one line
            print(f"{name}: error: {exc.filename or '(no file named)'}: {exc.strerror or exc}", file=sys.stderr)
            raise SystemExit(2) from None
