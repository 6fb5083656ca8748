"""`ferflow` command line: models, preset, leaderboard, ensemble, predict, watch, demo, validate-params, tracking-server.

Heavy libraries (keras, mlflow) are imported only by the subcommand that runs, so
`ferflow --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cmd_models(args: argparse.Namespace) -> int:
    from ferflow.model.architectures import describe_models

    rows = describe_models(args.num_classes)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'arch':<14}{'params':>12}{'MFLOPs/img':>12}  description")
    for r in rows:
        print(f"{r['arch']:<14}{r['params']:>12,}{r['mflops_per_image']:>12,.1f}  {r['description']}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from ferflow.core.params import ParamsError, load_params

    try:
        load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.params}: OK")
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    from ferflow.core.params import ParamsError
    from ferflow.core.presets import describe_preset, preset_names, preset_overrides

    if not args.name:
        for name in preset_names():
            print(f"{name:<12}{describe_preset(name)}")
        return 0
    try:
        overrides = preset_overrides(args.name)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(f"-S {o}" for o in overrides))
    return 0


def cmd_soft_labels(args: argparse.Namespace) -> int:
    """A teacher's probabilities on the train split -> the .npz that `train.teacher` names."""
    import keras

    from ferflow.model.distillation import write_soft_labels
    from ferflow.serving.ensemble import EnsembleError, read_member

    try:
        keras_file = read_member(args.model).keras if args.model.is_dir() else args.model
        out = write_soft_labels(keras.models.load_model(keras_file, compile=False), args.arrays, args.out)
    except (EnsembleError, FileNotFoundError, ValueError) as exc:
        print(f"ferflow soft-labels: error: {exc}", file=sys.stderr)
        return 2
    print(f"soft labels of {args.model} on {args.arrays}/train.npz written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from ferflow.demo.analysis import UploadError
    from ferflow.demo.app import serve
    from ferflow.serving.model import UsageError

    if args.max_video_mb <= 0:
        print(f"error: --max-video-mb {args.max_video_mb}: expected a positive number", file=sys.stderr)
        return 2
    try:
        serve(args.model, args.host, args.port, int(args.max_video_mb * 1_000_000), args.open)
    except (UsageError, UploadError, MlflowException, OSError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"error: {message.splitlines()[0] if message else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from ferflow.serving.model import DEFAULT_MODEL  # light: importing ferflow.demo here would slow down `ferflow --help`

    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"exported model directory or MLflow model URI (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p.add_argument("--max-video-mb", type=float, default=100, help="largest video upload in MB (default 100)")
    p.add_argument("--open", action="store_true", help="also open the page in the default web browser")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list the CNN architectures with parameter counts and FLOPs")
    p.add_argument("--num-classes", type=int, default=7, help="size of the output layer the counts are for (default 7)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("validate-params", help="check params.yaml against the schema")
    p.add_argument("params", nargs="?", default="params.yaml", help="the params file to check (default: params.yaml)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preset", help="print a training recipe as `dvc exp run -S` flags (no name: list them)")
    p.add_argument("name", nargs="?", help="a preset (cpu-quick, full); without it: the list")
    p.set_defaults(func=cmd_preset)

    p = sub.add_parser("soft-labels", help="a teacher's probabilities on the train split -> .npz for train.teacher")
    p.add_argument("model", type=Path, help="the teacher: an exported model directory or a .keras file (an ensemble's too)")
    p.add_argument("--arrays", type=Path, default=Path("data/arrays"), help="the extract stage's arrays (default: data/arrays)")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (track it with `dvc add`)")
    p.set_defaults(func=cmd_soft_labels)

    p = sub.add_parser("demo", help="a local web page: photos, the webcam and videos through the model")
    add_demo_arguments(p)
    p.set_defaults(func=cmd_demo)

    # these modules keep heavy imports (keras, mlflow) inside their functions
    from ferflow.serving import ensemble, predict
    from ferflow.tracking import leaderboard, server
    from ferflow.video import watch

    commands = (
        ("leaderboard", leaderboard),
        ("ensemble", ensemble),
        ("predict", predict),
        ("watch", watch),
        ("tracking-server", server),
    )
    for name, mod in commands:
        p = sub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


# Commands that load TensorFlow get the stages' quiet output: importing ferflow.core.stage
# sets TensorFlow's log level and MLflow's no-progress-bar default before either loads, and
# its filter drops the C++ start-up lines (oneDNN, absl) from stderr. Not the tracking
# server: its children outlive a filter thread.
LOADS_TENSORFLOW = ("models", "predict", "watch", "demo", "ensemble", "soft-labels")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in LOADS_TENSORFLOW:
        return int(args.func(args) or 0)
    from ferflow.core.stage import filtered_stderr

    with filtered_stderr():
        return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
