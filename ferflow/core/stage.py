"""Shared plumbing for `stages/*.py`: path options, logging and clean error exits."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ferflow.core.errors import UserError
from ferflow.core.params import ParamsError

# TensorFlow's C++ start-up chatter (oneDNN notes, CPU feature lists) hides the stage's
# own output; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow's per-file "Downloading artifacts" bars (export validates the model it logs)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Native libraries' lines that are not the user's business, dropped from the stage's
# stderr: TensorFlow's oneDNN note and absl's pre-init notice (written before
# TF_CPP_MIN_LOG_LEVEL is read), and tf.data's "NodeDef mentions attribute
# use_unbounded_threadpool" (an E-level line about a harmless version skew).
NATIVE_NOISE = re.compile(
    r"(oneDNN custom operations are on"
    r"|All log messages before absl::InitializeLog\(\) is called"
    r"|NodeDef mentions attribute use_unbounded_threadpool"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow)"
)

log = logging.getLogger("ferflow")
QUIET_LOGGERS = ("matplotlib", "jax", "absl", "tensorflow")

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


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str] = NATIVE_NOISE) -> Iterator[None]:
    """Route file descriptor 2 (C++ libraries write there directly, past sys.stderr) through a
    pipe and drop the lines matching `noise`; everything else, real warnings included,
    reaches the original stderr unchanged."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # the thread's own copy of the real stderr, made here: `saved` may be closed before the
    # thread first runs (a stage that fails at once), and its lines must still get through
    forward_to = os.dup(saved)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(forward_to, "wb", buffering=0) as out:
            for line in pipe:
                if not noise.search(line.decode("utf-8", "replace")):
                    out.write(line)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread sees EOF
        os.close(saved)
        thread.join(timeout=10)


def run(main: Callable[[argparse.Namespace], object], args: argparse.Namespace, name: str, collect_garbage: bool = True) -> None:
    """Run a stage's main; user errors exit 2 with `<stage>: error: <message>`.

    `collect_garbage=False` turns Python's cyclic garbage collector off for the stage:
    the data stages build one object per image (32k on FER-2013) that live to the end,
    and the collector re-scans them all again and again as they accumulate (a third of
    the ingest stage's time); they create almost no cycles, and the process ends soon.
    """
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    # libraries' INFO lines are not the user's business: matplotlib's "generated new
    # fontManager", JAX's "Unable to initialize backend 'tpu'", absl's notes
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
