"""Training throughput: in-graph augmentation vs. no augmentation vs. ImageDataGenerator.

Measures, in one run and for the same architecture and batch size, training images/s of
  (a) plain in-memory `model.fit` on numpy arrays, no augmentation (seed-000 style),
  (b) seed 003's loader as its notebook has it: `ImageDataGenerator(rescale=1/255, rotation 10,
      zoom 0.1, flip).flow_from_directory(...)` over a folder of 48x48 JPEGs (decoded and
      augmented per image on every epoch); the folder is written before the timer starts,
  (b') the same `ImageDataGenerator` fed from the in-memory arrays (`.flow(x, y)`), the
      kindest way to use it (no decoding), for comparison,
  (c) ferflow's pipeline: the same augmentation in the graph (ferflow.model.augmentation: one fused
      random affine per image), fed from numpy like (a), at the precision the pipeline's
      `train.mixed_precision: auto` picks (float32 on CPUs without bf16 units; `--precision`).
Each variant trains `--epochs` epochs; the first epoch (graph tracing) is not timed.
Prints images/s and the ratios (c)/(a) (target >= 0.9) and (c)/(b) (target >= 3), and (c)/(b').

    .venv/bin/python benchmarks/train_throughput.py [--arch seed001] [--images 4096] [--rounds 2]

Backend-neutral: with KERAS_BACKEND=jax (or torch) every variant runs without TensorFlow,
e.g. on a GPU machine that has JAX only.

`--devices N` measures instead (c) under JAX with `train.distribution: none` (1 device)
and `data_parallel` over N devices, same global batch, and prints images/s and the ratio
N/1 (docs/distributed.md). Without N accelerators, XLA splits the host CPU into N devices
(--xla_force_host_platform_device_count), which shows the mechanism, not a speed-up; on a
GPU machine expose exactly N GPUs (CUDA_VISIBLE_DEVICES).

    .venv/bin/python benchmarks/train_throughput.py --devices 2 [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from ferflow.core.params import PRECISIONS, AugmentParams, TrainParams
from ferflow.data.preprocessing import INPUT_SHAPE, normalize
from ferflow.data.sources.synthetic import generate_split
from ferflow.model import distribution
from ferflow.model.architectures import build_model
from ferflow.model.augmentation import build_augmentation
from ferflow.model.training import build_at_precision

SEED003_AUGMENT = AugmentParams(flip=True, rotation=10 / 360, zoom=0.1)
# The same augmentation as seed 003 asks ImageDataGenerator for it.
SEED003_GENERATOR = {"rotation_range": 10, "zoom_range": 0.1, "horizontal_flip": True}


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t)


def per_class_count(n: int) -> int:
    return max(1, n // 7)


def data(n: int) -> tuple[np.ndarray, np.ndarray]:
    per_class = per_class_count(n)
    pixels, labels = [], []
    for class_name, _, p in generate_split("train", per_class, seed=0):
        pixels.append(p)
        labels.append(class_name)
    classes = sorted(set(labels))
    y = keras.utils.to_categorical([classes.index(c) for c in labels], 7)
    return normalize(np.stack(pixels)), y


def write_jpeg_folder(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    """The images as `<root>/<class id>/<i>.jpg`, the layout flow_from_directory reads."""
    from PIL import Image

    for i, (pixels, onehot) in enumerate(zip(x, y)):
        folder = root / str(int(np.argmax(onehot)))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(pixels[..., 0] * 255).astype(np.uint8), mode="L").save(folder / f"{i}.jpg", quality=95)


def timed_fit(model: keras.Model, fit_args: dict, n_images: int, epochs: int) -> float:
    timer = EpochTimer()
    model.fit(**fit_args, epochs=epochs, callbacks=[timer], verbose=0)
    steady = timer.seconds[1:] or timer.seconds
    return n_images / float(np.median(steady))


def fresh_model(arch: str, seed: int, width: float = 1.0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_model(arch, 7, width)


def measure(variant: str, arch: str, width: float, n_images: int, batch_size: int, epochs: int, precision: str) -> float:
    """Images/s of one variant, in this process (the parent runs each in a fresh one)."""
    x, y = data(n_images)
    n = len(x)
    compile_args = {"optimizer": "adam", "loss": "categorical_crossentropy", "metrics": ["accuracy"]}
    if variant in ("c", "c_devices"):  # ferflow's pipeline also picks the compute precision (train.mixed_precision)
        params = TrainParams(arch=arch, width=width, dropout_scale=1.0, mixed_precision=precision, seed=0)
        if variant == "c_devices":  # 1 device: distribution none; N: data_parallel over all N
            mode = "data_parallel" if int(os.environ["FERFLOW_BENCH_DEVICES"]) > 1 else "none"
            layout = distribution.setup(mode, batch_size)
            if mode == "data_parallel" and layout.replicas != int(os.environ["FERFLOW_BENCH_DEVICES"]):
                raise SystemExit(f"--devices {os.environ['FERFLOW_BENCH_DEVICES']} but JAX sees {layout.devices}")
            x, y, _ = distribution.pad_to_multiple(x, y, layout.replicas, 0)
            n = len(x)
        model, _ = build_at_precision(params, 7)
        trainer = keras.Sequential([keras.Input(INPUT_SHAPE), *build_augmentation(SEED003_AUGMENT, 0), model])
        trainer.compile(**compile_args)
        return timed_fit(trainer, {"x": x, "y": y, "batch_size": batch_size, "shuffle": True}, n, epochs)
    model = fresh_model(arch, 0, width)
    if variant == "a":
        model.compile(**compile_args)
        return timed_fit(model, {"x": x, "y": y, "batch_size": batch_size, "shuffle": True}, n, epochs)
    # (b) and (b'). The class tf.keras re-exports as tensorflow.keras.preprocessing.image.ImageDataGenerator;
    # imported from Keras itself it needs no TensorFlow, so (b) also runs under JAX or torch.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    model.compile(**compile_args)
    steps = {"steps_per_epoch": int(np.ceil(n / batch_size))}
    if variant == "b_mem":
        flow = ImageDataGenerator(**SEED003_GENERATOR).flow(x, y, batch_size=batch_size, shuffle=True, seed=0)
        return timed_fit(model, {"x": flow, **steps}, n, epochs)
    with tempfile.TemporaryDirectory() as tmp:
        write_jpeg_folder(Path(tmp), x, y)
        flow = ImageDataGenerator(rescale=1 / 255.0, **SEED003_GENERATOR).flow_from_directory(
            tmp, target_size=(48, 48), color_mode="grayscale", batch_size=batch_size, shuffle=True, seed=0
        )
        return timed_fit(model, {"x": flow, **steps}, n, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="seed001")
    parser.add_argument("--width", type=float, default=1.0, help="train.width of the architecture")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="each round runs a, b, b', c (then reversed) in fresh processes")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="(c)'s train.mixed_precision")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--devices", type=int, help="compare (c) on 1 and on N devices (JAX, data_parallel) instead")
    parser.add_argument("--variant", choices=("a", "b", "b_mem", "c", "c_devices"), help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.variant:
        print(
            json.dumps(
                {
                    "images_per_s": measure(
                        args.variant, args.arch, args.width, args.images, args.batch_size, args.epochs, args.precision
                    ),
                    "precision": keras.mixed_precision.global_policy().name,
                }
            )
        )
        return

    if args.devices:
        compare_devices(args)
        return

    # One process per measurement: TensorFlow in a process that already trained another model
    # runs measurably slower, which would favour whichever variant goes first. Rounds alternate
    # the order and the best of each variant is kept (the least disturbed on a shared machine).
    order = ("a", "b", "b_mem", "c")
    samples: dict[str, list[float]] = {v: [] for v in order}
    precisions: dict[str, str] = {}
    for r in range(args.rounds):
        for variant in order if r % 2 == 0 else order[::-1]:
            out = subprocess.run(child_command(args, variant), capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            samples[variant].append(measured["images_per_s"])
            precisions[variant] = measured["precision"]
    a, b, b_mem, c = (max(samples[v]) for v in order)
    n = per_class_count(args.images) * 7  # what data() generates
    result = {
        "arch": args.arch,
        "width": args.width,
        "images": n,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "backend": keras.backend.backend(),
        "precision": precisions,
        "rounds": args.rounds,
        "samples_images_per_s": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
        "images_per_s": {
            "a_plain_fit": round(a, 1),
            "b_image_data_generator_from_directory": round(b, 1),
            "b_mem_image_data_generator_from_arrays": round(b_mem, 1),
            "c_ferflow_in_graph_aug": round(c, 1),
        },
        "ratio_c_over_a": round(c / a, 3),
        "ratio_c_over_b": round(c / b, 3),
        "ratio_c_over_b_mem": round(c / b_mem, 3),
    }
    print(
        f"arch={args.arch} width={args.width} images={n} batch={args.batch_size} rounds={args.rounds} "
        f"backend={keras.backend.backend()} (best of each; all samples in --json)"
    )
    print(f"(a) plain fit, no augmentation                        {a:9.1f} images/s")
    print(f"(b) seed 003: ImageDataGenerator.flow_from_directory  {b:9.1f} images/s")
    print(f"(b') ImageDataGenerator.flow on in-memory arrays      {b_mem:9.1f} images/s")
    print(f"(c) ferflow in-graph augmentation ({precisions['c']:>14})  {c:9.1f} images/s")
    print(f"(c)/(a) = {c / a:.2f}  (target >= 0.9)    (c)/(b) = {c / b:.2f}  (target >= 3)    (c)/(b') = {c / b_mem:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def child_command(args: argparse.Namespace, variant: str) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--arch",
        args.arch,
        "--width",
        str(args.width),
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(args.epochs),
        "--precision",
        args.precision,
    ]


def compare_devices(args: argparse.Namespace) -> None:
    """(c) with train.distribution none (1 device) vs data_parallel over `args.devices`, under JAX."""
    if args.devices < 2:
        raise SystemExit(f"--devices {args.devices}: expected 2 or more (1 device is the baseline it is compared with)")
    if args.batch_size % args.devices:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {args.devices} devices")
    counts = (1, args.devices)
    samples: dict[int, list[float]] = {d: [] for d in counts}
    precisions: dict[int, str] = {}
    for r in range(args.rounds):
        for d in counts if r % 2 == 0 else counts[::-1]:
            env = {
                **os.environ,
                "KERAS_BACKEND": "jax",
                "FERFLOW_BENCH_DEVICES": str(d),
                # N host CPU devices when there is no accelerator (ignored on GPU/TPU)
                "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={d}".strip(),
            }
            out = subprocess.run(child_command(args, "c_devices"), capture_output=True, text=True, check=True, env=env).stdout
            measured = json.loads(out.strip().splitlines()[-1])
            samples[d].append(measured["images_per_s"])
            precisions[d] = measured["precision"]
    one, many = max(samples[1]), max(samples[args.devices])
    import jax

    result = {
        "arch": args.arch,
        "width": args.width,
        "images": per_class_count(args.images) * 7,
        "global_batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "platform": jax.devices()[0].platform,
        "precision": {str(k): v for k, v in precisions.items()},
        "rounds": args.rounds,
        "samples_images_per_s": {str(k): [round(v, 1) for v in vs] for k, vs in samples.items()},
        "images_per_s": {"1_device": round(one, 1), f"{args.devices}_devices": round(many, 1)},
        "ratio_n_over_1": round(many / one, 3),
    }
    print(
        f"arch={args.arch} width={args.width} global batch={args.batch_size} rounds={args.rounds} "
        f"backend=jax platform={result['platform']} cpus={os.cpu_count()} (best of each)"
    )
    print(f"1 device  (distribution none)              {one:9.1f} images/s  ({precisions[1]})")
    print(f"{args.devices} devices (distribution data_parallel)     {many:9.1f} images/s  ({precisions[args.devices]})")
    print(f"{args.devices} devices / 1 device = {many / one:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
