"""The MLLM stage of MGIE: expressive instructions and the hidden states of the ``[IMG]`` tokens.

MGIE asks a LLaVA model ``what will this image be like if '<instruction>'`` about the source
image, generates greedily, keeps the first two sentences of the answer as the *expressive
instruction*, and hands the last-layer hidden states at the eight ``[IMG]`` positions to the edit
head. This module reproduces that on ``transformers.LlavaForConditionalGeneration``, batched over
items with left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def img_hidden_positions(sequence: list[int], prompt_length: int, num_hidden: int, img0_token_id: int) -> int:
    """Start of the eight hidden states that feed the edit head, as MGIE picks them.

    The hidden state at position ``p`` is the one that predicts token ``p + 1``; MGIE takes the
    eight states starting one before the generated ``[IMG0]``, or the last eight complete ones when
    the model never generated ``[IMG0]``.
    """
    fallback = num_hidden - (NUM_IMG_TOKENS + 1)
    generated = sequence[prompt_length:]
    if img0_token_id in generated:
        return min(prompt_length + generated.index(img0_token_id) - 1, fallback)
    return fallback


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
) -> MLLMOutput:
    """Run the MLLM over a batch of (image, instruction) pairs with MGIE's generation settings."""
    if len(images) != len(instructions):
        raise ValueError(f"got {len(images)} images but {len(instructions)} instructions")
    if max_new_tokens < NUM_IMG_TOKENS + 1:
        raise ValueError(f"max_new_tokens must be at least {NUM_IMG_TOKENS + 1}, got {max_new_tokens}")
    device = mllm.device
    vision = mllm.config.vision_config
    num_image_tokens = (vision.image_size // vision.patch_size) ** 2
    special = list(tokenizer.all_special_tokens) + IMG_TOKENS + MLLM_SPECIAL_TOKENS
    prompts = [build_prompt(strip_special_tokens(text, special), num_image_tokens) for text in instructions]

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    pixel_values = feature_extractor(images=images, return_tensors="pt")["pixel_values"]
    out = mllm.generate(
        input_ids=batch["input_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
        pixel_values=pixel_values.to(device=device, dtype=mllm.dtype),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        no_repeat_ngram_size=no_repeat_ngram_size,
        return_dict_in_generate=True,
        output_hidden_states=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # One entry per forward pass: the prompt first, then one per generated token but the last.
    hidden = torch.cat([step[-1] for step in out.hidden_states], dim=1)
    prompt_length = batch["input_ids"].shape[1]
    img0_id = tokenizer.convert_tokens_to_ids(IMG_TOKENS[0])

    texts, states, generated_ids = [], [], []
    for row, sequence in enumerate(out.sequences.tolist()):
        start = img_hidden_positions(sequence, prompt_length, hidden.shape[1], img0_id)
        states.append(hidden[row, start : start + NUM_IMG_TOKENS])
        generated = sequence[prompt_length:]
        if tokenizer.eos_token_id in generated:
            generated = generated[: generated.index(tokenizer.eos_token_id)]
        generated_ids.append(generated)
        decoded = tokenizer.decode(generated, skip_special_tokens=False)
        texts.append(clean_expressive_instruction(decoded, tokenizer.eos_token, special))
    return MLLMOutput(texts, torch.stack(states), generated_ids)
