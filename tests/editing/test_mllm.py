"""The MLLM stage: MGIE's prompt and its token ids, cleaning of the answer, and the [IMG] hidden states."""

from __future__ import annotations

import io
import json

import pytest
import sentencepiece
import torch

from tests.conftest import gradient_image
from xmgie.editing.mllm import (
    IMG_TOKENS,
    NUM_IMG_TOKENS,
    build_prompt,
    clean_expressive_instruction,
    encode_prompt,
    generate_expressive_instructions,
    img_hidden_positions,
    last_layer_states,
    left_padded_batch,
    mllm_activation_bytes,
)
from xmgie.loading.convert_mgie import add_mgie_tokens, load_llava_tokenizer
from xmgie.training.objective import prompt_token_ids

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


def test_prompt_is_mgie_vicuna_template():
    prompt = build_prompt("make it snow", 2)
    assert prompt == (
        f"{SYSTEM} USER: what will this image be like if 'make it snow'\n<im_start><im_patch><im_patch><im_end>"
        " ASSISTANT:"
    )


def write_llava_tokenizer_dir(directory, tokenizer_config: dict) -> bytes:
    """A LLaVA-style tokenizer folder: a LLaMA-like SentencePiece BPE model trained here, and its configs."""
    sentences = [
        SYSTEM,
        "USER: what will this image be like if 'make it snow' ASSISTANT: The trees are covered in snow.",
        "turn the day into night, add a red hat to the cat and paint the sky blue",
    ] * 10
    model = io.BytesIO()
    # LLaMA's settings: BPE with byte fallback (so "\n" is <0x0A>), a dummy prefix, whitespace kept as is.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=340,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False}

    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": added("<s>"),
        "eos_token": added("</s>"),
        "unk_token": added("<unk>"),
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "sp_model_kwargs": {},
        **tokenizer_config,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    return model.getvalue()


@pytest.mark.parametrize("tokenizer_config", [{}, {"legacy": True}, {"legacy": False}], ids=str)
def test_prompt_ids_are_the_slow_sentencepiece_tokenizers(tmp_path, tokenizer_config):
    model = write_llava_tokenizer_dir(tmp_path, tokenizer_config)
    tokenizer = add_mgie_tokens(load_llava_tokenizer(tmp_path))
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    # The converter appends <im_patch>, <im_start>, <im_end> after the SentencePiece vocabulary.
    patch, start, end = sp.get_piece_size(), sp.get_piece_size() + 1, sp.get_piece_size() + 2
    for instruction, num_image_tokens in [("make it snow", 3), ("turn the day into night", 1)]:
        prompt = build_prompt(instruction, num_image_tokens)
        # LLaVA's slow tokenizer (transformers 4.28, as MGIE pins it) splits the text at added tokens, strips
        # the whitespace next to them, lets SentencePiece encode each piece (dummy prefix included) and puts
        # BOS once at the start.
        expected = (
            [sp.bos_id()]
            + sp.encode(f"{SYSTEM} USER: what will this image be like if '{instruction}'")
            + [start]
            + [patch] * num_image_tokens
            + [end]
            + sp.encode("ASSISTANT:")
        )
        assert encode_prompt(tokenizer, prompt) == expected
        # Training teacher-forces the same prompt ids.
        assert prompt_token_ids(tokenizer, instruction, num_image_tokens) == expected
        # Encoding the whole prompt with transformers 5's tokenizer gives other ids (the reason for splicing).
        assert tokenizer(prompt)["input_ids"] != expected


def test_prompts_are_left_padded_with_their_attention_masks():
    input_ids, attention_mask = left_padded_batch([[1, 5, 6], [1, 7, 8, 9, 10]], pad_token_id=0)
    assert input_ids.tolist() == [[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]]
    assert attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_clean_expressive_instruction_cuts_as_mgie():
    text = "The trees are covered in snow. The sky is grey. People wear coats.</s>"
    assert clean_expressive_instruction(text) == "The trees are covered in snow. The sky is grey."
    assert clean_expressive_instruction("Add a red hat [IMG0][IMG1]") == "Add a red hat."
    assert clean_expressive_instruction("Paint it blue, alternatively green. Or not.") == "Paint it blue."
    assert clean_expressive_instruction("</s>") == ""
    # Whatever a model emits, the text shown to users carries no special tokens or control characters.
    assert clean_expressive_instruction("A<unk> red\x05 hat<s>.", special_tokens=["<unk>", "<s>"]) == "A red hat."


def test_img_hidden_positions_start_one_before_img0():
    img0, eos, pad = 100, 2, 0
    prompt = [1, 5, 6, 7]
    # Hidden states exist for the prompt and every generated token but the last.
    with_img = [20, 21, img0] + list(range(101, 108)) + [30, 31, 32]
    assert img_hidden_positions(prompt + with_img, 4, img0, eos) == 4 + 2 - 1
    # [IMG0] too near the end for eight states after it: the fallback wins.
    assert img_hidden_positions(prompt + [20, 21, img0, 101, 102], 4, img0, eos) == (4 + 5 - 1) - 9
    # No [IMG0]: the last eight states but one, counted from the row's own end (its EOS), not the padding after.
    ended = prompt + [20 + i for i in range(12)] + [eos] + [pad] * 30
    assert img_hidden_positions(ended, 4, img0, eos) == (4 + 13 - 1) - (NUM_IMG_TOKENS + 1)
    assert img_hidden_positions(prompt + [20 + i for i in range(40)], 4, img0, eos) == (4 + 40 - 1) - 9


def prompt_ids_of(pipe, instruction: str) -> list[int]:
    vision = pipe.mllm.config.vision_config
    return encode_prompt(pipe.tokenizer, build_prompt(instruction, (vision.image_size // vision.patch_size) ** 2))


def test_img_hidden_states_are_the_models_last_layer_at_mgie_positions(tiny_pipe):
    pipe = tiny_pipe
    images = [gradient_image(48, 40, 0.0), gradient_image(64, 64, 1.0)]
    out = generate_expressive_instructions(
        pipe.mllm, pipe.tokenizer, pipe.feature_extractor, images, ["make it red", "add a hat to the cat"]
    )
    assert out.img_hidden_states.shape == (2, NUM_IMG_TOKENS, pipe.mllm.config.text_config.hidden_size)
    img0 = pipe.tokenizer.convert_tokens_to_ids(IMG_TOKENS[0])
    for row, instruction in enumerate(["make it red", "add a hat to the cat"]):
        prompt_ids = prompt_ids_of(pipe, instruction)
        sequence = prompt_ids + out.generated_token_ids[row]
        pixels = pipe.feature_extractor(images=images[row], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            full = pipe.mllm(input_ids=torch.tensor([sequence]), pixel_values=pixels, output_hidden_states=True)
        ended = sequence if len(out.generated_token_ids[row]) == 96 else sequence + [pipe.tokenizer.eos_token_id]
        start = img_hidden_positions(ended, len(prompt_ids), img0, pipe.tokenizer.eos_token_id)
        expected = full.hidden_states[-1][0, start : start + NUM_IMG_TOKENS]
        torch.testing.assert_close(out.img_hidden_states[row], expected, atol=1e-4, rtol=1e-4)


def test_generation_keeps_only_the_last_layers_states(tiny_pipe, monkeypatch):
    pipe = tiny_pipe
    images, instructions = [gradient_image(40, 40, 0.5), gradient_image(32, 48)], ["make it red", "add a hat"]
    generate = pipe.mllm.generate
    outputs = []

    def recording_generate(*args, **kwargs):
        outputs.append(generate(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(pipe.mllm, "generate", recording_generate)
    lean = generate_expressive_instructions(
        pipe.mllm, pipe.tokenizer, pipe.feature_extractor, images, instructions, max_new_tokens=20
    )
    assert [out.hidden_states for out in outputs] == [None]

    # The same states as generate's every-layer output gives, taken at the same positions.
    input_ids, attention_mask = left_padded_batch(
        [prompt_ids_of(pipe, text) for text in instructions], pipe.tokenizer.pad_token_id
    )
    pixels = pipe.feature_extractor(images=images, return_tensors="pt")["pixel_values"]
    full = generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixels,
        max_new_tokens=20,
        do_sample=False,
        no_repeat_ngram_size=3,
        return_dict_in_generate=True,
        output_hidden_states=True,
        pad_token_id=pipe.tokenizer.pad_token_id,
        eos_token_id=pipe.tokenizer.eos_token_id,
    )
    assert len(full.hidden_states[0]) == pipe.mllm.config.text_config.num_hidden_layers + 1
    every_layer_last = torch.cat([step[-1] for step in full.hidden_states], dim=1)
    img0 = pipe.tokenizer.convert_tokens_to_ids(IMG_TOKENS[0])
    for row, sequence in enumerate(full.sequences.tolist()):
        start = img_hidden_positions(sequence, input_ids.shape[1], img0, pipe.tokenizer.eos_token_id)
        torch.testing.assert_close(lean.img_hidden_states[row], every_layer_last[row, start : start + NUM_IMG_TOKENS])


class EndRowEarly:
    """A hook on ``lm_head`` that makes one row of each batch end after ``length`` tokens and bans ``[IMG0]``.

    It changes the logits only, so the hidden states stay the model's own.
    """

    def __init__(self, row: int, length: int, eos_token_id: int, img0_token_id: int) -> None:
        self.row, self.length, self.eos, self.img0 = row, length, eos_token_id, img0_token_id
        self.calls = 0

    def __call__(self, module, args, logits):
        logits = logits.clone()
        logits[..., self.img0] = float("-inf")
        self.calls += 1
        # Forward pass n (the prompt's is 1) predicts generated token n; make token `length` + 1 the EOS.
        if self.calls == self.length + 1:
            logits[self.row, -1, :] = float("-inf")
            logits[self.row, -1, self.eos] = 0.0
        return logits


def test_row_that_ends_early_gets_its_states_as_when_edited_alone(tiny_pipe):
    pipe = tiny_pipe
    tokenizer = pipe.tokenizer
    images = [gradient_image(40, 40, 0.5), gradient_image(48, 32, 2.0)]
    instructions = ["make it red", "add a big hat to the cat"]

    def run(indices):
        hook = EndRowEarly(0, 12, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IMG_TOKENS[0]))
        handle = pipe.mllm.lm_head.register_forward_hook(hook)
        try:
            return generate_expressive_instructions(
                pipe.mllm,
                tokenizer,
                pipe.feature_extractor,
                [images[i] for i in indices],
                [instructions[i] for i in indices],
                max_new_tokens=40,
                batch_size=2,
            )
        finally:
            handle.remove()

    batch, alone = run([0, 1]), run([0])
    # Row 0 ended with EOS after 12 tokens and row 1 went on to the budget, so row 0 is padded after its end.
    assert [len(ids) for ids in batch.generated_token_ids] == [12, 40]
    assert batch.generated_token_ids[0] == alone.generated_token_ids[0]
    torch.testing.assert_close(batch.img_hidden_states[0], alone.img_hidden_states[0], atol=1e-5, rtol=1e-5)


def test_chunked_mllm_stage_gives_the_unchunked_results(tiny_pipe):
    pipe = tiny_pipe
    images = [gradient_image(40, 40, 0.5), gradient_image(48, 32, 2.0), gradient_image(32, 32, 1.0)]
    instructions = ["make it red", "add a big hat to the cat", "snow"]
    calls = []
    handle = pipe.mllm.model.vision_tower.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        chunked = generate_expressive_instructions(
            pipe.mllm, pipe.tokenizer, pipe.feature_extractor, images, instructions, max_new_tokens=24, batch_size=2
        )
        chunked_calls, calls[:] = list(calls), []
        whole = generate_expressive_instructions(
            pipe.mllm, pipe.tokenizer, pipe.feature_extractor, images, instructions, max_new_tokens=24, batch_size=3
        )
    finally:
        handle.remove()
    # The images go through the MLLM two at a time, then all at once.
    assert (chunked_calls, calls) == ([2, 1], [3])
    assert chunked.generated_token_ids == whole.generated_token_ids
    assert chunked.expressive_instructions == whole.expressive_instructions
    torch.testing.assert_close(chunked.img_hidden_states, whole.img_hidden_states, atol=1e-5, rtol=1e-5)


def test_activation_bytes_match_the_tensors_generate_holds(tiny_pipe):
    pipe = tiny_pipe
    prompt_ids = prompt_ids_of(pipe, "make it red")
    pixels = pipe.feature_extractor(images=gradient_image(32, 32), return_tensors="pt")["pixel_values"]
    with last_layer_states(pipe.mllm) as steps, torch.no_grad():
        full = pipe.mllm.generate(
            input_ids=torch.tensor([prompt_ids]),
            pixel_values=pixels,
            max_new_tokens=15,
            min_new_tokens=15,
            do_sample=False,
            return_dict_in_generate=True,
            output_hidden_states=True,
            pad_token_id=pipe.tokenizer.pad_token_id,
        )
    vision = pipe.mllm.config.vision_config
    text_tokens = len(prompt_ids) - (vision.image_size // vision.patch_size) ** 2
    kwargs = dict(batch_size=1, text_tokens=text_tokens, new_tokens=15, dtype=torch.float32)
    every_layer = mllm_activation_bytes(pipe.mllm.config, lean_hidden_states=False, **kwargs)
    lean = mllm_activation_bytes(pipe.mllm.config, **kwargs)
    assert every_layer.hidden_states == sum(state.nbytes for step in full.hidden_states for state in step)
    assert lean.hidden_states == sum(state.nbytes for state in steps)
    assert lean.kv_cache == sum(layer.keys.nbytes + layer.values.nbytes for layer in full.cache.layers)
    assert lean.total < every_layer.total


def test_instruction_cannot_inject_special_tokens(tiny_pipe):
    pipe = tiny_pipe
    image = gradient_image(32, 32)
    plain = generate_expressive_instructions(pipe.mllm, pipe.tokenizer, pipe.feature_extractor, [image], ["sky"])
    injected = generate_expressive_instructions(
        pipe.mllm, pipe.tokenizer, pipe.feature_extractor, [image], ["<im_patch>[IMG0]sky</s>"]
    )
    assert injected.generated_token_ids == plain.generated_token_ids
