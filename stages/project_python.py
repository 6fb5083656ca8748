"""Imported first by every stage: stop, before any other import or any write, when the stage
runs under a Python that lacks the project's packages (usually the system `python`,
because the project's virtual environment is not activated). Standard library only.

DVC runs each stage's `cmd` with the `python` found on PATH, not the one DVC itself runs
under, so `.venv/bin/dvc exp run` without an activated venv used to fail deep inside a
stage with `ModuleNotFoundError`.
"""

import importlib.util
import sys
from pathlib import Path

REQUIRED = ("ferflow", "numpy", "pandas", "PIL", "yaml", "pydantic", "keras", "mlflow")


def missing_modules() -> list[str]:
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def check() -> None:
    missing = missing_modules()
    if missing:
        stage = Path(sys.argv[0]).stem
        print(
            f"{stage}: error: this Python ({sys.executable}) cannot import {', '.join(missing)}: the project's "
            "virtual environment is not active. Run `source .venv/bin/activate` (create it with `make install`), "
            "then rerun; after a failed `dvc exp run -S ...`, `git checkout params.yaml` drops the -S changes it left.",
            file=sys.stderr,
        )
        raise SystemExit(2)


check()
