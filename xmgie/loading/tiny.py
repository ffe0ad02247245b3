"""The ``tiny`` preset: every component with its real architecture at toy size, randomly initialised.

The weights are random (seeded), so a tiny edit shows the machinery working, not a real edit. The
preset is written once into a cache folder in the same format as real weights and then loaded
through the same ``from_pretrained`` path, so tests exercise the real loading code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from xmgie.editing.edit_head import EditMapper
from xmgie.editing.identity import build_tiny_identity_components
from xmgie.editing.mllm import IMG_TOKENS, MLLM_SPECIAL_TOKENS
from xmgie.editing.pipeline import XMGIEPipeline

TINY_PRESET_VERSION = "tiny-v2"
"""Folder name of the preset in the cache; bump it whenever the preset's contents change."""

TINY_SEED = 0
TINY_HIDDEN = 32
TINY_CROSS_ATTENTION_DIM = 32
TINY_IMAGE_SIZE = 32

# InstructPix2Pix's scheduler configuration (timbrooks/instruct-pix2pix, scheduler/).
IP2P_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer written from scratch: LLaMA's three special tokens, then the 256 bytes.

    With no merges every byte is one token, which is all a randomly initialised model needs; the
    MLLM's own special tokens (image patch, image start/end) and the eight ``[IMG]`` tokens follow,
    in the order LLaVA v1 and MGIE add them.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.add_tokens(MLLM_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.add_tokens(IMG_TOKENS, special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def build_tiny_pipeline(seed: int = TINY_SEED) -> XMGIEPipeline:
    """Build the tiny pipeline in memory, each component from its own fixed seed."""
    tokenizer = build_byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mllm = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=CLIPVisionConfig(
                    hidden_size=TINY_HIDDEN,
                    intermediate_size=37,
                    num_hidden_layers=3,
                    num_attention_heads=4,
                    image_size=TINY_IMAGE_SIZE,
                    patch_size=8,
                    projection_dim=TINY_HIDDEN,
                ),
                text_config=LlamaConfig(
                    hidden_size=TINY_HIDDEN,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    vocab_size=len(tokenizer),
                    max_position_embeddings=2048,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                image_token_id=tokenizer.convert_tokens_to_ids(MLLM_SPECIAL_TOKENS[0]),
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                # LLaVA v1 has one linear projector; see xmgie.loading.convert_mgie for the mapping.
                projector_hidden_act="linear",
            )
        ).eval()
        torch.manual_seed(seed + 1)
        edit_head = EditMapper(
            llm_hidden_size=TINY_HIDDEN,
            d_model=32,
            nhead=4,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=64,
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        )
        with torch.no_grad():
            edit_head.img_embeddings.normal_(std=0.02)
        torch.manual_seed(seed + 2)
        # SD 1.5's layout (three cross-attention levels, one plain level, a cross-attention middle block).
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=8,
            out_channels=4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=64,
        )
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    scheduler = EulerAncestralDiscreteScheduler(**IP2P_SCHEDULER_CONFIG)
    image_encoder, _, identity_adapter = build_tiny_identity_components(unet, seed=seed + 4)
    return XMGIEPipeline(
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


def ensure_tiny(cache_dir: str | os.PathLike) -> Path:
    """Return the tiny preset's directory under ``cache_dir``, writing it first if it is not there.

    The directory is written to a temporary sibling and renamed into place, so concurrent
    processes never see a half-written preset.
    """
    target = Path(cache_dir) / TINY_PRESET_VERSION
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{TINY_PRESET_VERSION}-", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
