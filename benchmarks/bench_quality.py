"""Edit quality against exact targets: plain MGIE, each extension alone and all four, per mask source.

Runs the pipeline on the held-out (``test``) items of a synthetic dataset (``xmgie data synth``) and
scores each output with :func:`xmgie.quality.item_scores`. Configurations:

- ``plain``: every extension off and no mask used (``auto_mask`` off, no mask given): MGIE;
- ``pfb``, ``cam``, ``ie``, ``gb``: that extension alone; ``all``: the four together;

each of the latter with the ``user`` mask (the item's true region) and with the ``auto`` mask (no mask
given, the automatic mask in ``auto`` mode, which also decides the edit scope). With a user mask the
pipeline reports every edit ``local`` (global kinds' masks are the whole image), so scope accuracy
means something for ``auto`` rows only. Every configuration
edits item ``i`` with the same seed (``--seed`` + i). Prints one table (rows = configuration × mask
source; L1 ratio on global and local kinds, PSNR inside and outside, far-outside-equal share,
automatic-mask IoU on local kinds, scope accuracy, names-kind share), per-kind tables of ``all``
with the automatic mask and of ``plain``, and the per-kind *autoencoder floor*: each target through the
model's VAE and back, with the model's detail transfer from the source where it has one
(:func:`xmgie.quality.autoencoder_round_trip`), the closest any edit of this model can come to it whatever its
UNet learnt, and the per-kind *conditioning separation*: the distance from each
kind's mean edit conditioning to the nearest other kind's (:func:`xmgie.quality.conditioning_separation`),
also in units of the two kinds' spreads: kinds whose conditionings lie as close as their own spread get the
same edit; kinds far apart that still get the same edit point at the UNet, not the conditioning.

Last, *whole photos*: every photo of ``--whole-photos`` (the bundled ones) edited whole by each global kind with
all extensions and no mask — what a user's edit of a photo is, at another scale and shape than the split's square
crops — scored against its exact target (:func:`xmgie.training.synth.write_whole_photo_items`), per kind for the
photos held out of the dataset's training split and for its training photos (``--no-whole-photos`` skips them).

    python benchmarks/bench_quality.py --model tiny --limit 3 --steps 2
    python benchmarks/bench_quality.py --model mini --data synth --per-kind 4 --steps 20
    python benchmarks/bench_quality.py --model models/mgie --data data/synth --steps 20 --json quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from xmgie.cli import DEFAULT_CACHE_DIR
from xmgie.loading import directory
from xmgie.loading.directory import load_pipeline
from xmgie.metrics import json_safe
from xmgie.quality import (
    EXTENSIONS,
    LOCAL_KINDS,
    aggregate,
    autoencoder_round_trip,
    conditioning_separation,
    edit_and_score,
    format_table,
    item_scores,
    read_paired_metadata,
)
from xmgie.training.synth import BUNDLED_PHOTOS, write_synthetic_dataset, write_whole_photo_items

CONFIGURATIONS: dict[str, tuple[str, ...]] = {
    "plain": (),
    **{name: (name,) for name in EXTENSIONS},
    "all": EXTENSIONS,
}
"""The extensions switched on per configuration."""

COLUMNS = (
    "l1_ratio_global",
    "l1_ratio_local",
    "psnr_inside",
    "psnr_outside",
    "far_outside_equal",
    "mask_iou_local",
    "scope_accuracy",
    "names_kind_share",
    "expressive_exact_share",
)
WHOLE_PHOTO_COLUMNS = ("n", "l1_ratio", "l1_inside", "psnr_inside", "tone_gain", "colour_cast")


def default_model() -> str:
    """The ``mini`` preset when the loader has one, else the ``tiny`` preset (random weights)."""
    return getattr(directory, "MINI", None) or directory.TINY


def runs() -> list[tuple[str, str]]:
    """(configuration, mask source) pairs: ``plain`` without a mask, every other with ``user`` and ``auto``."""
    pairs = [("plain", "none")]
    for name in CONFIGURATIONS:
        if name != "plain":
            pairs += [(name, "user"), (name, "auto")]
    return pairs


def edit_item(pipe: Any, row: dict[str, Any], folder: Path, configuration: str, mask_source: str, args) -> dict:
    """Edit one item under one configuration and score it."""
    scores = edit_and_score(
        pipe,
        row,
        folder,
        extensions=CONFIGURATIONS[configuration],
        mask_source=mask_source,
        seed=args.seed + row["index"],
        num_inference_steps=args.steps,
        max_side=args.max_side,
    )
    return {
        "configuration": configuration,
        "mask_source": mask_source,
        "index": row["index"],
        "scope": row.get("scope", "local" if row["kind"] in LOCAL_KINDS else "global"),
        **scores,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The one-table row of a configuration × mask source: means split by the kinds' scope where asked."""
    everything = aggregate(rows, by="scope")
    by_scope = {key: everything.get(key, {}) for key in ("global", "local")}
    return {
        "n": everything["all"]["n"],
        "l1_ratio_global": by_scope["global"].get("l1_ratio"),
        "l1_ratio_local": by_scope["local"].get("l1_ratio"),
        "psnr_inside": everything["all"]["psnr_inside"],
        "psnr_outside": everything["all"]["psnr_outside"],
        "far_outside_equal": everything["all"]["far_outside_equal"],
        "mask_iou_local": by_scope["local"].get("mask_iou"),
        "scope_accuracy": everything["all"]["scope_accuracy"],
        "names_kind_share": everything["all"]["names_kind_share"],
        "expressive_exact_share": everything["all"]["expressive_exact_share"],
    }


def whole_photo_scores(pipe: Any, folder: Path, scratch: Path, args) -> list[dict[str, Any]]:
    """Each photo of ``args.whole_photos`` edited whole by each global kind (all extensions, no mask) and scored;
    each row says whether its photo was held out of the dataset's training split (by the dataset's
    ``synth.json``; ``unknown`` without one)."""
    settings = folder.parent / "synth.json"
    splits = json.loads(settings.read_text())["photos"] if settings.is_file() else {}
    label = {name: "held-out" if split == "test" else "training" for split, names in splits.items() for name in names}
    rows = write_whole_photo_items(scratch, args.whole_photos)
    scored = []
    for index, row in enumerate(rows):
        scores = edit_and_score(
            pipe,
            row,
            scratch,
            extensions=EXTENSIONS,
            mask_source="none",
            seed=args.seed + index,
            num_inference_steps=args.steps,
            max_side=args.max_side,
        )
        scored.append({"photo": row["photo"], "split": label.get(row["photo"], "unknown"), **scores})
    print(f"whole photos: {len(rows)} items", file=sys.stderr)
    return scored


def main(argv: list[str] | None = None) -> int:
    """Run every configuration on the held-out items, print the tables and write ``--json``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model(), help="model directory, or 'tiny' (default: mini/tiny)")
    parser.add_argument("--data", type=Path, help="synthetic dataset (its test/ split) or a split folder")
    parser.add_argument("--count", type=int, default=60, help="items of the dataset written without --data")
    parser.add_argument("--limit", type=int, help="edit N held-out items, evenly spaced")
    parser.add_argument("--per-kind", type=int, help="edit the first N held-out items of every kind")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-side", type=int, default=64, help="long side the model works at")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data written and of item 0's noise")
    parser.add_argument("--device", default=None, help="default: CUDA when present, else cpu")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--whole-photos", type=Path, default=BUNDLED_PHOTOS, help="photos edited whole")
    parser.add_argument("--no-whole-photos", action="store_true", help="skip the whole-photo edits")
    parser.add_argument("--json", type=Path, help="write every per-item row and the tables here")
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as scratch:
        if args.data is None:
            write_synthetic_dataset(Path(scratch) / "synth", args.count, size=64, seed=args.seed)
            folder = Path(scratch) / "synth" / "test"
        else:
            folder = args.data / "test" if (args.data / "test").is_dir() else args.data
        rows = read_paired_metadata(folder)
        for index, row in enumerate(rows):
            row["index"] = index
        if args.per_kind is not None:
            seen: dict[str, int] = {}
            kept = []
            for row in rows:
                seen[row["kind"]] = seen.get(row["kind"], 0) + 1
                if seen[row["kind"]] <= args.per_kind:
                    kept.append(row)
            rows = kept
        if args.limit is not None and args.limit < len(rows):
            # Evenly spaced over the split, whose kinds take turns: a small limit spans global and local kinds.
            rows = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, max(1, args.limit))]

        pipe = load_pipeline(args.model, cache_dir=args.cache_dir, device=args.device)
        started = time.perf_counter()
        scored: list[dict[str, Any]] = []
        for configuration, mask_source in runs():
            for row in rows:
                scored.append(edit_item(pipe, row, folder, configuration, mask_source, args))
            print(f"{configuration}/{mask_source}: {len(rows)} items", file=sys.stderr)
        seconds = time.perf_counter() - started
        floor = [
            {
                "kind": row["kind"],
                **item_scores(
                    folder / row["source_file"],
                    folder / row["target_file"],
                    autoencoder_round_trip(pipe, folder / row["target_file"], folder / row["source_file"]),
                    folder / row["mask_file"],
                ),
            }
            for row in rows
        ]
        separation = conditioning_separation(pipe, rows, folder)
        whole = [] if args.no_whole_photos else whole_photo_scores(pipe, folder, Path(scratch) / "whole", args)

    table = {
        f"{configuration} / {mask_source}": summary(
            [r for r in scored if r["configuration"] == configuration and r["mask_source"] == mask_source]
        )
        for configuration, mask_source in runs()
    }
    per_kind = {
        key: aggregate([r for r in scored if (r["configuration"], r["mask_source"]) == pair])
        for key, pair in (("all / auto", ("all", "auto")), ("plain / none", ("plain", "none")))
    }
    per_kind["autoencoder floor (target through the VAE and the model's detail transfer)"] = aggregate(floor)
    print(f"model {args.model}, {len(rows)} held-out items, {args.steps} steps, {seconds:.1f} s\n")
    print(format_table(table, ("n", *COLUMNS), label="configuration / mask"))
    for key, kinds in per_kind.items():
        print(f"\nper kind, {key}:\n")
        print(format_table(kinds))
    for split in ("held-out", "training", "unknown"):
        kept = [row for row in whole if row["split"] == split]
        if kept:
            photos = sorted({row["photo"] for row in kept})
            print(f"\nper kind, whole {split} photos ({', '.join(photos)}), all extensions, no mask:\n")
            print(format_table(aggregate(kept), WHOLE_PHOTO_COLUMNS))
    print("\nconditioning separation (distance of each kind's mean conditioning to the nearest other kind's):\n")
    print("| kind | n | nearest kind | distance | own spread | distance / spreads |\n|---|---:|---|---:|---:|---:|")
    for kind, row in sorted(separation.items()):
        distance = "–" if row["distance"] is None else f"{row['distance']:.2f}"
        ratio = "–" if row["ratio"] is None else f"{row['ratio']:.1f}"
        print(f"| {kind} | {row['n']} | {row['nearest'] or '–'} | {distance} | {row['spread']:.2f} | {ratio} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "settings": {**vars(args), "data": str(folder)},
            "table": table,
            "per_kind": per_kind,
            "conditioning_separation": separation,
            "rows": scored,
            "whole_photo_rows": whole,
        }
        args.json.write_text(json.dumps(json_safe(report), indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
