"""MGIE's training objective: the instruction loss of the MLLM plus InstructPix2Pix's edit loss.

- **Instruction loss.** The MLLM reads MGIE's prompt with the source image and is teacher-forced on
  the expressive instruction followed by the eight ``[IMG]`` tokens and the end of sequence; the loss
  is the cross-entropy of those answer tokens only.
- **Edit loss.** The last-layer hidden states that predict the eight ``[IMG]`` tokens (the ones the
  pipeline hands to the edit head at inference) go through the edit head; the UNet is trained to
  predict the noise added to the target's latent, with the source's latent concatenated to its
  input, as InstructPix2Pix trains. Conditioning dropout (InstructPix2Pix's): for 5 % of the items the
  conditioning becomes the null conditioning, for 5 % the source latent becomes zeros, for 5 % both —
  the three branches of the three-way guidance at inference.
- **Masked attention** (optional, not MGIE's): with ``mask_attention`` drawn for some items, their image positions
  attend to the conditioning only inside their region and to the null conditioning outside it — CAM as the
  pipeline applies it with a user's mask — so the UNet learns to put an edit where its conditioning is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from xmgie.editing.attention import CrossAttentionControl, edit_processors_installed
from xmgie.editing.masks import mask_pyramid
from xmgie.editing.mllm import (
    IMG_TOKENS,
    MAX_NEW_TOKENS,
    MLLM_SPECIAL_TOKENS,
    NO_REPEAT_NGRAM_SIZE,
    build_prompt,
    encode_prompt,
    strip_special_tokens,
)

IGNORE_INDEX = -100
CONDITIONING_DROPOUT = 0.05
"""InstructPix2Pix's rate for each of: conditioning dropped, source image dropped, both dropped."""
NULL_TARGETS = ("target", "source")
"""What an item whose conditioning is dropped but whose source image is kept learns to produce:
InstructPix2Pix's ``target`` (the edit, so the null branch learns the average edit of the data) or ``source``
(no edit, so the null branch reconstructs the source; see :meth:`MGIEObjective.forward`)."""


def num_image_tokens(mllm) -> int:
    """How many ``<im_patch>`` tokens stand for the image in the MLLM's prompt."""
    vision = mllm.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def prompt_token_ids(tokenizer, instruction: str, image_tokens: int) -> list[int]:
    """MGIE's prompt for ``instruction`` as token ids, exactly as the pipeline builds it at inference."""
    special = list(tokenizer.all_special_tokens) + IMG_TOKENS + MLLM_SPECIAL_TOKENS
    return encode_prompt(tokenizer, build_prompt(strip_special_tokens(instruction, special), image_tokens))


def answer_token_ids(tokenizer, expressive_instruction: str, max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """The answer the MLLM learns: the expressive instruction, ``[IMG0]``…``[IMG7]`` and the end of sequence.

    The text is cut so that the whole answer fits the generation budget of inference.
    """
    text_ids = tokenizer(expressive_instruction, add_special_tokens=False)["input_ids"]
    text_ids = text_ids[: max_new_tokens - len(IMG_TOKENS) - 1]
    return text_ids + tokenizer.convert_tokens_to_ids(IMG_TOKENS) + [tokenizer.eos_token_id]


def first_banned_answer_token(
    prompt_ids: list[int], answer_ids: list[int], ngram_size: int = NO_REPEAT_NGRAM_SIZE
) -> int | None:
    """Index of the first answer token that MGIE's generation can never produce, or ``None``.

    MGIE generates with ``no_repeat_ngram_size`` over the prompt and the answer together: a token that would
    complete an n-gram already in the sequence is banned. An answer that repeats a trigram of its prompt (or of
    itself) is therefore unreachable at inference, however low its teacher-forced loss: generation leaves the
    learnt answer at that token, and the ``[IMG]`` states read after it are not the trained ones.
    """
    sequence = list(prompt_ids)
    seen = {tuple(sequence[i : i + ngram_size]) for i in range(len(sequence) - ngram_size + 1)}
    for index, token in enumerate(answer_ids):
        if len(sequence) >= ngram_size - 1:
            ngram = (*sequence[len(sequence) - ngram_size + 1 :], token)
            if ngram in seen:
                return index
            seen.add(ngram)
        sequence.append(token)
    return None


def unreachable_answer_lines(tokenizer, pairs, image_tokens: int) -> list[int]:
    """Metadata lines of ``pairs`` whose answer MGIE's generation cannot produce (see `first_banned_answer_token`)."""
    lines = []
    for pair in pairs:
        prompt = prompt_token_ids(tokenizer, pair.instruction, image_tokens)
        if first_banned_answer_token(prompt, answer_token_ids(tokenizer, pair.expressive_instruction)) is not None:
            lines.append(pair.line)
    return lines


@dataclass
class TeacherForcingBatch:
    """The MLLM's inputs for a batch: right-padded ids, labels on the answer only, ``[IMG]`` state positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    img_positions: torch.Tensor
    pixel_values: torch.Tensor


def build_teacher_forcing_batch(
    tokenizer,
    feature_extractor,
    image_tokens: int,
    images: list[Image.Image],
    instructions: list[str],
    expressive_instructions: list[str],
) -> TeacherForcingBatch:
    """Token ids, labels and image pixels of ``prompt + answer`` for each item.

    ``img_positions[i]`` are the eight positions whose hidden states predict ``[IMG0]``…``[IMG7]``: the
    states MGIE's inference takes (from one before the generated ``[IMG0]``).
    """
    sequences, labels, positions = [], [], []
    for instruction, expressive in zip(instructions, expressive_instructions, strict=True):
        prompt = prompt_token_ids(tokenizer, instruction, image_tokens)
        answer = answer_token_ids(tokenizer, expressive)
        sequences.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
        img0 = len(prompt) + len(answer) - len(IMG_TOKENS) - 1
        positions.append(list(range(img0 - 1, img0 - 1 + len(IMG_TOKENS))))
    length = max(len(sequence) for sequence in sequences)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    label_ids = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (sequence, label) in enumerate(zip(sequences, labels, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        label_ids[row, : len(label)] = torch.tensor(label)
        attention_mask[row, : len(sequence)] = 1
    pixel_values = feature_extractor(images=images, return_tensors="pt")["pixel_values"]
    return TeacherForcingBatch(input_ids, attention_mask, label_ids, torch.tensor(positions), pixel_values)


def draw_conditioning_dropout(
    batch_size: int, generator: torch.Generator, rate: float = CONDITIONING_DROPOUT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which items lose their conditioning and which their source image, InstructPix2Pix's way.

    One uniform draw ``p`` per item: ``p < rate`` drops the conditioning, ``rate ≤ p < 2·rate`` both,
    ``2·rate ≤ p < 3·rate`` the source image.
    """
    p = torch.rand(batch_size, generator=generator)
    drop_conditioning = p < 2 * rate
    drop_image = (p >= rate) & (p < 3 * rate)
    return drop_conditioning, drop_image


def conditioning_spread(conditioning: torch.Tensor) -> torch.Tensor:
    """How much a batch's edit conditionings differ from item to item, relative to their size.

    The root mean square of each item's deviation from the batch mean, over the root mean square of the
    conditionings (0 for one item). The UNet can only tell edits apart by what differs between items; a
    spread of a few per cent means the ``[IMG]`` states carry little of the instruction, and the guided
    edit becomes the same average edit for every instruction.
    """
    flat = conditioning.detach().float().flatten(1)
    deviation = (flat - flat.mean(dim=0, keepdim=True)).pow(2).mean().sqrt()
    return deviation / flat.pow(2).mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)


@dataclass
class StepNoise:
    """Every random draw of one training step, made up front from the step's own generator."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor
    drop_conditioning: torch.Tensor
    drop_image: torch.Tensor
    mask_attention: torch.Tensor | None = None
    """(B,) bool: items whose cross-attention to the conditioning is masked to their region (CAM) this step."""
    noisy_timestep: torch.Tensor | None = None
    """(B,) bool: items whose timestep was drawn from the noisier half of the schedule this step."""

    @classmethod
    def draw(
        cls,
        generator: torch.Generator,
        batch_size: int,
        latent_shape: tuple[int, int, int],
        num_train_timesteps: int,
        dropout_rate: float = CONDITIONING_DROPOUT,
        masked_attention_share: float = 0.0,
        noisy_timestep_share: float = 0.0,
    ) -> StepNoise:
        """Timesteps, the diffusion noise, the target latent's sampling noise, the dropout decisions and, with a
        ``masked_attention_share`` above 0, which items train with their cross-attention masked to their region
        (drawn after those, so they do not depend on it). With a ``noisy_timestep_share`` above 0, that share of the
        items (drawn last) takes its timestep again from the noisier half ``[T/2, T)``: see
        :func:`noisy_timesteps`."""
        timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
        noise = torch.randn((batch_size, *latent_shape), generator=generator)
        latent_noise = torch.randn((batch_size, *latent_shape), generator=generator)
        drop_conditioning, drop_image = draw_conditioning_dropout(batch_size, generator, dropout_rate)
        mask_attention = None
        if masked_attention_share > 0:
            mask_attention = torch.rand(batch_size, generator=generator) < masked_attention_share
        noisy_timestep = None
        if noisy_timestep_share > 0:
            timesteps, noisy_timestep = noisy_timesteps(
                timesteps, num_train_timesteps, noisy_timestep_share, generator
            )
        return cls(timesteps, noise, latent_noise, drop_conditioning, drop_image, mask_attention, noisy_timestep)


def noisy_timesteps(
    timesteps: torch.Tensor, num_train_timesteps: int, share: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``timesteps`` with a ``share`` of them (drawn per item) drawn again from the noisier half of the schedule.

    Returns the timesteps and which items were redrawn. With ``share`` s, a timestep of the noisier half
    ``[T/2, T)`` is drawn (1 + s) / (1 − s) times as often as one of the other half. That half is where the edit is
    decided: there the noisy target says little of the target, and the model's clean-latent estimate — which sets
    the picture's tones in a sampler's first steps — must come from the source and the instruction alone. Near
    the clean end the noisy target gives the answer away, and a uniform draw spends half the steps there.
    """
    redraw = torch.rand(timesteps.shape[0], generator=generator) < share
    noisier = torch.randint(num_train_timesteps // 2, num_train_timesteps, timesteps.shape, generator=generator)
    return torch.where(redraw, noisier, timesteps), redraw


@dataclass
class PairLatents:
    """VAE encodings of pairs: the target's posterior mean and standard deviation, unscaled, and the source's mode.

    The VAE is frozen in MGIE's objective, so with ``cache_latents`` a whole dataset's are computed once
    (:meth:`of_dataset`) and each step takes its items' rows (:meth:`rows`) instead of encoding them again.
    """

    target_mean: torch.Tensor
    target_std: torch.Tensor
    source: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, vae, source_pixels: torch.Tensor, target_pixels: torch.Tensor) -> PairLatents:
        """Encode a batch of sources and targets (pixels in [-1, 1]) with ``vae``."""
        posterior = vae.encode(target_pixels.to(vae.dtype)).latent_dist
        return cls(posterior.mean, posterior.std, vae.encode(source_pixels.to(vae.dtype)).latent_dist.mode())

    @classmethod
    def of_dataset(cls, vae, dataset, device, chunk: int = 32) -> PairLatents:
        """Encode the ``source_pixels`` and ``target_pixels`` of every item of ``dataset``, ``chunk`` at a time."""
        parts = []
        for start in range(0, len(dataset), chunk):
            items = [dataset[index] for index in range(start, min(start + chunk, len(dataset)))]
            sources = torch.stack([item["source_pixels"] for item in items]).to(device)
            targets = torch.stack([item["target_pixels"] for item in items]).to(device)
            parts.append(cls.of(vae, sources, targets))
        return cls(
            *(torch.cat([getattr(part, name) for part in parts]) for name in ("target_mean", "target_std", "source"))
        )

    def rows(self, indices: list[int]) -> PairLatents:
        """The encodings of the items ``indices``."""
        index = torch.as_tensor(indices, device=self.source.device)
        return PairLatents(self.target_mean[index], self.target_std[index], self.source[index])


def region_loss_weights(masks: torch.Tensor, latent_size: tuple[int, int], share: float) -> torch.Tensor:
    """Per-pixel weights of the edit loss that give each item's edited region at least ``share`` of its loss.

    ``masks`` are the items' (B, 1, H, W) region masks in [0, 1]; they are area-averaged to ``latent_size``. An
    item whose region covers a fraction ``f`` of its latent, with ``0 < f < share``, weighs its region pixels
    ``share / f`` and the rest ``(1 − share) / (1 − f)``: the weights still average 1 over the item, so every item
    counts as much as before, and the region's share of the item's loss becomes ``share``. Items with an empty or
    full mask, or a region already that large, keep the weight 1 everywhere (``share`` 0: plain mean squares).
    Local edits touch a few per cent of an image: with plain mean squares their region is about 1 % of
    what a mixed batch's loss measures, and a model learns global edits long before it learns them.
    """
    region = F.adaptive_avg_pool2d(masks.float(), latent_size)
    fraction = region.mean(dim=(1, 2, 3), keepdim=True)
    boost = (fraction > 0) & (fraction < share)
    inside = torch.where(boost, share / fraction.clamp_min(1e-12), torch.ones_like(fraction))
    outside = torch.where(boost, (1 - share) / (1 - fraction).clamp_min(1e-12), torch.ones_like(fraction))
    return outside + (inside - outside) * region


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al., 2023) of ``timesteps``: ``min(SNR, γ)`` over what the prediction's
    squared error already weighs, ``SNR`` for ε-prediction and ``SNR + 1`` for v-prediction.

    Plain mean squares let the many nearly noise-free timesteps, whose detail is cheap to predict, pull the
    shared weights against the noisy ones that decide an edit's layout; clamping each timestep's weight at ``γ``
    (5 in the paper) balances them, reported to converge several times faster at 256–512 px. On ``mini`` (64 px)
    it left most colour edits far from their targets: see the README's "Training".
    """
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas / (1 - alphas)
    clamped = snr.clamp(max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clamped / (snr + 1)
    return clamped / snr


EDIT_SIZE_FLOOR = 0.1
"""An item's edit size counts as at least this share of its batch's mean size in :func:`edit_size_weights`."""


def edit_size_weights(
    target_latents: torch.Tensor,
    source_latents: torch.Tensor,
    power: float,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-item weights of the edit loss that grow as the item's edit gets smaller: its size to the power ``-power``.

    An item's edit size is the root mean square of its target's latent minus its source's (weighted per pixel
    by ``pixel_weights``, the region weights, where given), floored at :data:`EDIT_SIZE_FLOOR` of the batch's
    mean size; the weights are normalised to average 1 over the batch, so the loss keeps its scale. With
    ``power`` 1 an item's squared error counts over its edit's size: a model that has learnt a share of every
    edit feels each item's remaining error in proportion to that share, where plain mean squares let the large
    edits (an inversion moves a picture about eight times as far as a warmer tone) outweigh the subtle ones.
    ``power`` 0 gives every item the weight 1.
    """
    squared = (target_latents.float() - source_latents.float()).pow(2)
    if pixel_weights is not None:
        squared = squared * pixel_weights
    size = squared.mean(dim=(1, 2, 3)).sqrt()
    size = torch.maximum(size, EDIT_SIZE_FLOOR * size.mean()).clamp_min(torch.finfo(torch.float32).tiny)
    raw = size.pow(-power)
    return raw / raw.mean()


class MGIEObjective(nn.Module):
    """The trained model as one module whose forward returns MGIE's two losses.

    Holding every component in one module lets ``accelerate`` wrap it once for data-parallel training;
    the components are the pipeline's own objects, so saving the pipeline saves what was trained.
    """

    def __init__(self, mllm, edit_head: nn.Module, unet: nn.Module, vae: nn.Module, noise_scheduler) -> None:
        super().__init__()
        self.mllm = mllm
        self.edit_head = edit_head
        self.unet = unet
        self.vae = vae
        self.noise_scheduler = noise_scheduler

    def forward(
        self,
        mllm_inputs: TeacherForcingBatch,
        source_pixels: torch.Tensor,
        target_pixels: torch.Tensor,
        noise: StepNoise,
        cached: PairLatents | None = None,
        region_masks: torch.Tensor | None = None,
        region_loss_share: float = 0.0,
        snr_gamma: float = 0.0,
        null_target: str = "target",
        edit_size_power: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """``instruction_loss`` and ``edit_loss`` of a batch, and the ``conditioning_spread`` (no gradient).

        ``cached`` are the batch's VAE encodings when they were computed before training; the pixels are then
        not encoded again. With ``region_masks`` (B, 1, H, W) and a ``region_loss_share`` above 0, the edit loss
        is weighted per pixel by :func:`region_loss_weights`. With ``snr_gamma`` above 0 each item's edit loss is
        weighted by :func:`min_snr_weights` of its timestep, and with ``edit_size_power`` above 0 by
        :func:`edit_size_weights` (its edit's size, target latent against source latent). The items of
        ``noise.mask_attention`` read their conditioning only inside their ``region_masks`` (hard, at every attention
        resolution), the null conditioning outside: the UNet then learns to draw an edit where CAM lets it read the
        conditioning at inference.

        ``null_target`` ``source`` makes the items that lose only their conditioning denoise the source's latent
        instead of the target's: the null branch ``ε(image, ∅)`` then learns "no edit" rather than InstructPix2Pix's
        average edit of the data. The difference ``ε(image, edit) − ε(image, ∅)`` — the automatic mask's map and
        the text-guidance direction — is then the edit itself: zero where the edit keeps the source, large where
        it changes it, whatever the other edits of the data do there.
        """
        if null_target not in NULL_TARGETS:
            raise ValueError(f"null_target must be one of {NULL_TARGETS}, got {null_target!r}")
        device = source_pixels.device
        # 1. Instruction loss: teacher-forced cross-entropy on the answer tokens
        out = self.mllm(
            input_ids=mllm_inputs.input_ids,
            attention_mask=mllm_inputs.attention_mask,
            pixel_values=mllm_inputs.pixel_values.to(self.mllm.dtype),
            output_hidden_states=True,
        )
        logits = out.logits[:, :-1].float()
        labels = mllm_inputs.labels[:, 1:]
        instruction_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

        # 2. Edit-head conditioning from the [IMG] hidden states, dropped to the null conditioning for some items
        hidden = out.hidden_states[-1]
        rows = torch.arange(hidden.shape[0], device=device)[:, None]
        img_hidden = hidden[rows, mllm_inputs.img_positions].to(self.edit_head.dtype)
        conditioning = self.edit_head(img_hidden)
        spread = conditioning_spread(conditioning)
        null = self.edit_head(torch.zeros_like(img_hidden))
        drop_conditioning = noise.drop_conditioning.to(device)[:, None, None]
        conditioning = torch.where(drop_conditioning, null, conditioning)

        # 3. Latents: the target's sampled from the VAE posterior and scaled, the source's its mode, unscaled
        with torch.no_grad():
            vae_dtype = self.vae.dtype
            if cached is None:
                cached = PairLatents.of(self.vae, source_pixels, target_pixels)
            latents = (cached.target_mean + cached.target_std * noise.latent_noise.to(device, vae_dtype)) * (
                self.vae.config.scaling_factor
            )
            source_latents = cached.source
            if null_target == "source":
                no_edit = (noise.drop_conditioning & ~noise.drop_image).to(device)[:, None, None, None]
                latents = torch.where(no_edit, source_latents * self.vae.config.scaling_factor, latents)
        keep_image = (~noise.drop_image.to(device)).to(source_latents.dtype)[:, None, None, None]
        source_latents = source_latents * keep_image

        # 4. Edit loss: InstructPix2Pix's denoising loss
        timesteps = noise.timesteps.to(device)
        epsilon = noise.noise.to(device, latents.dtype)
        noisy = self.noise_scheduler.add_noise(latents, epsilon, timesteps)
        model_input = torch.cat([noisy, source_latents], dim=1).to(self.unet.dtype)
        with self._masked_cross_attention(noise, region_masks, null, tuple(noisy.shape[-2:])):
            prediction = self.unet(
                model_input, timesteps, encoder_hidden_states=conditioning.to(self.unet.dtype), return_dict=False
            )[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, epsilon, timesteps)
        else:
            target = epsilon
        squared_error = (prediction.float() - target.float()).pow(2)
        pixel_weights = None
        if region_masks is not None and region_loss_share > 0:
            pixel_weights = region_loss_weights(
                region_masks.to(device), tuple(squared_error.shape[-2:]), region_loss_share
            )
            squared_error = squared_error * pixel_weights
        if edit_size_power > 0:
            weights = edit_size_weights(cached.target_mean, cached.source, edit_size_power, pixel_weights)
            squared_error = squared_error * weights.to(device)[:, None, None, None]
        if snr_gamma > 0:
            weights = min_snr_weights(self.noise_scheduler, timesteps, snr_gamma).to(device)
            squared_error = squared_error * weights[:, None, None, None]
        edit_loss = squared_error.mean()
        return {"instruction_loss": instruction_loss, "edit_loss": edit_loss, "conditioning_spread": spread}

    @contextmanager
    def _masked_cross_attention(
        self, noise: StepNoise, region_masks: torch.Tensor | None, null: torch.Tensor, latent_size: tuple[int, int]
    ) -> Iterator[None]:
        """CAM as the pipeline applies it with a user's mask, for the items of ``noise.mask_attention``: their
        image positions attend to the conditioning inside their (hard) region and to the null conditioning
        outside it. The other items' masks are full, which leaves their attention as it is."""
        if noise.mask_attention is None or region_masks is None or not bool(noise.mask_attention.any()):
            yield
            return
        device = null.device
        chosen = noise.mask_attention.to(device)[:, None, None, None]
        region = region_masks.to(device).float()
        masks = torch.where(chosen, (region >= 0.5).float(), torch.ones_like(region))
        control = CrossAttentionControl(batch_size=masks.shape[0], num_branches=1)
        control.edit_masks = {
            length: (mask >= 0.5).to(self.unet.dtype) for length, mask in mask_pyramid(masks, *latent_size).items()
        }
        control.null_conditioning = null.to(self.unet.dtype)
        with edit_processors_installed(self.unet, control):
            yield
