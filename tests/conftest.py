"""Shared fixtures: tiny params, a throwaway copy of the repository, a tiny trained model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Small enough for seconds of CPU, big enough that every class/split is populated.
TINY_OVERRIDES = {
    "data": {"synthetic": {"train_per_class": 30, "test_per_class": 8}},
    "train": {"arch": "ferflow_tiny", "epochs": 2, "batch_size": 32, "early_stopping_patience": 2},
}


def deep_update(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def write_params(path: Path, overrides: dict | None = None) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    deep_update(params, overrides or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run(
    cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 600
) -> subprocess.CompletedProcess:
    # a git identity for DVC's experiment commits, on machines without a global one
    identity = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "ferflow-tests"), ("EMAIL", "tests@ferflow.invalid"))
    }
    full_env = {
        **identity,
        **os.environ,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(env or {}),
    }
    full_env.pop("MLFLOW_TRACKING_URI", None) if not (env and "MLFLOW_TRACKING_URI" in env) else None
    full_env.pop("DVC_ROOT", None)
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
        )
    return proc


def clone_repo(dest: Path) -> Path:
    """A fresh git repo holding exactly the files a commit of the working tree would hold
    (tracked + untracked-not-ignored), like a user's `git clone` of this change."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    run(["git", "init", "-q"], dest)
    run([*git, "add", "-A"], dest)
    run([*git, "commit", "-qm", "clone"], dest)
    return dest


def write_tiny_model(work: Path) -> tuple[Path, Path]:
    """An untrained, seeded ferflow_tiny model and the 7-class label map in `work`."""
    import keras

    from ferflow.core import files
    from ferflow.core.classes import FER_CLASSES
    from ferflow.model.architectures import build_model

    keras.utils.set_random_seed(0)
    build_model("ferflow_tiny", len(FER_CLASSES)).save(work / "model.keras")
    files.write_json(work / "label_map.json", {"classes": list(FER_CLASSES)})
    return work / "model.keras", work / "label_map.json"


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    write_params(path, TINY_OVERRIDES)
    return path


# Session fixtures: built once per test process (`make test` runs one per worker), shared
# by every file that asks, instead of once per file.


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The untrained, seeded ferflow_tiny model and label map of `write_tiny_model` (read only)."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ingest -> index -> extract on 20 train / 6 test synthetic faces per class, with the
    class plots, under the names dvc.yaml uses (read only)."""
    from ferflow.core.classes import FER_CLASSES
    from ferflow.core.params import DataParams
    from ferflow.data.sources.synthetic import SyntheticSource
    from support import prepare_data

    root = tmp_path_factory.mktemp("synthetic-data")
    source = SyntheticSource(20, 6, seed=3, classes=list(FER_CLASSES))
    prepare_data(root, source, DataParams(val_fraction=0.2, seed=3), plots=True)
    return root
