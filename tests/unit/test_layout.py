"""Layout checks computed from the imports: dvc.yaml deps, layering, no import cycles."""

from __future__ import annotations

import graphlib
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ferflow.core.imports import direct_imports, imported_modules, module_name, module_path
from ferflow.serving.packaging import MODEL_CODE

# subpackage -> the subpackages it may import (itself included); top-level modules are free
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "model": {"core", "data", "tracking", "model"},  # training logs to MLflow as it goes
    "tracking": {"core", "tracking"},
    "serving": {"core", "data", "model", "tracking", "serving"},
    "video": {"core", "data", "model", "serving", "video"},  # `ferflow watch` uses the served model's code
    "demo": {"core", "data", "model", "serving", "video", "demo"},  # `ferflow demo`: the page over both
}


def dep_coverage(root: Path, stage: str, deps: list[str]) -> tuple[list[str], list[str]]:
    """(imported module files no dep covers, ferflow deps covering no imported module)."""
    # the export stage also ships the pyfunc file and what it imports as the model's code
    roots = [root / "stages" / f"{stage}.py", *([root / MODEL_CODE.relative_to(REPO)] if stage == "export" else [])]
    modules = set().union(*(imported_modules(r, root) for r in roots))
    imported = [module_path(m, root).relative_to(root).as_posix() for m in modules]
    local = [d.rstrip("/") for d in deps if d.split("/")[0] == "ferflow"]

    def covers(dep: str, file: str) -> bool:
        return file == dep or file.startswith(dep + "/")

    missing = sorted(f for f in imported if not any(covers(d, f) for d in local))
    unused = sorted(d for d in local if not any(covers(d, f) for f in imported))
    return missing, unused


def subpackage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else None


def package_modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "ferflow").rglob("*.py"))}


def layering_violations(root: Path) -> list[str]:
    out = []
    for name, path in package_modules(root).items():
        here = subpackage(name)
        if here not in ALLOWED:
            continue
        for imported in sorted(direct_imports(path, root)):
            there = subpackage(imported)
            if there is not None and there not in ALLOWED[here]:
                out.append(f"{name} imports {imported}")
    return out


def import_cycle(root: Path) -> list[str] | None:
    """A cycle of module-level imports between ferflow modules, or None."""
    graph = {name: direct_imports(path, root, module_level_only=True) - {name} for name, path in package_modules(root).items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_deps_cover_exactly_the_modules_each_stage_imports(stage: str) -> None:
    missing, unused = dep_coverage(REPO, stage, STAGES[stage]["deps"])
    assert not missing, f"dvc.yaml stage {stage}: deps miss {missing}"
    assert not unused, f"dvc.yaml stage {stage}: deps {unused} hold no module the stage imports"
    assert f"stages/{stage}.py" in STAGES[stage]["deps"]


def test_dep_coverage_fails_on_drift(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "ferflow/__init__.py": "",
            "ferflow/a/__init__.py": "",
            "ferflow/a/x.py": "from . import y\n\ndef f():\n    from ferflow.b.z import g  # inside a function: still counted\n",
            "ferflow/a/y.py": "",
            "ferflow/b/__init__.py": "",
            "ferflow/b/z.py": "def g(): ...\n",
            "ferflow/c/__init__.py": "",
            "stages/s.py": "def main():\n    from ferflow.a.x import f\n",
        },
    )
    assert dep_coverage(root, "s", ["stages/s.py", "ferflow/a", "ferflow/b", "ferflow/__init__.py"]) == ([], [])
    assert dep_coverage(root, "s", ["stages/s.py", "ferflow/a", "ferflow/__init__.py"]) == (
        ["ferflow/b/__init__.py", "ferflow/b/z.py"],
        [],
    )
    assert dep_coverage(root, "s", ["ferflow", "ferflow/c"]) == ([], ["ferflow/c"])


def test_no_module_level_import_cycles() -> None:
    assert import_cycle(REPO) is None


def test_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "ferflow/__init__.py": "",
            "ferflow/p.py": "from ferflow.q import b\n",
            "ferflow/q.py": "import ferflow.r\n\ndef b(): ...\n",
            "ferflow/r.py": "from ferflow import p\n",
            "ferflow/lazy.py": "def f():\n    import ferflow.lazy2\n",
            "ferflow/lazy2.py": "import ferflow.lazy\n",  # a function-level import closes no cycle
        },
    )
    assert set(import_cycle(root)) == {"ferflow.p", "ferflow.q", "ferflow.r"}
    (root / "ferflow/r.py").write_text("")
    assert import_cycle(root) is None


def test_subpackages_import_only_lower_layers() -> None:
    assert layering_violations(REPO) == []


def test_layering_check_finds_an_upward_import(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "ferflow/__init__.py": "",
            "ferflow/cli.py": "import ferflow.serving.s\n",  # top-level modules may import anything
            **{f"ferflow/{p}/__init__.py": "" for p in ALLOWED},
            "ferflow/core/c.py": "def f():\n    from ferflow.tracking.t import g\n",
            "ferflow/model/m.py": "from ferflow.data.d import h\nfrom ferflow.serving import s\n",
            "ferflow/data/d.py": "def h(): ...\n",
            "ferflow/tracking/t.py": "def g(): ...\n",
            "ferflow/serving/s.py": "",
        },
    )
    assert layering_violations(root) == ["ferflow.core.c imports ferflow.tracking.t", "ferflow.model.m imports ferflow.serving.s"]


@pytest.mark.parametrize("error", ["ferflow.data.ingest:IngestError", "ferflow.tracking.store:TrackingError"])
def test_stage_errors_from_upper_layers_exit_in_one_line(error: str, capsys: pytest.CaptureFixture[str]) -> None:
    """core/stage.py catches them through their core base (UserError), without importing them."""
    import argparse
    import importlib

    from ferflow.core import stage

    module, name = error.split(":")
    raised = getattr(importlib.import_module(module), name)

    def main(_args: argparse.Namespace) -> None:
        raise raised("data/ingested: class 'disgust' is empty")

    with pytest.raises(SystemExit) as exit_info:
        stage.run(main, argparse.Namespace(), "ingest")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "ingest: error: data/ingested: class 'disgust' is empty\n"


def test_functions_stay_short_and_take_few_parameters():
    """#28: no function in ferflow/ over 60 lines or with more than 6 parameters (a config
    object counts as one): a maintainer reads each at once."""
    import ast

    too_big = []
    for path in sorted((REPO / "ferflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg)
                count -= bool(args.args) and args.args[0].arg in ("self", "cls")
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or count > 6:
                    too_big.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines, {count} parameters")
    assert not too_big, "\n".join(too_big)


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["ruff-check", "ruff-format"])
def test_the_code_passes_make_lint(check: list[str]) -> None:
    """`make lint` as a test, so a red lint reaches CI (it ran only by hand before)."""
    import subprocess
    import sys

    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.is_file():
        pytest.skip(f"{ruff}: ruff is not installed (make install-dev installs it)")
    done = subprocess.run(
        [str(ruff), *check, "ferflow", "stages", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
