"""The first hour (#29): the README's commands as a new user types them, and what they see.

A fresh clone, a new HOME without a git identity and no activated venv (the venv reached by
PATH only, as `source .venv/bin/activate` would). Adapted from the wt-newcomer helper's test.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, REPO, TINY_OVERRIDES, clone_repo, write_params

# what a user must not see from the libraries (#29 items 8-10)
NOISE = re.compile(
    r"oneDNN|cpu_feature_guard|absl::|fontManager|libtpu|Unable to initialize backend|Optimizing ONNX model|Using opset|MLflow database tables|Updating database tables"
)


def _user_env(home: Path, repo: Path) -> dict[str, str]:
    """A new login shell: a HOME of its own, no git identity, the venv on PATH only."""
    return {
        "HOME": str(home),
        "PATH": f"{repo / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "COLUMNS": "120",
    }


def _sh(command: str, repo: Path, env: dict[str, str], timeout: int = 900) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _readme_commands(heading: str) -> list[str]:
    """The commands (comments cut) of the first bash block under `heading` in the README."""
    block = (REPO / "README.md").read_text().split(heading, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_first_hour_from_a_fresh_clone(tmp_path):
    repo = clone_repo(tmp_path / "ferflow")
    write_params(repo / "params.yaml", TINY_OVERRIDES)  # seconds, not minutes; the commands are the README's
    subprocess.run(["git", "-c", "user.email=t@x.invalid", "-c", "user.name=t", "commit", "-qam", "tiny"], cwd=repo, check=True)
    (repo / ".venv").symlink_to(BIN.parent)  # `make repro` finds its venv installed
    for stamped in ("requirements.txt", "pyproject.toml"):  # ... and up to date: no `pip install -e` of this
        os.utime(repo / stamped, (0, 0))  # temporary clone into the shared venv (later tests would import it)
    home = tmp_path / "home"
    home.mkdir()
    env = _user_env(home, repo)

    quick_start = _readme_commands("## Quick start")
    assert quick_start[1] == "make repro"
    out = _sh("make repro", repo, env)
    experiments = _readme_commands("## Experiments")
    identity, baseline, first_experiment = experiments[:3]
    assert identity.startswith("git config user.name") and baseline.startswith("git add -A")
    _sh(f"{identity}; {baseline}", repo, env)  # no git identity in this HOME: the README's line sets one
    assert first_experiment.startswith("dvc exp run -S train.epochs=")
    out += _sh("dvc exp run -S train.epochs=3", repo, env)

    noise = [line for line in out.splitlines() if NOISE.search(line)]
    assert not noise, noise
    val = [float(v) for v in re.findall(r"\[train\] trained .*validation accuracy ([0-9.]+)", out)]
    test = [float(v) for v in re.findall(r"\[evaluate\] test accuracy ([0-9.]+)", out)]
    assert len(val) == len(test) == 2, out[-3000:]
    for v, t in zip(val, test):  # the same model on neighbouring splits: not 0.14 against 0.60
        assert abs(v - t) < 0.3, (val, test)
    assert out.count("View run") <= 2, out  # once per run-opening stage at most, never twice

    show_cmd = next(line for line in experiments if line.startswith("dvc exp show"))
    show = _sh(show_cmd, repo, env)
    assert max(len(line) for line in show.splitlines()) <= 120, show
    assert "train.epochs" in show and "synthetic" not in show and " ! " not in show, show  # baseline row filled
    board = _sh("ferflow leaderboard --png ''", repo, env)
    assert "@champion" in board and "epochs=3" in board, board
