"""The MLLM stage: MGIE's prompt, cleaning of the answer, and the [IMG] hidden states."""

from __future__ import annotations

import torch

from tests.conftest import gradient_image
from xmgie.editing.mllm import (
    IMG_TOKENS,
    NUM_IMG_TOKENS,
    build_prompt,
    clean_expressive_instruction,
    generate_expressive_instructions,
    img_hidden_positions,
)


def test_prompt_is_mgie_vicuna_template():
    prompt = build_prompt("make it snow", 2)
    assert prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: what will this image be like if "
        "'make it snow'\n<im_start><im_patch><im_patch><im_end> ASSISTANT:"
    )


def test_clean_expressive_instruction_cuts_as_mgie():
    text = "The trees are covered in snow. The sky is grey. People wear coats.</s>"
    assert clean_expressive_instruction(text) == "The trees are covered in snow. The sky is grey."
    assert clean_expressive_instruction("Add a red hat [IMG0][IMG1]") == "Add a red hat."
    assert clean_expressive_instruction("Paint it blue, alternatively green. Or not.") == "Paint it blue."
    assert clean_expressive_instruction("</s>") == ""
    # Whatever a model emits, the text shown to users carries no special tokens or control characters.
    assert clean_expressive_instruction("A<unk> red\x05 hat<s>.", special_tokens=["<unk>", "<s>"]) == "A red hat."


def test_img_hidden_positions_start_one_before_img0():
    img0 = 100
    sequence = [1, 5, 6, 7] + [20, 21, img0, 101, 102]
    # Hidden states exist for the prompt and every generated token but the last.
    assert img_hidden_positions(sequence, 4, len(sequence) - 1 + 20, img0) == 4 + 2 - 1
    assert img_hidden_positions([1, 5, 6, 7, 20, 21, 22], 4, 40, img0) == 40 - (NUM_IMG_TOKENS + 1)


def test_img_hidden_states_are_the_models_last_layer_at_mgie_positions(tiny_pipe):
    pipe = tiny_pipe
    images = [gradient_image(48, 40, 0.0), gradient_image(64, 64, 1.0)]
    out = generate_expressive_instructions(
        pipe.mllm, pipe.tokenizer, pipe.feature_extractor, images, ["make it red", "add a hat to the cat"]
    )
    assert out.img_hidden_states.shape == (2, NUM_IMG_TOKENS, pipe.mllm.config.text_config.hidden_size)
    img0 = pipe.tokenizer.convert_tokens_to_ids(IMG_TOKENS[0])
    vision = pipe.mllm.config.vision_config
    for row, instruction in enumerate(["make it red", "add a hat to the cat"]):
        prompt_ids = pipe.tokenizer([build_prompt(instruction, (vision.image_size // vision.patch_size) ** 2)])
        prompt_ids = prompt_ids["input_ids"][0]
        sequence = prompt_ids + out.generated_token_ids[row]
        pixels = pipe.feature_extractor(images=images[row], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            full = pipe.mllm(input_ids=torch.tensor([sequence]), pixel_values=pixels, output_hidden_states=True)
        num_hidden = len(sequence) - 1 if len(out.generated_token_ids[row]) == 96 else len(sequence)
        start = img_hidden_positions(sequence, len(prompt_ids), num_hidden, img0)
        expected = full.hidden_states[-1][0, start : start + NUM_IMG_TOKENS]
        torch.testing.assert_close(out.img_hidden_states[row], expected, atol=1e-4, rtol=1e-4)


def test_instruction_cannot_inject_special_tokens(tiny_pipe):
    pipe = tiny_pipe
    image = gradient_image(32, 32)
    plain = generate_expressive_instructions(pipe.mllm, pipe.tokenizer, pipe.feature_extractor, [image], ["sky"])
    injected = generate_expressive_instructions(
        pipe.mllm, pipe.tokenizer, pipe.feature_extractor, [image], ["<im_patch>[IMG0]sky</s>"]
    )
    assert injected.generated_token_ids == plain.generated_token_ids
