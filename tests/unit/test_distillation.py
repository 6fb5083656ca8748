"""Distillation (issue #32 item 2): a student trained on a fixed teacher's soft labels follows it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ferflow.core.classes import FER_CLASSES
from ferflow.core.params import TrainParams
from ferflow.data.preprocessing import prepare_batch
from ferflow.data.sources.synthetic import generate_face
from ferflow.model.distillation import load_soft_labels, mixed_targets, train_digest, write_soft_labels
from support import fit


def _faces(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(FER_CLASSES)), per_class)
    return prepare_batch(np.stack([generate_face(rng, FER_CLASSES[label]) for label in y])), y


def test_mixed_targets_weigh_labels_and_softened_teacher() -> None:
    teacher = np.array([[0.9, 0.1], [0.2, 0.8]])
    targets = mixed_targets(np.array([1, 1]), teacher, temperature=1.0, weight=0.25)
    np.testing.assert_allclose(targets, [[0.225, 0.775], [0.05, 0.95]], atol=1e-6)
    soft = mixed_targets(np.array([0, 0]), teacher, temperature=4.0, weight=1.0)
    assert 0.5 < soft[0, 0] < 0.9  # flatter, same favourite


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_student_on_soft_labels_follows_a_fixed_teacher(tmp_path: Path) -> None:
    """The teacher's favourite class is a fixed permutation of the true one: a student with
    weight 1.0 on the soft labels learns the teacher's answers, not the labels."""
    x_train, y_train = _faces(14, seed=1)
    (tmp_path / "arrays").mkdir()
    np.savez(tmp_path / "arrays" / "train.npz", x=x_train, y=y_train)
    shifted = (y_train + 3) % len(FER_CLASSES)  # the teacher's answers: never the label
    # validation scored on the teacher's answers: the checkpoint kept (lowest val_loss) is the one closest to it
    x_val, y_val = x_train[::4], shifted[::4]

    class FixedTeacher:
        def predict(self, x, batch_size=256, verbose=0):
            probs = np.full((len(x), len(FER_CLASSES)), 0.02)
            probs[np.arange(len(x)), shifted] = 0.88
            return probs

    teacher_file = write_soft_labels(FixedTeacher(), tmp_path / "arrays", tmp_path / "teacher.npz")
    assert sorted(p.name for p in (tmp_path / "arrays").iterdir()) == ["train.npz"]  # never the test split
    train = TrainParams(
        arch="seed000", width=0.25, dropout_scale=0.0, epochs=30, batch_size=16, learning_rate=0.002, mixed_precision="float32",
        lr_schedule="constant", teacher=str(teacher_file), distill_weight=1.0, distill_temperature=1.0, early_stopping_patience=40,
    )  # fmt: skip
    model, _ = fit(train, x_train, y_train, x_val, y_val, tmp_path / "out", verbose=0)
    student = model.predict(x_train, verbose=0).argmax(axis=1)
    assert np.mean(student == shifted) > 0.7
    assert np.mean(student == y_train) < 0.2


def test_a_soft_label_file_of_another_train_split_is_refused(tmp_path: Path) -> None:
    x, y = _faces(2, seed=1)
    np.savez(tmp_path / "t.npz", probs=np.full((len(x), 7), 1 / 7), train_digest=np.array(train_digest(x, y)))
    assert load_soft_labels(tmp_path / "t.npz", x, y, 7).shape == (len(x), 7)
    with pytest.raises(ValueError, match=r"train\.teacher: .*t\.npz: computed on another train split"):
        load_soft_labels(tmp_path / "t.npz", x, (y + 1) % 7, 7)
    with pytest.raises(ValueError, match=r"probs shape"):
        load_soft_labels(tmp_path / "t.npz", x[:-1], y[:-1], 7)
    with pytest.raises(FileNotFoundError, match=r"train\.teacher: .*missing\.npz not found"):
        load_soft_labels(tmp_path / "missing.npz", x, y, 7)


def test_soft_labels_cli_writes_a_teacher_file_from_an_export(tmp_path: Path) -> None:
    from conftest import write_tiny_model
    from ferflow.cli import main
    from ferflow.serving.packaging import export_model

    model_path, labels = write_tiny_model(tmp_path)
    export = export_model(model_path, labels, {}, np.full((48, 48), 100, np.uint8), tmp_path / "export")
    x, y = _faces(2, seed=4)
    (tmp_path / "arrays").mkdir()
    np.savez(tmp_path / "arrays" / "train.npz", x=x, y=y)
    assert main(["soft-labels", str(export), "--arrays", str(tmp_path / "arrays"), "--out", str(tmp_path / "t.npz")]) == 0
    probs = load_soft_labels(tmp_path / "t.npz", x, y, len(FER_CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert main(["soft-labels", str(tmp_path), "--out", str(tmp_path / "u.npz")]) == 2  # not an export: one line
