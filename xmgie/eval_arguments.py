"""The arguments of ``xmgie eval``, apart from :mod:`xmgie.metrics` so that building the command line imports no
model library."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_eval_arguments"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the evaluation command (see :func:`run_eval`) to ``parser``."""
    parser.add_argument("--sources", type=Path, help="folder of source images (required without --paired)")
    parser.add_argument("--outputs", type=Path, required=True, help="folder of edited outputs (paired by file stem)")
    parser.add_argument("--targets", type=Path, help="folder of ground-truth target images (L1, L2, CLIP-I, DINO)")
    parser.add_argument(
        "--captions", type=Path, help='target captions: JSON lines {"id": "0001", "caption": "..."} (CLIP-T)'
    )
    parser.add_argument("--masks", type=Path, help="folder of edit masks, white = edited (preservation outside)")
    parser.add_argument("--clip", type=Path, help="local CLIP model directory (CLIP-I, CLIP-T, source similarity)")
    parser.add_argument("--dino", type=Path, help="local DINO ViT directory, e.g. dino-vits16 (DINO)")
    parser.add_argument("--device", default="cpu", help="device of the encoders: cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", type=Path, help="write every per-item figure to this JSON file")
    paired = parser.add_argument_group(
        "paired data",
        "score --outputs against a synthetic split with exact targets and edit regions (xmgie data synth); "
        "outputs are named by the source file's stem: images/00003_source.png -> OUTPUTS/00003_source.png",
    )
    paired.add_argument("--paired", type=Path, help="a split folder with metadata.jsonl (e.g. DATA/test)")
    paired.add_argument(
        "--results",
        type=Path,
        help="with --paired: results.jsonl of `xmgie batch` (edit scope, expressive instruction, automatic mask)",
    )
    paired.add_argument(
        "--far-px", type=float, default=16.0, help="with --paired: distance (px) from the region of far_outside_equal"
    )
