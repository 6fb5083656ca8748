"""Stage 3 - extract: index CSV + ingested faces -> per-split model-ready arrays + the label map."""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.data.arrays import ExtractPaths, extract_arrays


def main(args) -> None:
    paths = ExtractPaths(args.index, args.ingested, args.out, args.label_map)
    stage.log.info("arrays: %s", extract_arrays(paths, read_params(args.params).data.classes))


if __name__ == "__main__":
    args = stage.parser(__doc__, "index", "ingested", "out", "label-map").parse_args()
    stage.run(main, args, "extract", collect_garbage=False)
