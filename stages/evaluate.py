"""Stage 5 - evaluate: models/model.keras on the test split -> metrics/eval.json, plots, predictions."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferflow.core import stage  # noqa: E402


def main(args) -> None:
    from ferflow.pipeline import run_evaluation

    m = run_evaluation(args)
    stage.log.info("test accuracy %.4f, macro-F1 %.4f (n=%d, tta=%s)", m["accuracy"], m["macro_f1"], m["n_test"], m["tta"])


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--arrays", default="data/arrays")
    p.add_argument("--label-map", default="data/label_map.json")
    p.add_argument("--model", default="models/model.keras")
    p.add_argument("--history", default="metrics/history.csv")
    p.add_argument("--run-file", default="models/run.json")
    p.add_argument("--metrics", default="metrics/eval.json")
    p.add_argument("--predictions", default="metrics/predictions.csv")
    p.add_argument("--plots", default="metrics/plots")
    stage.run(main, p.parse_args(), "evaluate")
