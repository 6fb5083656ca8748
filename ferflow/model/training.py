"""Training: arrays + `train` params -> best Keras model, per-epoch history, MLflow metrics.

The model, augmentation and fit loop are backend-neutral Keras 3 (numpy in, keras.layers
and keras.ops only), so the same code trains with KERAS_BACKEND=jax or torch; only the
optional determinism switch touches TensorFlow, and only when it is the backend.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ferflow.core import files
from ferflow.core.interrupts import interrupts_held
from ferflow.core.params import TrainParams
from ferflow.model import distribution
from ferflow.model.architectures import build_model
from ferflow.model.augmentation import build_augmentation
from ferflow.model.distillation import load_soft_labels, mixed_targets
from ferflow.model.history import read_history, write_history

log = logging.getLogger("ferflow")


def detect_precision(requested: str, num_params: int | None = None) -> str:
    """`auto`: mixed_float16 on TensorFlow GPUs, mixed_bfloat16 on JAX GPUs, float32 on JAX CPUs; on other
    CPUs mixed_bfloat16 for wide nets (>2M params) where bf16 matrix units (AVX512-BF16/AMX) exist, else float32."""
    if requested != "auto":
        return requested
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return "mixed_float16"
    elif keras.backend.backend() == "jax":
        import jax

        if jax.devices()[0].platform == "gpu":
            return "mixed_bfloat16"
        return "float32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    has_bf16 = "amx_bf16" in flags or "avx512_bf16" in flags
    # Small nets are memory-bound: bf16 casts cost more than they save (measured on seed001).
    return "mixed_bfloat16" if has_bf16 and (num_params or 0) > 2_000_000 else "float32"


def build_at_precision(train: TrainParams, num_classes: int) -> tuple[keras.Model, str]:
    """The `train` params' model, built under the precision `train.mixed_precision` resolves
    to (set as Keras' global policy), and that precision's name."""

    def build() -> keras.Model:
        return build_model(train.arch, num_classes, train.width, train.dropout_scale, train.crop_size)

    probe = build()
    precision = detect_precision(train.mixed_precision, probe.count_params())
    del probe
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(train.seed)  # same init whatever the probe consumed
    return build(), precision


def set_determinism(seed: int, deterministic: bool) -> None:
    keras.utils.set_random_seed(seed)
    if deterministic and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def make_optimizer(train: TrainParams, total_steps: int) -> keras.optimizers.Optimizer:
    """`train.optimizer` at `train.learning_rate`; with the cosine schedule the rate decays
    over `total_steps` (all epochs' steps) to 1% of it."""
    lr: float | keras.optimizers.schedules.LearningRateSchedule = train.learning_rate
    if train.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=max(1, total_steps), alpha=0.01)
    # weight averaging by the optimizer itself: fit() ends by overwriting the weights with the average
    ema = {"use_ema": train.weight_average == "ema", "ema_momentum": train.ema_decay}
    if train.optimizer == "adam":
        return keras.optimizers.Adam(lr, **ema)
    if train.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=train.weight_decay, **ema)
    return keras.optimizers.SGD(lr, momentum=train.momentum, nesterov=True, weight_decay=train.weight_decay or None, **ema)


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics (with learning rate, epoch time, images/s) to CSVs and to MLflow.

    `history_csvs`: the stage output plus a copy in the resume work dir, because DVC
    deletes a stage's outputs before rerunning it.
    """

    def __init__(self, history_csvs: list[Path], n_train: int, log_to_mlflow: bool, initial_rows: list[dict[str, Any]]):
        super().__init__()
        self.history_csvs = history_csvs
        self.n_train = n_train
        self.log_to_mlflow = log_to_mlflow
        self.rows = initial_rows
        self.tracking_error: str | None = None
        self._t0 = 0.0

    def on_train_begin(self, logs=None):
        # After a resume, log epochs the killed process recorded on disk but not in MLflow.
        if self.log_to_mlflow and self.rows:
            import mlflow

            run_id = mlflow.active_run().info.run_id
            logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")}
            for row in self.rows:
                if row["epoch"] not in logged:
                    self._log(row)

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self._t0
        lr = self.model.optimizer.learning_rate
        row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}}
        row["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        row["epoch_time_s"] = seconds
        row["images_per_s"] = self.n_train / seconds if seconds > 0 else 0.0
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        for path in self.history_csvs:
            write_history(path, self.rows)
        if self.log_to_mlflow:
            self._log(row)

    def _log(self, row: dict[str, Any]) -> None:
        """Log one epoch; if the tracking server went away, warn once and keep training:
        the model and history on disk matter more than the remote copy."""
        from ferflow.tracking.runs import log_metrics

        try:
            with interrupts_held():
                log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
        except Exception as exc:  # mlflow raises several types for a lost server
            self.log_to_mlflow = False
            self.tracking_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning(
                "MLflow logging failed at epoch %d (%s); training continues, history stays in %s",
                row["epoch"],
                self.tracking_error,
                self.history_csvs[0],
            )


class BestWeights(keras.callbacks.Callback):
    """The weights of the epoch with the lowest val_loss, saved atomically. ModelCheckpoint
    writes in place: a kill during the write left a truncated file that the final load (or
    a resume) then failed to read."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.best = float("inf")  # RestorePlateauState sets it after a resume

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get("val_loss")
        if current is None or not current < self.best:
            return
        self.best = float(current)
        with files.atomic_path(self.path) as tmp:
            self.model.save_weights(tmp)


class RestorePlateauState(keras.callbacks.Callback):
    """After a resume, give EarlyStopping, ReduceLROnPlateau and BestWeights the
    best/wait counters they had before the kill (their on_train_begin resets them), by
    replaying their rules over the recorded val_loss history. Must come after them.

    Why it exists: keras.callbacks.BackupAndRestore brings back the weights, optimizer and
    epoch, not other callbacks' counters, so a resumed run would wait `patience` epochs anew."""

    def __init__(self, val_losses: list[float], early: keras.callbacks.EarlyStopping, plateau, checkpoint: BestWeights):
        super().__init__()
        self.val_losses, self.early, self.plateau, self.checkpoint = val_losses, early, plateau, checkpoint

    def on_train_begin(self, logs=None):
        if not self.val_losses:
            return
        early_best = plateau_best = None
        early_wait = plateau_wait = 0
        for epoch, v in enumerate(self.val_losses):
            if epoch >= self.early.start_from_epoch:
                early_wait += 1
                if early_best is None or v < early_best:
                    early_best, early_wait = v, 0
            if plateau_best is None or v < plateau_best:
                plateau_best, plateau_wait = v, 0
            else:
                plateau_wait += 1
                if self.plateau is not None and plateau_wait >= self.plateau.patience:
                    plateau_wait = 0
        self.early.best, self.early.wait = early_best, early_wait
        if self.plateau is not None:
            self.plateau.best, self.plateau.wait = plateau_best, plateau_wait
        self.checkpoint.best = min(self.val_losses)


class LastEpochWeights(keras.callbacks.Callback):
    """The weights as the last epoch left them: an EMA optimizer overwrites them with the
    average when fit() ends, so they are copied at every epoch end."""

    weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch, logs=None):
        self.weights = self.model.get_weights()


def val_scores(model: keras.Model, x_val: np.ndarray, y_val: np.ndarray, batch_size: int = 256) -> dict[str, float]:
    """Validation loss (cross-entropy) and accuracy of the inference model as it stands."""
    probs = np.asarray(model.predict(x_val, batch_size=batch_size, verbose=0), dtype=np.float64)
    picked = np.clip(probs[np.arange(len(y_val)), y_val], 1e-7, 1.0)
    return {"val_loss": float(-np.mean(np.log(picked))), "val_accuracy": float(np.mean(probs.argmax(axis=1) == y_val))}


def choose_weights(fit: _Fit, candidates: dict[str, list[np.ndarray]], batch_size: int) -> dict[str, Any]:
    """Score each candidate (the averaged weights, the last epoch's, the best checkpoint's) on
    validation, BatchNorm statistics recomputed for each; keep the average unless the
    checkpoint's val_loss is lower, with its statistics as recomputed here. Training and
    validation splits only, never the test split."""
    scores, tuned = {}, {}
    for name, weights in candidates.items():
        fit.trainer.set_weights(weights)
        layers = recompute_batchnorm_statistics(fit.model, fit.splits.x_train, batch_size)
        tuned[name], scores[name] = fit.trainer.get_weights(), val_scores(fit.model, fit.splits.x_val, fit.splits.y_val)
    checkpoint = scores.get("best_checkpoint")
    kept = "ema" if checkpoint is None or scores["ema"]["val_loss"] <= checkpoint["val_loss"] else "best_checkpoint"
    fit.trainer.set_weights(tuned[kept])
    log.info(
        "weight average: %s",
        ", ".join(f"{n} val_loss {s['val_loss']:.4f} acc {s['val_accuracy']:.4f}" for n, s in scores.items()),
    )
    return {"weights_kept": kept, "weight_candidates": scores, "batchnorm_layers": layers}


def _all_layers(model: keras.Layer) -> list[keras.Layer]:
    layers = []
    for layer in getattr(model, "layers", []):
        layers += [layer, *_all_layers(layer)]
    return layers


def recompute_batchnorm_statistics(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> int:
    """Set every BatchNormalization layer's moving mean/variance to the average of its batch
    statistics over `x` (one forward pass, dropout off), and return the number of layers.

    Why: the moving averages (momentum 0.99) lag the weights by ~100 steps, so after a short
    run they describe the random initial weights and inference collapses to one class
    (3-epoch synthetic runs ended at chance, 0.14). Averaging with momentum k/(k+1) at
    batch k makes the moving values the exact mean over the batches seen."""
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not norms or len(x) == 0:
        return 0
    dropouts = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.Dropout)]
    saved = [(layer, layer.momentum) for layer in norms] + [(layer, layer.rate) for layer in dropouts]
    try:
        for layer in dropouts:
            layer.rate = 0.0  # the inference network's activations, batch statistics of BN only
        for k, start in enumerate(range(0, len(x), batch_size)):
            for layer in norms:
                layer.momentum = k / (k + 1)
            model(x[start : start + batch_size], training=True)
    finally:
        for layer, value in saved:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = value
            else:
                layer.rate = value
    return len(norms)


def class_weights(y: np.ndarray, num_classes: int) -> dict[int, float]:
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = len(y) / (num_classes * np.maximum(counts, 1))
    return {i: float(w) for i, w in enumerate(weights)}


def _resume_key(train: TrainParams) -> dict[str, Any]:
    # everything but the epoch budget must match for a backup to be reusable
    return train.model_dump(mode="json", exclude={"epochs"})


def can_resume(work_dir: str | os.PathLike[str], train: TrainParams) -> bool:
    """True when `work_dir` holds a per-epoch backup made with the same train params."""
    work_dir = Path(work_dir)
    if not (work_dir / "backup").exists() or not (work_dir / "train_params.json").exists():
        return False
    try:
        return files.read_json(work_dir / "train_params.json") == _resume_key(train)
    except ValueError:
        return False


@dataclass(frozen=True)
class Splits:
    """The arrays a model is fitted on: train and val images (N, 48, 48, 1) and label ids."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int


@dataclass(frozen=True)
class FitOutputs:
    """Where a fit writes: the model and history (stage outputs) and the resume work dir,
    which lives outside DVC's outputs so `dvc repro` does not wipe it before resuming."""

    model: Path
    history: Path
    work_dir: Path


@dataclass
class _Fit:
    """What the steps of one fit hand each other."""

    trainer: keras.Model  # the model with its augmentation layers in front
    model: keras.Model
    precision: str
    splits: Splits  # this process's share, padded to split over the devices
    n_train: int  # images per epoch, all processes together
    padded: dict[str, int]
    resumed: bool = False
    previous_rows: list[dict[str, Any]] = field(default_factory=list)
    last_epoch: LastEpochWeights | None = None  # with train.weight_average: ema


def fit_model(
    train: TrainParams,
    splits: Splits,
    outputs: FitOutputs,
    layout: distribution.Layout,
    *,
    log_to_mlflow: bool = False,
    verbose: int | str = "auto",
) -> tuple[keras.Model, dict[str, Any]]:
    """Train per `train` on the devices of `layout` (from `distribution.setup`, called once by
    the caller before anything asks for devices); save the best model atomically."""
    fit = _build(train, splits, layout)
    _restore_or_reset(fit, train, outputs.work_dir, layout)
    callbacks, epoch_logger = _callbacks(fit, train, outputs, layout, log_to_mlflow)
    if verbose == "auto":  # a progress bar on a terminal; one line per epoch in a log (CI, dvc queue logs)
        verbose = 1 if sys.stdout.isatty() else 2
    start = time.perf_counter()
    s = fit.splits
    fit.trainer.fit(
        s.x_train,
        s.y_train if s.y_train.ndim == 2 else keras.utils.to_categorical(s.y_train, s.num_classes),
        batch_size=train.batch_size // layout.num_processes,  # each process feeds its share of the global batch
        epochs=train.epochs,
        validation_data=(s.x_val, keras.utils.to_categorical(s.y_val, s.num_classes)),
        callbacks=callbacks,
        class_weight=class_weights(splits.y_train, s.num_classes) if train.class_weight else None,
        shuffle=True,
        verbose=verbose,
    )
    summary = _finalize(fit, train, outputs, layout, time.perf_counter() - start)
    summary["tracking_error"] = epoch_logger.tracking_error
    return fit.model, summary


def _build(train: TrainParams, splits: Splits, layout: distribution.Layout) -> _Fit:
    """This process's share of the data, and the model (with augmentation) compiled."""
    y_train = splits.y_train
    if train.teacher:  # the targets become (N, K) mixtures of labels and teacher; they travel through local_share like labels
        teacher = load_soft_labels(train.teacher, splits.x_train, splits.y_train, splits.num_classes)
        y_train = mixed_targets(splits.y_train, teacher, train.distill_temperature, train.distill_weight)
    x_train, y_train, padded_train = distribution.local_share(layout, splits.x_train, y_train, train.seed)
    x_val, y_val, padded_val = distribution.local_share(layout, splits.x_val, splits.y_val, train.seed + 1)
    n_train = len(splits.x_train) + padded_train
    set_determinism(train.seed, train.deterministic)
    model, precision = build_at_precision(train, splits.num_classes)
    augmentation = build_augmentation(train.augment, train.seed)
    trainer = (
        keras.Sequential([keras.Input(model.input_shape[1:]), *augmentation, model], name="trainer") if augmentation else model
    )
    trainer.compile(
        optimizer=make_optimizer(train, int(np.ceil(n_train / train.batch_size)) * train.epochs),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing),
        metrics=["accuracy"],
    )
    local = Splits(x_train, y_train, x_val, y_val, splits.num_classes)
    return _Fit(trainer, model, precision, local, n_train, {"train": padded_train, "val": padded_val})


def _restore_or_reset(fit: _Fit, train: TrainParams, work_dir: Path, layout: distribution.Layout) -> None:
    """Resume from the work dir's backup when it was made with the same params; otherwise
    clear stale state of another configuration (the MLflow run record stays)."""
    # processes other than 0 keep no backup, so a multi-process run cannot resume consistently
    fit.resumed = can_resume(work_dir, train) and layout.num_processes == 1
    if not fit.resumed:
        shutil.rmtree(work_dir / "backup", ignore_errors=True)
        for name in ("best.weights.h5", "history.csv", "train_params.json"):
            (work_dir / name).unlink(missing_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(work_dir / "train_params.json", _resume_key(train))
    fit.previous_rows = read_history(work_dir / "history.csv") if fit.resumed else []


def _callbacks(
    fit: _Fit, train: TrainParams, outputs: FitOutputs, layout: distribution.Layout, log_to_mlflow: bool
) -> tuple[list[keras.callbacks.Callback], EpochLogger]:
    """Backup (resume), best checkpoint, early stopping, the plateau schedule, their restored
    counters after a resume, and the per-epoch logger."""
    work_dir = outputs.work_dir
    checkpoint = BestWeights(work_dir / "best.weights.h5")
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=train.early_stopping_patience, start_from_epoch=train.early_stopping_start_epoch
    )
    plateau = (
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=train.reduce_lr_factor, patience=train.reduce_lr_patience, min_lr=train.min_learning_rate
        )
        if train.lr_schedule == "plateau"
        else None
    )
    val_losses = [r["val_loss"] for r in fit.previous_rows if "val_loss" in r]
    epoch_logger = EpochLogger([outputs.history, work_dir / "history.csv"], fit.n_train, log_to_mlflow, fit.previous_rows)
    callbacks: list[keras.callbacks.Callback] = [
        # double_checkpoint: Keras writes the backup in place; a kill during that write leaves
        # it truncated, and the resume then falls back to the epoch before
        *(
            [keras.callbacks.BackupAndRestore(str(work_dir / "backup"), delete_checkpoint=True, double_checkpoint=True)]
            if layout.num_processes == 1
            else []
        ),
        checkpoint,
        early,
        *([plateau] if plateau else []),
        RestorePlateauState(val_losses, early, plateau, checkpoint),
        epoch_logger,
    ]
    if train.weight_average == "ema":
        fit.last_epoch = LastEpochWeights()
        callbacks.append(fit.last_epoch)
    return callbacks, epoch_logger


def _final_weights(fit: _Fit, train: TrainParams, best_weights: Path) -> dict[str, Any]:
    """Load the weights the model keeps, BatchNorm statistics recomputed: the best checkpoint's,
    or with `weight_average: ema` the better on validation of the average and the checkpoint."""
    batch_size = max(train.batch_size, 256)
    if train.weight_average != "ema":
        if best_weights.exists():
            fit.trainer.load_weights(str(best_weights))
        return {
            "weight_average": "none",
            "batchnorm_layers": recompute_batchnorm_statistics(fit.model, fit.splits.x_train, batch_size),
        }
    candidates = {"ema": fit.trainer.get_weights()}  # fit() ended by writing the average into the weights
    if fit.last_epoch is not None and fit.last_epoch.weights is not None:
        candidates["last_epoch"] = fit.last_epoch.weights
    if best_weights.exists():
        fit.trainer.load_weights(str(best_weights))
        candidates["best_checkpoint"] = fit.trainer.get_weights()
    return {"weight_average": "ema", **choose_weights(fit, candidates, batch_size)}


def _finalize(fit: _Fit, train: TrainParams, outputs: FitOutputs, layout: distribution.Layout, seconds: float) -> dict[str, Any]:
    """The best epoch's weights, BatchNorm statistics recomputed, the model saved atomically;
    the run's summary. The work dir is removed: nothing is left to resume."""
    averaging = _final_weights(fit, train, outputs.work_dir / "best.weights.h5")
    recalibrated = averaging.pop("batchnorm_layers")
    if recalibrated:
        log.info("BatchNorm statistics recomputed over %d training images (%d layers)", len(fit.splits.x_train), recalibrated)
    with files.atomic_path(outputs.model) as tmp:
        fit.model.save(tmp)
    # the saved model's own validation accuracy: the per-epoch figures were measured before the
    # BatchNorm statistics were recomputed, and after a short run they are at chance
    rows = read_history(outputs.history)
    best = min(rows, key=lambda r: r["val_loss"]) if rows else {}
    final_val_accuracy = float(best.get("val_accuracy", float("nan")))
    if layout.num_processes == 1:  # several processes hold only shards of the model's outputs
        val_probs = fit.model.predict(fit.splits.x_val, batch_size=max(train.batch_size, 256), verbose=0)
        final_val_accuracy = float(np.mean(np.argmax(val_probs, axis=1) == fit.splits.y_val)) if len(val_probs) else float("nan")
    summary = {
        "arch": train.arch,
        "params": int(fit.model.count_params()),
        "precision": fit.precision,
        "epochs_run": len(rows),
        "best_epoch": int(best.get("epoch", 0)),
        "best_val_loss": float(best.get("val_loss", float("nan"))),
        "best_val_accuracy": float(best.get("val_accuracy", float("nan"))),
        "final_val_accuracy": round(final_val_accuracy, 4),
        "train_time_s": round(sum(r.get("epoch_time_s", 0.0) for r in rows), 2),
        "this_session_time_s": round(seconds, 2),
        "images_per_s": round(float(np.mean([r["images_per_s"] for r in rows])) if rows else 0.0, 1),
        "resumed": fit.resumed,
        "distribution": layout.mode,
        "devices": layout.replicas,
        "processes": layout.num_processes,
        "repeated_images": fit.padded,
        "batchnorm_recomputed": bool(recalibrated),
        **averaging,
    }
    shutil.rmtree(outputs.work_dir, ignore_errors=True)
    return summary
