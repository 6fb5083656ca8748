"""Stage 1 - ingest: `data.source` -> data/ingested/{faces.npy, manifest.csv}, rejects, metrics."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferflow.core import stage  # noqa: E402


def main(args) -> None:
    from ferflow.core.params import load_section
    from ferflow.data.ingest import ingest
    from ferflow.data.sources import open_source
    from ferflow.tracking.store import find_root

    data = load_section("data", args.params)
    source = open_source(data, root=find_root())
    metrics = ingest(
        source,
        out_dir=args.out,
        rejected_csv=args.rejected,
        metrics_json=args.metrics,
        classes=data["classes"],
        max_per_class=data["max_per_class"],
        max_reject_fraction=data["max_reject_fraction"],
    )
    stage.log.info("ingested %d images %s, rejected %d", metrics["total"], metrics["split_totals"], metrics["rejected"])


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--out", default="data/ingested")
    p.add_argument("--rejected", default="data/rejected.csv")
    p.add_argument("--metrics", default="metrics/ingest.json")
    stage.run(main, p.parse_args(), "ingest", collect_garbage=False)
