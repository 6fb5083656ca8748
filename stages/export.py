"""Stage 6 - export: models/model.keras -> MLflow pyfunc models/export + a registered version."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferflow.core import stage  # noqa: E402


def main(args) -> None:
    from ferflow.pipeline import run_export

    r = run_export(args)
    if "version" in r:
        stage.log.info(
            "exported to %s; registered %s v%d (champion: v%d)",
            r["export_dir"],
            r["registered_model"],
            r["version"],
            r["champion_version"],
        )
    else:
        stage.log.info("exported to %s (no MLflow run: not registered)", r["export_dir"])


if __name__ == "__main__":
    p = stage.parser(__doc__)
    p.add_argument("--arrays", default="data/arrays")
    p.add_argument("--label-map", default="data/label_map.json")
    p.add_argument("--model", default="models/model.keras")
    p.add_argument("--run-file", default="models/run.json")
    p.add_argument("--eval-metrics", default="metrics/eval.json")
    p.add_argument("--out", default="models/export")
    p.add_argument("--metrics", default="metrics/export.json")
    stage.run(main, p.parse_args(), "export")
