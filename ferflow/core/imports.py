"""Which ferflow modules a file imports, read from its source (`ast`, nothing is executed).

Used by the export (the model ships only the modules its pyfunc imports) and by
tests/unit/test_layout.py (dvc.yaml deps cover what each stage imports; layering; no cycles).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "ferflow"


def module_path(name: str, root: str | os.PathLike[str]) -> Path | None:
    """`ferflow.a.b` -> root/ferflow/a/b.py or root/ferflow/a/b/__init__.py; None if neither exists."""
    base = Path(root, *name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
    """root/ferflow/a/b.py -> `ferflow.a.b`; root/ferflow/a/__init__.py -> `ferflow.a`."""
    parts = list(Path(path).resolve().relative_to(Path(root).resolve()).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _statements(tree: ast.AST, module_level_only: bool) -> Iterable[ast.Import | ast.ImportFrom]:
    """Import statements; with `module_level_only`, not those inside function bodies (run on call)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            elif not (module_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)):
                pending.append(child)


def direct_imports(path: str | os.PathLike[str], root: str | os.PathLike[str], module_level_only: bool = False) -> set[str]:
    """The ferflow modules (files under root) that the file at `path` imports itself.

    `from ferflow.core import files` names the module ferflow.core.files when that file
    exists, else the package ferflow.core (for an attribute); relative imports are
    resolved against `path`. Enclosing packages are not listed: see `with_packages`.
    """
    path = Path(path)
    try:
        here = module_name(path, root)
    except ValueError:  # a script outside root's package tree (stages/*.py)
        here = ""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for stmt in _statements(ast.parse(path.read_text(), str(path)), module_level_only):
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        else:
            base = stmt.module or ""
            if stmt.level:
                anchor = here.split(".")[: len(here.split(".")) - stmt.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in stmt.names]
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            # an attribute (`from m import f`) is not a module: fall back to its owner
            while name and module_path(name, root) is None:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def with_packages(modules: Iterable[str]) -> set[str]:
    """Each module plus its enclosing packages: importing ferflow.a.b runs ferflow and ferflow.a first."""
    out: set[str] = set()
    for name in modules:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def imported_modules(start: str | os.PathLike[str], root: str | os.PathLike[str], module_level_only: bool = False) -> set[str]:
    """Every ferflow module that importing/running `start` can import, transitively (packages included).

    By default imports inside functions count too: they run when the function is called.
    """
    seen: set[str] = set()
    pending = sorted(with_packages(direct_imports(start, root, module_level_only)))
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        file = module_path(name, root)
        if file is not None:
            pending.extend(with_packages(direct_imports(file, root, module_level_only)) - seen)
    return seen
