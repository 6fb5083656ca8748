"""Index: dedup before the val carve, exact duplicate/leak counts, class subsets, plots."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import DataParams
from ferflow.data.arrays import ExtractPaths, extract_arrays, load_label_map, load_split
from ferflow.data.index import IndexPaths, build_index, carve_validation
from ferflow.data.ingest import IngestPaths, ingest
from ferflow.data.sources.files import open_path_source


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48), dtype=np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def tree(train: int, test: int, val: int = 0, classes=FER_CLASSES) -> dict[str, bytes]:
    files = {}
    for s, (split, n) in enumerate((("train", train), ("val", val), ("test", test))):
        for c, name in enumerate(classes):
            for i in range(n):
                files[f"{split}/{name}/{split}_{name}_{i}.png"] = png(10_000 * s + 100 * c + i)
    return files


def ingest_and_index(
    tmp_path: Path, files: dict[str, bytes], classes=FER_CLASSES, dedup="drop_cross_split", fraction=0.2, plots=False
):
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    data = DataParams(classes=list(classes), val_fraction=fraction, dedup=dedup, seed=7)
    ing = ingest(
        open_path_source(src), IngestPaths(tmp_path / "ingested", tmp_path / "rejected.csv", tmp_path / "ingest.json"), data
    )
    paths = IndexPaths(
        tmp_path / "ingested", tmp_path / "index.csv", tmp_path / "index.json", tmp_path / "plots" if plots else None
    )
    idx = build_index(paths, data)
    assert json.loads((tmp_path / "index.json").read_text()) == json.loads(json.dumps(idx))
    index = pd.read_csv(tmp_path / "index.csv", keep_default_na=False, dtype={"pixel_hash": str})
    return ing, idx, index


def leaky_tree() -> dict[str, bytes]:
    files = tree(train=10, test=2)
    files["train/happy/copy1.png"] = files["test/happy/test_happy_0.png"]
    files["train/happy/copy2.png"] = files["test/happy/test_happy_0.png"]
    files["train/happy/copy_of_sad.png"] = files["test/sad/test_sad_0.png"]  # leaks and conflicts
    files["train/angry/twin.png"] = files["train/angry/train_angry_3.png"]
    return files


def test_dedup_drops_train_copies_of_test_before_the_val_carve(tmp_path):
    ing, idx, index = ingest_and_index(tmp_path, leaky_tree())
    assert ing["split_totals"] == {"train": 74, "test": 14}  # before dedup
    assert ing["duplicates"] == {
        "within_split": {"train": 2, "test": 0},  # copy2 repeats copy1; the angry twin
        "within_split_total": 2,
        "cross_split": {"train_test": {"distinct_images": 2, "train_copies": 3, "test_copies": 2}},
        "conflicting_labels": 1,
    }
    assert idx["dedup"] == {
        "policy": "drop_cross_split",
        "cross_split_copies_in_train_val": 3,
        "dropped": 3,
        "dropped_by_split": {"train": 3, "val": 0},
    }
    test_hashes = set(index.loc[index["split"] == "test", "pixel_hash"])
    assert not index.loc[index["split"] != "test", "pixel_hash"].isin(test_hashes).any()
    # val is 20% of the train that survived dedup: happy had 13 train images, 10 after dedup -> 2 val
    assert idx["val_carved_from_train"] is True
    for c in FER_CLASSES:
        if c != "angry":
            assert (idx["counts"]["train"][c], idx["counts"]["val"][c], idx["counts"]["test"][c]) == (8, 2, 2)
    # the angry twin (11 images) moves as one: both copies on the same side of train/val
    twin = index[index["pixel_hash"] == index.loc[index["origin"] == "train/angry/twin.png", "pixel_hash"].iloc[0]]
    assert len(twin) == 2 and twin["split"].nunique() == 1
    assert idx["counts"]["train"]["angry"] + idx["counts"]["val"]["angry"] == 11 and idx["counts"]["val"]["angry"] in (2, 3)
    after = idx["duplicates_after_dedup"]
    assert all(v["distinct_images"] == 0 for v in after["cross_split"].values()) and after["within_split_total"] == 1
    assert after["conflicting_labels"] == 0


def test_keep_policy_counts_but_keeps_the_copies(tmp_path):
    _, idx, index = ingest_and_index(tmp_path, leaky_tree(), dedup="keep")
    assert idx["dedup"] == {
        "policy": "keep",
        "cross_split_copies_in_train_val": 3,
        "dropped": 0,
        "dropped_by_split": {"train": 0, "val": 0},
    }
    assert len(index) == 74 + 14
    leak = idx["duplicates_after_dedup"]["cross_split"]
    assert leak["train_test"]["distinct_images"] + leak["val_test"]["distinct_images"] >= 2


def test_source_val_is_kept_and_its_test_copies_dropped(tmp_path):
    files = tree(train=4, val=2, test=2)
    files["val/fear/leak.png"] = files["test/fear/test_fear_1.png"]
    files["train/fear/leak.png"] = files["test/fear/test_fear_1.png"]
    _, idx, _ = ingest_and_index(tmp_path, files)
    assert idx["val_carved_from_train"] is False
    assert idx["dedup"]["dropped_by_split"] == {"train": 1, "val": 1}
    assert idx["split_totals"] == {"train": 28, "val": 14, "test": 14}


def test_dedup_that_empties_a_class_is_a_clear_error(tmp_path):
    files = tree(train=2, test=2)
    files["train/disgust/train_disgust_0.png"] = files["test/disgust/test_disgust_0.png"]
    files["train/disgust/train_disgust_1.png"] = files["test/disgust/test_disgust_1.png"]
    with pytest.raises(ValueError, match=r"no image left in train/disgust after data.dedup='drop_cross_split'"):
        ingest_and_index(tmp_path, files)


def test_carve_is_stratified_seeded_and_never_takes_a_whole_class():
    df = pd.DataFrame({"split": ["train"] * 7 + ["test"], "label": ["a"] * 5 + ["b"] * 2 + ["a"], "pixel_hash": list("pqrstuvp")})
    out = carve_validation(df, 0.4, seed=1)
    assert out.groupby(["split", "label"]).size().to_dict() == {
        ("test", "a"): 1,
        ("train", "a"): 3,
        ("train", "b"): 1,
        ("val", "a"): 2,
        ("val", "b"): 1,
    }
    assert out.equals(carve_validation(df, 0.4, seed=1))
    single = pd.DataFrame({"split": ["train", "test"], "label": ["a", "a"], "pixel_hash": ["x", "y"]})
    assert carve_validation(single, 0.5, seed=0)["split"].tolist() == ["train", "test"]


def test_a_class_subset_flows_to_label_ids_plots_and_label_map(tmp_path):
    chosen = ["angry", "happy", "neutral", "sad"]
    files = tree(train=6, test=2)  # all 7 classes on disk; only 4 selected
    ing, idx, index = ingest_and_index(tmp_path, files, classes=chosen, plots=True)
    assert ing["skipped"] == {"class_not_selected": 3 * 8}
    assert sorted(index["label"].unique()) == chosen
    assert (index["label_id"] == index["label"].map(chosen.index)).all() and set(index["label_id"]) == {0, 1, 2, 3}
    assert list(idx["counts"]["train"]) == chosen
    with Image.open(tmp_path / "plots" / "samples.png") as grid:
        assert grid.size == ((70 + 10 * 48) * 2, 4 * 48 * 2)  # one row per chosen class
    with Image.open(tmp_path / "plots" / "class_distribution.png") as bars:
        assert bars.size[0] > 500
    extract_arrays(
        ExtractPaths(tmp_path / "index.csv", tmp_path / "ingested", tmp_path / "arrays", tmp_path / "label_map.json"), chosen
    )
    assert load_label_map(tmp_path / "label_map.json") == chosen
    x, y = load_split(tmp_path / "arrays", "test")
    assert x.shape == (8, 48, 48, 1) and sorted(set(y.tolist())) == [0, 1, 2, 3]


def test_labels_outside_data_classes_are_an_error(tmp_path):
    ingest_and_index(tmp_path, tree(train=2, test=1))
    with pytest.raises(ValueError, match=r"labels \['disgust', 'fear', 'surprise'\] are not in data.classes"):
        paths = IndexPaths(tmp_path / "ingested", tmp_path / "i.csv", tmp_path / "i.json")
        build_index(paths, DataParams(classes=["angry", "happy", "neutral", "sad"], dedup="keep", seed=1))
