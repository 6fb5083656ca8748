"""Optional: ingest + index the real FER-2013 zip (Kaggle layout). Needs FER2013_ZIP=<path>.

FER2013_ZIP=../shared/data/fer2013.zip .venv/bin/pytest tests/pipeline/test_realdata.py -s
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import DataParams
from ferflow.data.index import IndexPaths, build_index
from ferflow.data.ingest import MANIFEST_NAME, IngestPaths, ingest, load_faces
from ferflow.data.preprocessing import decode_image, to_face_pixels
from ferflow.data.sources import open_source

ZIP = os.environ.get("FER2013_ZIP", "")
pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not ZIP, reason="FER2013_ZIP is not set (path to the real FER-2013 zip, Kaggle layout)"),
]

# The official counts (angry..surprise); the zip holds Training as train/ and PublicTest as test/.
TRAIN = dict(zip(FER_CLASSES, (3995, 436, 4097, 7215, 4965, 4830, 3171)))
TEST = dict(zip(FER_CLASSES, (467, 56, 496, 895, 607, 653, 415)))


def test_real_fer2013_zip(tmp_path):
    path = Path(ZIP).expanduser()
    assert path.is_file(), f"FER2013_ZIP={ZIP}: not a file"
    data = DataParams(source=str(path.resolve()))
    ing = ingest(open_source(data), IngestPaths(tmp_path / "ingested", tmp_path / "rejected.csv", tmp_path / "ingest.json"), data)
    # before dedup: exactly the official counts, nothing rejected or skipped
    assert ing["rejected"] == 0 and ing["skipped"] == {}
    assert ing["counts"] == {"train": TRAIN, "test": TEST}
    assert ing["split_totals"] == {"train": 28_709, "test": 3_589}
    dup = ing["duplicates"]
    leak = dup["cross_split"]["train_test"]
    assert leak["distinct_images"] > 0 and leak["train_copies"] >= leak["distinct_images"]  # FER-2013 leaks
    # the libjpeg-turbo shortcut stores exactly Pillow's pixels, for every image
    manifest = pd.read_csv(tmp_path / "ingested" / MANIFEST_NAME, keep_default_na=False, dtype={"pixel_hash": str})
    faces = load_faces(tmp_path / "ingested", expected_rows=len(manifest))
    with zipfile.ZipFile(path) as zf:
        for row, origin in zip(manifest["row"], manifest["origin"]):
            pillow = to_face_pixels(decode_image(zf.read(origin.split(":", 1)[1])))
            assert (faces[row] == pillow).all(), origin

    idx = build_index(IndexPaths(tmp_path / "ingested", tmp_path / "index.csv", tmp_path / "index.json"), data)
    assert idx["dedup"]["dropped"] == leak["train_copies"]
    assert idx["split_totals"]["train"] + idx["split_totals"]["val"] == 28_709 - leak["train_copies"]
    assert idx["counts"]["test"] == TEST  # test is never touched
    index = pd.read_csv(tmp_path / "index.csv", keep_default_na=False, dtype={"pixel_hash": str})
    test_hashes = set(index.loc[index["split"] == "test", "pixel_hash"])
    assert not index.loc[index["split"] != "test", "pixel_hash"].isin(test_hashes).any()
    print("\ningest (before dedup):", json.dumps({k: ing[k] for k in ("split_totals", "duplicates")}))
    print("index (after dedup):", json.dumps({k: idx[k] for k in ("split_totals", "counts", "dedup")}))
