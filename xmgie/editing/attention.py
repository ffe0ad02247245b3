"""Cross-attention processors for cross-attention masking (CAM) and identity embeddings (IE).

One processor class serves every ``attn2`` layer of the UNet. It reads a shared
:class:`CrossAttentionControl` that the pipeline fills for each denoising call, so nothing is passed
through ``cross_attention_kwargs``. The UNet batch is laid out in branches of ``batch_size`` rows:
``[edit, image, uncond]`` with classifier-free guidance (``[edit]`` without), optionally followed by a
``reference`` branch for feature blending. Only the edit branch carries the edit conditioning.

- CAM: for rows of the edit branch, attention is computed against the edit conditioning and against the
  null conditioning (the image branch's rows); image positions mix the two results by the mask,
  ``m·attn(edit) + (1 − m)·attn(null)`` — equivalent to attention over the concatenated keys with the
  edit keys' probabilities scaled by ``m`` — so outside a hard mask the probability of attending to the
  edit conditioning is exactly zero.
- IE: decoupled cross-attention (IP-Adapter): ``out += scale · region · attn(q, K_id, V_id)`` with keys
  and values projected from the identity tokens by the adapter's per-layer projections.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


@dataclass
class CrossAttentionControl:
    """What the processors need for one denoising call; ``active`` False makes them plain attention.

    Attributes:
        batch_size: items in the call.
        num_branches: guidance branches before the reference branch (3 with guidance, else 1).
        edit_masks: per sequence length ``h·w``, the (B, h·w) edit mask at that resolution (CAM); ``None``
            disables CAM. A row whose mask is 1 everywhere reads its conditioning as without CAM, and the null
            conditioning's attention is not computed for it (unless ``capture``).
        null_conditioning: (B, tokens, dim) the null conditioning that CAM falls back to outside the mask when
            there is a single branch (no classifier-free guidance, so no branch of the batch carries it).
        identity_adapter: the adapter with per-layer identity projections; ``None`` disables IE.
        identity_tokens: (rows, tokens, dim) identity tokens for every row of the UNet batch.
        identity_scale: weight of the identity branch.
        identity_regions: per sequence length, the (B, h·w) region where the identity branch acts, or ``None``.
        token_ranges: ``(start, stop, "inside" | "outside")`` ranges of conditioning tokens that edit-branch
            image positions may attend to only inside (or only outside) the mask in ``token_masks`` (per
            sequence length, (B, h·w)) — for per-word control with CLIP-text conditioning.
        capture: when set, each layer stores what tests and diagnostics inspect (see :class:`AttentionRecord`).
    """

    batch_size: int = 1
    num_branches: int = 3
    edit_masks: dict[int, torch.Tensor] | None = None
    null_conditioning: torch.Tensor | None = None
    identity_adapter: torch.nn.Module | None = None
    identity_tokens: torch.Tensor | None = None
    identity_scale: float = 0.0
    identity_regions: dict[int, torch.Tensor] | None = None
    token_ranges: list[tuple[int, int, str]] | None = None
    token_masks: dict[int, torch.Tensor] | None = None
    capture: bool = False
    records: dict[str, list[AttentionRecord]] = field(default_factory=dict)
    _identity_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _masked_rows_cache: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def masked_rows(self, length: int) -> torch.Tensor | None:
        """The rows whose edit mask at ``length`` is below 1 somewhere, or ``None`` when every row's is.

        Decided once per mask tensor (not per layer and step, which would wait on the device each time)."""
        mask = self.edit_masks[length]
        cached = self._masked_rows_cache.get(length)
        if cached is None or cached[0] is not mask:
            partial = (mask < 1).any(dim=1)
            rows = None if bool(partial.all()) else torch.nonzero(partial).squeeze(1)
            cached = self._masked_rows_cache[length] = (mask, rows)
        return cached[1]

    def identity_key_value(self, name: str, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The identity keys and values of layer ``name`` for the first ``rows`` rows, projected once per call.

        The tokens do not change during denoising; fewer rows than tokens means the reference rows were
        dropped after the last blended block, and they are the trailing ones.
        """
        key = (name, rows)
        if key not in self._identity_cache:
            tokens = self.identity_tokens[:rows].to(dtype)
            self._identity_cache[key] = self.identity_adapter.key_value(name, tokens)
        return self._identity_cache[key]

    @property
    def active(self) -> bool:
        return (
            self.edit_masks is not None
            or bool(self.token_ranges)
            or (self.identity_adapter is not None and self.identity_scale != 0.0)
        )


@dataclass
class AttentionRecord:
    """One layer's captured attention for one call.

    Attributes:
        edit_probability: (B, heads, h·w, edit tokens) probability that edit-branch image positions attend
            to each edit-conditioning token.
        edit_mask: (B, h·w) the mask the layer used, or ``None``.
        identity_output: (rows, h·w, dim) the identity branch's contribution, or ``None``.
    """

    edit_probability: torch.Tensor
    edit_mask: torch.Tensor | None
    identity_output: torch.Tensor | None


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    return x.view(batch, length, attn.heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


class EditCrossAttnProcessor:
    """``attn2`` processor applying CAM and IE from a shared :class:`CrossAttentionControl`."""

    def __init__(self, name: str, control: CrossAttentionControl) -> None:
        self.name = name
        self.control = control
        self.plain = AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        control = self.control
        plain = not (control.active or control.capture)
        if plain or encoder_hidden_states is None or hidden_states.ndim != 3 or attn.norm_cross:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or attn.group_norm is not None or attn.spatial_norm is not None:
            raise ValueError(f"{self.name}: attention masks and normalised attention are not supported with CAM/IE")

        residual = hidden_states
        length = hidden_states.shape[1]
        rows = control.batch_size
        query = _heads(attn, attn.to_q(hidden_states))
        key = _heads(attn, attn.to_k(encoder_hidden_states))
        value = _heads(attn, attn.to_v(encoder_hidden_states))
        out = F.scaled_dot_product_attention(query, key, value)

        edit_probability = None
        if control.token_ranges:
            # Restricted token ranges: their logits are -inf at image positions on the wrong side of the mask.
            inside = control.token_masks[length].to(query.device) >= 0.5
            allowed = torch.ones(rows, 1, length, key.shape[2], dtype=torch.bool, device=query.device)
            for start, stop, where in control.token_ranges:
                place = inside if where == "inside" else ~inside
                allowed[..., start:stop] = place[:, None, :, None]
            logits = (query[:rows] @ key[:rows].transpose(-1, -2)) * attn.scale
            edit_probability = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
            out = torch.cat([edit_probability @ value[:rows], out[rows:]])

        record_probability = None
        mask = None
        if control.edit_masks is not None:
            mask = control.edit_masks[length].to(query.device, query.dtype)
            # Only rows whose mask is below 1 somewhere fall back to the null conditioning; a full mask weighs
            # the null branch 0 (a training batch masks some items and leaves the others' masks full).
            masked = None if control.capture else control.masked_rows(length)
            if masked is None or len(masked):
                out = self._blend_null(attn, control, query, key, value, encoder_hidden_states, out, mask, masked)
            if control.capture:
                if edit_probability is None:
                    logits = (query[:rows] @ key[:rows].transpose(-1, -2)) * attn.scale
                    edit_probability = torch.softmax(logits, dim=-1)
                record_probability = mask[:, None, :, None] * edit_probability

        identity_output = None
        if control.identity_adapter is not None and control.identity_scale != 0.0:
            id_key, id_value = control.identity_key_value(self.name, query.shape[0], query.dtype)
            identity = _merge_heads(
                F.scaled_dot_product_attention(query, _heads(attn, id_key), _heads(attn, id_value))
            )
            if control.identity_regions is not None:
                region = control.identity_regions[length].to(query.device, query.dtype)
                repeats = identity.shape[0] // region.shape[0]
                identity = identity * region.repeat(repeats, 1)[:, :, None]
            identity_output = control.identity_scale * identity

        out = _merge_heads(out)
        if identity_output is not None:
            out = out + identity_output
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor

        if control.capture:
            if record_probability is None:
                record_probability = edit_probability
            if record_probability is None:
                record_probability = torch.softmax((query[:rows] @ key[:rows].transpose(-1, -2)) * attn.scale, dim=-1)
            control.records.setdefault(self.name, []).append(
                AttentionRecord(
                    record_probability.detach(),
                    None if mask is None else mask.detach(),
                    None if identity_output is None else identity_output.detach(),
                )
            )
        return out

    def _blend_null(self, attn, control, query, key, value, encoder_hidden_states, out, mask, masked):
        """CAM's blend of the edit rows' attention with their attention to the null conditioning, weighted by
        ``mask``; with ``masked`` (indices of edit rows), only those rows are computed and blended."""
        rows = control.batch_size

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            return tensor[:rows] if masked is None else tensor[masked]

        # Rows of the image branch hold the null conditioning that the edit branch's rows fall back to.
        if control.num_branches > 1:
            null_key, null_value = pick(key[rows : 2 * rows]), pick(value[rows : 2 * rows])
        elif control.null_conditioning is not None:
            null = pick(control.null_conditioning.to(encoder_hidden_states.device, encoder_hidden_states.dtype))
            null_key, null_value = _heads(attn, attn.to_k(null)), _heads(attn, attn.to_v(null))
        else:
            raise ValueError(f"{self.name}: CAM with a single branch needs control.null_conditioning")
        null_out = F.scaled_dot_product_attention(pick(query), null_key, null_value)
        weight = pick(mask)[:, None, :, None]
        blended = weight * pick(out) + (1 - weight) * null_out
        return torch.cat([blended, out[rows:]]) if masked is None else out.index_copy(0, masked, blended)


@contextmanager
def text_cross_attention_masking(
    pipe,
    masks: torch.Tensor,
    latent_size: tuple[int, int],
    *,
    token_ranges: list[tuple[int, int, str]] | None = None,
    mode: str | None = "hard",
    capture: bool = False,
):
    """CAM for a plain InstructPix2Pix pipeline with a CLIP text encoder (diffusers' layout of the batch).

    Inside the block, ``pipe``'s UNet masks the edit prompt's cross-attention by ``masks`` (B, 1, H, W)
    (``mode`` ``hard``/``soft``; ``None`` leaves whole-prompt masking off) and restricts ``token_ranges``
    of the prompt's tokens (indices into the tokenizer's output, BOS at 0) to inside or outside the mask.
    Yields the :class:`CrossAttentionControl`, whose ``records`` hold captured attention when ``capture``.
    """
    from xmgie.editing.masks import mask_pyramid

    masks = masks.float()
    control = CrossAttentionControl(batch_size=masks.shape[0], num_branches=3, capture=capture)
    if mode is not None:
        soft = masks if mode == "soft" else (masks >= 0.5).float()
        control.edit_masks = mask_pyramid(soft, *latent_size)
    if token_ranges:
        control.token_ranges = list(token_ranges)
        control.token_masks = mask_pyramid((masks >= 0.5).float(), *latent_size)
    with edit_processors_installed(pipe.unet, control):
        yield control


def cross_attention_names(unet) -> list[str]:
    """Processor names of the UNet's cross-attention (``attn2``) layers, in the UNet's order."""
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextmanager
def edit_processors_installed(unet, control: CrossAttentionControl) -> Iterator[None]:
    """The UNet with :func:`install_edit_processors` inside the block and its own processors back after it."""
    previous = unet.attn_processors
    install_edit_processors(unet, control)
    try:
        yield
    finally:
        unet.set_attn_processor(previous)


def install_edit_processors(unet, control: CrossAttentionControl) -> None:
    """Put an :class:`EditCrossAttnProcessor` on every ``attn2`` layer; self-attention stays as it is."""
    processors = {}
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            processors[name] = EditCrossAttnProcessor(name, control)
        else:
            processors[name] = processor
    unet.set_attn_processor(processors)
