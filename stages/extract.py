"""Stage 3 - extract: data/index.csv + data/ingested/faces.npy -> data/arrays/<split>.npz + data/label_map.json."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferflow.core import stage  # noqa: E402


def main(args) -> None:
    from ferflow.core.params import load_section
    from ferflow.data.arrays import extract_arrays

    data = load_section("data", args.params)
    summary = extract_arrays(args.index, args.ingested, args.out, args.label_map, data["classes"])
    stage.log.info("arrays: %s", summary)


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--index", default="data/index.csv")
    p.add_argument("--ingested", default="data/ingested")
    p.add_argument("--out", default="data/arrays")
    p.add_argument("--label-map", default="data/label_map.json")
    stage.run(main, p.parse_args(), "extract", collect_garbage=False)
