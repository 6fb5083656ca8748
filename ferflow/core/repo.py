"""Where the project root is: data paths in params.yaml and the local MLflow store are relative to it."""

from __future__ import annotations

import os
from pathlib import Path


def find_root(start: str | os.PathLike[str] | None = None) -> Path:
    """DVC_ROOT, else the nearest ancestor of `start` (cwd) holding .dvc or .git."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / ".dvc").is_dir() or (candidate / ".git").exists():
            return candidate
    return here
