"""Presets: named recipes that validate against the schema and travel as `dvc exp run -S` flags."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from conftest import BIN
from ferflow.core.params import Params, ParamsError, flatten
from ferflow.core.presets import load_preset, preset_names, preset_overrides


def test_the_documented_presets_exist():
    assert {"cpu-quick", "full"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_overrides_are_shell_words_that_parse_back_to_the_preset(name):
    preset = flatten(load_preset(name))
    overrides = preset_overrides(name)
    assert len(overrides) == len(preset)
    defaults = flatten(Params())
    for override in overrides:
        assert not any(ch.isspace() for ch in override), override  # survives $(...) word splitting
        key, _, text = override.partition("=")
        assert key in defaults, key
        assert yaml.safe_load(text) == preset[key], override


def test_cpu_quick_is_the_recipe_the_readme_reports():
    flat = flatten(load_preset("cpu-quick"))
    assert flat["train.arch"] == "ferflow_vgg" and flat["train.width"] == 0.5 and flat["train.epochs"] == 25
    assert "train.crop_size" not in flat and flat["evaluate.tta"] == "tencrop"
    assert flat["train.optimizer"] == "adam" and flat["train.lr_schedule"] == "cosine"
    assert flat["train.dropout_scale"] == 0.0  # the dropout-off runs the README's preset rows report


def test_unknown_preset_names_the_known_ones(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(ParamsError, match=r"unknown preset 'b': expected one of a"):
        load_preset("b", tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: {epochz: 3}\n", "unknown key `train.epochz`. Did you mean 'epochs'?"),
        ("train: {optimizer: lion}\n", "`train.optimizer` = 'lion' is not allowed"),
        ("train: [1, 2]\n", "`train` must be a mapping"),
        ("", "expected a mapping of params sections"),
        ("train: {epochs: 3\n", "not valid YAML"),
    ],
)
def test_a_broken_preset_fails_naming_the_file_and_key(tmp_path, text, expected):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ParamsError) as err:
        load_preset("bad", tmp_path)
    assert expected in str(err.value) and "bad.yaml" in str(err.value)


def test_cli_prints_flags_and_lists_presets():
    out = subprocess.run([BIN / "ferflow", "preset", "cpu-quick"], capture_output=True, text=True, check=True).stdout
    assert out.split() == [w for o in preset_overrides("cpu-quick") for w in ("-S", o)]
    listing = subprocess.run([BIN / "ferflow", "preset"], capture_output=True, text=True, check=True).stdout
    assert listing.startswith("cpu-quick") and "full" in listing
    bad = subprocess.run([BIN / "ferflow", "preset", "fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown preset 'fast'" in bad.stderr


@pytest.mark.parametrize("name", preset_names())
def test_the_description_is_one_whole_sentence(name):
    from ferflow.core.presets import describe_preset

    text = describe_preset(name)
    assert text.endswith(".") and len(text) > 40, text  # not cut at the first line of a paragraph


def test_full_claims_no_accuracy_it_never_reached():
    from ferflow.core.presets import describe_preset

    text = describe_preset("full")
    assert "never trained to the end" in text and ">=" not in text


@pytest.mark.parametrize("name", preset_names())
def test_the_served_model_uses_the_tta_its_accuracy_was_measured_with(name):
    flat = flatten(load_preset(name))
    assert flat["serve.tta"] == flat["evaluate.tta"]
