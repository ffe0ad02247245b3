"""Seconds per optimizer step of ``xmgie train`` on a synthetic dataset (for sizing training runs).

    python benchmarks/bench_train.py --model tiny --resolution 64 --batch-size 4 --steps 20 --threads 1
    python benchmarks/bench_train.py --model mini --batch-size 8 --steps 30 --cache-latents both
    python benchmarks/bench_train.py --model mini --batch-size 8 --steps 30 --cache-latents on --shape-options both
    python benchmarks/bench_train.py --model OLD_DIR --versus mini --batch-size 8 --steps 30 --cache-latents on

Writes a synthetic dataset and a trained model under a temporary folder, trains ``--steps`` steps and
prints the median and mean seconds per step (the first step, which warms up, is left out), the process
CPU seconds per step, and the losses of the first and last steps. ``--cache-latents both`` trains
without and with the latent cache, alternating ``--rounds`` times, and prints the ratio of their median
seconds per step (same process, same data, same seed). ``--shape-options both`` does the same without and
with the ``mini`` recipe's options for shape edits (:data:`SHAPE_OPTIONS`: masked attention, the region's
share of the loss, shape rows read three times). ``--versus DIR`` does the same for two model directories
(``--model`` and ``DIR``, e.g. two architectures of one preset) and prints DIR's median over ``--model``'s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from xmgie.training.recipe import load_recipe, train_stages
from xmgie.training.synth import write_synthetic_dataset
from xmgie.training.trainer import DEFAULT_TRAIN, TrainingConfig, train

SHAPE_OPTIONS = ("masked_attention_share", "region_loss_share", "repeat_rows")
"""The fields of the ``mini`` recipe's objective that ``--shape-options on`` takes over."""


def shape_options() -> dict:
    """The ``mini`` recipe's values of :data:`SHAPE_OPTIONS` in its first stage (lists as tuples, as the config
    holds them)."""
    train_fields = train_stages(load_recipe("mini"))[0]
    return {name: tuple(v) if isinstance(v := train_fields[name], list) else v for name in SHAPE_OPTIONS}


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
    parser.add_argument(
        "--shape-options", choices=["off", "on", "both"], default="off", help="the mini recipe's options for shapes"
    )
    parser.add_argument("--versus", help="a second model directory, timed alternately with --model")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of off and on with a 'both'")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if [args.cache_latents == "both", args.shape_options == "both", args.versus is not None].count(True) > 1:
        parser.error("compare one thing at a time: --cache-latents both, --shape-options both or --versus")

    choices = {"off": [False], "on": [True], "both": [False, True] * args.rounds}
    caches, shapes = choices[args.cache_latents], choices[args.shape_options]
    models = [False, True] * args.rounds if args.versus else [False]
    modes = [(cache, shape, versus) for cache in caches for shape in shapes for versus in models]
    compared = 0 if args.cache_latents == "both" else 2 if args.versus else 1
    medians: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        data = Path(folder) / "synth"
        write_synthetic_dataset(data, max(16, 2 * args.batch_size), seed=0, size=args.resolution)
        for run, (cache, shape, versus) in enumerate(modes):
            model = args.versus if versus else args.model
            stamps: list[tuple[float, float]] = []
            config = TrainingConfig(
                data=str(data / "train"),
                output_dir=str(Path(folder) / f"model-{run}"),
                model=model,
                cache_dir=args.cache_dir,
                train=tuple(args.train.split(",")),
                resolution=args.resolution,
                batch_size=args.batch_size,
                max_steps=args.steps,
                precision=args.precision,
                cache_latents=cache,
                progress=False,
                **(shape_options() if shape else {}),
            )
            result = train(
                config,
                on_step=lambda step, row, stamps=stamps: stamps.append((time.perf_counter(), time.process_time())),
            )
            walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
            cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
            medians[(cache, shape, versus)[compared]].append(statistics.median(walls))
            first, last = result.history[0], result.history[-1]
            print(
                f"model {model}, {args.resolution}px, batch {args.batch_size}, train {args.train}, "
                f"{args.precision}, latent cache {'on' if cache else 'off'}, shape options {'on' if shape else 'off'}"
            )
            print(f"  seconds per step: median {statistics.median(walls):.3f}, mean {statistics.mean(walls):.3f}")
            print(f"  CPU seconds per step (this process): {statistics.mean(cpus):.3f}")
            print(
                f"  losses step 1 → {last['step']}: instruction {first['instruction_loss']:.3f} → "
                f"{last['instruction_loss']:.3f}, edit {first['edit_loss']:.3f} → {last['edit_loss']:.3f}"
            )
    if medians[False] and medians[True]:
        ratio = statistics.median(medians[True]) / statistics.median(medians[False])
        names = ("cached / uncached", "with / without shape options", f"{args.versus} / {args.model}")[compared]
        print(f"seconds per step, {names} = {ratio:.2f}")


if __name__ == "__main__":
    main()
