"""Where a model loses the place of a shape edit, and how far any threshold takes its automatic mask.

Two measurements on ``xmgie data synth`` items (fresh crops, made here with ``--seed``):

1. **Place probes** on the ``add_shape`` items of the train split (crops of the training photos): the share of
   expressive instructions that name the instruction's place, and how well a linear probe tells the nine places
   apart (multinomial logistic regression with an L2 penalty on the first 64 principal components, k-fold
   cross-validated) from the MLLM's ``[IMG]`` hidden states, from the edit head's conditioning tokens and from
   the tokens' mean.
2. **The automatic mask's ceiling** on the local items of the test split: DiffEdit's difference map as the
   pipeline computes it (the model's strength and smoothing), thresholded per item at the quantile that gives
   the best IoU with the true region (an oracle no rule can beat), and the map's ROC AUC inside the region.

    python benchmarks/bench_place.py                      # mini, about 3 minutes on 2 cores
    python benchmarks/bench_place.py --model DIR --count 2400 --seed 5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.stats import rankdata

from xmgie.editing.images import to_working_size
from xmgie.editing.masks import derived_generators, estimate_edit_masks
from xmgie.editing.mllm import MAX_NEW_TOKENS, generate_expressive_instructions
from xmgie.editing.options import DEFAULT_MAX_SIDE, AutoMaskOptions
from xmgie.loading import directory
from xmgie.loading.directory import load_pipeline
from xmgie.training.synth import LOCAL_KINDS, PLACES, write_synthetic_dataset


def principal_components(features: np.ndarray, count: int) -> np.ndarray:
    centred = features - features.mean(axis=0)
    _, _, right = np.linalg.svd(centred, full_matrices=False)
    return centred @ right[:count].T


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int, penalty: float, seed: int = 0) -> float:
    """k-fold accuracy of an L2-penalised multinomial logistic regression on standardised ``features``."""
    order = np.random.default_rng(seed).permutation(len(labels))
    classes = int(labels.max()) + 1
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = np.setdiff1d(order, test)
        mean, std = features[train].mean(axis=0), features[train].std(axis=0) + 1e-6
        x = torch.from_numpy((features[train] - mean) / std).float()
        y = torch.from_numpy(labels[train]).long()
        weight = torch.zeros(x.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")
        optimizer.step(lambda x=x, y=y, w=weight, b=bias, o=optimizer: _probe_loss(x, y, w, b, penalty, o))
        x_test = torch.from_numpy((features[test] - mean) / std).float()
        with torch.no_grad():
            correct += int(((x_test @ weight + bias).argmax(dim=1).numpy() == labels[test]).sum())
    return correct / len(labels)


def _probe_loss(x, y, weight, bias, penalty: float, optimizer) -> torch.Tensor:
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + penalty * weight.pow(2).sum() / 2
    loss.backward()
    return loss


def place_of(instruction: str) -> str | None:
    """The longest place name in ``instruction`` ("top left" before "top")."""
    found = [place for place in PLACES if place in instruction]
    return max(found, key=len) if found else None


def place_probes(pipe, folder: Path, items: int, folds: int, penalty: float) -> None:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["kind"] == "add_shape"][:items]
    hidden, tokens, named = [], [], []
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        images = [Image.open(folder / row["source_file"]).convert("RGB") for row in chunk]
        with torch.no_grad():
            out = generate_expressive_instructions(
                pipe.mllm,
                pipe.tokenizer,
                pipe.feature_extractor,
                images,
                [row["instruction"] for row in chunk],
                max_new_tokens=MAX_NEW_TOKENS,
                batch_size=16,
            )
            states = out.img_hidden_states.to(pipe.edit_head.dtype)
            hidden.append(states.flatten(1).float().numpy())
            tokens.append(pipe.edit_head(states).float().numpy())
        expressive = out.expressive_instructions
        named += [place_of(text) == place_of(row["instruction"]) for row, text in zip(chunk, expressive, strict=True)]
    labels = np.array([list(PLACES).index(place_of(row["instruction"])) for row in rows])
    conditioning = np.concatenate(tokens)
    features = {
        "[IMG] hidden states": np.concatenate(hidden),
        "edit-head tokens": conditioning.reshape(len(rows), -1),
        "edit-head tokens' mean": conditioning.mean(axis=1),
    }
    print(f"add_shape items: {len(rows)}; expressive instruction names the place: {np.mean(named):.2f}")
    print(f"place probe accuracy ({folds}-fold, 9 places, chance {1 / len(PLACES):.2f}):")
    for name, values in features.items():
        reduced = principal_components(values, min(64, values.shape[1], len(rows) - 1))
        print(f"  {name:<24} {probe_accuracy(reduced, labels, folds, penalty):.2f}")


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The chance that a pixel inside the region scores above one outside it (ties count half)."""
    ranks = rankdata(scores)
    count = int(positive.sum())
    return float((ranks[positive].sum() - count * (count + 1) / 2) / (count * (len(scores) - count)))


def mask_ceiling(pipe, folder: Path, per_kind: int) -> None:
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    options = pipe.resolve_auto_mask(AutoMaskOptions())
    print(f"automatic mask's ceiling on the test split (strength {options.strength}, smoothing {options.smoothing}):")
    for kind in LOCAL_KINDS:
        chosen = [row for row in rows if row["kind"] == kind][:per_kind]
        best, aucs = [], []
        for index, row in enumerate(chosen):
            source = Image.open(folder / row["source_file"]).convert("RGB")
            source = to_working_size(source, max_side=pipe.config.get("max_working_side") or DEFAULT_MAX_SIDE)
            with torch.no_grad():
                prompt, null, _ = pipe.encode_instructions([source], [row["instruction"]], MAX_NEW_TOKENS, {})
                latents = pipe.prepare_image_latents(pipe.image_processor.preprocess(source))
                estimate = estimate_edit_masks(
                    pipe.unet,
                    pipe.scheduler,
                    latents,
                    prompt,
                    null,
                    latent_scale=pipe.vae.config.scaling_factor,
                    generator=derived_generators(pipe.seeded_generators([index]), "auto_mask"),
                    draws=options.draws,
                    strength=options.strength,
                )
            difference = estimate.difference[0].double().numpy()
            if options.smoothing > 0:
                difference = ndimage.gaussian_filter(difference, options.smoothing, mode="nearest")
            size = (difference.shape[1], difference.shape[0])
            region = Image.open(folder / row["mask_file"]).convert("L").resize(size, Image.Resampling.BOX)
            true = np.asarray(region) >= 128
            ious = []
            for level in np.quantile(difference, np.linspace(0.5, 0.995, 60)):
                selected = difference > level
                ious.append((selected & true).sum() / max((selected | true).sum(), 1))
            best.append(max(ious))
            aucs.append(roc_auc(difference.ravel(), true.ravel()))
        print(f"  {kind:<15} items {len(chosen)}  oracle IoU {np.mean(best):.2f}  ROC AUC {np.mean(aucs):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=directory.MINI, help="model directory (default: mini)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--count", type=int, default=2400, help="items synthesised (train and test)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--probe-items", type=int, default=180)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--penalty", type=float, default=0.1, help="L2 penalty of the probes")
    parser.add_argument("--per-kind", type=int, default=8, help="test items per local kind for the mask ceiling")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(args.model, cache_dir=args.cache_dir, device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        write_synthetic_dataset(scratch, args.count, seed=args.seed, size=64, test_fraction=0.1, test_photos=1)
        place_probes(pipe, Path(scratch) / "train", args.probe_items, args.folds, args.penalty)
        mask_ceiling(pipe, Path(scratch) / "test", args.per_kind)


if __name__ == "__main__":
    main()
