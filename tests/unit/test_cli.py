"""`ferflow --help` and every subcommand's options are described (#29 item 9)."""

from __future__ import annotations

import argparse

from ferflow import cli


def test_every_option_of_every_command_has_help():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing


def test_help_loads_no_heavy_library():
    """`ferflow --help` took 5 s when it imported MLflow and TensorFlow (#29 item 9)."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from ferflow import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "print(sorted(m for m in ('mlflow', 'keras', 'tensorflow', 'pandas', 'sklearn', 'cv2') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_models_prints_its_table_without_library_noise():
    """#29 item 9: `ferflow models` printed absl/oneDNN start-up lines."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ferflow.cli", "models"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "seed001" in proc.stdout, proc.stderr[-2000:]
    noise = [line for line in proc.stderr.splitlines() if any(w in line for w in ("absl", "oneDNN", "cpu_feature_guard"))]
    assert not noise, noise
