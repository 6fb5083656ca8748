"""Stage 6 - export: the trained model -> an MLflow pyfunc directory + a registered version."""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.serving.export import ExportPaths, run_export


def main(args) -> None:
    params = read_params(args.params)
    paths = ExportPaths(args.arrays, args.label_map, args.model, args.eval_metrics, args.out, args.metrics, args.calibration)
    r = run_export(params.export, params.serve, paths)
    if "int8" in r:
        stage.log.info(r["int8"]["reason"])
    if "version" in r:
        stage.log.info(
            "exported to %s; registered %s v%d, test accuracy %.4f; %s: v%d; champion: v%d",
            r["export_dir"],
            r["registered_model"],
            r["version"],
            r["test_accuracy"],
            r["champion_alias"],
            r["champion_alias_version"],  # not `previous_champion`: a concurrent export may have won
            r["champion_version"],
        )
    else:
        stage.log.info("exported to %s (no MLflow run: not registered)", r["export_dir"])


if __name__ == "__main__":
    p = stage.parser(__doc__, "arrays", "label-map", "model", "eval-metrics", "out", "metrics", "calibration")
    stage.run(main, p.parse_args(), "export")
