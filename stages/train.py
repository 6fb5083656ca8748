"""Stage 4 - train: data/arrays -> models/model.keras, metrics/train.json, metrics/history.csv.

Opens the pipeline run's MLflow run (recorded in models/run.json for evaluate/export).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferflow.core import stage  # noqa: E402


def main(args) -> None:
    from ferflow.pipeline import run_training

    metrics = run_training(args)
    stage.log.info(
        "trained %s: best val_accuracy %.4f after %d epochs", metrics["arch"], metrics["best_val_accuracy"], metrics["epochs_run"]
    )


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--arrays", default="data/arrays")
    p.add_argument("--label-map", default="data/label_map.json")
    p.add_argument("--index", default="data/index.csv")
    p.add_argument("--model", default="models/model.keras")
    p.add_argument("--metrics", default="metrics/train.json")
    p.add_argument("--history", default="metrics/history.csv")
    p.add_argument("--run-file", default="models/run.json")
    p.add_argument("--work-dir", default=".ferflow/train", help="per-epoch backup for resuming (not a DVC output)")
    p.add_argument("--no-mlflow", action="store_true", help="train without tracking")
    stage.run(main, p.parse_args(), "train")
