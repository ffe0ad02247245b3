"""The xMGIE pipeline: MLLM → edit head → InstructPix2Pix diffusion, in one diffusers-style class."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from xmgie.editing.edit_head import EditMapper
from xmgie.editing.errors import EditInputError
from xmgie.editing.images import check_instruction, to_working_size
from xmgie.editing.mllm import MAX_NEW_TOKENS, generate_expressive_instructions
from xmgie.editing.options import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_MAX_SIDE,
    DEFAULT_STEPS,
)

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
    """

    images: list
    expressive_instructions: list[str]
    masks: list[PIL.Image.Image | None]
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)


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
    """

    model_cpu_offload_seq = "mllm->edit_head->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "image_latents"]

    def __init__(
        self,
        mllm,
        tokenizer,
        feature_extractor,
        edit_head: EditMapper,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: KarrasDiffusionSchedulers,
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
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

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

    def encode_instructions(
        self,
        images: list[PIL.Image.Image],
        instructions: list[str],
        max_new_tokens: int,
        timings: dict[str, float],
        peak_memory: dict[str, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Expressive instructions and UNet conditioning for the batch, plus the null conditioning."""
        with self._timed(timings, "mllm", peak_memory):
            mllm_out = generate_expressive_instructions(
                self.mllm, self.tokenizer, self.feature_extractor, images, instructions, max_new_tokens=max_new_tokens
            )
        with self._timed(timings, "edit_head", peak_memory):
            hidden = mllm_out.img_hidden_states.to(device=self.edit_head.device, dtype=self.edit_head.dtype)
            prompt_embeds = self.edit_head(hidden)
            negative_prompt_embeds = self.edit_head.null_conditioning(len(images))
        return prompt_embeds, negative_prompt_embeds, mllm_out.expressive_instructions

    def prepare_image_latents(self, image: torch.Tensor) -> torch.Tensor:
        """Source-image latents as InstructPix2Pix uses them: the VAE posterior mode, unscaled."""
        image = image.to(device=self._execution_device, dtype=self.vae.dtype)
        return self.vae.encode(image).latent_dist.mode()

    def prepare_latents(
        self, batch_size: int, height: int, width: int, dtype: torch.dtype, generator: GeneratorInput
    ) -> torch.Tensor:
        """Initial noise for ``batch_size`` latents of ``height×width`` latent pixels."""
        shape = (batch_size, self.vae.config.latent_channels, height, width)
        latents = randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def denoise(
        self,
        image_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor,
        *,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE,
        generator: GeneratorInput = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> torch.Tensor:
        """The diffusion stage: InstructPix2Pix three-way classifier-free guidance over the scheduler's steps.

        ``noise = uncond + s_text·(text − image) + s_image·(image − uncond)``, where the text branch sees
        the edit conditioning and the source latents, the image branch the null conditioning and the
        source latents, and the unconditional branch the null conditioning and zero latents — the
        semantics of diffusers' ``StableDiffusionInstructPix2PixPipeline``.
        """
        device = self._execution_device
        batch_size = image_latents.shape[0]
        do_cfg = guidance_scale > 1.0 and image_guidance_scale >= 1.0
        dtype = self.unet.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        image_latents = image_latents.to(device=device, dtype=dtype)
        if do_cfg:
            conditioning = torch.cat([prompt_embeds, negative_prompt_embeds, negative_prompt_embeds])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        else:
            conditioning = prompt_embeds

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = self.prepare_latents(batch_size, *image_latents.shape[-2:], dtype, generator)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator)

        for i, t in enumerate(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 3) if do_cfg else latents
            model_input = torch.cat([self.scheduler.scale_model_input(model_input, t), image_latents], dim=1)
            noise_pred = self.unet(model_input, t, encoder_hidden_states=conditioning, return_dict=False)[0]
            if do_cfg:
                noise_text, noise_image, noise_uncond = noise_pred.chunk(3)
                noise_pred = (
                    noise_uncond
                    + guidance_scale * (noise_text - noise_image)
                    + image_guidance_scale * (noise_image - noise_uncond)
                )
            latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "prompt_embeds": prompt_embeds, "image_latents": image_latents}
                callback_kwargs = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)
        return latents

    def prepare_extra_step_kwargs(self, generator: GeneratorInput, eta: float = 0.0) -> dict:
        """The keyword arguments the scheduler's ``step`` accepts (not all take ``eta`` or a generator)."""
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def decode_latents(self, latents: torch.Tensor) -> list[PIL.Image.Image]:
        """VAE-decode latents to PIL images at the working size."""
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image | Sequence[PIL.Image.Image],
        instruction: str | Sequence[str],
        mask: PIL.Image.Image | Sequence[PIL.Image.Image | None] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        image_guidance_scale: float = DEFAULT_IMAGE_GUIDANCE_SCALE,
        generator: GeneratorInput = None,
        max_side: int = DEFAULT_MAX_SIDE,
        max_new_tokens: int = MAX_NEW_TOKENS,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        return_dict: bool = True,
    ) -> XMGIEPipelineOutput | tuple:
        r"""Edit a batch of images, each by its own instruction.

        Args:
            image: RGB images of any size (load files with ``xmgie.editing.images.load_image``).
            instruction: one instruction per image.
            mask: optional masks (mode ``L``, white = edit) at their image's size.
            num_inference_steps, guidance_scale, image_guidance_scale: as in InstructPix2Pix.
            generator: one generator, or one per image so that each item's result depends on its seed only.
            max_side: the long side the model works at; results come back at each input's size.
            max_new_tokens: the MLLM's generation budget.
            output_type: ``"pil"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, callback_kwargs) -> dict`` after each step.
        """
        # 1. Check inputs
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        images, instructions, masks = self.check_inputs(
            image, instruction, mask, generator, callback_on_step_end_tensor_inputs
        )
        timings: dict[str, float] = {}
        peak_memory: dict[str, int] = {}

        # 2. Expressive instructions and conditioning (the MLLM sees every item in one batch)
        prompt_embeds, negative_prompt_embeds, expressive = self.encode_instructions(
            images, instructions, max_new_tokens, timings, peak_memory
        )

        # 3. Working sizes: items of the same size share a batched diffusion call
        working = [to_working_size(item, max_side=max_side) for item in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(working):
            groups.setdefault(item.size, []).append(index)

        outputs: list = [None] * len(images)
        for indices in groups.values():
            group_generator = [generator[i] for i in indices] if isinstance(generator, list) else generator

            # 4. Source-image latents
            with self._timed(timings, "vae_encode", peak_memory):
                pixels = torch.cat([self.image_processor.preprocess(working[i]) for i in indices])
                image_latents = self.prepare_image_latents(pixels)

            # 5. Denoising loop
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
                )

            # 6. Post-process at each input's size
            if output_type == "latent":
                for row, i in enumerate(indices):
                    outputs[i] = latents[row]
                continue
            with self._timed(timings, "vae_decode", peak_memory):
                decoded = self.decode_latents(latents)
            for row, i in enumerate(indices):
                result = decoded[row]
                if result.size != images[i].size:
                    result = result.resize(images[i].size, PIL.Image.Resampling.LANCZOS)
                outputs[i] = result

        self.maybe_free_model_hooks()
        if not return_dict:
            return outputs, expressive
        return XMGIEPipelineOutput(
            images=outputs, expressive_instructions=expressive, masks=masks, timings=timings, peak_memory=peak_memory
        )
