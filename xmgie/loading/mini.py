"""The ``mini`` preset: the real architectures at a size a CPU trains in minutes, trained on exact edits.

``mini`` is built here (architecture and tokenizer) and trained by the recipe
``xmgie/training/recipes/mini.json`` (``xmgie train --recipe mini``): an autoencoder stage, then MGIE's
objective on ``xmgie data synth`` pairs in two stages (the second weighs each item's edit loss by its edit's
size). The trained directory is shipped in the package (``xmgie/loading/presets/mini``) and loaded through the
same ``from_pretrained`` path as any model.

Shapes (all real classes): LLaVA with a 3-layer CLIP vision tower (32 px, patches of 8) and a 2-layer LLaMA (hidden
128), a byte-level BPE tokenizer trained on the recipe's instruction language; an edit head of width 64; an
InstructPix2Pix UNet in SD 1.5's block classes at widths 32–64 on 32×32 latents (cross-attention at 16×16 and 8×8,
and the conditioning pooled into the timestep embedding: :data:`MINI_POOLED_CONDITIONING`); a 2-level
``AutoencoderKL`` (factor 2, no mid-block self-attention), so the model works at 64 px. The scheduler is
InstructPix2Pix's with ``v_prediction``, rescaled to zero terminal SNR and sampled from its last timestep (see
:data:`MINI_SCHEDULER_CONFIG`). The identity adapter is not trained:
its value projections start at zero, so IE leaves a ``mini`` edit unchanged (the identity score is still reported).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from xmgie.editing.blur import DEFAULT_SIGMA_MAX, DEFAULT_SIGMA_S
from xmgie.editing.edit_head import EditMapper
from xmgie.editing.identity import build_tiny_identity_components
from xmgie.editing.mllm import IMG_TOKENS, MLLM_SPECIAL_TOKENS, build_prompt
from xmgie.editing.options import DEFAULT_MAX_SIDE
from xmgie.editing.pipeline import XMGIEPipeline
from xmgie.loading.tiny import IP2P_SCHEDULER_CONFIG

MINI = "mini"
MINI_DIR = Path(__file__).resolve().parent / "presets" / MINI
"""Where the trained ``mini`` directory lives in the package."""
MINI_SIDE = 64
"""The working size of ``mini`` in pixels: it never edits at a larger size (see ``max_working_side``)."""
MINI_VAE_FACTOR = 2
"""A VAE of factor 4 at this size cannot reconstruct a photo crop much better than a 4× down- and upsampling
(mean L1 0.040 on the held-out crops); the edits' targets differ from their sources by as little as 0.05."""
MINI_PREDICTION_TYPE = "v_prediction"
"""What mini's UNet predicts. The edits it learns are mostly global colour and brightness changes, decided at
high noise, where an ε-prediction's estimate of the clean latent divides its error by √ᾱ (about 0.07 at
InstructPix2Pix's last timestep); a v-prediction is the clean latent's there (Salimans & Ho 2022; Lin et al.
2024 on brightness)."""
MINI_SCHEDULER_CONFIG = {
    "prediction_type": MINI_PREDICTION_TYPE,
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
"""mini's noise schedule: InstructPix2Pix's, rescaled so that its last timestep is pure noise (zero terminal SNR),
sampled from that last timestep (Lin et al. 2024). InstructPix2Pix's last timestep keeps 7 % of the target's
signal in training; the UNet learns to read the target's overall tones from that leak, which at inference is
pure noise, and the picture's tones then come out wrong (a held-out ``more contrast`` or ``warmer`` turned into
another colour edit)."""
MINI_POOLED_CONDITIONING = {
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 4,
    "resnet_time_scale_shift": "scale_shift",
}
"""How mini's UNet reads the edit conditioning besides cross-attention: attention-pooled into one vector added to
the timestep embedding (diffusers' ``text`` addition embedding), which every ResNet block turns into a per-channel
scale and shift of its features (``scale_shift``). Most of mini's edits are global colour transforms, a
multiplication per channel that a scale expresses directly; cross-attention only adds to features, at 16×16 and
8×8. Side by side from the same initial weights, 1,000 steps of the recipe (6 held-out items per kind, all
extensions, user mask): the mean L1 ratio to the target over the 12 kinds fell from 2.01 to 1.16, every global
kind moved closer to its target, and brighter (1.55 → 0.29) passed the bar beside invert and night."""
MINI_GUIDANCE_SCALE = 1.5
MINI_IMAGE_GUIDANCE_SCALE = 1.25
"""The guidance mini edits with by default (saved in its ``model_index.json``): a little of InstructPix2Pix's
three-way guidance. Every edit it learnt has one right answer, so the conditional prediction is near the edit
already and InstructPix2Pix's 7.5 / 1.5 extrapolate far past it; a little guidance pushes its subtle colour edits the
rest of the way. Chosen on 96 fresh crops of its training photos (8 per kind, all extensions, user mask; mean L1
ratio to the target over the 12 kinds): 0.527 unguided, 0.496 / 0.497 / 0.497 at 1.25 / 1.25, 1.5 / 1.25 and
1.5 / 1.5; on the first 48 of them 0.544 unguided, 0.528 at 1.75 / 1.25 and 0.571 / 0.603 at text guidance 2 / 2.5
(image 1). Three UNet branches a step instead of one (in one batched call): the diffusion stage takes about 2.4×
as long on a CPU (four 64 px edits at 20 steps: 2.3 s against 0.98 s)."""
MINI_AUTO_MASK_MODE = "off"
"""mini's automatic masks do not find its shapes (IoU 0.03 / 0.11 / 0.03 with the true region for the test's
add / remove / recolour items: unmasked, its local edits spread over the whole picture, since its conditioning
carries a shape's colour but hardly its place), and on the example photos two of six global edits (a darkening of
a mostly black sky, a tissue slide's black and white) left enough of the image unchanged to be judged local, so an
unmasked mini edit is global unless the call asks for an estimate (``--auto-mask-mode auto``), which then uses the
settings below."""
MINI_AUTO_MASK_STRENGTH = 0.7
MINI_AUTO_MASK_LEVEL = 0.03
MINI_AUTO_MASK_SMOOTHING = 1.5
"""The automatic mask's settings for mini (saved in its ``model_index.json``): draws at 70 % of the noise
schedule, the difference map blurred by σ 1.5 latent pixels, and a pixel edited where ``|ε_edit − ε_null|``
exceeds 0.03 (the absolute rule of :func:`xmgie.editing.masks.threshold_difference_map`). DiffEdit's rule,
relative to each map's mean, judged 0 of 36 held-out global edits global: a colour edit acts unevenly (a
brightening more on dark pixels), so its map has pixels well above its mean like a local one. mini's global
edits move the noise prediction by 0.04–0.5 over most pixels, while where a local edit changes nothing its
residual stays near 0.02. Chosen on held-out items 7–12 of each kind (strengths 0.5 / 0.7, blur 0–1.5, levels
0.01–0.2), then measured on items 1–4 (the test's): 35 of 36 global edits judged global, every local one
local; levels 0.025 and 0.035 gave 35 and 32 of 36, and without the blur the local IoU fell from 0.15 to 0.10."""
MINI_GB_SIGMA_MAX = DEFAULT_SIGMA_MAX * MINI_SIDE / DEFAULT_MAX_SIDE
MINI_GB_SIGMA_S = DEFAULT_SIGMA_S * MINI_SIDE / DEFAULT_MAX_SIDE
"""GB's blur for mini (saved in its ``model_index.json``): the seed paper's σ_max 5 and σ_s 10, made for
MGIE's 512-pixel working size, scaled to mini's 64 px, so the feather covers the same part of the picture. At
5 working pixels the feather reached halfway into a shape of radius 6–10 px and composited the source back
over it: on the first four held-out items per shape kind (all extensions, user mask) the L1 ratio to the
target was 0.85 (remove) and 0.97 (recolour) with σ_max 5, 0.62 and 0.81 with 0.625 — and 0.63 and 0.80
without GB at all; far-outside pixels stayed exact either way."""
MINI_DETAIL_RADIUS = 2
"""Detail transfer for mini (saved in its ``model_index.json``): a guided filter of radius 2 working pixels puts
the source's fine detail back into each decoded edit (:func:`xmgie.editing.detail.transfer_detail`). mini's
autoencoder (factor 2, trained for minutes) loses much of it: on the first four held-out items per kind, the
targets' own round trips sit at L1 ratios 0.65 (more contrast), 0.88 (warmer) and 0.47 (cooler) of the
source's distance — above or near the 0.6 bar before any edit error; with the transfer those floors fall to
0.33, 0.42 and 0.26. On the edits themselves (all extensions, user mask, same items and seeds): cooler
0.65 → 0.47, sepia 0.72 → 0.64, more contrast 1.15 → 0.96, warmer 1.59 → 1.30, black and white 0.40 → 0.36,
darker 0.23 → 0.19; the shape kinds within ±0.03. Radii 1 and 3 and regularisers a fifth to twice the default
gave the same figures within 0.03."""
MINI_VISION_SIZE = 32
MINI_HIDDEN = 128
MINI_CROSS_ATTENTION_DIM = 64
MINI_UNET_HEADS = 16
"""Attention heads of mini's UNet (the recipe's ``architecture_options.unet_heads`` changes it): 16 heads of 4
channels each at its width of 64, as the shipped weights were trained. 4 heads of 16 channels make a training
step 0.66× as long on this CPU (``benchmarks/bench_train.py --versus``; attention was 45 % of a step: many heads
of tiny width run slowly there); one 4,000-step run of the recipe with them did not edit better (README,
Recipes)."""
MINI_UNET_WIDTH = 64
"""The channels of mini's UNet at its levels with attention (16×16 and 8×8) and below; its first level has 32 (the
recipe's ``architecture_options.unet_width`` changes it: a multiple of 16, the UNet's norm groups)."""
MINI_VOCAB_SIZE = 600


def instruction_corpus() -> list[str]:
    """The text ``mini``'s tokenizer learns its merges from: every phrasing and expressive instruction of
    ``xmgie data synth`` with each of its names, and MGIE's prompt."""
    from xmgie.training import synth

    lines = [build_prompt("x", 1)]
    for kind, phrasings in synth.GLOBAL_PHRASINGS.items():
        lines += phrasings + [synth.GLOBAL_EXPRESSIVE[kind]]
    colours = list(synth.COLOURS)
    for kind in synth.LOCAL_KINDS:
        templates = synth.LOCAL_PHRASINGS[kind] + [synth.LOCAL_EXPRESSIVE[kind]]
        for shape in synth.SHAPES:
            for place in synth.PLACES:
                for index, colour in enumerate(colours):
                    new_colour = colours[(index + 1) % len(colours)]
                    parts = {"shape": shape, "place": place, "colour": colour, "new_colour": new_colour}
                    lines += [template.format(**parts) for template in templates]
    return lines


def build_mini_tokenizer(vocab_size: int = MINI_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) whose merges come from :func:`instruction_corpus`, so an
    instruction is a few tokens; LLaMA's special tokens first, then the MLLM's and the eight ``[IMG]`` tokens."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(instruction_corpus(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    tokenizer.add_tokens(MLLM_SPECIAL_TOKENS, special_tokens=True)
    tokenizer.add_tokens(IMG_TOKENS, special_tokens=True)
    tokenizer.padding_side = "left"
    return tokenizer


def check_unet_options(unet_heads: object = MINI_UNET_HEADS, unet_width: object = MINI_UNET_WIDTH) -> None:
    """``ValueError`` unless mini's UNet can have ``unet_width`` channels below its first level (a positive multiple
    of 16, its norm groups) and ``unet_heads`` attention heads (a whole number dividing that width)."""
    if isinstance(unet_width, bool) or not isinstance(unet_width, int) or unet_width < 16 or unet_width % 16:
        raise ValueError(f"unet_width must be a positive multiple of 16, got {unet_width!r}")
    if isinstance(unet_heads, bool) or not isinstance(unet_heads, int) or unet_heads < 1 or unet_width % unet_heads:
        raise ValueError(
            f"unet_heads must be a whole number dividing the UNet's width {unet_width}, got {unet_heads!r}"
        )


def build_mini_pipeline(
    seed: int = 0, unet_heads: int = MINI_UNET_HEADS, unet_width: int = MINI_UNET_WIDTH
) -> XMGIEPipeline:
    """``mini``'s architecture with fresh weights (each component from its own seed): what the recipe trains.

    ``unet_heads`` and ``unet_width``: the UNet's attention heads and its channels below the first level
    (:data:`MINI_UNET_HEADS`, :data:`MINI_UNET_WIDTH`; :func:`check_unet_options`).
    """
    check_unet_options(unet_heads, unet_width)
    tokenizer = build_mini_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mllm = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=CLIPVisionConfig(
                    hidden_size=64,
                    intermediate_size=128,
                    num_hidden_layers=3,
                    num_attention_heads=4,
                    image_size=MINI_VISION_SIZE,
                    patch_size=8,
                    projection_dim=64,
                ),
                text_config=LlamaConfig(
                    hidden_size=MINI_HIDDEN,
                    intermediate_size=256,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    num_key_value_heads=4,
                    vocab_size=len(tokenizer),
                    max_position_embeddings=512,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                image_token_id=tokenizer.convert_tokens_to_ids(MLLM_SPECIAL_TOKENS[0]),
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
                projector_hidden_act="linear",
            )
        ).eval()
        torch.manual_seed(seed + 1)
        edit_head = EditMapper(
            llm_hidden_size=MINI_HIDDEN,
            d_model=64,
            nhead=4,
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=128,
            cross_attention_dim=MINI_CROSS_ATTENTION_DIM,
        )
        with torch.no_grad():
            edit_head.img_embeddings.normal_(std=0.02)
        torch.manual_seed(seed + 2)
        # 32×32 latents: no attention at the first and last levels (32×32 and 4×4), as SD 1.5 has none at its
        # lowest one; cross-attention at 16×16 and 8×8, where PFB's default levels and CAM act. The conditioning also
        # reaches every ResNet block as a scale and shift of its features (see MINI_POOLED_CONDITIONING).
        unet = UNet2DConditionModel(
            sample_size=MINI_SIDE // MINI_VAE_FACTOR,
            in_channels=8,
            out_channels=4,
            block_out_channels=(32, unet_width, unet_width, unet_width),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=MINI_CROSS_ATTENTION_DIM,
            # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads (a naming kept for
            # SD 1.5's configs): 16 heads of 4 channels at width 64 by default.
            attention_head_dim=unet_heads,
            norm_num_groups=16,
            **MINI_POOLED_CONDITIONING,
        )
        torch.manual_seed(seed + 3)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            sample_size=MINI_SIDE,
            # No self-attention in the mid-blocks: at 32×32 it is a third of the encoder's time and reconstructs
            # no better (held-out L1 0.049 with it, 0.049 without, after 400 steps).
            mid_block_add_attention=False,
        )
    feature_extractor = CLIPImageProcessorPil(
        size={"shortest_edge": MINI_VISION_SIZE}, crop_size={"height": MINI_VISION_SIZE, "width": MINI_VISION_SIZE}
    )
    scheduler = EulerAncestralDiscreteScheduler(**{**IP2P_SCHEDULER_CONFIG, **MINI_SCHEDULER_CONFIG})
    image_encoder, _, identity_adapter = build_tiny_identity_components(unet, seed=seed + 4)
    with torch.no_grad():
        for layer in identity_adapter.layers:
            layer.to_v_ip.weight.zero_()
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
        max_working_side=MINI_SIDE,
        guidance_scale=MINI_GUIDANCE_SCALE,
        image_guidance_scale=MINI_IMAGE_GUIDANCE_SCALE,
        auto_mask_mode=MINI_AUTO_MASK_MODE,
        auto_mask_strength=MINI_AUTO_MASK_STRENGTH,
        auto_mask_level=MINI_AUTO_MASK_LEVEL,
        auto_mask_smoothing=MINI_AUTO_MASK_SMOOTHING,
        gb_sigma_max=MINI_GB_SIGMA_MAX,
        gb_sigma_s=MINI_GB_SIGMA_S,
        detail_radius=MINI_DETAIL_RADIUS,
    )
