"""Stage 1 - ingest: `data.source` -> the ingested faces + manifest, rejects, metrics."""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.core.repo import find_root
from ferflow.data.ingest import IngestPaths, ingest
from ferflow.data.sources import open_source


def main(args) -> None:
    data = read_params(args.params).data
    metrics = ingest(open_source(data, root=find_root()), IngestPaths(args.out, args.rejected, args.metrics), data)
    stage.log.info("ingested %d images %s, rejected %d", metrics["total"], metrics["split_totals"], metrics["rejected"])


if __name__ == "__main__":
    stage.run(main, stage.parser(__doc__, "out", "rejected", "metrics").parse_args(), "ingest", collect_garbage=False)
