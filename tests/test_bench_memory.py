"""The memory table of `benchmarks/bench_edit.py --real-shapes`: activation metering on the meta device and the
weights each offload mode holds (reduced shapes, so the test is fast; the figures are the script's)."""

from __future__ import annotations

import torch

from benchmarks.bench_edit import ActivationMeter, held_weights, memory_table, parse_args


def test_the_meter_counts_live_activations_and_attention_as_fused():
    weight = torch.empty(1000, device="meta")  # exists before: not an activation
    with torch.no_grad(), ActivationMeter() as meter:
        doubled = weight * 2  # 4000 bytes
        tripled = doubled * 3  # 4000 more, both alive
        del doubled, tripled
        kept = weight + 1  # 4000, after the others were freed
        query = torch.empty(1, 2, 256, 8, device="meta")
        torch.nn.functional.scaled_dot_product_attention(query, query, query)
    # The peak is the last moment: ``kept``, the query and the attention's output; no 256×256 score matrix.
    assert meter.peak == 4000 + 2 * (2 * 256 * 8 * 4)
    assert kept.shape == weight.shape
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"


def test_memory_table_holds_per_offload_mode_and_counts_the_lean_hidden_states():
    args = parse_args(
        ["--real-shapes", "--llm-layers", "1", "--vision-layers", "1", "--unet-scale", "small", "--size", "128"]
    )
    assert args.device.type == "meta" or torch.cuda.is_available()
    table = memory_table(args, large_side=1536)
    weights = table["weights"]
    assert set(weights) == {"mllm", "edit_head", "unet", "vae", "image_encoder", "identity_adapter"}
    assert table["held"]["none"]["diffusion"] == sum(weights.values())
    assert table["held"]["model"]["diffusion"] == weights["unet"] + weights["identity_adapter"]
    assert table["held"]["mllm"]["diffusion"] == sum(weights.values()) - weights["mllm"]
    assert table["held"]["mllm"]["mllm"] == held_weights("mllm", "none", weights)
    assert table["peaks"]["model"] < table["peaks"]["mllm"] <= table["peaks"]["none"]
    assert 0 < table["activations"]["mllm"] < table["mllm_every_layer_states"]
    assert all(table["activations"][stage] > 0 for stage in ("vae_encode", "diffusion", "vae_decode"))
    decode = table["vae_decode_large"]
    assert decode["sliced_tiled"] < decode["whole_group"] / 4
