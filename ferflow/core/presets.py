"""Named training recipes (`presets/<name>.yaml`): partial params files applied as `-S` overrides.

    dvc exp run -n cpu-quick $(ferflow preset cpu-quick) -S data.source=../shared/data/fer2013.zip

A preset holds only the keys it changes; it is validated against the params schema on
defaults, so a typo in a preset fails here, not halfway through a training run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ferflow.core.params import ParamsError, flatten, parse_yaml, validate_params

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def preset_names(presets_dir: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in presets_dir.glob("*.yaml"))


def load_preset(name: str, presets_dir: Path = PRESETS_DIR) -> dict[str, Any]:
    """The preset's own keys (nested), after checking that defaults + preset are valid params."""
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(
            f"unknown preset {name!r}: expected one of {', '.join(preset_names(presets_dir)) or '(none)'} (files in {presets_dir})"
        )
    raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(raw, dict) or not raw:
        raise ParamsError(f"{path}: expected a mapping of params sections, got {raw!r}")
    validate_params(raw, str(path))
    return raw


def describe_preset(name: str, presets_dir: Path = PRESETS_DIR) -> str:
    """The first comment line of the preset file."""
    for line in (presets_dir / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _flow(value: Any) -> str:
    # one shell word that DVC's -S parses back to the same YAML value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def preset_overrides(name: str, presets_dir: Path = PRESETS_DIR) -> list[str]:
    """`key=value` strings for `dvc exp run -S`, one per leaf param the preset sets."""
    return [f"{key}={_flow(value)}" for key, value in flatten(load_preset(name, presets_dir)).items()]
