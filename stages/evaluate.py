"""Stage 5 - evaluate: the trained model on the test split -> eval metrics, plots, predictions."""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.model.evaluation_run import run_evaluation


def main(args) -> None:
    m = run_evaluation(
        read_params(args.params).evaluate,
        arrays=args.arrays,
        label_map=args.label_map,
        model_path=args.model,
        history_csv=args.history,
        run_file=args.run_file,
        metrics_json=args.metrics,
        predictions_csv=args.predictions,
        plots_dir=args.plots,
        summary_json=args.summary,
    )
    stage.log.info("test accuracy %.4f, macro-F1 %.4f (n=%d, tta=%s)", m["accuracy"], m["macro_f1"], m["n_test"], m["tta"])


if __name__ == "__main__":
    p = stage.parser(__doc__, "arrays", "label-map", "model", "history", "run-file", "metrics", "predictions", "plots", "summary")
    stage.run(main, p.parse_args(), "evaluate")
