"""The MLLM stage of MGIE: expressive instructions and the hidden states of the ``[IMG]`` tokens.

MGIE asks a LLaVA model ``what will this image be like if '<instruction>'`` about the source
image, generates greedily, keeps the first two sentences of the answer as the *expressive
instruction*, and hands the last-layer hidden states at the eight ``[IMG]`` positions to the edit
head. This module reproduces that on ``transformers.LlavaForConditionalGeneration``, batched over
items with left padding, a few items per ``generate`` call, keeping only the last layer's hidden states.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

NUM_IMG_TOKENS = 8
IMG_TOKENS = [f"[IMG{i}]" for i in range(NUM_IMG_TOKENS)]
IMAGE_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
# LLaVA v1 as used by MGIE wraps the image patches in start/end tokens (mm_use_im_start_end).
MLLM_SPECIAL_TOKENS = [IMAGE_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN]

VICUNA_V1_1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM_SIZE = 3
DEFAULT_MLLM_BATCH_SIZE = 4
"""Items per ``generate`` call: the MLLM's cache and states grow with it, and a micro-batch may be larger."""

_MLLM_SPECIAL_TOKEN_PATTERN = re.compile("(" + "|".join(re.escape(token) for token in MLLM_SPECIAL_TOKENS) + ")")


@dataclass
class MLLMOutput:
    """What the MLLM stage hands on: one expressive instruction and ``(8, hidden)`` states per item."""

    expressive_instructions: list[str]
    img_hidden_states: torch.Tensor
    generated_token_ids: list[list[int]]


def build_prompt(instruction: str, num_image_tokens: int) -> str:
    """MGIE's prompt in the vicuna_v1_1 template, with the image as start/patch×N/end tokens."""
    text = f"what will this image be like if '{instruction}'"
    text = text + "\n" + IM_START_TOKEN + IMAGE_PATCH_TOKEN * num_image_tokens + IM_END_TOKEN
    return f"{VICUNA_V1_1_SYSTEM} USER: {text} ASSISTANT:"


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The token ids of ``prompt`` as MGIE was trained with them (LLaVA's slow SentencePiece tokenizer).

    The prompt is split at the image tokens (``<im_start>``, ``<im_patch>``, ``<im_end>``); each text
    segment is encoded as a text of its own, without BOS (so SentencePiece's dummy prefix starts it),
    after dropping the whitespace next to an image token as the slow tokenizer does around added
    tokens; the image tokens' ids are spliced in between and BOS is put once at the start, as LLaVA's
    ``tokenizer_image_token`` does. Encoding the whole prompt with transformers 5's tokenizer instead
    gives other ids around the image tokens (it keeps the ``"\\n"`` before ``<im_start>``, and its
    rebuilt pre-tokenizer treats the text after ``<im_end>`` as the middle of a sentence).
    """
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    pieces = _MLLM_SPECIAL_TOKEN_PATTERN.split(prompt)
    # re.split with a group alternates text and token: even indices are text, odd ones image tokens.
    for index, piece in enumerate(pieces):
        if index % 2:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
            continue
        if index > 0:
            piece = piece.lstrip()
        if index < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def left_padded_batch(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token sequences padded on the left to the longest, as generation needs."""
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            input_ids[row, length - len(sequence) :] = torch.tensor(list(sequence), dtype=torch.long)
            attention_mask[row, length - len(sequence) :] = 1
    return input_ids, attention_mask


def strip_special_tokens(instruction: str, special_tokens: list[str]) -> str:
    """Remove special-token strings from user text so an instruction cannot inject image or ``[IMG]`` tokens."""
    for token in sorted(special_tokens, key=len, reverse=True):
        instruction = instruction.replace(token, "")
    return instruction


def clean_expressive_instruction(text: str, eos_token: str | None = "</s>", special_tokens: Sequence[str] = ()) -> str:
    """Cut the generated answer as MGIE does: at the end of sequence, "alternative" or ``[IMG0]``; two sentences.

    Special-token strings other than ``[IMG0]`` and control characters are dropped, so the text is safe to
    show to a user whatever the model produced.
    """
    if "ASSISTANT:" in text:
        text = text[text.index("ASSISTANT:") + len("ASSISTANT:") :].strip()
    if eos_token and eos_token in text:
        text = text[: text.index(eos_token)].strip()
    if "alternative" in text.lower():
        text = text[: text.lower().index("alternative")]
    if IMG_TOKENS[0] in text:
        text = text[: text.index(IMG_TOKENS[0])]
    text = strip_special_tokens(text, [token for token in special_tokens if token != eos_token])
    text = "".join(char for char in text if char.isprintable() or char == " ")
    # MGIE joins the first two sentences with a bare "."; a space reads better and keeps the same content.
    sentences = [part.strip() for part in text.split(".")[:2]]
    text = ". ".join(part for part in sentences if part).rstrip(" ,;:")
    return text + "." if text else ""


def img_hidden_positions(sequence: list[int], prompt_length: int, img0_token_id: int, eos_token_id: int | None) -> int:
    """Start of the eight hidden states that feed the edit head, as MGIE picks them.

    ``sequence`` is a row of ``generate``'s output: the (padded) prompt of ``prompt_length`` tokens,
    then the generated tokens, padded after the row's end of sequence when other rows of the batch
    went on. The hidden state at position ``p`` is the one that predicts token ``p + 1``, so the row
    has states up to one before its own last token. MGIE takes the eight states starting one before
    the generated ``[IMG0]``, or the last eight but one of the row's own states when the model never
    generated ``[IMG0]`` — counted from the row's end, not the batch's, whose tail is padding.
    """
    generated = sequence[prompt_length:]
    if eos_token_id is not None and eos_token_id in generated:
        generated = generated[: generated.index(eos_token_id) + 1]
    num_hidden = prompt_length + len(generated) - 1
    fallback = num_hidden - (NUM_IMG_TOKENS + 1)
    if img0_token_id in generated:
        return min(prompt_length + generated.index(img0_token_id) - 1, fallback)
    return fallback


def final_norm(mllm) -> torch.nn.Module:
    """The language model's final norm, whose output is the last layer's hidden states."""
    norm = getattr(mllm.get_decoder(), "norm", None)
    if not isinstance(norm, torch.nn.Module):
        raise ValueError(f"{type(mllm).__name__}'s language model has no final `norm` to read hidden states from")
    return norm


@contextmanager
def last_layer_states(mllm) -> Iterator[list[torch.Tensor]]:
    """Collect the last layer's hidden states of every forward pass of ``mllm`` while the context is open.

    ``generate(output_hidden_states=True)`` keeps every layer's states for every step (about 110 MB per
    item in float16 at LLaVA-7B's size) where MGIE needs the last layer's only; a hook on the final norm
    keeps just those. (``output_hidden_states=-1`` would also reach the vision tower and drop the layer
    LLaVA's features come from.)
    """
    states: list[torch.Tensor] = []
    handle = final_norm(mllm).register_forward_hook(lambda module, args, output: states.append(output))
    try:
        yield states
    finally:
        handle.remove()


@dataclass(frozen=True)
class MLLMActivationBytes:
    """Bytes the MLLM stage holds for one ``generate`` call beyond the weights (see `mllm_activation_bytes`)."""

    kv_cache: int
    hidden_states: int

    @property
    def total(self) -> int:
        """Cache and kept hidden states together."""
        return self.kv_cache + self.hidden_states


def mllm_activation_bytes(
    config,
    *,
    batch_size: int,
    text_tokens: int,
    new_tokens: int = MAX_NEW_TOKENS,
    dtype: torch.dtype = torch.float16,
    lean_hidden_states: bool = True,
) -> MLLMActivationBytes:
    """Bytes of the MLLM stage's activations for one ``generate`` call of ``batch_size`` items, from the config.

    Args:
        config: the MLLM's ``LlavaConfig`` (its ``text_config`` and ``vision_config`` are read).
        batch_size: items per call (the stage runs ``DEFAULT_MLLM_BATCH_SIZE`` at a time by default).
        text_tokens: the prompt's text tokens with BOS (about 100 for MGIE's prompt with LLaMA's tokenizer);
            the image's patch tokens are added from the vision config.
        new_tokens: tokens generated (``MAX_NEW_TOKENS`` at most).
        dtype: the MLLM's dtype.
        lean_hidden_states: ``True`` for what this module keeps (the last layer's states), ``False`` for
            ``generate(output_hidden_states=True)`` (the embeddings and every layer's states).

    Every forward pass but the one the last token would need runs, so the cache and the states cover
    ``prompt + new_tokens - 1`` positions. Transient per-layer buffers are not counted.
    """
    text, vision = config.text_config, config.vision_config
    positions = text_tokens + (vision.image_size // vision.patch_size) ** 2 + new_tokens - 1
    element = torch.empty((), dtype=dtype).element_size()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    kv_cache = 2 * text.num_hidden_layers * batch_size * kv_heads * head_dim * positions * element
    kept_layers = 1 if lean_hidden_states else text.num_hidden_layers + 1
    hidden_states = kept_layers * batch_size * positions * text.hidden_size * element
    return MLLMActivationBytes(kv_cache=kv_cache, hidden_states=hidden_states)


@torch.no_grad()
def generate_expressive_instructions(
    mllm,
    tokenizer,
    feature_extractor,
    images: list[Image.Image],
    instructions: list[str],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    no_repeat_ngram_size: int = NO_REPEAT_NGRAM_SIZE,
    batch_size: int = DEFAULT_MLLM_BATCH_SIZE,
) -> MLLMOutput:
    """Run the MLLM over (image, instruction) pairs with MGIE's generation settings, ``batch_size`` items at a time.

    Each item's result does not depend on how the items are chunked: rows are left-padded with an
    attention mask, and every row's states are read at its own positions.
    """
    if len(images) != len(instructions):
        raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
    if max_new_tokens < NUM_IMG_TOKENS + 1:
        raise ValueError(f"max_new_tokens must be at least {NUM_IMG_TOKENS + 1}, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    vision = mllm.config.vision_config
    num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    special = list(tokenizer.all_special_tokens) + IMG_TOKENS + MLLM_SPECIAL_TOKENS
    prompt_ids = [
        encode_prompt(tokenizer, build_prompt(strip_special_tokens(text, special), num_image_tokens))
        for text in instructions
    ]
    texts: list[str] = []
    states: list[torch.Tensor] = []
    generated_ids: list[list[int]] = []
    for begin in range(0, len(images), batch_size):
        chunk = slice(begin, begin + batch_size)
        chunk_states, chunk_generated = _generate_chunk(
            mllm, tokenizer, feature_extractor, images[chunk], prompt_ids[chunk], max_new_tokens, no_repeat_ngram_size
        )
        states.append(chunk_states)
        for generated in chunk_generated:
            generated_ids.append(generated)
            decoded = tokenizer.decode(generated, skip_special_tokens=False)
            texts.append(clean_expressive_instruction(decoded, tokenizer.eos_token, special))
    return MLLMOutput(texts, torch.cat(states), generated_ids)


def _generate_chunk(
    mllm,
    tokenizer,
    feature_extractor,
    images: list[Image.Image],
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    no_repeat_ngram_size: int,
) -> tuple[torch.Tensor, list[list[int]]]:
    """One ``generate`` call: the ``(rows, 8, hidden)`` states and each row's generated ids up to its end."""
    device = mllm.device
    input_ids, attention_mask = left_padded_batch(prompt_ids, tokenizer.pad_token_id)
    pixel_values = feature_extractor(images=images, return_tensors="pt")["pixel_values"]
    with last_layer_states(mllm) as steps:
        out = mllm.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=pixel_values.to(device=device, dtype=mllm.dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            no_repeat_ngram_size=no_repeat_ngram_size,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    # One entry per forward pass: the prompt first, then one per generated token but the last.
    hidden = torch.cat(steps, dim=1)
    if hidden.shape[1] != out.sequences.shape[1] - 1:
        raise RuntimeError(
            f"collected {hidden.shape[1]} hidden states for {out.sequences.shape[1]} tokens: "
            "generate did not run one forward pass per token"
        )
    prompt_length = input_ids.shape[1]
    img0_id = tokenizer.convert_tokens_to_ids(IMG_TOKENS[0])
    states, generated_ids = [], []
    for row, sequence in enumerate(out.sequences.tolist()):
        start = img_hidden_positions(sequence, prompt_length, img0_id, tokenizer.eos_token_id)
        states.append(hidden[row, start : start + NUM_IMG_TOKENS])
        generated = sequence[prompt_length:]
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        generated_ids.append(generated)
    return torch.stack(states), generated_ids
