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
# what the saved model holds and answers, as this backend sees it
saved = keras.models.load_model(sys.argv[1] + "/model.keras", compile=False)
np.savez(sys.argv[1] + "/seen.npz", probs=saved.predict(x[:4], verbose=0), *[np.asarray(w) for w in saved.get_weights()])
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
    seen = np.load(tmp_path / "seen.npz")
    # the trained weights, not a fresh initialisation: equal bit for bit
    weights = model.get_weights()
    assert len(weights) == len(seen.files) - 1
    for i, w in enumerate(weights):
        np.testing.assert_array_equal(np.asarray(w), seen[f"arr_{i}"], err_msg=f"weight {i}")
    # and the same answers, up to the backends' bfloat16 arithmetic
    x = np.random.default_rng(0).random((16, 48, 48, 1), dtype=np.float32)[:4]
    probs = model.predict(x, verbose=0)
    np.testing.assert_allclose(probs, seen["probs"], atol=0.02)


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
