"""Stage 2 - index: data/ingested -> data/index.csv (splits, labels, hashes, sizes)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferflow.core import stage  # noqa: E402


def main(args) -> None:
    from ferflow.core.params import load_section
    from ferflow.data.index import build_index

    data = load_section("data", args.params)
    metrics = build_index(
        args.ingested,
        args.out,
        args.metrics,
        classes=data["classes"],
        val_fraction=data["val_fraction"],
        dedup=data["dedup"],
        seed=data["seed"],
        plots_dir=args.plots,
    )
    stage.log.info("index: %s, dedup %s", metrics["split_totals"], metrics["dedup"])


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--ingested", default="data/ingested")
    p.add_argument("--out", default="data/index.csv")
    p.add_argument("--metrics", default="metrics/index.json")
    p.add_argument("--plots", default="data/plots")
    stage.run(main, p.parse_args(), "index", collect_garbage=False)
