"""The xMGIE pipeline: MLLM → edit head → InstructPix2Pix diffusion, in one diffusers-style class."""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from xmgie.editing.attention import CrossAttentionControl, install_edit_processors
from xmgie.editing.blending import (
    FeatureBlender,
    blend_modules,
    ddim_inverted_latents,
    epsilon_from_prediction,
    noised_reference_latents,
)
from xmgie.editing.blur import DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_S, composite_images, resize_mask, soften_mask
from xmgie.editing.detail import DEFAULT_DETAIL_EPSILON, transfer_detail
from xmgie.editing.edit_head import EditMapper
from xmgie.editing.errors import EditInputError
from xmgie.editing.identity import IdentityAdapter, encode_identity, identity_score
from xmgie.editing.images import check_instruction, mask_to_tensor, to_working_size
from xmgie.editing.masks import derived_generators, estimate_edit_masks, mask_pyramid
from xmgie.editing.mllm import DEFAULT_MLLM_BATCH_SIZE, MAX_NEW_TOKENS, generate_expressive_instructions
from xmgie.editing.options import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_MAX_SIDE,
    DEFAULT_STEPS,
    AutoMaskOptions,
    CAMOptions,
    EditOptions,
    GBOptions,
    IEOptions,
    PFBOptions,
)
from xmgie.metrics import preservation as preservation_outside

GeneratorInput = torch.Generator | list[torch.Generator] | None


@dataclass
class XMGIEPipelineOutput(BaseOutput):
    """Edited images at their inputs' sizes, the expressive instructions and per-stage seconds.

    Attributes:
        images: one ``PIL.Image`` per item (``output_type="pil"``), or one latent tensor per item.
        expressive_instructions: the MLLM's expressive instruction per item.
        masks: the mask used per item at the input's size (``None`` where none was given).
        timings: seconds spent per stage over the whole batch: ``mllm``, ``edit_head``, ``vae_encode``,
            ``diffusion`` and ``vae_decode``.
        peak_memory: on CUDA, the peak allocated bytes (weights included) per stage; empty elsewhere.
        identity_scores: per item, cosine similarity of the identity encoder's embeddings of source and output
            (``None`` when identity embeddings were off or unavailable).
        preservation: per item with a mask, PSNR and L1 between source and output outside the mask.
        edit_scopes: per item, ``"local"`` (the edit was confined to its mask) or ``"global"`` (the whole image:
            no mask, or an automatic estimate that the edit is everywhere; PFB, CAM and GB were off for it).
        mask_fractions: per item, the fraction of the image inside the mask the edit was confined to (1.0 when
            global).
    """

    images: list
    expressive_instructions: list[str]
    masks: list[PIL.Image.Image | None]
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    identity_scores: list[float | None] = field(default_factory=list)
    preservation: list[dict[str, float] | None] = field(default_factory=list)
    edit_scopes: list[str] = field(default_factory=list)
    mask_fractions: list[float] = field(default_factory=list)


class XMGIEPipeline(DiffusionPipeline):
    r"""MLLM-guided image editing (MGIE) on an InstructPix2Pix diffusion model.

    Components:
        mllm ([`~transformers.LlavaForConditionalGeneration`]): LLaVA with the ``[IMG]`` tokens in its vocabulary.
        tokenizer ([`~transformers.PreTrainedTokenizerFast`]): the MLLM's tokenizer.
        feature_extractor ([`~transformers.CLIPImageProcessor`]): the MLLM's image preprocessing.
        edit_head ([`EditMapper`]): maps ``[IMG]`` hidden states to UNet conditioning.
        unet ([`UNet2DConditionModel`]): InstructPix2Pix UNet (8 input channels).
        vae ([`AutoencoderKL`]): the image autoencoder.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler; Euler-ancestral in the released model.
        image_encoder ([`~transformers.CLIPVisionModelWithProjection`], optional): identity encoder (IE).
        identity_adapter ([`IdentityAdapter`], optional): IP-Adapter-style identity projections (IE).
        max_working_side (`int`, optional): the largest long side the model edits at (the size it was trained
            at); a larger ``max_side`` is lowered to it. Saved in ``model_index.json``.
        guidance_scale, image_guidance_scale (`float`, optional): the guidance this model edits with when a call
            gives none (saved in ``model_index.json``); ``None``: InstructPix2Pix's 7.5 and 1.5. A model trained on
            edits with one right answer (``mini``) wants guidance near 1: a larger scale extrapolates past it.
        auto_mask_mode (`str`, optional): the automatic mask's mode when a call leaves it unset (``auto``,
            ``always`` or ``off``; saved in ``model_index.json``); ``None``: ``auto``. A model whose estimates
            cannot be trusted says ``off``: its unmasked edits are then global instead of confined to a wrong blob.
        auto_mask_strength, auto_mask_level, auto_mask_smoothing (`float`, optional): the automatic mask's noise
            level, absolute threshold and map blur when a call leaves them unset (saved in ``model_index.json``);
            ``None``: 0.5, DiffEdit's relative threshold, no blur (:class:`~xmgie.editing.options.AutoMaskOptions`).
        gb_sigma_max, gb_sigma_s (`float`, optional): GB's blur, in working pixels, when a call leaves it unset
            (saved in ``model_index.json``); ``None``: the seed paper's 5 and 10, made for a 512-pixel working
            size. A model that works at a smaller size scales them down, or the feather eats its edit regions.
        detail_radius (`int`, optional), detail_epsilon (`float`, optional): detail transfer
            (:func:`~xmgie.editing.detail.transfer_detail`) after decoding, for a model whose autoencoder loses
            fine detail: the guided filter's window radius in working pixels and its regulariser (squared pixel
            values of [-1, 1]; ``None``: :data:`DEFAULT_DETAIL_EPSILON`). ``None`` or 0: no transfer (saved in
            ``model_index.json``).
    """

    model_cpu_offload_seq = "mllm->edit_head->image_encoder->identity_adapter->unet->vae"
    _optional_components = ["image_encoder", "identity_adapter"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "image_latents"]

    vae_slice_size: int = 1
    """Items per VAE encode/decode call: a group of large images never goes through the VAE at once."""
    vae_tile_above: int = 1024
    """Long side in pixels above which the VAE encodes and decodes in overlapping tiles of
    ``vae.tile_sample_min_size`` pixels (diffusers' tiled VAE); at or below it, in one piece."""
    _mllm_offload_device: torch.device | None = None

    def __init__(
        self,
        mllm,
        tokenizer,
        feature_extractor,
        edit_head: EditMapper,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder=None,
        identity_adapter: IdentityAdapter | None = None,
        max_working_side: int | None = None,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        auto_mask_mode: str | None = None,
        auto_mask_strength: float | None = None,
        auto_mask_level: float | None = None,
        auto_mask_smoothing: float | None = None,
        gb_sigma_max: float | None = None,
        gb_sigma_s: float | None = None,
        detail_radius: int | None = None,
        detail_epsilon: float | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            mllm=mllm,
            tokenizer=tokenizer,
            feature_extractor=feature_extractor,
            edit_head=edit_head,
            unet=unet,
            vae=vae,
            scheduler=scheduler,
            image_encoder=image_encoder,
            identity_adapter=identity_adapter,
        )
        # Saved in model_index.json: the largest working size (a model trained at one size edits at most at it;
        # ``None``: no limit) and the guidance, automatic-mask settings and GB blur a call without them gets.
        self.register_to_config(
            max_working_side=max_working_side,
            guidance_scale=guidance_scale,
            image_guidance_scale=image_guidance_scale,
            auto_mask_mode=auto_mask_mode,
            auto_mask_strength=auto_mask_strength,
            auto_mask_level=auto_mask_level,
            auto_mask_smoothing=auto_mask_smoothing,
            gb_sigma_max=gb_sigma_max,
            gb_sigma_s=gb_sigma_s,
            detail_radius=detail_radius,
            detail_epsilon=detail_epsilon,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def _model_setting(self, given, name: str, fallback):
        """``given``, else the model's setting ``name`` (its ``model_index.json``), else ``fallback``."""
        if given is not None:
            return given
        setting = self.config.get(name)
        return fallback if setting is None else setting

    def resolve_guidance(
        self, guidance_scale: float | None = None, image_guidance_scale: float | None = None
    ) -> tuple[float, float]:
        """The text and image guidance of an edit: the given ones, else the model's (its ``model_index.json``),
        else InstructPix2Pix's (:data:`DEFAULT_GUIDANCE_SCALE`, :data:`DEFAULT_IMAGE_GUIDANCE_SCALE`)."""
        return (
            float(self._model_setting(guidance_scale, "guidance_scale", DEFAULT_GUIDANCE_SCALE)),
            float(self._model_setting(image_guidance_scale, "image_guidance_scale", DEFAULT_IMAGE_GUIDANCE_SCALE)),
        )

    def resolve_auto_mask(self, auto_mask: AutoMaskOptions) -> AutoMaskOptions:
        """``auto_mask`` with its unset mode, strength, level and smoothing made the model's (``model_index.json``'s
        ``auto_mask_mode``, ``auto_mask_strength``, ``auto_mask_level``, ``auto_mask_smoothing``), else ``auto``,
        0.5, 0 (DiffEdit's relative threshold) and 0 (no blur)."""
        return replace(
            auto_mask,
            mode=self._model_setting(auto_mask.mode, "auto_mask_mode", "auto"),
            strength=float(self._model_setting(auto_mask.strength, "auto_mask_strength", 0.5)),
            level=float(self._model_setting(auto_mask.level, "auto_mask_level", 0.0)),
            smoothing=float(self._model_setting(auto_mask.smoothing, "auto_mask_smoothing", 0.0)),
        )

    def resolve_gb(self, gb: GBOptions) -> GBOptions:
        """``gb`` with an unset ``sigma_max`` / ``sigma_s`` made the model's (``model_index.json``'s
        ``gb_sigma_max`` / ``gb_sigma_s``), else the seed paper's (:data:`DEFAULT_SIGMA_MAX`,
        :data:`DEFAULT_SIGMA_S`)."""
        return replace(
            gb,
            sigma_max=float(self._model_setting(gb.sigma_max, "gb_sigma_max", DEFAULT_SIGMA_MAX)),
            sigma_s=float(self._model_setting(gb.sigma_s, "gb_sigma_s", DEFAULT_SIGMA_S)),
        )

    def resolve_detail(self) -> tuple[int, float]:
        """The model's detail transfer: window radius (0: none) and regulariser (``model_index.json``'s
        ``detail_radius`` / ``detail_epsilon``)."""
        return (
            int(self._model_setting(None, "detail_radius", 0)),
            float(self._model_setting(None, "detail_epsilon", DEFAULT_DETAIL_EPSILON)),
        )

    # ------------------------------------------------------------------ offload

    def enable_mllm_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep every component but the MLLM on ``device``; the MLLM waits on the CPU and visits ``device``
        only for the instruction stage. Cheaper than model offload (the diffusion components never move) while
        the MLLM's weights are off the accelerator during diffusion."""
        if getattr(self, "_all_hooks", None):
            raise ValueError("model CPU offload is enabled on this pipeline; use one offload mode, not both")
        device = torch.device(device)
        for name, component in self.components.items():
            if isinstance(component, torch.nn.Module) and name != "mllm":
                component.to(device)
        self.mllm.to("cpu")
        self._mllm_offload_device = device

    @property
    def _execution_device(self) -> torch.device:
        if self._mllm_offload_device is not None:
            return self._mllm_offload_device
        return super()._execution_device

    @contextmanager
    def _mllm_on_device(self):
        """The MLLM on the execution device for the instruction stage, whatever the offload mode.

        ``generate`` builds its token tensors on the device the MLLM's weights are on, so under model offload
        the MLLM is loaded through its offload hook before ``generate`` starts rather than at its first forward.
        """
        if self._mllm_offload_device is not None:
            self.mllm.to(self._mllm_offload_device)
            try:
                yield
            finally:
                self.mllm.to("cpu")
                if self._mllm_offload_device.type == "cuda":
                    torch.cuda.empty_cache()
            return
        hook = getattr(self.mllm, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self.mllm)
        yield

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str, peak_memory: dict[str, int] | None = None):
        """Add the stage's seconds to ``timings`` and, on CUDA, its peak allocated bytes to ``peak_memory``."""
        device = self._execution_device
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        yield
        if on_cuda:
            torch.cuda.synchronize(device)
            if peak_memory is not None:
                peak_memory[stage] = max(peak_memory.get(stage, 0), torch.cuda.max_memory_allocated(device))
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start

    def seeded_generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        """One generator per item, seeded and created on the execution device.

        On CUDA a CPU generator would make every noise draw of the sampler (Euler-ancestral draws one per step)
        happen on the CPU and be copied over; a generator on the device draws there. The same seed gives the same
        result on the same kind of device (CPU and CUDA random streams differ).
        """
        device = self._execution_device
        return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]

    def check_inputs(
        self,
        image: PIL.Image.Image | Sequence[PIL.Image.Image],
        instruction: str | Sequence[str],
        mask: PIL.Image.Image | Sequence[PIL.Image.Image | None] | None,
        generator: GeneratorInput,
        callback_on_step_end_tensor_inputs: Sequence[str],
    ) -> tuple[list[PIL.Image.Image], list[str], list[PIL.Image.Image | None]]:
        """Normalise the batch to lists and refuse what cannot be edited, naming the offending value."""
        images = [image] if isinstance(image, PIL.Image.Image) else list(image)
        instructions = [instruction] if isinstance(instruction, str) else list(instruction)
        if not images:
            raise ValueError("`image` is empty: pass at least one image")
        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
        for index, item in enumerate(images):
            if not isinstance(item, PIL.Image.Image):
                raise ValueError(
                    f"image {index} must be a PIL.Image.Image (load it with xmgie.editing.images), "
                    f"got {type(item).__name__}"
                )
            if item.mode != "RGB":
                raise ValueError(f"image {index} has mode {item.mode!r}; convert it with load_image first")
        instructions = [check_instruction(text) for text in instructions]
        masks = [mask] * len(images) if mask is None or isinstance(mask, PIL.Image.Image) else list(mask)
        if len(masks) != len(images):
            raise ValueError(f"got {len(masks)} masks for {len(images)} images")
        for index, (item, item_mask) in enumerate(zip(images, masks, strict=True)):
            if item_mask is not None and item_mask.size != item.size:
                raise EditInputError(
                    "mask_size_mismatch",
                    f"mask {index} is {item_mask.size[0]}×{item_mask.size[1]} "
                    f"but its image is {item.size[0]}×{item.size[1]}; load it with load_mask",
                )
        if isinstance(generator, list) and len(generator) != len(images):
            raise ValueError(f"got {len(generator)} generators for {len(images)} images")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        return images, instructions, masks

    @torch.no_grad()
    def encode_instructions(
        self,
        images: list[PIL.Image.Image],
        instructions: list[str],
        max_new_tokens: int,
        timings: dict[str, float],
        peak_memory: dict[str, int] | None = None,
        mllm_batch_size: int = DEFAULT_MLLM_BATCH_SIZE,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Expressive instructions and UNet conditioning for the batch, plus the null conditioning.

        The MLLM runs ``mllm_batch_size`` items per ``generate`` call; the results do not depend on it.
        """
        with self._timed(timings, "mllm", peak_memory), self._mllm_on_device():
            mllm_out = generate_expressive_instructions(
                self.mllm,
                self.tokenizer,
                self.feature_extractor,
                images,
                instructions,
                max_new_tokens=max_new_tokens,
                batch_size=mllm_batch_size,
            )
        with self._timed(timings, "edit_head", peak_memory):
            hidden = mllm_out.img_hidden_states.to(device=self.edit_head.device, dtype=self.edit_head.dtype)
            prompt_embeds = self.edit_head(hidden)
            negative_prompt_embeds = self.edit_head.null_conditioning(len(images))
        return prompt_embeds, negative_prompt_embeds, mllm_out.expressive_instructions

    @contextmanager
    def _vae_tiling(self, side: int):
        """Tiled VAE calls inside the block when ``side`` (pixels) is above ``vae_tile_above``."""
        was_tiling = self.vae.use_tiling
        if side > self.vae_tile_above:
            self.vae.enable_tiling()
        try:
            yield
        finally:
            self.vae.use_tiling = was_tiling

    @torch.no_grad()
    def prepare_image_latents(self, image: torch.Tensor) -> torch.Tensor:
        """Source-image latents as InstructPix2Pix uses them: the VAE posterior mode, unscaled.

        Encoded ``vae_slice_size`` items at a time, tiled above ``vae_tile_above`` pixels.
        """
        image = image.to(device=self._execution_device, dtype=self.vae.dtype)
        with self._vae_tiling(max(image.shape[-2:])):
            latents = [self.vae.encode(chunk).latent_dist.mode() for chunk in image.split(self.vae_slice_size)]
        return torch.cat(latents)

    def prepare_latents(
        self, batch_size: int, height: int, width: int, dtype: torch.dtype, generator: GeneratorInput
    ) -> torch.Tensor:
        """Initial noise for ``batch_size`` latents of ``height×width`` latent pixels."""
        shape = (batch_size, self.vae.config.latent_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def denoise(
        self,
        image_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: GeneratorInput = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        edit_masks: torch.Tensor | None = None,
        pfb: PFBOptions | None = None,
        cam: CAMOptions | None = None,
        identity_tokens: torch.Tensor | None = None,
        identity_scale: float = 0.0,
        identity_regions: torch.Tensor | None = None,
        pfb_sequential: bool = False,
        capture_attention: bool = False,
    ) -> torch.Tensor:
        """The diffusion stage: InstructPix2Pix three-way classifier-free guidance over the scheduler's steps.

        ``noise = uncond + s_text·(text − image) + s_image·(image − uncond)``, where the text branch sees
        the edit conditioning and the source latents, the image branch the null conditioning and the
        source latents, and the unconditional branch the null conditioning and zero latents — the
        semantics of diffusers' ``StableDiffusionInstructPix2PixPipeline``.

        Extensions, each active only when its inputs are given:

        - ``edit_masks`` (B, 1, H, W) soft masks (1 = edit) with ``pfb`` enabled: a reference branch of the
          source rides in the same UNet call (``pfb_sequential`` runs it as a separate call instead) and
          its features at ``pfb.levels`` (or ``pfb.blocks``) and, for the leading steps, latents are blended
          outside the mask; ``self.pfb_blended_sizes`` then maps each blended module to its (h, w). With
          ``pfb.reference="inversion_start"`` and no ``latents`` given, sampling starts from the inverted
          source latent.
        - ``edit_masks`` with ``cam`` enabled: cross-attention masking of the edit conditioning.
        - ``identity_tokens`` (B, T, D) with a non-zero ``identity_scale``: decoupled identity cross-attention,
          limited to ``identity_regions`` (B, 1, H, W) when given.
        - ``capture_attention``: the cross-attention layers record what they did in ``self.attention_records``.
        """
        device = self._execution_device
        batch_size = image_latents.shape[0]
        guidance_scale, image_guidance_scale = self.resolve_guidance(guidance_scale, image_guidance_scale)
        do_cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
        num_branches = 3 if do_cfg else 1
        dtype = self.unet.dtype
        # Latents stay in (at least) float32 between steps: a bf16 UNet's rounding would otherwise accumulate
        # in the sampler's state over the whole schedule. Only the UNet's inputs are cast to its dtype.
        latent_dtype = torch.promote_types(dtype, torch.float32)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        source_image_latents = image_latents.to(device=device, dtype=dtype)
        if do_cfg:
            conditioning = torch.cat([prompt_embeds, negative_prompt_embeds, negative_prompt_embeds])
            image_latents = torch.cat(
                [source_image_latents, source_image_latents, torch.zeros_like(source_image_latents)]
            )
        else:
            conditioning = prompt_embeds
            image_latents = source_image_latents

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        use_pfb = pfb is not None and pfb.enabled and edit_masks is not None
        reference = None
        if use_pfb and pfb.reference != "noise":
            # The inversion draws no noise, so it comes first: inversion_start samples from its result.
            reference = self.prepare_reference_latents(
                source_image_latents.to(latent_dtype), negative_prompt_embeds, pfb.reference, generator
            )
            if latents is None and pfb.reference == "inversion_start":
                latents = reference[0]
        if latents is None:
            latents = self.prepare_latents(batch_size, *image_latents.shape[-2:], latent_dtype, generator)
        latents = latents.to(device=device, dtype=latent_dtype)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)
        latent_size = tuple(latents.shape[-2:])

        # Progressive feature blending: the reference branch and its trajectory.
        blender = None
        if use_pfb:
            latent_masks = resize_mask(edit_masks.to(device=device, dtype=torch.float32), latent_size).to(latent_dtype)
            if reference is None:
                # Its own generators: whether a batch neighbour needs a reference branch must not move an item's
                # noise.
                reference = self.prepare_reference_latents(
                    source_image_latents.to(latent_dtype),
                    negative_prompt_embeds,
                    pfb.reference,
                    derived_generators(generator, "pfb"),
                )
            blended_steps = round(pfb.latent_blend_fraction * len(self.scheduler.timesteps))
            blender = FeatureBlender(
                edit_masks.to(device=device, dtype=torch.float32),
                num_branches,
                mode="blend" if pfb_sequential else "batched",
            ).attach(self.unet, pfb.blocks or blend_modules(self.unet, pfb.levels))

        # Cross-attention masking and identity embeddings share one processor on every attn2 layer.
        control = CrossAttentionControl(batch_size=batch_size, num_branches=num_branches, capture=capture_attention)
        if cam is not None and cam.enabled and edit_masks is not None:
            masks = edit_masks.to(device=device, dtype=torch.float32)
            if cam.mode == "hard":
                masks = (masks >= 0.5).float()
            control.edit_masks = mask_pyramid(masks, *latent_size)
            if cam.mode == "hard":
                control.edit_masks = {n: (m >= 0.5).to(dtype) for n, m in control.edit_masks.items()}
            if not do_cfg:
                # Without guidance no branch of the batch carries the null conditioning that CAM falls back to.
                control.null_conditioning = negative_prompt_embeds
        negative_tokens = None
        if identity_tokens is not None and identity_scale != 0.0:
            if self.identity_adapter is None:
                raise ValueError("identity tokens were given but the model has no identity adapter")
            negative_tokens = self.identity_adapter.tokens(
                torch.zeros(batch_size, self.identity_adapter.config.image_embed_dim, device=device, dtype=dtype)
            )
            rows = [identity_tokens.to(device=device, dtype=dtype)] + [negative_tokens] * (num_branches - 1)
            control.identity_adapter = self.identity_adapter
            if use_pfb and not pfb_sequential:
                rows.append(negative_tokens)
            control.identity_tokens = torch.cat(rows)
            control.identity_scale = identity_scale
            if identity_regions is not None:
                control.identity_regions = mask_pyramid(identity_regions.to(device, torch.float32), *latent_size)
        reference_conditioning = negative_prompt_embeds
        previous_processors = None
        if control.active or capture_attention:
            previous_processors = self.unet.attn_processors
            install_edit_processors(self.unet, control)

        try:
            for i, t in enumerate(self.scheduler.timesteps):
                model_input = torch.cat([latents] * num_branches)
                branch_image_latents, branch_conditioning = image_latents, conditioning
                if use_pfb and not pfb_sequential:
                    model_input = torch.cat([model_input, reference[i]])
                    branch_image_latents = torch.cat([image_latents, source_image_latents])
                    branch_conditioning = torch.cat([conditioning, reference_conditioning])
                model_input = torch.cat(
                    [self.scheduler.scale_model_input(model_input, t).to(dtype), branch_image_latents], 1
                )
                if use_pfb and pfb_sequential:
                    blender.mode = "record"
                    reference_input = torch.cat(
                        [self.scheduler.scale_model_input(reference[i], t).to(dtype), source_image_latents], 1
                    )
                    with self._attention_paused(control, negative_tokens):
                        self.unet(reference_input, t, encoder_hidden_states=reference_conditioning)
                    blender.mode = "blend"
                noise_pred = self.unet(model_input, t, encoder_hidden_states=branch_conditioning, return_dict=False)[0]
                noise_pred = noise_pred[: num_branches * batch_size].to(latent_dtype)
                if do_cfg:
                    noise_text, noise_image, noise_uncond = noise_pred.chunk(3)
                    noise_pred = (
                        noise_uncond
                        + guidance_scale * (noise_text - noise_image)
                        + image_guidance_scale * (noise_image - noise_uncond)
                    )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if use_pfb and i < blended_steps:
                    latents = latent_masks * latents + (1 - latent_masks) * reference[i + 1]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "image_latents": image_latents}
                    callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
        finally:
            if blender is not None:
                blender.detach()
            if previous_processors is not None:
                self.unet.set_attn_processor(previous_processors)
        self.attention_records = control.records
        self.reference_latents = reference if use_pfb else None
        self.pfb_blended_sizes = dict(blender.blended_sizes) if blender is not None else {}
        return latents

    @contextmanager
    def _attention_paused(self, control: CrossAttentionControl, reference_tokens: torch.Tensor | None):
        """Run the sequential reference call as the reference rows of the batched call would see it."""
        saved = (control.edit_masks, control.identity_tokens, control.batch_size, control.num_branches)
        control.edit_masks = None
        control.identity_tokens = reference_tokens
        edit_cache, control._identity_cache = control._identity_cache, {}
        control.num_branches = 1
        capture, control.capture = control.capture, False
        try:
            yield
        finally:
            control.edit_masks, control.identity_tokens, control.batch_size, control.num_branches = saved
            control._identity_cache = edit_cache
            control.capture = capture

    def prepare_reference_latents(
        self,
        image_latents: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        method: str,
        generator: GeneratorInput,
    ) -> list[torch.Tensor]:
        """The reference branch's latent at each timestep (and the source latent last), by noise or inversion.

        ``method`` is ``noise``, or ``inversion`` / ``inversion_start`` (both DDIM inversion with the null
        conditioning; they differ only in where :meth:`denoise` starts sampling).
        """
        source = image_latents * self.vae.config.scaling_factor
        if method == "noise":
            noise = randn_tensor(source.shape, generator=generator, device=source.device, dtype=source.dtype)
            return noised_reference_latents(self.scheduler, source, noise)

        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")

        def predict_noise(x: torch.Tensor, t: int) -> torch.Tensor:
            model_input = torch.cat([x, image_latents], dim=1).to(self.unet.dtype)
            conditioning = negative_prompt_embeds.to(self.unet.dtype)
            output = self.unet(model_input, t, encoder_hidden_states=conditioning, return_dict=False)[0]
            return epsilon_from_prediction(output, x, self.scheduler.alphas_cumprod[t], prediction_type).to(x.dtype)

        return ddim_inverted_latents(self.scheduler, predict_noise, source)

    def prepare_extra_step_kwargs(self, generator: GeneratorInput, eta: float = 0.0) -> dict:
        """The keyword arguments the scheduler's ``step`` accepts (not all take ``eta`` or a generator)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    @torch.no_grad()
    def decode_latents(
        self,
        latents: torch.Tensor,
        source_latents: torch.Tensor | None = None,
        source_pixels: torch.Tensor | None = None,
    ) -> list[PIL.Image.Image]:
        """VAE-decode latents to PIL images at the working size, ``vae_slice_size`` items at a time (tiled above
        ``vae_tile_above`` pixels).

        With the sources' unscaled latents and pixels (in [-1, 1], at the working size) and a model that sets a
        ``detail_radius``, each decoded edit takes its source's fine detail (:func:`transfer_detail`, guided by
        the source's own decoded round trip).
        """
        radius, epsilon = self.resolve_detail()
        detail = radius > 0 and source_latents is not None and source_pixels is not None
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images: list[PIL.Image.Image] = []
        with self._vae_tiling(max(latents.shape[-2:]) * self.vae_scale_factor):
            for start in range(0, latents.shape[0], self.vae_slice_size):
                rows = slice(start, start + self.vae_slice_size)
                decoded = self.vae.decode(latents[rows], return_dict=False)[0]
                if detail:
                    round_trip = self.vae.decode(source_latents[rows].to(self.vae.dtype), return_dict=False)[0]
                    decoded = transfer_detail(
                        decoded, round_trip, source_pixels[rows].to(decoded), radius=radius, epsilon=epsilon
                    )
                images.extend(self.image_processor.postprocess(decoded, output_type="pil"))
        return images

    # ------------------------------------------------------------------ call

    def item_masks(
        self,
        masks: list[PIL.Image.Image | None],
        auto_masks: list[torch.Tensor | None],
        sizes: list[tuple[int, int]],
    ) -> list[PIL.Image.Image | None]:
        """Each item's hard mask at ``sizes[i]``: the user's, else its (1, h, w) automatic latent mask, else ``None``.

        The latent mask is upsampled bilinearly and thresholded at 0.5, so its outline is smooth rather than made of
        one block per latent pixel.
        """
        result: list[PIL.Image.Image | None] = []
        for mask, latent, size in zip(masks, auto_masks, sizes, strict=True):
            if mask is not None:
                result.append(mask if mask.size == size else mask.resize(size, PIL.Image.Resampling.BILINEAR))
            elif latent is not None:
                upsampled = resize_mask(latent[None].float().cpu(), (size[1], size[0]))[0, 0] >= 0.5
                result.append(PIL.Image.fromarray(upsampled.numpy().astype(np.uint8) * 255, "L"))
            else:
                result.append(None)
        return result

    def soft_masks(
        self, masks: list[PIL.Image.Image | None], working_size: tuple[int, int], gb: GBOptions
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Each item's mask softened once, at its input's size, for the final composite and for the model.

        GB's σ_max and σ_s are in working pixels, where the edit is made, and are scaled by the input's size over
        the working size: the feather covers the same part of the picture whatever the input's resolution (on a
        4000-pixel photo edited at 512 it is about 8 times wider in input pixels). One distance transform per
        item; the working-size mask is the input-size one resized.

        Args:
            masks: hard masks (mode ``L``, white = edit) at each item's input size; ``None``: edited everywhere.
            working_size: the (width, height) the model works at.
            gb: with GB off the masks are kept hard; an unset σ is the model's (:meth:`resolve_gb`).

        Returns:
            (B, 1, h, w) masks in [0, 1] at the working size for PFB and CAM, and per item its (H, W) mask at the
            input's size for the composite (``None`` where the item has no mask).
        """
        width, height = working_size
        device = self._execution_device
        gb = self.resolve_gb(gb)
        working: list[torch.Tensor] = []
        at_input: list[torch.Tensor | None] = []
        for mask in masks:
            if mask is None:
                working.append(torch.ones(height, width, device=device))
                at_input.append(None)
                continue
            hard = mask_to_tensor(mask)[0].to(device)
            if gb.enabled:
                scale = math.sqrt(mask.width * mask.height / (width * height))
                hard = soften_mask((hard >= 0.5).float(), sigma_max=gb.sigma_max * scale, sigma_s=gb.sigma_s * scale)
            at_input.append(hard)
            working.append(hard if mask.size == working_size else resize_mask(hard, (height, width)))
        return torch.stack(working)[:, None], at_input

    def encode_identity_tokens(
        self,
        images: list[PIL.Image.Image],
        masks: list[PIL.Image.Image | None],
        identity_images: list[PIL.Image.Image | None],
        ie: IEOptions,
    ) -> torch.Tensor:
        """Identity tokens (B, tokens, dim) of each item's identity reference."""
        references, regions = [], []
        for image, mask, given in zip(images, masks, identity_images, strict=True):
            if ie.reference == "image":
                references.append(given)
                regions.append(None)
            elif ie.reference == "outside_mask" and mask is not None:
                references.append(image)
                regions.append(PIL.Image.eval(mask.convert("L"), lambda v: 255 - v))
            else:
                references.append(image)
                regions.append(None)
        # One item at a time: a batched encoder call rounds differently, and an item's tokens must not depend on
        # its neighbours.
        embeds = torch.cat(
            [
                encode_identity(self.image_encoder, self.feature_extractor, [reference], [region])
                for reference, region in zip(references, regions, strict=True)
            ]
        )
        embeds = embeds.to(device=self._execution_device, dtype=self.identity_adapter.dtype)
        return self.identity_adapter.tokens(embeds)

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | Sequence[PIL.Image.Image],
        instruction: str | Sequence[str],
        mask: PIL.Image.Image | Sequence[PIL.Image.Image | None] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        generator: GeneratorInput = None,
        max_side: int = DEFAULT_MAX_SIDE,
        max_new_tokens: int = MAX_NEW_TOKENS,
        pfb: PFBOptions | bool = True,
        cam: CAMOptions | bool = True,
        ie: IEOptions | bool = True,
        gb: GBOptions | bool = True,
        auto_mask: AutoMaskOptions | bool = True,
        detail: bool = True,
        identity_image: PIL.Image.Image | Sequence[PIL.Image.Image | None] | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
    ) -> XMGIEPipelineOutput | tuple:
        r"""Edit a batch of images, each by its own instruction.

        Args:
            image: RGB images of any size (load files with ``xmgie.editing.images.load_image``).
            instruction: one instruction per image.
            mask: optional masks (mode ``L``, white = edit) at their image's size; where an item has none and
                ``auto_mask`` is on, a mask is estimated from the model and returned in the output.
            num_inference_steps, guidance_scale, image_guidance_scale: as in InstructPix2Pix; ``None`` guidance
                is the model's (:meth:`resolve_guidance`).
            generator: one generator, or one per image so that each item's result depends on its seed only.
            max_side: the long side the model works at (at most the model's ``max_working_side``, when it has
                one); results come back at each input's size.
            max_new_tokens: the MLLM's generation budget.
            pfb, cam, ie, gb, auto_mask: the extensions' options (``True``/``False`` for defaults/off).
                IE needs a model with an image encoder and an identity adapter; without them it is skipped.
            detail: put the source's fine detail back after decoding, where the model sets a ``detail_radius``
                (:meth:`decode_latents`); ``False``: the decoder's output as it is.
            identity_image: the identity reference per item when ``ie.reference`` is ``"image"``.
            output_type: ``"pil"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step.
        """
        # 1. Check inputs
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        images, instructions, masks = self.check_inputs(
            image, instruction, mask, generator, callback_on_step_end_tensor_inputs
        )
        guidance_scale, image_guidance_scale = self.resolve_guidance(guidance_scale, image_guidance_scale)
        pfb, cam, ie, gb, auto_mask = EditOptions(
            pfb=pfb, cam=cam, ie=ie, gb=gb, auto_mask=auto_mask
        ).extension_groups()
        auto_mask = self.resolve_auto_mask(auto_mask)
        identity_images = (
            list(identity_image) if isinstance(identity_image, list | tuple) else [identity_image] * len(images)
        )
        use_ie = (
            ie.enabled and ie.scale != 0.0 and self.identity_adapter is not None and self.image_encoder is not None
        )
        if use_ie and ie.reference == "image" and any(given is None for given in identity_images):
            raise EditInputError("missing_identity_image", "ie.reference is 'image' but an item has no identity image")
        wants_mask = pfb.enabled or cam.enabled or gb.enabled or (use_ie and ie.region is not None)
        timings: dict[str, float] = {}
        peak_memory: dict[str, int] = {}

        # 2. Expressive instructions and conditioning (the MLLM sees every item in one batch)
        prompt_embeds, negative_prompt_embeds, expressive = self.encode_instructions(
            images, instructions, max_new_tokens, timings, peak_memory
        )

        # 3. Working sizes: items of the same size share a batched diffusion call
        if self.config.get("max_working_side"):
            max_side = min(max_side, self.config.max_working_side)
        working = [to_working_size(item, max_side=max_side) for item in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(working):
            groups.setdefault(item.size, []).append(index)

        outputs: list = [None] * len(images)
        used_masks: list[PIL.Image.Image | None] = [None] * len(images)
        identity_scores: list[float | None] = [None] * len(images)
        preservation: list[dict[str, float] | None] = [None] * len(images)
        edit_scopes: list[str] = ["global"] * len(images)
        mask_fractions: list[float] = [1.0] * len(images)
        for indices in groups.values():
            group_generator = [generator[i] for i in indices] if isinstance(generator, list) else generator
            group_size = working[indices[0]].size

            # 4. Source-image latents
            with self._timed(timings, "vae_encode", peak_memory):
                pixels = torch.cat([self.image_processor.preprocess(working[i]) for i in indices])
                image_latents = self.prepare_image_latents(pixels)

            # 5. Masks and edit scope: a used mask makes the edit local; without one, auto_mask.mode decides
            group_masks = [masks[i] for i in indices] if wants_mask else [None] * len(indices)
            missing = [row for row, m in enumerate(group_masks) if m is None]
            auto: list[torch.Tensor | None] = [None] * len(indices)
            if wants_mask and auto_mask.mode != "off" and missing:
                with self._timed(timings, "auto_mask", peak_memory):
                    rows = [indices[row] for row in missing]
                    # Draws from generators of their own, only for the rows that need them: an item's noise and
                    # result never depend on whether its neighbours brought a mask.
                    mask_generator = derived_generators(
                        [group_generator[row] for row in missing]
                        if isinstance(group_generator, list)
                        else group_generator,
                        "auto_mask",
                    )
                    estimate = estimate_edit_masks(
                        self.unet,
                        self.scheduler,
                        image_latents[missing],
                        prompt_embeds[rows],
                        negative_prompt_embeds[rows],
                        latent_scale=self.vae.config.scaling_factor,
                        generator=mask_generator,
                        draws=auto_mask.draws,
                        strength=auto_mask.strength,
                        ratio=auto_mask.ratio,
                        threshold=auto_mask.threshold,
                        min_spread=auto_mask.min_spread,
                        level=auto_mask.level,
                        smoothing=auto_mask.smoothing,
                        chunk=auto_mask.chunk,
                    )
                for position, (row, fraction) in enumerate(zip(missing, estimate.fractions(), strict=True)):
                    if auto_mask.mode == "always" or 0.0 < fraction < auto_mask.global_fraction:
                        auto[row] = estimate.masks[position]
            scopes = [
                "local" if mask is not None or latent is not None else "global"
                for mask, latent in zip(group_masks, auto, strict=True)
            ]
            working_masks = self.item_masks(group_masks, auto, [group_size] * len(indices))
            have_masks = "local" in scopes
            # A global item in a group with masks gets a full mask: PFB, CAM and GB then change nothing for it.
            full_masks = [m if m is not None else PIL.Image.new("L", group_size, 255) for m in working_masks]
            input_masks = self.item_masks(group_masks, auto, [images[i].size for i in indices])
            edit_masks, input_soft_masks = self.soft_masks(input_masks, group_size, gb) if have_masks else (None, None)

            # 6. Identity tokens (IE applies to global items too, over the whole image)
            identity_tokens = identity_regions = None
            if use_ie:
                with self._timed(timings, "identity", peak_memory):
                    identity_tokens = self.encode_identity_tokens(
                        [working[i] for i in indices], working_masks, [identity_images[i] for i in indices], ie
                    )
                if ie.region is not None and have_masks:
                    hard = torch.stack([mask_to_tensor(m) for m in full_masks]).to(self._execution_device)
                    identity_regions = hard if ie.region == "inside_mask" else 1 - hard
                    identity_regions[[row for row, scope in enumerate(scopes) if scope == "global"]] = 1.0

            # 7. Denoising loop
            with self._timed(timings, "diffusion", peak_memory):
                latents = self.denoise(
                    image_latents,
                    prompt_embeds[indices],
                    negative_prompt_embeds[indices],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    image_guidance_scale=image_guidance_scale,
                    generator=group_generator,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    edit_masks=edit_masks,
                    pfb=pfb,
                    cam=cam,
                    identity_tokens=identity_tokens,
                    identity_scale=ie.scale if use_ie else 0.0,
                    identity_regions=identity_regions,
                )

            # 8. Post-process at each input's size; GB composites the edit onto the source
            for row, i in enumerate(indices):
                used_masks[i] = input_masks[row]
                edit_scopes[i] = scopes[row]
                mask_fractions[i] = 1.0 if used_masks[i] is None else float(np.asarray(used_masks[i]).mean() / 255)
            if output_type == "latent":
                for row, i in enumerate(indices):
                    outputs[i] = latents[row]
                continue
            with self._timed(timings, "vae_decode", peak_memory):
                decoded = (
                    self.decode_latents(latents, image_latents, pixels) if detail else self.decode_latents(latents)
                )
            for row, i in enumerate(indices):
                result = decoded[row]
                if result.size != images[i].size:
                    result = result.resize(images[i].size, PIL.Image.Resampling.LANCZOS)
                if have_masks and gb.enabled and input_soft_masks[row] is not None:
                    result = composite_images(result, images[i], input_soft_masks[row].cpu())
                outputs[i] = result
                if used_masks[i] is not None:
                    preservation[i] = preservation_outside(images[i], result, used_masks[i])
            if use_ie:
                with self._timed(timings, "identity", peak_memory):
                    scores = identity_score(
                        self.image_encoder,
                        self.feature_extractor,
                        [images[i] for i in indices],
                        [outputs[i] for i in indices],
                    )
                for row, i in enumerate(indices):
                    identity_scores[i] = scores[row]

        self.maybe_free_model_hooks()
        if not return_dict:
            return outputs, expressive
        return XMGIEPipelineOutput(
            images=outputs,
            expressive_instructions=expressive,
            masks=used_masks,
            timings=timings,
            peak_memory=peak_memory,
            identity_scores=identity_scores,
            preservation=preservation,
            edit_scopes=edit_scopes,
            mask_fractions=mask_fractions,
        )
