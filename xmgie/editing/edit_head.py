"""MGIE's edit head: maps the MLLM's ``[IMG]`` hidden states to UNet conditioning."""

from __future__ import annotations

import warnings

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class EditMapper(ModelMixin, ConfigMixin):
    """Sequence-to-sequence mapper from ``[IMG]`` hidden states to ``encoder_hidden_states``.

    The defaults are MGIE's released configuration: hidden states of LLaVA-7B (4096) are projected
    to 512, run through ``nn.Transformer`` (4 heads, 4 encoder and 4 decoder layers, feed-forward 2048,
    no dropout, pre-norm) with a learned query of 77 tokens as decoder input, and projected to 768
    (the SD 1.5 cross-attention width). ``img_embeddings`` holds the embeddings of the ``[IMG]``
    tokens that MGIE adds to the hidden states before the mapper (``emb`` in ``mllm.pt``).
    """

    @register_to_config
    def __init__(
        self,
        llm_hidden_size: int = 4096,
        num_img_tokens: int = 8,
        d_model: int = 512,
        nhead: int = 4,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 2048,
        num_queries: int = 77,
        cross_attention_dim: int = 768,
    ) -> None:
        super().__init__()
        self.llm2hid = nn.Linear(llm_hidden_size, d_model)
        self.query = nn.Parameter(torch.randn(1, num_queries, d_model))
        with warnings.catch_warnings():
            # Pre-norm layers cannot use nested tensors; torch warns about it on every construction.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.mapper = nn.Transformer(
                batch_first=True,
                norm_first=True,
                d_model=d_model,
                nhead=nhead,
                num_encoder_layers=num_encoder_layers,
                num_decoder_layers=num_decoder_layers,
                dim_feedforward=dim_feedforward,
                dropout=0.0,
            )
        self.hid2feat = nn.Linear(d_model, cross_attention_dim)
        self.img_embeddings = nn.Parameter(torch.zeros(num_img_tokens, llm_hidden_size))

    def forward(self, img_hidden_states: torch.Tensor) -> torch.Tensor:
        """Map ``(B, num_img_tokens, llm_hidden_size)`` hidden states to ``(B, num_queries, cross_attention_dim)``."""
        expected = (self.config.num_img_tokens, self.config.llm_hidden_size)
        if img_hidden_states.ndim != 3 or tuple(img_hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"img_hidden_states must have shape (B, {expected[0]}, {expected[1]}), "
                f"got {tuple(img_hidden_states.shape)}"
            )
        hidden = self.llm2hid(img_hidden_states + self.img_embeddings.to(img_hidden_states.dtype))
        query = self.query.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        hidden = self.mapper(hidden, query)
        return self.hid2feat(hidden)

    def null_conditioning(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional embedding: the mapper applied to zero hidden states, as MGIE does."""
        zeros = torch.zeros(
            batch_size, self.config.num_img_tokens, self.config.llm_hidden_size, device=self.device, dtype=self.dtype
        )
        return self(zeros)
