"""Image editing metrics as MagicBrush (Zhang et al. 2023) defines them, and an evaluation over folders.

An edited output is compared with the ground-truth target image and the target caption:

``l1`` / ``l2``
    mean absolute / mean squared pixel difference between output and target, with pixels as
    floats in [0, 1] and the output resized (bicubic) to the target's size when they differ,
    as MagicBrush's evaluation does. MagicBrush's "L2" is the mean of squared differences, not
    its square root.
``clip_i`` / ``dino``
    cosine similarity of CLIP image embeddings / DINO ViT CLS features of output and target.
``clip_t``
    cosine similarity of the output's CLIP image embedding and the target caption's CLIP text
    embedding.

Two figures compare the output with the source instead: :func:`preservation` (PSNR and L1
outside the edit mask, i.e. how much of what should have been kept was kept) and
:func:`identity_score` (cosine similarity of two identity embeddings computed elsewhere).

:func:`evaluate_folder` applies all of them to folders of images paired by file stem, and
:func:`xmgie.eval_arguments.add_eval_arguments` / :func:`run_eval` expose that on the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    from transformers import CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerBase, ViTImageProcessorPil, ViTModel

    from xmgie.editing.images import ImageSource

    MaskSource = ImageSource | np.ndarray

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""File name endings (lower case) that :func:`evaluate_folder` treats as images."""


# --- pixel metrics ---------------------------------------------------------------------------------------------------


def _load_image(source: ImageSource) -> Image.Image:
    # xmgie.editing's package init imports the pipeline, which imports this module: a top-level import is a cycle.
    from xmgie.editing.images import load_image as load

    return load(source)


def _load_mask(source: ImageSource, size: tuple[int, int]) -> Image.Image:
    from xmgie.editing.images import load_mask as load

    return load(source, size)


def _unit_pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def _aligned(output: ImageSource, reference: ImageSource) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float arrays in [0, 1] of ``output`` resized to ``reference``'s size, and of ``reference``."""
    out = _load_image(output)
    ref = _load_image(reference)
    if out.size != ref.size:
        out = out.resize(ref.size, Image.Resampling.BICUBIC)
    return _unit_pixels(out), _unit_pixels(ref)


def l1_distance(output: ImageSource, target: ImageSource) -> float:
    """Mean absolute difference of RGB pixels in [0, 1] between ``output`` and ``target``.

    Images are loaded as by :func:`~xmgie.editing.images.load_image` (transparency over white,
    any mode to RGB). An output whose size differs from the target's is resized to the target's
    size with bicubic filtering first, as MagicBrush's evaluation compares both at one resolution.
    """
    out, ref = _aligned(output, target)
    return float(np.mean(np.abs(out - ref)))


def l2_distance(output: ImageSource, target: ImageSource) -> float:
    """Mean squared difference of RGB pixels in [0, 1]; same loading and resizing as :func:`l1_distance`.

    This is MagicBrush's "L2": the mean of the squared differences, without a square root.
    """
    out, ref = _aligned(output, target)
    return float(np.mean((out - ref) ** 2))


def _keep_region(mask: MaskSource, size: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) array, True for pixels outside the edited region of ``mask`` for an image of ``size``."""
    width, height = size
    if isinstance(mask, np.ndarray):
        values = np.asarray(mask)
        if values.ndim == 3 and values.shape[-1] == 1:
            values = values[..., 0]
        if values.shape != (height, width):
            raise ValueError(f"mask array has shape {values.shape}, expected ({height}, {width}) for the source image")
        if values.dtype == np.bool_:
            values = values.astype(np.float64)
        elif np.issubdtype(values.dtype, np.integer):
            values = values.astype(np.float64) / 255.0
        else:
            values = values.astype(np.float64)
    else:
        values = np.asarray(_load_mask(mask, size), dtype=np.float64) / 255.0
    return values < 0.5


def preservation(source: ImageSource, output: ImageSource, mask: MaskSource) -> dict[str, float]:
    """How well ``output`` keeps ``source`` outside the edited region: ``{"psnr": dB, "l1": mean abs diff}``.

    Pixels are RGB floats in [0, 1]; an output of another size is resized to the source's size
    (bicubic). ``mask`` marks the edited region in white: an ``L`` image or a path loaded with
    :func:`~xmgie.editing.images.load_mask` (scaled to the source's size), or an (H, W) array
    of the source's size, read as 0..255 when its dtype is an integer type and as 0..1
    otherwise. Pixels whose mask value is below 0.5 are outside the edit and are compared.

    PSNR uses a peak of 1.0 and is ``inf`` when the compared pixels are identical. When the mask
    covers every pixel nothing is compared and both values are NaN.

    Raises:
        ValueError: ``mask`` is an array whose shape is not the source's (H, W).
    """
    src = _load_image(source)
    keep = _keep_region(mask, src.size)
    out, ref = _aligned(output, src)
    if not keep.any():
        return {"psnr": math.nan, "l1": math.nan}
    diff = out[keep] - ref[keep]
    mse = float(np.mean(diff**2))
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    return {"psnr": psnr, "l1": float(np.mean(np.abs(diff)))}


def identity_score(source_embedding: torch.Tensor, output_embedding: torch.Tensor) -> float:
    """Cosine similarity of two embeddings of the same shape, each flattened to one vector.

    Raises:
        ValueError: the two embeddings have different numbers of elements.
    """
    a = torch.as_tensor(source_embedding).detach().reshape(-1).to("cpu", torch.float64)
    b = torch.as_tensor(output_embedding).detach().reshape(-1).to("cpu", torch.float64)
    if a.numel() != b.numel():
        raise ValueError(f"embeddings differ in size: {a.numel()} and {b.numel()} elements")
    return float(F.cosine_similarity(a, b, dim=0))


# --- encoders --------------------------------------------------------------------------------------------------------


def _features(output: Any) -> torch.Tensor:
    # CLIPModel's get_*_features return the projected embedding as pooler_output in transformers 5, a tensor before.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipEncoder:
    """A CLIP model with its tokenizer and image processor, giving normalised image and text embeddings."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    processor: CLIPImageProcessorPil
    device: torch.device

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> ClipEncoder:
        """Load ``CLIPModel``, its tokenizer and ``CLIPImageProcessorPil`` from one local directory, in float32."""
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        directory = Path(directory)
        model = CLIPModel.from_pretrained(directory, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        processor = CLIPImageProcessorPil.from_pretrained(directory)
        return cls(model=model, tokenizer=tokenizer, processor=processor, device=torch.device(device))

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-length CLIP image embeddings (``get_image_features``)."""
        pixels = self.processor(images=[_load_image(image) for image in images], return_tensors="pt")["pixel_values"]
        features = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, torch.float32)))
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.inference_mode()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-length CLIP text embeddings, texts truncated to the model's context."""
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        features = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            )
        )
        return F.normalize(features.float(), dim=-1).cpu()


@dataclass
class DinoEncoder:
    """A DINO ViT (``transformers.ViTModel``) giving normalised CLS features of the last layer."""

    model: ViTModel
    processor: ViTImageProcessorPil
    device: torch.device

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> DinoEncoder:
        """Load ``ViTModel`` (without its pooler) and ``ViTImageProcessorPil`` from one local directory, in float32."""
        from transformers import ViTImageProcessorPil, ViTModel

        directory = Path(directory)
        # DINO's features are the normed CLS token; ViT's pooler is a classification head DINO checkpoints lack.
        model = ViTModel.from_pretrained(directory, add_pooling_layer=False, dtype=torch.float32).to(device).eval()
        processor = ViTImageProcessorPil.from_pretrained(directory)
        return cls(model=model, processor=processor, device=torch.device(device))

    @torch.inference_mode()
    def image_embeddings(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of unit-length CLS features of the last layer (after its layer norm)."""
        pixels = self.processor(images=[_load_image(image) for image in images], return_tensors="pt")["pixel_values"]
        hidden = self.model(pixel_values=pixels.to(self.device, torch.float32)).last_hidden_state
        return F.normalize(hidden[:, 0].float(), dim=-1).cpu()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def clip_i(output: ImageSource, target: ImageSource, encoder: ClipEncoder) -> float:
    """Cosine similarity of the CLIP image embeddings of ``output`` and ``target``."""
    embeddings = encoder.image_embeddings([output, target])
    return _cosine(embeddings[0], embeddings[1])


def clip_t(output: ImageSource, caption: str, encoder: ClipEncoder) -> float:
    """Cosine similarity of the CLIP image embedding of ``output`` and the CLIP text embedding of ``caption``."""
    return _cosine(encoder.image_embeddings([output])[0], encoder.text_embeddings([caption])[0])


def dino(output: ImageSource, target: ImageSource, encoder: DinoEncoder) -> float:
    """Cosine similarity of the DINO CLS features of ``output`` and ``target``."""
    embeddings = encoder.image_embeddings([output, target])
    return _cosine(embeddings[0], embeddings[1])


# --- folders ---------------------------------------------------------------------------------------------------------


def _images_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise ValueError(
                f"{what} folder {folder} has two images for {path.stem!r}: {found[path.stem].name}, {path.name}"
            )
        found[path.stem] = path
    return found


def load_captions(path: str | os.PathLike[str]) -> dict[str, str]:
    """Target captions by item id (the image file stem) from a JSON-lines or JSON file.

    A ``.jsonl`` file (or any file that is not one JSON document) holds one object per line,
    ``{"id": "0001", "caption": "..."}``; blank lines are skipped. Any other file is one JSON
    document: an object mapping id to caption, ``{"0001": "..."}``, or a list of ``{"id", "caption"}``
    objects. Ids are compared as strings, so write ``"0001"``, not ``1``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line or record is malformed, or an id appears twice.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    records: list[Any] | None = None
    if path.suffix.lower() != ".jsonl":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None
        if isinstance(document, dict):
            return {str(key): _caption_text(value, path, str(key)) for key, value in document.items()}
        if isinstance(document, list):
            records = document
        elif document is not None:
            raise ValueError(f"captions file {path} holds a {type(document).__name__}, not an object or a list")
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"captions file {path} line {number} is not JSON: {error}") from error
    captions: dict[str, str] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict) or "id" not in record or "caption" not in record:
            raise ValueError(f"captions file {path} record {index + 1} is not an object with 'id' and 'caption'")
        key = str(record["id"])
        if key in captions:
            raise ValueError(f"captions file {path} has two captions for {key!r}")
        captions[key] = _caption_text(record["caption"], path, key)
    return captions


def _caption_text(value: Any, path: Path, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"captions file {path}: the caption of {key!r} is not a string")
    return value


def _mean(values: list[float]) -> float:
    # NaN marks a figure that is undefined for an item (a mask over the whole image), not a measurement.
    defined = [value for value in values if not math.isnan(value)]
    return math.fsum(defined) / len(defined) if defined else math.nan


def evaluate_folder(
    *,
    sources: Path,
    outputs: Path,
    targets: Path | None = None,
    captions: Path | None = None,
    masks: Path | None = None,
    clip: ClipEncoder | None = None,
    dino: DinoEncoder | None = None,
) -> dict[str, Any]:
    """Metrics of every edited output in ``outputs``, paired with other folders' images by file stem.

    Images are any file ending in one of :data:`IMAGE_SUFFIXES` (``0001.png`` in ``outputs``
    pairs with ``0001.jpg`` in ``targets``). Items are the stems found in ``sources`` or
    ``outputs``. Per item, the metrics the inputs allow are computed:

    - ``targets``: ``l1``, ``l2``; with ``clip`` also ``clip_i``, with ``dino`` also ``dino``;
    - ``captions`` (see :func:`load_captions`) and ``clip``: ``clip_t``;
    - ``masks`` (white = edited region): ``preservation_psnr`` and ``preservation_l1``, see
      :func:`preservation`;
    - ``clip``: ``source_similarity``, the CLIP image cosine between source and output.
      Identity embeddings are the edit pipeline's business and not computed here.

    An item without an output is not evaluated; an item lacking a counterpart that a requested
    metric needs (source, target, caption, mask) gets the other metrics and is listed under
    ``"missing"`` with the counterparts it lacks, so nothing is dropped silently.

    Returns:
        ``{"items": {stem: {metric: value}}, "means": {metric: mean}, "counts": {metric: n},
        "missing": [{"id": stem, "missing": [...]}]}``. Each mean is over the items that have the
        metric; NaN values (no pixel outside the mask) are left out of means and counts, while an
        ``inf`` PSNR is kept, so one untouched item makes the mean PSNR ``inf``.

    Raises:
        FileNotFoundError: a folder or the captions file does not exist.
        ValueError: a folder has two images with the same stem, or the captions file is malformed.
    """
    source_files = _images_by_stem(Path(sources), "sources")
    output_files = _images_by_stem(Path(outputs), "outputs")
    target_files = _images_by_stem(Path(targets), "targets") if targets is not None else None
    mask_files = _images_by_stem(Path(masks), "masks") if masks is not None else None
    caption_texts = load_captions(captions) if captions is not None else None

    items: dict[str, dict[str, float]] = {}
    missing: list[dict[str, Any]] = []
    for stem in sorted(source_files.keys() | output_files.keys()):
        lacks = [
            name
            for name, files in (
                ("source", source_files),
                ("output", output_files),
                ("target", target_files),
                ("mask", mask_files),
                ("caption", caption_texts if clip is not None else None),
            )
            if files is not None and stem not in files
        ]
        if lacks:
            missing.append({"id": stem, "missing": lacks})
        if stem not in output_files:
            continue
        output = _load_image(output_files[stem])
        source = _load_image(source_files[stem]) if stem in source_files else None
        target = _load_image(target_files[stem]) if target_files is not None and stem in target_files else None
        caption = caption_texts.get(stem) if caption_texts is not None else None
        figures: dict[str, float] = {}
        if target is not None:
            figures["l1"] = l1_distance(output, target)
            figures["l2"] = l2_distance(output, target)
        if clip is not None:
            images = [output, *(image for image in (target, source) if image is not None)]
            embeddings = clip.image_embeddings(images)
            rest = iter(embeddings[1:])
            if target is not None:
                figures["clip_i"] = _cosine(embeddings[0], next(rest))
            if caption is not None:
                figures["clip_t"] = _cosine(embeddings[0], clip.text_embeddings([caption])[0])
            if source is not None:
                figures["source_similarity"] = _cosine(embeddings[0], next(rest))
        if dino is not None and target is not None:
            dino_embeddings = dino.image_embeddings([output, target])
            figures["dino"] = _cosine(dino_embeddings[0], dino_embeddings[1])
        if mask_files is not None and source is not None and stem in mask_files:
            kept = preservation(source, output, mask_files[stem])
            figures["preservation_psnr"] = kept["psnr"]
            figures["preservation_l1"] = kept["l1"]
        items[stem] = figures

    names = sorted({name for figures in items.values() for name in figures}, key=_metric_order)
    means = {name: _mean([figures[name] for figures in items.values() if name in figures]) for name in names}
    counts = {
        name: sum(1 for figures in items.values() if name in figures and not math.isnan(figures[name]))
        for name in names
    }
    return {"items": items, "means": means, "counts": counts, "missing": missing}


_METRIC_ORDER = ("l1", "l2", "clip_i", "dino", "clip_t", "preservation_psnr", "preservation_l1", "source_similarity")


def _metric_order(name: str) -> tuple[int, str]:
    return (_METRIC_ORDER.index(name) if name in _METRIC_ORDER else len(_METRIC_ORDER), name)


# --- command line ----------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    # Strict JSON has no inf or NaN; strings keep them readable and float() parses them back.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate a folder of edits: print a table of the means and the missing items, and write ``--json``.

    The JSON file holds :func:`evaluate_folder`'s result, with non-finite numbers written as the
    strings ``"inf"``, ``"-inf"`` and ``"nan"``. With ``--paired`` the outputs are scored against a
    synthetic split's targets instead (see :func:`run_paired_eval`).
    """
    if getattr(args, "paired", None) is not None:
        return run_paired_eval(args)
    if getattr(args, "results", None) is not None:
        raise ValueError("--results needs --paired")
    if args.sources is None:
        raise ValueError("--sources is required (or give --paired)")
    clip = ClipEncoder.from_pretrained(args.clip, device=args.device) if args.clip is not None else None
    dino_encoder = DinoEncoder.from_pretrained(args.dino, device=args.device) if args.dino is not None else None
    result = evaluate_folder(
        sources=args.sources,
        outputs=args.outputs,
        targets=args.targets,
        captions=args.captions,
        masks=args.masks,
        clip=clip,
        dino=dino_encoder,
    )
    width = max([len("metric"), *(len(name) for name in result["means"])])
    print(f"{'metric':<{width}}  {'mean':>10}  {'n':>5}")
    for name, mean in result["means"].items():
        print(f"{name:<{width}}  {mean:>10.4f}  {result['counts'][name]:>5}")
    if not result["means"]:
        print("no metric could be computed: give --targets, --masks or --clip")
    for entry in result["missing"]:
        print(f"missing: {entry['id']} ({', '.join(entry['missing'])})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def run_paired_eval(args: argparse.Namespace) -> int:
    """``xmgie eval --paired DIR``: print the per-kind table of :mod:`xmgie.quality`'s scores; ``--json`` the rows.

    The JSON file holds :func:`xmgie.quality.evaluate_paired`'s result (rows, per-kind and per-scope
    tables, missing outputs).
    """
    from xmgie.quality import evaluate_paired, format_table

    result = evaluate_paired(args.paired, args.outputs, results=args.results, far_px=args.far_px)
    print(format_table(result["table"]))
    for source in result["missing"]:
        print(f"missing: {source} (output)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
