"""What the job system needs from the model: edit a micro-batch of loaded images, one result per request.

``PipelineEditor`` runs an ``XMGIEPipeline``: requests whose options share a ``batch_key()`` go through one
pipeline call, each with its own seeded generator, so an item's result depends on its seed only and not on its
neighbours. ``lazy_pipeline_editor`` loads the configured model on first use, once per process (never in the parent
of a fork); ``load_editor`` makes an editor that has a ``load()`` load its model now (workers load it before they
claim anything, so no lease has to cover the load). ``NoOpEditor`` returns the input unchanged, for queue
benchmarks and tests that measure the job machinery without a model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from PIL import Image

from xmgie.editing.options import EditOptions

if TYPE_CHECKING:
    from xmgie.editing.pipeline import XMGIEPipeline
    from xmgie.jobs.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class EditRequest:
    """One item to edit, decoded and checked.

    Attributes:
        image: the source as an RGB image.
        instruction: the edit instruction, stripped.
        options: the item's validated options.
        seed: the seed of the item's noise (always set, so a retry repeats the same edit).
        mask: the region to edit (mode ``L``, white = edit) at the image's size, or ``None``.
        identity_image: the identity reference (RGB) for ``ie.reference == "image"``, or ``None``.
    """

    image: Image.Image
    instruction: str
    options: EditOptions
    seed: int
    mask: Image.Image | None = None
    identity_image: Image.Image | None = None


@dataclass
class EditResult:
    """The edit of one request.

    Attributes:
        image: the edited image, at the source's size.
        mask: the mask used (the user's or the automatic one) at the source's size, or ``None``.
        expressive_instruction: the MLLM's expressive instruction, or ``None`` when there is none.
        identity_score: cosine similarity of identity embeddings of source and output, or ``None``.
        preservation: PSNR and L1 between source and output outside the mask, or ``None`` without a mask.
        edit_scope: ``"local"`` (confined to the mask) or ``"global"`` (the whole image), or ``None`` when unknown.
        mask_fraction: the fraction of the image inside the mask the edit was confined to (1.0 when global).
        timings: seconds per stage of the call the item was part of, plus ``batch_size`` (items in that call).
    """

    image: Image.Image
    mask: Image.Image | None = None
    expressive_instruction: str | None = None
    identity_score: float | None = None
    preservation: dict[str, float] | None = None
    edit_scope: str | None = None
    mask_fraction: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Editor(Protocol):
    """Edits a micro-batch; returns one result per request, in order. Raises on failure of the whole batch."""

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        """Edit ``requests`` and return their results in the same order."""
        ...


def load_editor(editor: Editor) -> None:
    """Call the editor's ``load()`` if it has one (a lazily loaded model), so its first edit does not pay for it.

    A failure is logged and not raised: the first edit loads again and fails its items with ``internal_error``
    as any editor failure does, instead of leaving them queued behind a worker that cannot start.
    """
    load = getattr(editor, "load", None)
    if not callable(load):
        return
    try:
        load()
    except Exception:  # noqa: BLE001 - see the docstring: the edit reports it on the items
        logger.exception("loading the editor %r failed", editor)


class NoOpEditor:
    """An editor that returns each input image unchanged, without any model.

    For queue benchmarks and tests of the job machinery (claiming, storage, manifests) where the model's cost and
    output do not matter. Never use it to serve real jobs.
    """

    def __init__(self) -> None:
        self.calls = 0

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        """Return a copy of each request's image, with its mask and no expressive instruction."""
        self.calls += 1
        return [
            EditResult(image=request.image.copy(), mask=request.mask, timings={"batch_size": float(len(requests))})
            for request in requests
        ]


class PipelineEditor:
    """Edits with an ``XMGIEPipeline``: one pipeline call per group of requests with the same ``batch_key()``."""

    def __init__(self, pipe: XMGIEPipeline) -> None:
        self.pipe = pipe

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        """Edit ``requests`` group by group; each item gets its own generator seeded with its seed on the device."""
        results: list[EditResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for position, request in enumerate(requests):
            groups.setdefault(request.options.batch_key(), []).append(position)
        for positions in groups.values():
            group = [requests[position] for position in positions]
            options = group[0].options
            pfb, cam, ie, gb, auto_mask = options.extension_groups()
            identity_images = [request.identity_image for request in group]
            started = time.perf_counter()
            out = self.pipe(
                [request.image for request in group],
                [request.instruction for request in group],
                mask=[request.mask for request in group],
                num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale,
                image_guidance_scale=options.image_guidance_scale,
                generator=self.pipe.seeded_generators([request.seed for request in group]),
                max_side=options.max_side,
                max_new_tokens=options.max_new_tokens,
                pfb=pfb,
                cam=cam,
                ie=ie,
                gb=gb,
                auto_mask=auto_mask,
                detail=options.detail,
                identity_image=identity_images if any(image is not None for image in identity_images) else None,
            )
            timings = {stage: round(float(seconds), 4) for stage, seconds in out.timings.items()}
            timings["total"] = round(time.perf_counter() - started, 4)
            timings["batch_size"] = float(len(group))
            for row, position in enumerate(positions):
                results[position] = EditResult(
                    image=out.images[row],
                    mask=out.masks[row] if row < len(out.masks) else None,
                    expressive_instruction=out.expressive_instructions[row],
                    identity_score=_optional(out.identity_scores, row),
                    preservation=_optional(out.preservation, row),
                    edit_scope=_optional(out.edit_scopes, row),
                    mask_fraction=_optional(out.mask_fractions, row),
                    timings=dict(timings),
                )
        return [result for result in results if result is not None]


def _optional(values: list[Any], row: int) -> Any:
    return values[row] if row < len(values) else None


def default_cache_dir() -> Path:
    """Where the tiny preset is written when settings name no cache: ``$XMGIE_CACHE_DIR`` or ``~/.cache/xmgie``."""
    return Path(os.environ.get("XMGIE_CACHE_DIR", Path.home() / ".cache" / "xmgie")).expanduser()


_PIPELINES: dict[tuple[str, str, str, str, str], XMGIEPipeline] = {}
_PIPELINES_LOCK = threading.Lock()


def _pipeline_once(model: str, cache_dir: str, device: str, dtype: str, offload: str) -> XMGIEPipeline:
    """The pipeline for these settings, loaded on the first call in this process and kept."""
    key = (model, cache_dir, device, dtype, offload)
    with _PIPELINES_LOCK:
        pipe = _PIPELINES.get(key)
        if pipe is None:
            import torch

            from xmgie.loading.directory import load_pipeline

            pipe = load_pipeline(
                model, cache_dir=cache_dir, device=device, dtype=getattr(torch, dtype), offload=offload
            )
            _PIPELINES[key] = pipe
        return pipe


class LazyPipelineEditor:
    """A ``PipelineEditor`` whose model is loaded on the first ``edit`` (and shared by the whole process)."""

    def __init__(
        self, model: str, cache_dir: str | os.PathLike[str], device: str, dtype: str, offload: str = "none"
    ) -> None:
        self.model = model
        self.cache_dir = str(cache_dir)
        self.device = device
        self.dtype = dtype
        self.offload = offload

    @property
    def loaded(self) -> bool:
        """Whether the model is already in memory."""
        return (self.model, self.cache_dir, self.device, self.dtype, self.offload) in _PIPELINES

    def load(self) -> None:
        """Load the model now if it is not in memory yet (once per process)."""
        if self.loaded:
            return
        started = time.perf_counter()
        _pipeline_once(self.model, self.cache_dir, self.device, self.dtype)
        logger.info("model %s loaded on %s in %.1f s", self.model, self.device, time.perf_counter() - started)

    def edit(self, requests: list[EditRequest]) -> list[EditResult]:
        """Load the model if needed, then edit as ``PipelineEditor`` does."""
        pipe = _pipeline_once(self.model, self.cache_dir, self.device, self.dtype, self.offload)
        return PipelineEditor(pipe).edit(requests)


def lazy_pipeline_editor(settings: Settings) -> LazyPipelineEditor:
    """An editor for the settings' model, device, dtype and offload mode; nothing is loaded until it edits."""
    cache_dir = settings.model_cache_dir or default_cache_dir()
    return LazyPipelineEditor(settings.model, cache_dir, settings.device, settings.dtype, settings.offload)
