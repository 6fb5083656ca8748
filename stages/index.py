"""Stage 2 - index: the ingested faces -> the index CSV (splits, labels, hashes, sizes), metrics, plots."""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.data.index import IndexPaths, build_index


def main(args) -> None:
    metrics = build_index(IndexPaths(args.ingested, args.out, args.metrics, args.plots), read_params(args.params).data)
    stage.log.info("index: %s, dedup %s", metrics["split_totals"], metrics["dedup"])


if __name__ == "__main__":
    stage.run(main, stage.parser(__doc__, "ingested", "out", "metrics", "plots").parse_args(), "index", collect_garbage=False)
