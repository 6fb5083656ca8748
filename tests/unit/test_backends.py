"""The model builders, augmentation and fit loop are backend-neutral Keras 3.

Trains one step under a second Keras backend (JAX or PyTorch) when one is installed, saves
the .keras file there, and loads it back under TensorFlow, as evaluate/export do.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
OTHER_BACKENDS = [b for b, module in (("jax", "jax"), ("torch", "torch")) if importlib.util.find_spec(module)]

# The `full` preset's recipe (SGD-Nesterov, weight decay, cosine, label smoothing, every
# augmentation) at the precision `auto` picks on a JAX GPU, on the tiny net to stay quick.
TRAIN_ONE_STEP = """
import sys, numpy as np, keras
from ferflow.core.params import TrainParams
from ferflow.core.presets import load_preset
assert keras.backend.backend() == sys.argv[2], keras.backend.backend()
sys.path.insert(0, sys.argv[3])
from support import fit
recipe = {**load_preset("full")["train"], "arch": "ferflow_tiny", "epochs": 1, "batch_size": 8, "deterministic": False}
p = TrainParams.model_validate({**recipe, "mixed_precision": "mixed_bfloat16"})
rng = np.random.default_rng(0)
x = rng.random((16, 48, 48, 1), dtype=np.float32); y = np.arange(16) % 7
_, summary = fit(p, x, y, x[:8], y[:8], sys.argv[1], verbose=0)
print("precision", summary["precision"])
"""


@pytest.mark.skipif(not OTHER_BACKENDS, reason="no second Keras backend installed (pip install jax or torch to run this test)")
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_one_training_step_under_another_backend_loads_in_tensorflow(backend, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_ONE_STEP, str(tmp_path), backend, str(REPO / "tests")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision mixed_bfloat16" in proc.stdout, proc.stdout[-2000:]
    import keras

    assert keras.backend.backend() == "tensorflow"
    model = keras.models.load_model(tmp_path / "model.keras", compile=False)
    probs = model.predict(np.zeros((2, 48, 48, 1), np.float32), verbose=0)
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)


def test_training_path_has_no_tensorflow_imports_outside_backend_guards():
    """models.py, augmentation.py and the fit loop import no tf.*; training.py touches TF only inside
    `keras.backend.backend() == "tensorflow"` branches."""
    for module in ("architectures.py", "augmentation.py"):
        assert "tensorflow" not in (REPO / "ferflow" / "model" / module).read_text(), module
    source = (REPO / "ferflow" / "model" / "training.py").read_text()
    for line_no, line in enumerate(source.splitlines(), 1):
        if "import tensorflow" in line:
            guard = source.splitlines()[line_no - 3 : line_no]
            assert any('backend() == "tensorflow"' in g for g in guard), f"training.py:{line_no} imports TF unguarded"
