"""Seconds per optimizer step of ``xmgie train`` on a synthetic dataset (for sizing training runs).

    python benchmarks/bench_train.py --model tiny --resolution 64 --batch-size 4 --steps 20 --threads 1
    python benchmarks/bench_train.py --model mini --batch-size 8 --steps 30 --cache-latents both

Writes a synthetic dataset and a trained model under a temporary folder, trains ``--steps`` steps and
prints the median and mean seconds per step (the first step, which warms up, is left out), the process
CPU seconds per step, and the losses of the first and last steps. ``--cache-latents both`` trains
without and with the latent cache, alternating ``--rounds`` times, and prints the ratio of their median
seconds per step (same process, same data, same seed).
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
    parser.add_argument("--cache-latents", choices=["off", "on", "both"], default="off")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of off and on with --cache-latents both")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = {"off": [False], "on": [True], "both": [False, True] * args.rounds}[args.cache_latents]
    medians: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        data = Path(folder) / "synth"
        write_synthetic_dataset(data, max(16, 2 * args.batch_size), seed=0, size=args.resolution)
        for run, cache in enumerate(modes):
            stamps: list[tuple[float, float]] = []
            config = TrainingConfig(
                data=str(data / "train"),
                output_dir=str(Path(folder) / f"model-{run}"),
                model=args.model,
                cache_dir=args.cache_dir,
                train=tuple(args.train.split(",")),
                resolution=args.resolution,
                batch_size=args.batch_size,
                max_steps=args.steps,
                precision=args.precision,
                cache_latents=cache,
                progress=False,
            )
            result = train(
                config,
                on_step=lambda step, row, stamps=stamps: stamps.append((time.perf_counter(), time.process_time())),
            )
            walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
            cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
            medians[cache].append(statistics.median(walls))
            first, last = result.history[0], result.history[-1]
            print(
                f"model {args.model}, {args.resolution}px, batch {args.batch_size}, train {args.train}, "
                f"{args.precision}, latent cache {'on' if cache else 'off'}"
            )
            print(f"  seconds per step: median {statistics.median(walls):.3f}, mean {statistics.mean(walls):.3f}")
            print(f"  CPU seconds per step (this process): {statistics.mean(cpus):.3f}")
            print(
                f"  losses step 1 → {last['step']}: instruction {first['instruction_loss']:.3f} → "
                f"{last['instruction_loss']:.3f}, edit {first['edit_loss']:.3f} → {last['edit_loss']:.3f}"
            )
    if medians[False] and medians[True]:
        ratio = statistics.median(medians[True]) / statistics.median(medians[False])
        print(f"seconds per step, cached / uncached = {ratio:.2f}")


if __name__ == "__main__":
    main()
