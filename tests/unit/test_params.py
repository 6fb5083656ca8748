"""params.yaml is validated once against one schema: each bad input gets one clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ferflow.core.params import DataParams, Params, ParamsError, flatten, load_params, read_params, validate_params

DEFAULTS = Params().model_dump()

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_file_is_valid_and_spells_out_every_schema_default():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    assert params == DEFAULTS == raw  # nothing hidden: the file lists every key
    assert params["train"]["arch"] == "seed001" and params["data"]["source"] == "synthetic"


def test_defaults_fill_missing_keys():
    params = validate_params({"train": {"epochs": 3}})
    assert params["train"]["epochs"] == 3
    assert params["train"]["batch_size"] == DEFAULTS["train"]["batch_size"]
    assert params["train"]["augment"]["flip"] is False


def test_max_per_class_takes_null_int_or_per_split_caps():
    assert validate_params({"data": {"max_per_class": 50}})["data"]["max_per_class"] == 50
    caps = {"train": 1000, "test": 250, "val": None}
    assert validate_params({"data": {"max_per_class": caps}})["data"]["max_per_class"] == caps
    assert flatten(validate_params({"data": {"max_per_class": caps}}))["data.max_per_class"] == caps
    assert DataParams(max_per_class={"train": 3}).split_caps() == {"train": 3, "val": None, "test": None}
    assert DataParams(max_per_class=5).split_caps() == {"train": 5, "val": 5, "test": 5}


@pytest.mark.parametrize("bad", [{"training": 3}, 0, {"train": 0}, "3", True])
def test_max_per_class_refuses_what_ingest_cannot_cap(bad):
    with pytest.raises(ParamsError, match=r"`data.max_per_class` = "):
        validate_params({"data": {"max_per_class": bad}})


def test_empty_sections_take_their_defaults():
    # `train:` or `augment:` with nothing under it is null in YAML
    assert (
        validate_params({"train": {"augment": None, "epochs": 3}, "evaluate": None})["train"]["augment"]
        == (DEFAULTS["train"]["augment"])
    )
    assert validate_params(yaml.safe_load("serve:\n"))["serve"] == DEFAULTS["serve"]


def test_int_is_accepted_for_float():
    assert validate_params({"train": {"learning_rate": 1}})["train"]["learning_rate"] == 1.0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"epoch": 5}}, ["unknown key `train.epoch`", "Did you mean 'epochs'?"]),
        ({"trian": {}}, ["unknown key `trian`", "Did you mean 'train'?"]),
        ({"data": {"val_fraction": 0}}, ["`data.val_fraction` = 0.0", "strictly between 0 and 1"]),
        ({"data": {"val_fraction": 1.5}}, ["`data.val_fraction` = 1.5"]),
        ({"train": {"epochs": -1}}, ["`train.epochs` = -1", "an integer >= 1"]),
        ({"train": {"epochs": 2.5}}, ["`train.epochs` = 2.5", "an integer"]),
        ({"train": {"epochs": "ten"}}, ["`train.epochs` = 'ten'"]),
        ({"train": {"epochs": True}}, ["`train.epochs` = True"]),
        ({"train": {"arch": "resnet"}}, ["`train.arch` = 'resnet'", "seed001"]),
        ({"train": {"arch": "seed01"}}, ["Did you mean 'seed001'?"]),
        ({"train": {"optimizer": "rmsprop"}}, ["`train.optimizer` = 'rmsprop'", "adam, adamw, sgd"]),
        ({"train": {"dropout_scale": 2.5}}, ["`train.dropout_scale`", "dropout rate >= 1"]),
        ({"train": {"learning_rate": 0}}, ["`train.learning_rate` = 0.0", "> 0"]),
        ({"train": {"augment": {"flip": "yes"}}}, ["`train.augment.flip` = 'yes'", "true or false"]),
        ({"train": {"augment": {"rotate": 0.1}}}, ["unknown key `train.augment.rotate`", "rotation"]),
        ({"data": {"classes": ["happy", "joy"]}}, ["`data.classes`", "angry, disgust"]),
        ({"data": {"classes": []}}, ["`data.classes` = []"]),
        ({"data": {"classes": ["happy", "happy"]}}, ["distinct"]),
        ({"data": {"dedup": "remove"}}, ["`data.dedup` = 'remove'", "keep, drop_cross_split"]),
        ({"data": {"class_map": {"joy": "glad"}}}, ["`data.class_map`"]),
        ({"train": 5}, ["`train` must be a mapping"]),
        ({"data": {"max_per_class": 0}}, ["`data.max_per_class` = 0", "integer >= 1"]),
        ({"data": {"max_per_class": {"training": 10}}}, ["`data.max_per_class`", "split (train/val/test)"]),
        ({"data": {"max_per_class": {"test": -1}}}, ["`data.max_per_class` = {'test': -1}"]),
        ({"export": {"registered_model_name": "  "}}, ["`export.registered_model_name`", "non-empty"]),
        ({"evaluate": {"tta": "ten_crop"}}, ["`evaluate.tta` = 'ten_crop'", "none, flip, tencrop"]),
        ({"train": {"crop_size": 50}}, ["`train.crop_size` = 50", "<= 48"]),
    ],
)
def test_bad_params_are_named_with_value_and_allowed(raw, expected):
    with pytest.raises(ParamsError) as err:
        validate_params(raw, "params.yaml")
    message = str(err.value)
    assert message.startswith("params.yaml: ")
    for fragment in expected:
        assert fragment in message, message


def test_unreadable_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_a_stage_reads_its_typed_section(tiny_params):
    train = read_params(tiny_params).train
    assert train.arch == "ferflow_tiny"
    assert "source" not in type(train).model_fields


def test_flatten_uses_dotted_keys():
    flat = flatten(DEFAULTS)
    assert flat["train.augment.flip"] is False
    assert flat["data.synthetic.train_per_class"] == DEFAULTS["data"]["synthetic"]["train_per_class"]
    assert flat["data.class_map"] == {}


def test_stage_stops_before_work_with_one_line_error(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["val_fractoin"] = 0.2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "ingest.py"), "--params", "params.yaml", "--out", "out"]
        + ["--rejected", "r.csv", "--metrics", "m.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "ingest: error: params.yaml: unknown key `data.val_fractoin`. Did you mean 'val_fraction'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------- issue #20 item 5: hostile params files


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_yaml_alias_bomb_is_refused_fast_with_a_short_message(tmp_path):
    # the classic "billion laughs": 9 levels of 9 aliases, ~1 KB of text
    # inside one known key, so no "unknown key" error stops validation early
    levels = ["&a0 [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    levels += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = _write(tmp_path, f"train:\n  epochs: [{', '.join(levels)}]\n")
    assert path.stat().st_size < 1500
    with pytest.raises(ParamsError, match="alias") as info:
        load_params(path)
    assert str(info.value).startswith(str(path)) and len(str(info.value)) < 400


def test_duplicate_keys_are_refused_like_dvc_does(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(ParamsError, match=r"duplicate key 'epochs'.*line 3"):
        load_params(path)


def test_non_utf8_params_file_is_named(tmp_path):
    path = _write(tmp_path, b"train:\n  arch: seed\xff001\n")
    with pytest.raises(ParamsError, match=rf"^{path}: not UTF-8 text \(byte 0xff at offset 19\)"):
        load_params(path)


@pytest.mark.parametrize(
    ("raw", "expected", "allowed"),
    [
        ({"train": {"learning_rate": float("inf")}}, "`train.learning_rate` = inf", "<= 10 (finite)"),
        ({"train": {"weight_decay": float("inf")}}, "`train.weight_decay` = inf", "<= 1 (finite)"),
        ({"train": {"min_learning_rate": float("inf")}}, "`train.min_learning_rate` = inf", "(finite)"),
        ({"train": {"width": float("inf")}}, "`train.width` = inf", "<= 16"),
        ({"train": {"width": float("nan")}}, "`train.width` = nan", "(finite)"),
        ({"train": {"width": 1e6}}, "`train.width` = 1000000.0", "<= 16"),
        ({"train": {"epochs": 1_000_000_000}}, "`train.epochs` = 1000000000", "<= 100000"),
        ({"train": {"batch_size": 10**11}}, "`train.batch_size` = 100000000000", "<= 65536"),
        ({"evaluate": {"batch_size": 10**9}}, "`evaluate.batch_size` = 1000000000", "<= 65536"),
        ({"train": {"seed": 2**40}}, "`train.seed` = 1099511627776", "<= 4294967295"),
        ({"data": {"source": ""}}, "`data.source` = ''", "non-empty path"),
        ({"data": {"source": "   "}}, "`data.source` = '   '", "non-empty path"),
        ({"data": {"max_per_class": 10**12}}, "`data.max_per_class`", "<= 10000000"),
        ({"serve": {"max_image_pixels": 10**12}}, "`serve.max_image_pixels`", "<= 1000000000"),
        ({"serve": {"max_images_per_request": 0}}, "`serve.max_images_per_request` = 0", "integer >= 1"),
        # #30: a limit below one 48x48 face refuses every request
        ({"serve": {"max_request_pixels": 1}}, "`serve.max_request_pixels` = 1", "integer >= 2304"),
        ({"serve": {"max_image_pixels": 100}}, "`serve.max_image_pixels` = 100", "integer >= 2304"),
    ],
)
def test_infinite_huge_and_empty_values_are_refused(raw, expected, allowed):
    with pytest.raises(ParamsError) as info:
        validate_params(raw)
    assert expected in str(info.value) and allowed in str(info.value)


def test_long_values_are_truncated_in_messages():
    with pytest.raises(ParamsError) as info:
        validate_params({"train": {"arch": "x" * 100_000}})
    assert len(str(info.value)) < 600 and "..." in str(info.value)


@pytest.mark.parametrize("source", ["synthetic ", " data/fer2013.zip", "data/x\n"])
def test_a_data_source_with_leading_or_trailing_space_is_refused(source):
    """#30: 'synthetic ' was accepted as a path and failed much later, far from params.yaml."""
    with pytest.raises(ParamsError, match=r"`data.source` = .*without leading or trailing spaces"):
        validate_params({"data": {"source": source}})
