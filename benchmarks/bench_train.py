"""Seconds per optimizer step of ``xmgie train`` on a synthetic dataset (for sizing training runs).

    python benchmarks/bench_train.py --model tiny --resolution 64 --batch-size 4 --steps 20 --threads 1

Writes a synthetic dataset and a trained model under a temporary folder, trains ``--steps`` steps and
prints the median and mean seconds per step (the first step, which warms up, is left out), the process
CPU seconds per step, and the losses of the first and last steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xmgie.training.synth import write_synthetic_dataset
from xmgie.training.trainer import DEFAULT_TRAIN, TrainingConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "xmgie"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--train", default=",".join(DEFAULT_TRAIN))
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        data = Path(folder) / "synth"
        write_synthetic_dataset(data, max(16, 2 * args.batch_size), seed=0, size=args.resolution)
        stamps: list[tuple[float, float]] = []
        config = TrainingConfig(
            data=str(data / "train"),
            output_dir=str(Path(folder) / "model"),
            model=args.model,
            cache_dir=args.cache_dir,
            train=tuple(args.train.split(",")),
            resolution=args.resolution,
            batch_size=args.batch_size,
            max_steps=args.steps,
            precision=args.precision,
            progress=False,
        )
        result = train(config, on_step=lambda step, row: stamps.append((time.perf_counter(), time.process_time())))
    walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
    cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    first, last = result.history[0], result.history[-1]
    print(f"model {args.model}, {args.resolution}px, batch {args.batch_size}, train {args.train}, {args.precision}")
    print(f"seconds per step: median {statistics.median(walls):.3f}, mean {statistics.mean(walls):.3f}")
    print(f"CPU seconds per step (this process): {statistics.mean(cpus):.3f}")
    print(
        f"losses step 1 → {last['step']}: instruction {first['instruction_loss']:.3f} → "
        f"{last['instruction_loss']:.3f}, edit {first['edit_loss']:.3f} → {last['edit_loss']:.3f}"
    )


if __name__ == "__main__":
    main()
