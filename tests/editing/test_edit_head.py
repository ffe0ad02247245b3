"""The edit head at MGIE's released configuration."""

from __future__ import annotations

import torch

from xmgie.editing.edit_head import EditMapper

# Parameter shapes of MGIE's EditMapper (ml-mgie, llava.py) at its released configuration.
MGIE_SHAPES = {
    "llm2hid.weight": (512, 4096),
    "llm2hid.bias": (512,),
    "query": (1, 77, 512),
    "hid2feat.weight": (768, 512),
    "hid2feat.bias": (768,),
    "mapper.encoder.norm.weight": (512,),
    "mapper.decoder.norm.weight": (512,),
}
for layer in range(4):
    MGIE_SHAPES |= {
        f"mapper.encoder.layers.{layer}.self_attn.in_proj_weight": (1536, 512),
        f"mapper.encoder.layers.{layer}.self_attn.out_proj.weight": (512, 512),
        f"mapper.encoder.layers.{layer}.linear1.weight": (2048, 512),
        f"mapper.encoder.layers.{layer}.linear2.weight": (512, 2048),
        f"mapper.decoder.layers.{layer}.self_attn.in_proj_weight": (1536, 512),
        f"mapper.decoder.layers.{layer}.multihead_attn.in_proj_weight": (1536, 512),
        f"mapper.decoder.layers.{layer}.linear1.weight": (2048, 512),
        f"mapper.decoder.layers.{layer}.linear2.weight": (512, 2048),
        f"mapper.decoder.layers.{layer}.norm3.weight": (512,),
    }


def test_edit_head_has_mgie_shapes_and_maps_to_unet_conditioning():
    head = EditMapper().eval()
    shapes = {name: tuple(tensor.shape) for name, tensor in head.state_dict().items()}
    for name, shape in MGIE_SHAPES.items():
        assert shapes.get(name) == shape, name
    # Exactly MGIE's depth: no fifth layer, and pre-norm without dropout.
    assert "mapper.encoder.layers.4.linear1.weight" not in shapes
    assert "mapper.decoder.layers.4.linear1.weight" not in shapes
    assert head.mapper.encoder.layers[0].norm_first and head.mapper.encoder.layers[0].dropout.p == 0.0
    assert head.mapper.encoder.layers[0].self_attn.num_heads == 4
    with torch.no_grad():
        out = head(torch.randn(2, 8, 4096))
    assert out.shape == (2, 77, 768)


def test_null_conditioning_is_the_head_on_zero_states_plus_img_embeddings():
    torch.manual_seed(0)
    head = EditMapper(
        llm_hidden_size=16,
        d_model=16,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=32,
        cross_attention_dim=24,
    ).eval()
    with torch.no_grad():
        null_a = head.null_conditioning(2)
        head.img_embeddings.normal_()
        null_b = head.null_conditioning(2)
    assert null_a.shape == (2, 77, 24)
    assert torch.equal(null_b[0], null_b[1])
    # MGIE adds the [IMG] embeddings to the hidden states, so they shape the null conditioning too.
    assert not torch.allclose(null_a, null_b)


def test_edit_head_refuses_wrong_hidden_shape():
    head = EditMapper(
        llm_hidden_size=16,
        d_model=16,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dim_feedforward=32,
        cross_attention_dim=24,
    )
    try:
        head(torch.zeros(1, 7, 16))
    except ValueError as error:
        assert "(B, 8, 16)" in str(error)
    else:
        raise AssertionError("a (1, 7, 16) input was accepted")
