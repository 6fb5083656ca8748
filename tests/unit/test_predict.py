"""`ferflow predict`: table, --json, --annotate, directories, errors (through ferflow.cli.main)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BIN
from ferflow.cli import build_parser, main
from ferflow.core.classes import FER_CLASSES
from ferflow.data.sources.synthetic import generate_face
from ferflow.serving.model import load_model
from ferflow.serving.predict import annotation_paths, collect_images, format_table, predict_files
from support import synthetic_photo

PHOTO_SIZE = (800, 600)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple[Path, Path]) -> Path:
    from ferflow.serving.packaging import export_model

    work = tmp_path_factory.mktemp("predict-model")
    model, labels = tiny_model
    serve = {"detect_face": True, "tta": "none", "max_image_bytes": 2_000_000, "max_image_pixels": 4_000_000}
    face = generate_face(np.random.default_rng(0), "sad")
    return export_model(model, labels, serve, face, work / "export")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(5)
    (d / "crops").mkdir()
    paths = {
        "crop_png": d / "crops" / "happy.png",
        "crop_bmp": d / "crops" / "surprise.bmp",
        "photo": d / "photo.jpg",
        "noface": d / "wall.webp",
    }
    Image.fromarray(generate_face(rng, "happy")).save(paths["crop_png"])
    Image.fromarray(generate_face(rng, "surprise")).save(paths["crop_bmp"])
    synthetic_photo(generate_face(np.random.default_rng(0), "happy"), size=PHOTO_SIZE).save(paths["photo"], quality=92)
    synthetic_photo(None, size=(320, 240)).save(paths["noface"])
    (d / "notes.txt").write_text("not an image, and not listed: wrong suffix")
    (d / ".hidden").mkdir()
    Image.fromarray(generate_face(rng, "sad")).save(d / ".hidden" / "skipped.png")
    return paths


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["predict", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_is_a_cli_subcommand() -> None:
    args = build_parser().parse_args(["predict", "a.png", "--json"])
    assert args.images == ["a.png"] and args.json and args.model == "models/export"


def test_collect_images_walks_directories(images: dict[str, Path]) -> None:
    root = images["photo"].parent
    assert collect_images([root]) == sorted(images.values())  # no .txt, no hidden folder
    assert collect_images([images["photo"]]) == [images["photo"]]


def test_table_for_a_directory_with_a_broken_file(capsys, model_dir: Path, images: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    rc, out, err = run_cli(capsys, str(images["photo"].parent), str(broken), "--model", str(model_dir))
    assert rc == 1 and "1 of 5 file(s) could not be classified" in err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "face", "label", "conf", "top-3"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {*map(str, images.values()), str(broken)}
    assert rows[str(images["photo"])].split()[1] == "yes"
    assert rows[str(images["noface"])].split()[1] == "no"
    assert "ERROR" in rows[str(broken)] and "not an image" in rows[str(broken)]
    for path in images.values():
        fields = rows[str(path)].split()
        assert fields[2] in FER_CLASSES and 0 < float(fields[3]) <= 1
        assert fields[4] == fields[2]  # top-3 starts with the label


def test_json_output(capsys, model_dir: Path, images: dict[str, Path]) -> None:
    rc, out, _ = run_cli(capsys, str(images["crop_png"]), str(images["photo"]), "--model", str(model_dir), "--json")
    assert rc == 0
    records = json.loads(out)
    assert [r["file"] for r in records] == [str(images["crop_png"]), str(images["photo"])]
    for r in records:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["label"] == r["top3"][0][0] and r["confidence"] == pytest.approx(r["top3"][0][1])
        assert [p for _, p in r["top3"]] == sorted((p for _, p in r["top3"]), reverse=True)
    assert records[0]["face_found"] is False and records[0]["face_box"] == [0, 0, 48, 48]
    assert records[1]["face_found"] is True
    x, y, w, h = records[1]["face_box"]
    assert 250 < x < 350 and 120 < y < 250 and 150 < w < 300  # the face pasted at (300, 150), 240 px
    # --no-detect-face: the whole photo, centre square
    rc, out, _ = run_cli(capsys, str(images["photo"]), "--model", str(model_dir), "--json", "--no-detect-face")
    assert json.loads(out)[0]["face_box"] == [100, 0, 600, 600]


def test_annotate_writes_a_png_of_the_original_size(capsys, model_dir: Path, images: dict[str, Path], tmp_path: Path) -> None:
    out_png = tmp_path / "out" / "annotated.png"
    rc, out, _ = run_cli(capsys, str(images["photo"]), "--model", str(model_dir), "--annotate", str(out_png), "--json")
    assert rc == 0
    (record,) = json.loads(out)
    assert record["annotated"] == str(out_png)
    with Image.open(out_png) as img:
        assert img.format == "PNG" and img.size == PHOTO_SIZE
        annotated = np.asarray(img.convert("RGB"))
    original = np.asarray(Image.open(images["photo"]).convert("RGB"))
    x, y, w, h = record["face_box"]
    assert tuple(annotated[y + h // 2, x]) == (40, 220, 60)  # the box's left edge, in green
    assert np.array_equal(annotated[-50:, -50:], original[-50:, -50:])  # away from box and label: untouched
    # several images: --annotate is a directory, one PNG each, original sizes
    rc, _, _ = run_cli(
        capsys, str(images["crop_png"]), str(images["noface"]), "--model", str(model_dir), "--annotate", str(tmp_path / "many")
    )
    assert rc == 0
    small = Image.open(tmp_path / "many" / "happy.annotated.png").size  # enlarged so its label fits
    assert small[0] == small[1] and small[0] % 48 == 0
    assert Image.open(tmp_path / "many" / "wall.annotated.png").size == (320, 240)


def test_usage_errors_exit_2(capsys, model_dir: Path, images: dict[str, Path], tmp_path: Path) -> None:
    rc, _, err = run_cli(capsys, str(tmp_path / "missing.png"), "--model", str(model_dir))
    assert rc == 2 and "missing.png: no such file or directory" in err
    rc, _, err = run_cli(capsys, str(images["photo"]), "--model", str(tmp_path))
    assert rc == 2 and "not an exported model (no MLmodel file)" in err
    rc, _, err = run_cli(capsys, str(images["photo"]), str(images["noface"]), "--model", str(model_dir), "--annotate", "x.png")
    assert rc == 2 and "need a directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, str(tmp_path / "empty"), "--model", str(model_dir))
    assert rc == 2 and "no image files" in err


def test_progress_bar_counts_every_file_batch_by_batch(model_dir: Path, images: dict[str, Path]) -> None:
    from tqdm import tqdm

    stream = io.StringIO()
    paths = [images["crop_png"], images["noface"], images["photo"]]
    # mininterval 0: draw every update (on onnxruntime the batches come faster than tqdm's 0.1 s)
    with tqdm(total=len(paths), file=stream, unit="image", mininterval=0, miniters=1) as bar:
        records = predict_files(load_model(str(model_dir)), paths, {}, batch_size=2, progress=bar)
    assert len(records) == 3 and bar.n == 3
    shown = stream.getvalue()
    assert "2/3" in shown and "3/3" in shown


def test_helpers() -> None:
    assert annotation_paths([Path("a/x.png"), Path("b/x.png")], "out") == [
        Path("out/x.annotated.png"),
        Path("out/x-1.annotated.png"),
    ]
    table = format_table([{"file": "f.png", "error": "not an image"}])
    assert table.splitlines()[1].split()[:3] == ["f.png", "-", "ERROR"]


def test_annotate_fits_the_whole_label_on_a_48px_face(capsys, model_dir: Path, images: dict[str, Path], tmp_path: Path) -> None:
    from PIL import ImageDraw, ImageFont

    from ferflow.serving.predict import MIN_LABEL_FONT_PX

    out_png = tmp_path / "small.png"
    rc, out, _ = run_cli(capsys, str(images["crop_png"]), "--model", str(model_dir), "--annotate", str(out_png), "--json")
    assert rc == 0
    (record,) = json.loads(out)
    label = f"{record['label']} {record['confidence']:.2f} (no face found)"
    amber = (255, 190, 0)  # the label colour when the whole image was classified

    def label_pixels(img: Image.Image) -> np.ndarray:
        rgb = np.asarray(img.convert("RGB")).astype(int)
        return rgb[..., 0] - rgb[..., 2] > 60  # amber, anti-aliased on black; the face is gray

    drawn = label_pixels(Image.open(out_png))
    assert drawn.any() and not drawn[:, -1].any()  # the label ends inside the image
    # every glyph is there: at least as many label pixels as the label at the smallest font, uncut
    canvas = Image.new("RGB", (600, 60))
    ImageDraw.Draw(canvas).text((2, 2), label, fill=amber, font=ImageFont.load_default(size=MIN_LABEL_FONT_PX))
    assert drawn.sum() >= label_pixels(canvas).sum()


def test_collect_images_under_a_hidden_folder_skips_only_hidden_parts_below_it(tmp_path: Path) -> None:
    # issue #20 item 7: `predict /data/.cache/faces` found nothing
    root = tmp_path / ".cache" / "faces"
    (root / ".thumbs").mkdir(parents=True)
    Image.new("L", (48, 48)).save(root / "a.png")
    Image.new("L", (48, 48)).save(root / ".thumbs" / "b.png")
    Image.new("L", (48, 48)).save(root / ".c.png")
    assert collect_images([root]) == [root / "a.png"]


def test_predict_says_which_model_it_used(
    tmp_path: Path, images: dict[str, Path], tiny_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """#19.4: the model's URI, run, test accuracy and test data go to stderr (stdout stays the table/JSON)."""
    from ferflow.serving.packaging import export_model

    model, labels = tiny_model
    info = {"mlflow_run_id": "0123abcd" * 4, "test_accuracy": 0.6029, "test_set": "3f2a9c01deadbeef", "n_test": 700}
    serve = {"detect_face": False, "tta": "none"}
    face = generate_face(np.random.default_rng(0), "sad")
    exported = export_model(model, labels, serve, face, tmp_path / "export", {"ferflow": {**info, "classes": list(FER_CLASSES)}})
    rc, out, err = run_cli(capsys, str(images["crop_png"]), "--model", str(exported), "--json")
    assert rc == 0 and json.loads(out)[0]["label"] in FER_CLASSES
    (line,) = [x for x in err.splitlines() if x.startswith("model: ")]
    assert (
        str(exported) in line
        and info["mlflow_run_id"] in line
        and "0.6029" in line
        and "3f2a9c01 (700 images, 7 classes)" in line
    )


def test_predict_command_line_prints_no_tensorflow_start_up_lines(model_dir: Path, images: dict[str, Path]) -> None:
    """#19.5: as a user runs it (a fresh process, no TF_CPP_MIN_LOG_LEVEL set), stderr holds the
    model line and no oneDNN/absl notes; the JSON on stdout is intact."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [str(BIN / "ferflow"), "predict", str(images["crop_png"]), "--model", str(model_dir), "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["label"] in FER_CLASSES
    assert "model: " in proc.stderr
    for noise in ("oneDNN", "absl::InitializeLog", "This TensorFlow binary"):
        assert noise not in proc.stderr, proc.stderr


def test_the_readme_sample_face_is_found_and_labelled(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """#29 item 5: the README's curl and predict examples post examples/face.jpg, which the
    repo ships; a face at the default detector's size, so it is found."""
    sample = Path(__file__).resolve().parents[2] / "examples" / "face.jpg"
    assert 2_000 < sample.stat().st_size < 20_000
    rc, out, _ = run_cli(capsys, str(sample), "--model", str(model_dir), "--json")
    assert rc == 0
    (record,) = json.loads(out)
    assert record["face_found"] is True and record["label"] in FER_CLASSES


def test_the_default_model_is_found_from_a_subfolder_of_the_project(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """#29 item 11: the relative default `models/export` failed outside the repo root."""
    import shutil

    from ferflow.serving.model import CHAMPION_URI, resolve_model_uri

    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    shutil.copytree(model_dir, project / "models" / "export")
    (project / "clips").mkdir()
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(project / "clips")
    assert resolve_model_uri("models/export") == str(project / "models" / "export")
    sample = Path(__file__).resolve().parents[2] / "examples" / "face.jpg"
    rc, out, err = run_cli(capsys, str(sample), "--json")
    assert rc == 0 and f"model: {project / 'models' / 'export'}" in err, err
    monkeypatch.chdir(tmp_path)  # outside any project: the store's champion
    assert resolve_model_uri("models/export") == CHAMPION_URI
    assert resolve_model_uri("elsewhere/export") == "elsewhere/export"
