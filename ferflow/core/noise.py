"""Native libraries' start-up lines (TensorFlow's oneDNN note, absl's pre-init notice), which
they write to file descriptor 2 directly, past `sys.stderr`: a filter that drops them and
lets everything else through. Used by the stages, the CLI and the served model."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Iterator

# Native libraries' lines that are not the user's business, dropped from the stage's
# stderr: TensorFlow's oneDNN note and absl's pre-init notice (written before
# TF_CPP_MIN_LOG_LEVEL is read), and tf.data's "NodeDef mentions attribute
# use_unbounded_threadpool" (an E-level line about a harmless version skew).
NATIVE_NOISE = re.compile(
    r"(oneDNN custom operations are on"
    r"|All log messages before absl::InitializeLog\(\) is called"
    r"|NodeDef mentions attribute use_unbounded_threadpool"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow)"
)


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str] = NATIVE_NOISE) -> Iterator[None]:
    """Route file descriptor 2 (C++ libraries write there directly, past sys.stderr) through a
    pipe and drop the lines matching `noise`; everything else, real warnings included,
    reaches the original stderr unchanged."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # the thread's own copy of the real stderr, made here: `saved` may be closed before the
    # thread first runs (a stage that fails at once), and its lines must still get through
    forward_to = os.dup(saved)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as pipe, os.fdopen(forward_to, "wb", buffering=0) as out:
            for line in pipe:
                if not noise.search(line.decode("utf-8", "replace")):
                    out.write(line)

    thread = threading.Thread(target=forward, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread sees EOF
        os.close(saved)
        thread.join(timeout=10)
