"""Conversion of MGIE's release into a model directory, on a synthetic release with the real key names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from xmgie.editing.edit_head import EditMapper
from xmgie.editing.mllm import IMG_TOKENS, MLLM_SPECIAL_TOKENS
from xmgie.loading.convert_mgie import add_mgie_tokens, clip_vision_state_dict, convert_mgie
from xmgie.loading.directory import load_pipeline
from xmgie.loading.tiny import IP2P_SCHEDULER_CONFIG

HIDDEN = 32
VISION_HIDDEN = 16
IMAGE_SIZE = 32
PATCH = 8
CROSS_DIM = 32
# Deliberately unequal encoder/decoder depths so that both are read from the weights, not defaulted.
EDIT_HEAD = dict(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=24, num_queries=5)
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=8,
    out_channels=4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)


@dataclass
class Release:
    """Paths of a synthetic MGIE release and the tensors written into it."""

    llava_dir: Path
    clip_dir: Path
    mllm_ckpt: Path
    unet_ckpt: Path
    ip2p_dir: Path
    llama: dict[str, torch.Tensor]
    vision: dict[str, torch.Tensor]
    mllm: dict[str, torch.Tensor]
    unet: dict[str, torch.Tensor]
    ip2p_unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    llava_vocab: int

    def inputs(self, **overrides) -> dict:
        kwargs = dict(
            llava_dir=self.llava_dir,
            clip_dir=self.clip_dir,
            mllm_ckpt=self.mllm_ckpt,
            unet_ckpt=self.unet_ckpt,
            ip2p_dir=self.ip2p_dir,
        )
        kwargs.update(overrides)
        return kwargs


def llava_tokenizer(with_mllm_tokens: bool = True) -> PreTrainedTokenizerFast:
    """LLaMA-like byte tokenizer (``<unk>``, ``<s>``, ``</s>``, 256 bytes), with LLaVA's tokens but no ``[IMG]``."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if with_mllm_tokens:
        tokenizer.add_tokens(MLLM_SPECIAL_TOKENS, special_tokens=True)
    return tokenizer


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=8,
    )


def make_release(root: Path, *, clip_layout: str = "clip_model", llava_format: str = "bin_shards") -> Release:
    """Write a tiny MGIE release under ``root``.

    ``clip_layout``: ``clip_model`` (full CLIPModel + old-style preprocessor config, as openai's repo),
    ``vision_prefixed`` (vision-only ``pytorch_model.bin`` with ``vision_model.*`` keys, no preprocessor
    config) or ``in_llava`` (the vision tower inside LLaVA's weights, CLIP dir with config only).
    ``llava_format``: ``bin_shards`` (two ``pytorch_model-*.bin`` with an index) or ``safetensors``.
    """
    torch.manual_seed(0)
    llava_dir, clip_dir, ip2p_dir = root / "LLaVA-7B-v1", root / "clip-vit-large-patch14", root / "instruct-pix2pix"
    for folder in (llava_dir, clip_dir, ip2p_dir):
        folder.mkdir(parents=True)

    # LLaVA v1: tokenizer, config.json in LLaVA's format, LLaMA + mm_projector weights.
    tokenizer = llava_tokenizer()
    tokenizer.save_pretrained(llava_dir)
    llava_vocab = len(tokenizer)
    llava_config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "max_position_embeddings": 2048,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_cache": True,
        "vocab_size": llava_vocab,
        "mm_vision_tower": "openai/clip-vit-large-patch14",
        "mm_hidden_size": VISION_HIDDEN,
        "mm_vision_select_layer": -2,
        "mm_use_im_start_end": True,
        "use_mm_proj": True,
    }
    (llava_dir / "config.json").write_text(json.dumps(llava_config, indent=2))
    llama_model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=llava_vocab,
        )
    )
    llama = {k: v.clone() for k, v in llama_model.state_dict().items()}
    assert "model.layers.0.self_attn.q_proj.weight" in llama and "lm_head.weight" in llama
    llama["model.mm_projector.weight"] = torch.randn(HIDDEN, VISION_HIDDEN)
    llama["model.mm_projector.bias"] = torch.randn(HIDDEN)
    llava_weights = dict(llama)
    # Old checkpoints carry the rotary buffers; they must be ignored.
    llava_weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    # CLIP ViT: the vision tower.
    if clip_layout == "clip_model":
        clip = CLIPModel(
            CLIPConfig(
                vision_config=vision_config().to_dict(),
                text_config=dict(
                    hidden_size=16,
                    intermediate_size=20,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    vocab_size=64,
                    bos_token_id=0,
                    eos_token_id=1,
                    pad_token_id=1,
                ),
                projection_dim=8,
            )
        )
        clip.save_pretrained(clip_dir)
        vision = {
            k.removeprefix("vision_model."): v.clone()
            for k, v in clip.state_dict().items()
            if k.startswith("vision_model.")
        }
        # openai/clip-vit-large-patch14's preprocessor file, in the old integer format.
        (clip_dir / "preprocessor_config.json").write_text(
            json.dumps(
                {
                    "crop_size": IMAGE_SIZE,
                    "do_center_crop": True,
                    "do_normalize": True,
                    "do_resize": True,
                    "feature_extractor_type": "CLIPFeatureExtractor",
                    "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711],
                    "resample": 3,
                    "size": IMAGE_SIZE,
                }
            )
        )
    else:
        clip_vision = CLIPVisionModel(vision_config())
        vision = {k: v.clone() for k, v in clip_vision.state_dict().items()}
        (clip_dir / "config.json").write_text(vision_config().to_json_string())
        if clip_layout == "vision_prefixed":
            saved = {f"vision_model.{k}": v for k, v in vision.items()}
            saved["vision_model.embeddings.position_ids"] = torch.arange((IMAGE_SIZE // PATCH) ** 2 + 1)[None]
            torch.save(saved, clip_dir / "pytorch_model.bin")
        elif clip_layout == "in_llava":
            llava_weights.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in vision.items()})
        else:
            raise ValueError(clip_layout)
    assert vision and all(not k.startswith("vision_model.") for k in vision)

    if llava_format == "bin_shards":
        keys = sorted(llava_weights)
        shards = {
            "pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
            "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :],
        }
        for name, shard_keys in shards.items():
            torch.save({k: llava_weights[k] for k in shard_keys}, llava_dir / name)
        weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
        (llava_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file({k: v.contiguous() for k, v in llava_weights.items()}, llava_dir / "model.safetensors")

    # mllm.pt: resized embeddings and LM head, the edit head under edit_head (an attribute of MGIE's causal LM,
    # not of its inner model), the [IMG] embeddings.
    vocab = llava_vocab + len(IMG_TOKENS)
    head = EditMapper(llm_hidden_size=HIDDEN, cross_attention_dim=CROSS_DIM, **EDIT_HEAD)
    mllm = {
        "model.embed_tokens.weight": torch.randn(vocab, HIDDEN),
        "lm_head.weight": torch.randn(vocab, HIDDEN),
        "emb": torch.randn(1, len(IMG_TOKENS), HIDDEN),
    }
    mllm.update({f"edit_head.{k}": v.clone() for k, v in head.state_dict().items() if k != "img_embeddings"})
    mllm_ckpt = root / "mgie_7b" / "mllm.pt"
    mllm_ckpt.parent.mkdir()
    torch.save(mllm, mllm_ckpt)

    # InstructPix2Pix: a UNet (whose weights must NOT land), the VAE and the scheduler.
    torch.manual_seed(1)
    ip2p_unet = UNet2DConditionModel(**UNET_CONFIG)
    ip2p_unet.save_pretrained(ip2p_dir / "unet")
    torch.manual_seed(2)
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
    vae.save_pretrained(ip2p_dir / "vae")
    EulerAncestralDiscreteScheduler(**IP2P_SCHEDULER_CONFIG).save_pretrained(ip2p_dir / "scheduler")

    # unet.pt: the same architecture from a different initialisation.
    torch.manual_seed(3)
    unet = {k: v.clone() for k, v in UNet2DConditionModel(**UNET_CONFIG).state_dict().items()}
    unet_ckpt = root / "mgie_7b" / "unet.pt"
    torch.save(unet, unet_ckpt)

    return Release(
        llava_dir=llava_dir,
        clip_dir=clip_dir,
        mllm_ckpt=mllm_ckpt,
        unet_ckpt=unet_ckpt,
        ip2p_dir=ip2p_dir,
        llama=llama,
        vision=vision,
        mllm=mllm,
        unet=unet,
        ip2p_unet={k: v.clone() for k, v in ip2p_unet.state_dict().items()},
        vae={k: v.clone() for k, v in vae.state_dict().items()},
        llava_vocab=llava_vocab,
    )


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    return make_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def converted(release: Release, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "mgie-7b"
    result = convert_mgie(**release.inputs(output_dir=out), dtype=torch.float32)
    assert result == out
    return out


@pytest.fixture(scope="module")
def pipe(converted: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_pipeline(converted, cache_dir=tmp_path_factory.mktemp("cache"), device="cpu", dtype=torch.float32)


def _equal(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and torch.equal(actual.float(), expected.float())


def test_weights_land_in_the_right_modules(release: Release, pipe) -> None:
    mllm = pipe.mllm.state_dict()
    llama = release.llama
    assert _equal(
        mllm["model.language_model.layers.1.self_attn.q_proj.weight"], llama["model.layers.1.self_attn.q_proj.weight"]
    )
    assert _equal(
        mllm["model.language_model.layers.0.mlp.down_proj.weight"], llama["model.layers.0.mlp.down_proj.weight"]
    )
    assert _equal(mllm["model.language_model.norm.weight"], llama["model.norm.weight"])
    # Embeddings and LM head come from mllm.pt (resized for the [IMG] tokens), not from LLaVA.
    assert _equal(mllm["model.language_model.embed_tokens.weight"], release.mllm["model.embed_tokens.weight"])
    assert _equal(mllm["lm_head.weight"], release.mllm["lm_head.weight"])
    assert not torch.equal(mllm["lm_head.weight"][: release.llava_vocab], llama["lm_head.weight"])
    assert _equal(mllm["model.multi_modal_projector.linear_1.weight"], llama["model.mm_projector.weight"])
    assert _equal(mllm["model.multi_modal_projector.linear_1.bias"], llama["model.mm_projector.bias"])
    assert _equal(mllm["model.multi_modal_projector.linear_2.weight"], torch.eye(HIDDEN))
    assert _equal(mllm["model.multi_modal_projector.linear_2.bias"], torch.zeros(HIDDEN))
    assert _equal(
        mllm["model.vision_tower.encoder.layers.1.self_attn.k_proj.weight"],
        release.vision["encoder.layers.1.self_attn.k_proj.weight"],
    )
    assert _equal(
        mllm["model.vision_tower.embeddings.patch_embedding.weight"],
        release.vision["embeddings.patch_embedding.weight"],
    )

    head = pipe.edit_head.state_dict()
    expected_head = {k.removeprefix("edit_head."): v for k, v in release.mllm.items() if k.startswith("edit_head.")}
    assert set(head) == set(expected_head) | {"img_embeddings"}
    for key, value in expected_head.items():
        assert _equal(head[key], value), key
    assert _equal(head["img_embeddings"], release.mllm["emb"][0])
    config = pipe.edit_head.config
    assert (config.d_model, config.num_encoder_layers, config.num_decoder_layers) == (16, 2, 3)
    assert (config.dim_feedforward, config.num_queries, config.cross_attention_dim, config.nhead) == (24, 5, 32, 4)

    unet = pipe.unet.state_dict()
    assert set(unet) == set(release.unet)
    assert all(_equal(unet[k], v) for k, v in release.unet.items())
    assert not torch.equal(unet["conv_in.weight"], release.ip2p_unet["conv_in.weight"])
    vae = pipe.vae.state_dict()
    assert all(_equal(vae[k], v) for k, v in release.vae.items())
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"

    text = pipe.mllm.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (HIDDEN, 2, len(pipe.tokenizer))
    assert pipe.mllm.config.vision_feature_layer == -2
    assert pipe.mllm.config.image_token_id == pipe.tokenizer.convert_tokens_to_ids("<im_patch>")
    assert pipe.feature_extractor.crop_size["height"] == IMAGE_SIZE


def test_projector_mapping_is_exact(release: Release, pipe) -> None:
    pixel_values = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # transformers 5.x: get_image_features returns a model output whose pooler_output is a per-image list.
        features = torch.stack(list(pipe.mllm.model.get_image_features(pixel_values).pooler_output))
        clip = CLIPVisionModel(vision_config()).eval()
        clip.load_state_dict(release.vision, strict=True)
        patches = clip(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = torch.nn.functional.linear(
            patches, release.llama["model.mm_projector.weight"], release.llama["model.mm_projector.bias"]
        )
    assert features.shape == (2, (IMAGE_SIZE // PATCH) ** 2, HIDDEN)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)


def test_tokenizer_has_img_tokens_after_llava_vocabulary(release: Release, pipe) -> None:
    tokenizer = pipe.tokenizer
    ids = tokenizer.convert_tokens_to_ids(IMG_TOKENS)
    assert ids == list(range(release.llava_vocab, release.llava_vocab + 8))
    assert len(tokenizer) == release.llava_vocab + 8 == release.mllm["model.embed_tokens.weight"].shape[0]
    assert tokenizer.convert_tokens_to_ids(MLLM_SPECIAL_TOKENS) == list(
        range(release.llava_vocab - 3, release.llava_vocab)
    )
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == tokenizer.unk_token == "<unk>"
    assert tokenizer.tokenize("a[IMG3]b") == ["a", "[IMG3]", "b"]


def test_converted_directory_edits_an_image(pipe) -> None:
    image = Image.new("RGB", (64, 64), (40, 120, 200))
    out = pipe(image, "make it red", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 1
    assert out.images[0].size == (64, 64)
    assert out.images[0].mode == "RGB"
    assert isinstance(out.expressive_instructions[0], str)


@pytest.mark.parametrize(
    ("clip_layout", "llava_format"),
    [("vision_prefixed", "bin_shards"), ("in_llava", "safetensors")],
)
def test_other_release_layouts(tmp_path: Path, clip_layout: str, llava_format: str) -> None:
    release = make_release(tmp_path / "release", clip_layout=clip_layout, llava_format=llava_format)
    out = convert_mgie(**release.inputs(output_dir=tmp_path / "out"), dtype=torch.float32)
    mllm = LlavaForConditionalGeneration.from_pretrained(out / "mllm", dtype=torch.float32).state_dict()
    vision = {k.removeprefix("model.vision_tower."): v for k, v in mllm.items() if k.startswith("model.vision_tower.")}
    assert set(vision) == set(release.vision)
    assert all(_equal(vision[k], v) for k, v in release.vision.items())
    assert _equal(
        mllm["model.language_model.layers.0.self_attn.v_proj.weight"],
        release.llama["model.layers.0.self_attn.v_proj.weight"],
    )
    # Without a preprocessor config the CLIP defaults at the tower's resolution are used.
    processor = json.loads((out / "feature_extractor" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert processor["size"] == {"shortest_edge": IMAGE_SIZE}


def test_converts_to_half_precision(release: Release, tmp_path: Path) -> None:
    out = convert_mgie(**release.inputs(output_dir=tmp_path / "out"))
    files = [out / "mllm" / "model.safetensors"] + [
        out / name / "diffusion_pytorch_model.safetensors" for name in ("edit_head", "unet", "vae")
    ]
    for file in files:
        dtypes = {tensor.dtype for tensor in load_file(file).values()}
        assert dtypes == {torch.float16}, file


def test_add_mgie_tokens_adds_missing_llava_tokens_first() -> None:
    tokenizer = add_mgie_tokens(llava_tokenizer(with_mllm_tokens=False))
    base = len(llava_tokenizer(with_mllm_tokens=False))
    assert tokenizer.convert_tokens_to_ids(MLLM_SPECIAL_TOKENS + IMG_TOKENS) == list(range(base, base + 11))
    assert len(tokenizer) == base + 11


def test_clip_vision_state_dict_accepts_each_layout() -> None:
    tensor = torch.zeros(1)
    full = {
        "vision_model.encoder.x": tensor,
        "text_model.encoder.x": tensor,
        "logit_scale": tensor,
        "visual_projection.weight": tensor,
        "vision_model.embeddings.position_ids": tensor,
    }
    assert set(clip_vision_state_dict(full)) == {"encoder.x"}
    bare = {"encoder.x": tensor, "embeddings.position_ids": tensor, "post_layernorm.weight": tensor}
    assert set(clip_vision_state_dict(bare)) == {"encoder.x", "post_layernorm.weight"}


def test_mismatched_embedding_rows_raise(release: Release, tmp_path: Path) -> None:
    bad = dict(release.mllm)
    rows = release.llava_vocab + 9
    bad["model.embed_tokens.weight"] = torch.randn(rows, HIDDEN)
    torch.save(bad, tmp_path / "mllm.pt")
    with pytest.raises(ValueError, match=rf"{rows} rows but the tokenizer has {release.llava_vocab + 8} tokens"):
        convert_mgie(**release.inputs(mllm_ckpt=tmp_path / "mllm.pt", output_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_unet_ckpt_raises(release: Release, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"unet\.pt.*nowhere"):
        convert_mgie(**release.inputs(unet_ckpt=tmp_path / "nowhere" / "unet.pt", output_dir=tmp_path / "out"))


def test_missing_edit_head_raises(release: Release, tmp_path: Path) -> None:
    bad = {k: v for k, v in release.mllm.items() if not k.startswith("edit_head.")}
    torch.save(bad, tmp_path / "mllm.pt")
    with pytest.raises(ValueError, match=r"lacks the edit head \('edit_head\.\*'\)"):
        convert_mgie(**release.inputs(mllm_ckpt=tmp_path / "mllm.pt", output_dir=tmp_path / "out"))


def test_without_emb_the_img_embeddings_are_the_last_rows_of_embed_tokens(release: Release, tmp_path: Path) -> None:
    # MGIE's extraction notebook saves embed_tokens, lm_head and the edit head, but no 'emb'.
    saved = {k: v for k, v in release.mllm.items() if k != "emb"}
    torch.save(saved, tmp_path / "mllm.pt")
    out = convert_mgie(
        **release.inputs(mllm_ckpt=tmp_path / "mllm.pt", output_dir=tmp_path / "out"), dtype=torch.float32
    )
    head = load_file(out / "edit_head" / "diffusion_pytorch_model.safetensors")
    embed_tokens = release.mllm["model.embed_tokens.weight"]
    assert _equal(head["img_embeddings"], embed_tokens[-len(IMG_TOKENS) :])
    assert not _equal(head["img_embeddings"], release.mllm["emb"][0])


def test_an_unapplied_llava_delta_is_refused(tmp_path: Path) -> None:
    release = make_release(tmp_path / "release", llava_format="safetensors")
    weights = load_file(release.llava_dir / "model.safetensors")
    # A delta holds target − LLaMA: the final norm's gains (≈ 1 in real weights) average ≈ 0.
    weights["model.norm.weight"] = 0.01 * torch.randn(HIDDEN)
    save_file(weights, release.llava_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"un-applied delta: model\.norm\.weight averages -?0\.0\d\d.*apply_delta"):
        convert_mgie(**release.inputs(output_dir=tmp_path / "out"), dtype=torch.float32)
    assert not (tmp_path / "out").exists()


def test_unet_ckpt_with_wrong_keys_raises(release: Release, tmp_path: Path) -> None:
    bad = dict(release.unet)
    bad["conv_in.extra"] = bad.pop("conv_in.weight")
    torch.save(bad, tmp_path / "unet.pt")
    with pytest.raises(ValueError, match=r"missing keys: conv_in\.weight; unexpected keys: conv_in\.extra"):
        convert_mgie(**release.inputs(unet_ckpt=tmp_path / "unet.pt", output_dir=tmp_path / "out"))


def test_nonempty_output_dir_is_refused(release: Release, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_mgie(**release.inputs(output_dir=tmp_path / "out"))


def test_ip_adapter_weights_are_converted_for_identity_embeddings(release: Release, pipe, tmp_path: Path) -> None:
    from tests.conftest import synthetic_release
    from xmgie.editing.identity import build_tiny_identity_components

    encoder, _, _ = build_tiny_identity_components(pipe.unet)
    encoder.save_pretrained(tmp_path / "image_encoder")
    weights = synthetic_release(pipe.unet, image_embed_dim=encoder.config.projection_dim)
    torch.save(weights, tmp_path / "ip-adapter_sd15.bin")
    out = convert_mgie(
        **release.inputs(output_dir=tmp_path / "out"),
        dtype=torch.float32,
        ip_adapter=tmp_path / "ip-adapter_sd15.bin",
        image_encoder_dir=tmp_path / "image_encoder",
    )
    converted = load_pipeline(out, cache_dir=tmp_path / "cache", device="cpu", dtype=torch.float32)
    adapter = converted.identity_adapter
    assert _equal(adapter.image_proj.proj.weight, weights["image_proj"]["proj.weight"])
    first_attn2 = next(i for i, n in enumerate(pipe.unet.attn_processors) if n.endswith("attn2.processor"))
    assert _equal(adapter.layers[0].to_k_ip.weight, weights["ip_adapter"][f"{first_attn2}.to_k_ip.weight"])
    result = converted(
        Image.new("RGB", (64, 64), (40, 120, 200)),
        "make it red",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.identity_scores[0] is not None
    with pytest.raises(ValueError, match="go together"):
        convert_mgie(**release.inputs(output_dir=tmp_path / "o2"), ip_adapter=tmp_path / "ip-adapter_sd15.bin")
