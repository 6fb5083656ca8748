"""Stage 4 - train: arrays -> the Keras model, train metrics, per-epoch history.

Opens the pipeline run's MLflow run (recorded in the run file for evaluate/export).
"""

import project_python  # noqa: F401  (first: stops a Python without the project's packages)

from ferflow.core import stage
from ferflow.core.params import read_params
from ferflow.model.training_run import TrainPaths, run_training


def main(args) -> None:
    params = read_params(args.params)
    paths = TrainPaths(
        args.params, args.arrays, args.label_map, args.index, args.data_plots, args.model, args.metrics, args.history,
        args.run_file, args.work_dir,
    )  # fmt: skip
    metrics = run_training(params.train, params.data, paths, use_mlflow=not args.no_mlflow)
    stage.log.info(
        "trained %s: %d epochs; the saved model's validation accuracy %.4f",
        metrics["arch"], metrics["epochs_run"], metrics["final_val_accuracy"],
    )  # fmt: skip


if __name__ == "__main__":
    # work-dir: the per-epoch backup for resuming (not a DVC output)
    p = stage.parser(__doc__, "arrays", "label-map", "index", "data-plots", "model", "metrics", "history", "run-file", "work-dir")
    p.add_argument("--no-mlflow", action="store_true", help="train without tracking")
    stage.run(main, p.parse_args(), "train")
