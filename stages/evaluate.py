"""Stage 5 - evaluate: the trained model on the test split -> eval metrics, plots, predictions."""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.model.evaluation import EvalPaths
from ferflow.model.evaluation_run import run_evaluation


def main(args) -> None:
    paths = EvalPaths(
        args.arrays, args.label_map, args.model, args.history, args.run_file, args.metrics, args.predictions, args.plots,
        args.summary, args.calibration,
    )  # fmt: skip
    m = run_evaluation(read_params(args.params).evaluate, paths)
    stage.log.info("test accuracy %.4f, macro-F1 %.4f (n=%d, tta=%s)", m["accuracy"], m["macro_f1"], m["n_test"], m["tta"])
    stage.log.info(
        "test ECE %.4f -> %.4f (temperature %.3f, fitted on validation)", m["ece_before"], m["ece_after"], m["temperature"]
    )


if __name__ == "__main__":
    p = stage.parser(
        __doc__,
        "arrays",
        "label-map",
        "model",
        "history",
        "run-file",
        "metrics",
        "predictions",
        "plots",
        "summary",
        "calibration",
    )
    stage.run(main, p.parse_args(), "evaluate")
