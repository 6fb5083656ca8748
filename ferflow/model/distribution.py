"""`train.distribution: data_parallel`: one training run over every device, with keras.distribution.

Keras 3's `DataParallel` replicates the model on each device of a 1-D `DeviceMesh` and
splits every batch over them; `train.batch_size` stays the global batch. Keras implements
it for the JAX backend only (TensorFlow's MultiWorkerMirroredStrategy is broken under
Keras 3, keras issue 20585), so other backends stop before training.

Several processes (hosts) join through `keras.distribution.initialize()`, configured by
Keras' own environment variables (docs/distributed.md):
  KERAS_DISTRIBUTION_JOB_ADDRESSES  the coordinator's host:port (process 0's)
  KERAS_DISTRIBUTION_NUM_PROCESSES  how many processes take part
  KERAS_DISTRIBUTION_PROCESS_ID     this process's id, 0..N-1; 0 writes outputs and logs to MLflow
Each process then feeds its own share of every global batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import keras
import numpy as np

log = logging.getLogger("ferflow")

ENV_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
ENV_NUM_PROCESSES = "KERAS_DISTRIBUTION_NUM_PROCESSES"
ENV_PROCESS_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
SUPPORTED_BACKENDS = ("jax",)


class DistributionError(ValueError):
    """A distribution setting that cannot work here, with what to change."""


@dataclass(frozen=True)
class Layout:
    """Where one training run computes: `devices` (global mesh, batch axis) over `num_processes`."""

    mode: str
    devices: tuple[str, ...]
    num_processes: int = 1
    process_id: int = 0

    @property
    def is_writer(self) -> bool:
        """Only process 0 writes outputs and logs to MLflow."""
        return self.process_id == 0

    @property
    def replicas(self) -> int:
        return max(1, len(self.devices))

    def tags(self) -> dict[str, str]:
        """MLflow tags: the device count and the mesh layout."""
        return {
            "distribution": self.mode,
            "distribution.devices": str(self.replicas),
            "distribution.processes": str(self.num_processes),
            "distribution.layout": f"batch:{self.replicas} over {','.join(self.devices)}" if self.devices else "single device",
        }


_current: Layout | None = None


def _env_int(name: str, lo: int, hi: int | None = None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        limit = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise DistributionError(f"environment variable {name}={raw!r}: expected {limit}")
    return value


def _initialize_processes() -> tuple[int, int]:
    """`keras.distribution.initialize()` when the environment asks for several processes."""
    num_processes = _env_int(ENV_NUM_PROCESSES, 1)
    if num_processes is None or num_processes == 1:
        return 1, 0
    process_id = _env_int(ENV_PROCESS_ID, 0, num_processes - 1)
    if process_id is None or not os.environ.get(ENV_ADDRESSES):
        missing = ENV_PROCESS_ID if process_id is None else ENV_ADDRESSES
        raise DistributionError(
            f"environment variable {missing} is not set: {ENV_NUM_PROCESSES}={num_processes} needs "
            f"{ENV_ADDRESSES} (process 0's host:port) and {ENV_PROCESS_ID} (0..{num_processes - 1})"
        )
    import jax

    if not jax.distributed.is_initialized():
        log.info("joining %d processes as process %d (coordinator %s)", num_processes, process_id, os.environ[ENV_ADDRESSES])
        keras.distribution.initialize()  # reads the three variables
    return num_processes, process_id


def setup(mode: str, batch_size: int) -> Layout:
    """Make `mode` Keras' distribution for the models built next; call before any device query.

    Idempotent for the same mode (the train glue calls it before tagging the MLflow run,
    `fit_model` again). Raises DistributionError, before any training, when the backend
    cannot distribute or `batch_size` does not split over the devices.
    """
    global _current
    if _current is not None and _current.mode == mode:
        return _current
    if mode == "none":
        if keras.backend.backend() in SUPPORTED_BACKENDS:
            keras.distribution.set_distribution(None)
        _current = Layout("none", ())
        return _current
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise DistributionError(
            f"params.yaml: `train.distribution` = {mode!r} needs the JAX backend (keras.distribution data "
            f"parallelism is implemented for JAX only), but Keras runs on {backend!r}: run the train stage with "
            "KERAS_BACKEND=jax, e.g. `KERAS_BACKEND=jax dvc repro train` (docs/distributed.md)"
        )
    num_processes, process_id = _initialize_processes()
    devices = tuple(keras.distribution.list_devices())
    if batch_size % len(devices) or batch_size % num_processes:
        raise DistributionError(
            f"params.yaml: `train.batch_size` = {batch_size} does not split over {len(devices)} devices "
            f"in {num_processes} process(es): expected a multiple of {len(devices)}"
        )
    # auto_shard_dataset=False: each process passes its own share (`local_share`) as numpy arrays
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=list(devices), auto_shard_dataset=False))
    _current = Layout(mode, devices, num_processes, process_id)
    log.info("data parallel over %d devices (%s), %d process(es)", len(devices), ", ".join(devices), num_processes)
    return _current


def pad_to_multiple(x: np.ndarray, y: np.ndarray, multiple: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Repeat `len(x) % multiple` randomly chosen images so the count is a multiple of `multiple`.

    Every batch must split evenly over the devices, the epoch's last one too; like
    PyTorch's DistributedSampler, a few images (fewer than `multiple`) count twice.
    """
    missing = -len(x) % multiple
    if not missing:
        return x, y, 0
    extra = np.random.default_rng(seed).choice(len(x), size=missing, replace=False)
    return np.concatenate([x, x[extra]]), np.concatenate([y, y[extra]]), missing


def local_share(layout: Layout, x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """This process's part of a split (all of it in one process), padded so that every
    global batch splits over the devices; returns (x, y, images repeated globally)."""
    x, y, padded = pad_to_multiple(x, y, layout.replicas, seed)
    if layout.num_processes > 1:  # equal shares, so every process runs the same number of steps
        x, y = x[layout.process_id :: layout.num_processes], y[layout.process_id :: layout.num_processes]
    return x, y, padded
