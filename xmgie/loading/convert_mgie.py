"""Convert the released MGIE checkpoints into this project's model directory.

MGIE ships its trained parts on top of three public models, and its demo assembles them at run time:

* ``LLaVA-7B-v1`` (original LLaVA repository layout): the LLaMA weights under ``model.*``, the single
  linear projector ``model.mm_projector`` (CLIP 1024 → LLaMA 4096) and a tokenizer that already holds
  LLaVA's ``<im_patch>``, ``<im_start>`` and ``<im_end>`` (32000 + 3 tokens);
* ``openai/clip-vit-large-patch14``: the vision tower (LLaVA reads layer ``-2`` without the CLS token);
* ``timbrooks/instruct-pix2pix``: UNet configuration, VAE and scheduler;
* ``mllm.pt``: the word embeddings and LM head resized for the eight ``[IMG]`` tokens, the edit head
  (``edit_head.*``) and, in the demo's copy, the ``[IMG]`` embeddings ``emb``; ``unet.pt``: the fine-tuned UNet.

Mapping notes:

* Tokenizer: LLaVA's tokenizer, then the MLLM special tokens if it lacks them, then ``[IMG0]``…``[IMG7]``
  as special tokens. With the real release ``[IMG0]`` is id 32003 (32000 LLaMA + 3 LLaVA tokens), the id
  MGIE's demo indexes; the embedding rows of ``mllm.pt`` (32011) must equal the tokenizer's length.
* LLaMA: ``model.{embed_tokens,layers.N.*,norm}`` → ``model.language_model.*``; ``lm_head`` → ``lm_head``;
  ``embed_tokens`` and ``lm_head`` (and any other LLaVA key present in ``mllm.pt``, as the demo's
  ``load_state_dict(strict=False)`` would) come from ``mllm.pt``.
* Vision: CLIP's ``vision_model.*`` (or LLaVA's own ``model.vision_tower[.vision_tower][.vision_model].*``)
  → ``model.vision_tower.*``; the text tower and projections are dropped.
* Projector: ``transformers``' LLaVA projector is ``linear_2(act(linear_1(x)))``. LLaVA v1's single linear
  ``model.mm_projector`` becomes ``linear_1``, the activation is ``"linear"`` (identity) and ``linear_2``
  is the identity matrix with zero bias, so the composition equals the original projector exactly.
* Edit head: ``edit_head.*`` → ``edit_head`` (same parameter names); ``emb`` (1, 8, H) →
  ``edit_head.img_embeddings`` (8, H). A checkpoint without ``emb`` (MGIE's extraction notebook does not
  save it) takes the ``[IMG]`` rows of ``embed_tokens``, the last eight, which is what MGIE's training feeds
  the edit head. The number of attention heads cannot be read from the weights; MGIE uses 4.
* LLaVA-7B v1 is released as a delta on LLaMA-7B; a directory whose delta was not applied is refused
  (its ``model.norm.weight`` averages about 0, where applied weights average about 1).
* UNet: ``unet.pt`` (diffusers key names) loaded strictly into InstructPix2Pix's UNet configuration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.initialization import no_init_weights
from transformers.modeling_utils import local_torch_dtype

from xmgie.editing.edit_head import EditMapper
from xmgie.editing.mllm import IMAGE_PATCH_TOKEN, IMG_TOKENS, MLLM_SPECIAL_TOKENS, NUM_IMG_TOKENS
from xmgie.editing.pipeline import XMGIEPipeline

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]

MGIE_EDIT_HEAD_HEADS = 4
"""Attention heads of MGIE's edit head (``nn.Transformer(nhead=4)``); not recoverable from weight shapes."""

DELTA_NORM_MEAN_BELOW = 0.5
"""LLaVA weights whose ``model.norm.weight`` averages below this (in absolute value) are an un-applied delta."""

_TEXT_PREFIXES = ("embed_tokens.", "layers.", "norm.")
_CLIP_DROPPED_PREFIXES = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
_LLAMA_CONFIG_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "hidden_act",
    "initializer_range",
)


# ---------------------------------------------------------------------------- files


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}")
    return path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}")
    return path


def _read_json(path: Path, what: str) -> dict:
    _require_file(path, what)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {error}") from error


def weight_files(directory: PathLike) -> list[Path]:
    """The weight files of a Hugging Face style directory: safetensors first, else ``pytorch_model*.bin``.

    An index file (``*.index.json``) names the shards when present; otherwise the files are globbed.
    Returns an empty list when the directory holds no weights.
    """
    directory = Path(directory)
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index, "weight index").get("weight_map", {})
            files = [directory / name for name in sorted(set(weight_map.values()))]
            for file in files:
                _require_file(file, f"shard named in {index_name}")
            return files
        files = sorted(directory.glob(pattern))
        if files:
            return files
    return []


def load_state_dict_file(path: PathLike) -> StateDict:
    """Load one checkpoint file (``.safetensors`` or a ``torch.save`` pickle of tensors) onto the CPU."""
    path = _require_file(Path(path), "checkpoint")
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        # Memory-mapping keeps multi-gigabyte shards out of RAM until their tensors are copied.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a state dict of tensors")
    return state


def _load_directory_weights(directory: Path) -> StateDict:
    state: StateDict = {}
    for file in weight_files(directory):
        state.update(load_state_dict_file(file))
    return state


# ---------------------------------------------------------------------------- key mapping


def _classify_llava_key(key: str) -> tuple[str, str]:
    """Split a LLaVA / MGIE checkpoint key into ``(kind, name)``.

    Kinds: ``text`` (name relative to the LLaMA model), ``lm_head``, ``projector`` (``weight``/``bias``),
    ``vision`` (name relative to the CLIP vision transformer), ``edit_head``, ``emb``, ``ignore`` and
    ``unknown``.
    """
    name = key.removeprefix("model.")
    if name.endswith("rotary_emb.inv_freq"):
        return "ignore", name
    if name == "emb":
        return "emb", name
    if name.startswith("edit_head."):
        return "edit_head", name.removeprefix("edit_head.")
    if name.startswith("lm_head."):
        return "lm_head", name.removeprefix("lm_head.")
    if name.startswith(_TEXT_PREFIXES):
        return "text", name
    if name in ("mm_projector.weight", "mm_projector.bias"):
        return "projector", name.removeprefix("mm_projector.")
    if name.startswith("vision_tower."):
        name = name.removeprefix("vision_tower.")
        name = name.removeprefix("vision_tower.").removeprefix("vision_model.")
        if name.endswith("position_ids"):
            return "ignore", name
        return "vision", name
    return "unknown", key


def _split_checkpoint(state: StateDict, source: str, allowed: set[str]) -> dict[str, StateDict]:
    parts: dict[str, StateDict] = {}
    unknown = []
    for key, tensor in state.items():
        kind, name = _classify_llava_key(key)
        if kind == "ignore":
            continue
        if kind not in allowed:
            unknown.append(key)
            continue
        parts.setdefault(kind, {})[name] = tensor
    if unknown:
        shown = ", ".join(sorted(unknown)[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise ValueError(
            f"{source} has keys this converter does not map: {shown}{more}. Only LLaVA v1 with a "
            "single linear mm_projector is supported."
        )
    return parts


def clip_vision_state_dict(state: StateDict) -> StateDict:
    """The vision-transformer weights of a CLIP checkpoint, named relative to ``CLIPVisionModel``.

    Accepts full ``CLIPModel`` checkpoints (``vision_model.*`` plus the text tower, which is dropped),
    ``CLIPVisionModel`` checkpoints with or without the ``vision_model.`` prefix.
    """
    prefixed = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
    if not prefixed:
        prefixed = {k: v for k, v in state.items() if not k.startswith(_CLIP_DROPPED_PREFIXES)}
    return {k: v for k, v in prefixed.items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------------------- configs


def clip_vision_config(clip_dir: PathLike) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` in ``clip_dir/config.json``, which may be a full ``CLIPConfig``."""
    config = _read_json(Path(clip_dir) / "config.json", "CLIP config")
    vision = config.get("vision_config", config)
    known = CLIPVisionConfig().to_dict()
    return CLIPVisionConfig(**{k: v for k, v in vision.items() if k in known and k != "model_type"})


def load_llava_tokenizer(llava_dir: PathLike):
    """LLaVA's tokenizer via ``AutoTokenizer``, with a clear error when only a sentencepiece file is present."""
    llava_dir = Path(llava_dir)
    try:
        return AutoTokenizer.from_pretrained(llava_dir)
    except (ImportError, OSError, ValueError) as error:
        hint = ""
        if not (llava_dir / "tokenizer.json").is_file() and (llava_dir / "tokenizer.model").is_file():
            # transformers 5 builds fast tokenizers only; reading tokenizer.model needs sentencepiece + protobuf.
            hint = (
                " The directory has tokenizer.model but no tokenizer.json: install sentencepiece and protobuf "
                "so that transformers can convert it, or save the tokenizer once with tokenizer.json."
            )
        raise ValueError(
            f"could not load the LLaVA tokenizer from {str(llava_dir)!r}: {str(error).rstrip('.')}.{hint}"
        ) from error


def add_mgie_tokens(tokenizer):
    """Give LLaVA's tokenizer MGIE's vocabulary: the MLLM special tokens if missing, then the eight ``[IMG]`` tokens.

    Also sets the pad token to the unknown token when there is none and pads on the left, as MGIE does.
    """
    vocab = tokenizer.get_vocab()
    missing = [token for token in MLLM_SPECIAL_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.add_tokens(IMG_TOKENS, special_tokens=True)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise ValueError("the LLaVA tokenizer has neither a pad nor an unknown token to pad with")
        tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    # init_kwargs is what save_pretrained writes; without this the saved tokenizer pads on the right again.
    tokenizer.init_kwargs["padding_side"] = "left"
    return tokenizer


def _llama_config(llava_config: dict, tokenizer) -> LlamaConfig:
    missing = [
        name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads") if name not in llava_config
    ]
    if missing:
        raise ValueError(f"LLaVA config.json lacks {', '.join(missing)}")
    fields = {name: llava_config[name] for name in _LLAMA_CONFIG_FIELDS if name in llava_config}
    rope = llava_config.get("rope_parameters") or {
        "rope_type": "default",
        "rope_theta": float(llava_config.get("rope_theta", 10000.0)),
    }

    def token_id(attribute: str) -> int | None:
        value = getattr(tokenizer, attribute)
        return value if value is not None else llava_config.get(attribute)

    return LlamaConfig(
        **fields,
        vocab_size=len(tokenizer),
        rope_parameters=rope,
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        pad_token_id=token_id("pad_token_id"),
        tie_word_embeddings=False,
    )


def _feature_extractor(clip_dir: Path, image_size: int) -> CLIPImageProcessorPil:
    if (clip_dir / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessorPil.from_pretrained(clip_dir)
    else:
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
        )
    crop = processor.crop_size
    if processor.do_center_crop and (crop.height, crop.width) != (image_size, image_size):
        raise ValueError(
            f"{clip_dir / 'preprocessor_config.json'} crops to {crop.height}×{crop.width} but the "
            f"vision tower takes {image_size}×{image_size}"
        )
    return processor


# ---------------------------------------------------------------------------- models


def _check_shapes(model: torch.nn.Module, state: StateDict, what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if keys:
            more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
            problems.append(f"{label}: {', '.join(keys[:10])}{more}")
    if problems:
        raise ValueError(f"{what} does not match its model: " + "; ".join(problems))


def _load_strict(model: torch.nn.Module, state: StateDict, what: str) -> None:
    _check_shapes(model, state, what)
    model.load_state_dict(state, strict=True)


def _build_mllm(config: LlavaConfig, state: StateDict, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    # Built without random init and directly in the target dtype: at 7B parameters both matter.
    with local_torch_dtype(dtype), no_init_weights():
        mllm = LlavaForConditionalGeneration(config)
    _load_strict(mllm, state, "the assembled LLaVA state dict")
    return mllm.to(dtype).eval()


def _refuse_llava_delta(text: StateDict, llava_dir: Path) -> None:
    """Refuse LLaVA weights that are still a delta on LLaMA: the final RMS norm's gains average ≈ 0, not ≈ 1."""
    norm = text.get("norm.weight")
    if norm is None:
        return
    mean = norm.float().mean().item()
    if abs(mean) < DELTA_NORM_MEAN_BELOW:
        raise ValueError(
            f"LLaVA weights in {str(llava_dir)!r} look like an un-applied delta: model.norm.weight averages "
            f"{mean:.3f} (applied weights average about 1). Apply the delta to LLaMA-7B first "
            "(LLaVA's `python -m llava.model.apply_delta --base LLAMA --target OUT --delta DELTA`)."
        )


def _build_edit_head(state: StateDict, emb: torch.Tensor, llm_hidden_size: int, nhead: int) -> EditMapper:
    for key in ("llm2hid.weight", "query", "hid2feat.weight", "mapper.encoder.layers.0.linear1.weight"):
        if key not in state:
            raise ValueError(f"mllm.pt lacks the edit head key 'edit_head.{key}'")
    d_model, in_features = state["llm2hid.weight"].shape
    if in_features != llm_hidden_size:
        raise ValueError(
            f"edit head llm2hid takes {in_features} features but the LLaMA hidden size is {llm_hidden_size}"
        )
    if d_model % nhead:
        raise ValueError(f"edit head width {d_model} is not divisible by edit_head_heads={nhead}")

    def layer_count(part: str) -> int:
        pattern = re.compile(rf"^mapper\.{part}\.layers\.(\d+)\.")
        indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
        return max(indices) + 1 if indices else 0

    emb = emb.reshape(-1, emb.shape[-1])
    if tuple(emb.shape) != (NUM_IMG_TOKENS, llm_hidden_size):
        raise ValueError(
            f"mllm.pt 'emb' has {tuple(emb.shape)} values, expected ({NUM_IMG_TOKENS}, "
            f"{llm_hidden_size}) (optionally with a leading 1)"
        )
    edit_head = EditMapper(
        llm_hidden_size=llm_hidden_size,
        num_img_tokens=NUM_IMG_TOKENS,
        d_model=d_model,
        nhead=nhead,
        num_encoder_layers=layer_count("encoder"),
        num_decoder_layers=layer_count("decoder"),
        dim_feedforward=state["mapper.encoder.layers.0.linear1.weight"].shape[0],
        num_queries=state["query"].shape[1],
        cross_attention_dim=state["hid2feat.weight"].shape[0],
    )
    _load_strict(edit_head, {**state, "img_embeddings": emb}, "the edit head in mllm.pt")
    return edit_head.eval()


def _load_scheduler(ip2p_dir: Path) -> SchedulerMixin:
    config = _read_json(ip2p_dir / "scheduler" / "scheduler_config.json", "scheduler config")
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler_config.json names {name!r}, which is not a diffusers scheduler class")
    return cls.from_pretrained(ip2p_dir, subfolder="scheduler")


# ---------------------------------------------------------------------------- entry point


def convert_mgie(
    *,
    llava_dir: PathLike,
    clip_dir: PathLike,
    mllm_ckpt: PathLike,
    unet_ckpt: PathLike,
    ip2p_dir: PathLike,
    output_dir: PathLike,
    dtype: torch.dtype = torch.float16,
    edit_head_heads: int = MGIE_EDIT_HEAD_HEADS,
    ip_adapter: PathLike | None = None,
    image_encoder_dir: PathLike | None = None,
) -> Path:
    """Convert MGIE's release (LLaVA-7B v1, CLIP, ``mllm.pt``, ``unet.pt``, InstructPix2Pix) to a model directory.

    Args:
        llava_dir: LLaVA v1 directory: ``config.json``, tokenizer files and ``pytorch_model*.bin`` or
            ``*.safetensors`` weights.
        clip_dir: the CLIP vision tower (``openai/clip-vit-large-patch14``); its weights are used unless
            ``llava_dir`` carries the vision tower itself.
        mllm_ckpt: MGIE's ``mllm.pt``.
        unet_ckpt: MGIE's ``unet.pt``.
        ip2p_dir: ``timbrooks/instruct-pix2pix`` in diffusers format (``unet/config.json``, ``vae/``, ``scheduler/``).
        output_dir: where to write the model directory; must not exist or be empty.
        dtype: the dtype the weights are stored in.
        edit_head_heads: attention heads of the edit head (MGIE: 4).
        ip_adapter: IP-Adapter SD 1.5 weights (``ip-adapter_sd15.bin`` or ``.safetensors``) for identity
            embeddings; needs ``image_encoder_dir``. Without them the model edits without IE.
        image_encoder_dir: IP-Adapter's image encoder (``CLIPVisionModelWithProjection`` directory).

    Returns:
        ``output_dir`` as a ``Path``; it loads with ``xmgie.loading.directory.load_pipeline``.

    Raises:
        FileNotFoundError: an input file or folder is missing (named in the message).
        ValueError: an input does not have the expected keys, shapes or sizes.
        FileExistsError: ``output_dir`` exists and is not empty.
    """
    if (ip_adapter is None) != (image_encoder_dir is None):
        raise ValueError("ip_adapter and image_encoder_dir go together: pass both or neither")
    llava_dir, clip_dir, ip2p_dir = Path(llava_dir), Path(clip_dir), Path(ip2p_dir)
    mllm_ckpt, unet_ckpt, output_dir = Path(mllm_ckpt), Path(unet_ckpt), Path(output_dir)

    # Check every input before loading gigabytes of weights.
    _require_dir(llava_dir, "LLaVA directory")
    llava_config = _read_json(llava_dir / "config.json", "LLaVA config")
    llava_weight_files = weight_files(llava_dir)
    if not llava_weight_files:
        raise FileNotFoundError(
            f"no pytorch_model*.bin or *.safetensors weights in LLaVA directory {str(llava_dir)!r}"
        )
    if llava_config.get("mm_use_im_start_end") is False:
        # The pipeline's prompt always wraps the image in <im_start>/<im_end>, as MGIE's LLaVA was trained.
        raise ValueError(
            "LLaVA config.json has mm_use_im_start_end=false; MGIE's LLaVA v1 uses image start/end tokens"
        )
    _require_dir(clip_dir, "CLIP directory")
    vision_config = clip_vision_config(clip_dir)
    _require_file(mllm_ckpt, "MGIE mllm checkpoint (mllm.pt)")
    _require_file(unet_ckpt, "MGIE UNet checkpoint (unet.pt)")
    _require_dir(ip2p_dir, "InstructPix2Pix directory")
    _require_file(ip2p_dir / "unet" / "config.json", "InstructPix2Pix UNet config")
    _require_file(ip2p_dir / "vae" / "config.json", "InstructPix2Pix VAE config")
    _require_file(ip2p_dir / "scheduler" / "scheduler_config.json", "InstructPix2Pix scheduler config")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"output directory {str(output_dir)!r} exists and is not empty")

    # Tokenizer and MGIE's checkpoint first: a vocabulary mismatch fails before the LLaVA weights load.
    tokenizer = add_mgie_tokens(load_llava_tokenizer(llava_dir))
    for loading_only in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(loading_only, None)
    mgie = _split_checkpoint(
        load_state_dict_file(mllm_ckpt),
        f"{str(mllm_ckpt)!r}",
        {"text", "lm_head", "projector", "vision", "edit_head", "emb"},
    )
    mgie_text, mgie_head = mgie.get("text", {}), mgie.get("lm_head", {})
    for name, tensor in (
        ("model.embed_tokens.weight", mgie_text.get("embed_tokens.weight")),
        ("lm_head.weight", mgie_head.get("weight")),
    ):
        if tensor is None:
            raise ValueError(f"{str(mllm_ckpt)!r} lacks {name!r}")
        if tensor.shape[0] != len(tokenizer):
            raise ValueError(
                f"mllm.pt {name} has {tensor.shape[0]} rows but the tokenizer has {len(tokenizer)} tokens "
                f"(LLaVA's tokenizer plus the MLLM and {NUM_IMG_TOKENS} [IMG] tokens)"
            )
    if "edit_head" not in mgie:
        raise ValueError(f"{str(mllm_ckpt)!r} lacks the edit head ('edit_head.*')")
    hidden = llava_config.get("hidden_size")
    if not isinstance(hidden, int):
        raise ValueError(f"LLaVA config {str(llava_dir / 'config.json')!r} lacks an integer 'hidden_size'")
    if "emb" in mgie:
        emb = mgie["emb"]["emb"]
    else:
        # MGIE's training feeds the edit head embed_tokens' [IMG] rows; its extraction notebook saves no 'emb'.
        emb = mgie_text["embed_tokens.weight"][tokenizer.convert_tokens_to_ids(IMG_TOKENS)]
    edit_head = _build_edit_head(mgie["edit_head"], emb, hidden, edit_head_heads).to(dtype)

    # The UNet next, still before the LLaVA weights, so its key or width mismatches also fail early.
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ip2p_dir / "unet"))
    _load_strict(unet, load_state_dict_file(unet_ckpt), f"{str(unet_ckpt)!r}")
    if unet.config.cross_attention_dim != edit_head.config.cross_attention_dim:
        raise ValueError(
            f"the UNet attends to {unet.config.cross_attention_dim}-wide conditioning but the edit head "
            f"produces {edit_head.config.cross_attention_dim}"
        )
    unet = unet.to(dtype).eval()

    # LLaVA's weights, overridden by whatever mllm.pt carries for the same modules.
    llava = _split_checkpoint(
        _load_directory_weights(llava_dir),
        f"LLaVA weights in {str(llava_dir)!r}",
        {"text", "lm_head", "projector", "vision"},
    )
    _refuse_llava_delta(llava.get("text", {}), llava_dir)
    text = {**llava.get("text", {}), **mgie_text}
    lm_head = {**llava.get("lm_head", {}), **mgie_head}
    projector = {**llava.get("projector", {}), **mgie.get("projector", {})}
    vision = llava.get("vision") or {}
    if not vision:
        if not weight_files(clip_dir):
            raise FileNotFoundError(
                f"no CLIP vision weights: neither {str(llava_dir)!r} nor {str(clip_dir)!r} "
                "holds them (*.safetensors or pytorch_model*.bin)"
            )
        vision = clip_vision_state_dict(_load_directory_weights(clip_dir))
    vision = {**vision, **mgie.get("vision", {})}
    for key in ("weight", "bias"):
        if key not in projector:
            raise ValueError(f"LLaVA weights lack 'model.mm_projector.{key}'")

    mm_hidden = llava_config.get("mm_hidden_size", vision_config.hidden_size)
    if mm_hidden != vision_config.hidden_size:
        raise ValueError(
            f"LLaVA expects {mm_hidden}-wide vision features but the CLIP config has hidden size "
            f"{vision_config.hidden_size}"
        )
    text_config = _llama_config(llava_config, tokenizer)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        vision_feature_layer=int(llava_config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default",
        projector_hidden_act="linear",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    identity = torch.eye(hidden, dtype=projector["weight"].dtype)
    state: StateDict = {f"model.language_model.{k}": v for k, v in text.items()}
    state.update({f"lm_head.{k}": v for k, v in lm_head.items()})
    state.update({f"model.vision_tower.{k}": v for k, v in vision.items()})
    state.update(
        {
            "model.multi_modal_projector.linear_1.weight": projector["weight"],
            "model.multi_modal_projector.linear_1.bias": projector["bias"],
            "model.multi_modal_projector.linear_2.weight": identity,
            "model.multi_modal_projector.linear_2.bias": torch.zeros(hidden, dtype=identity.dtype),
        }
    )
    del llava, text, vision, mgie
    mllm = _build_mllm(config, state, dtype)
    del state

    vae = AutoencoderKL.from_pretrained(ip2p_dir, subfolder="vae", torch_dtype=dtype).eval()

    identity: dict = {}
    if ip_adapter is not None:
        from transformers import CLIPVisionModelWithProjection

        from xmgie.loading.convert_ip_adapter import load_ip_adapter

        encoder = CLIPVisionModelWithProjection.from_pretrained(
            _require_dir(Path(image_encoder_dir), "image encoder directory"), local_files_only=True, dtype=dtype
        )
        adapter = load_ip_adapter(
            _require_file(Path(ip_adapter), "IP-Adapter weights"), unet, image_embed_dim=encoder.config.projection_dim
        )
        identity = {"image_encoder": encoder, "identity_adapter": adapter.to(dtype)}
    pipe = XMGIEPipeline(
        **identity,
        mllm=mllm,
        tokenizer=tokenizer,
        feature_extractor=_feature_extractor(clip_dir, vision_config.image_size),
        edit_head=edit_head,
        unet=unet,
        vae=vae,
        scheduler=_load_scheduler(ip2p_dir),
    )
    # Written beside the target and renamed, so a failed conversion never leaves a half-written directory.
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir
