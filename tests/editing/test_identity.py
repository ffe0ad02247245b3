"""Identity embeddings: the IP-Adapter parts, their conversion from the release, encoding and scoring."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from tests.conftest import gradient_image, synthetic_release
from xmgie.editing.identity import (
    IdentityAdapter,
    build_tiny_identity_components,
    encode_identity,
    identity_score,
)
from xmgie.loading.convert_ip_adapter import convert_ip_adapter_state_dict, load_ip_adapter


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    """The tiny preset's UNet layout (SD 1.5's blocks at toy width)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=24,
        attention_head_dim=8,
        norm_num_groups=8,
    )


@pytest.fixture(scope="module")
def components(unet):
    return build_tiny_identity_components(unet, seed=0)


def attn2_names(unet) -> list[str]:
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


def test_adapter_has_one_projection_pair_per_cross_attention_layer(unet):
    adapter = IdentityAdapter.from_unet(unet, image_embed_dim=20, num_tokens=3)
    names = attn2_names(unet)
    assert list(adapter.config.layer_names) == names
    assert len(adapter.layers) == len(names) == 10
    for index, name in enumerate(names):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        layer = adapter.layers[adapter.layer_index(name)]
        assert adapter.layer_index(name) == index
        assert adapter.layer_index(name.removesuffix(".processor")) == index
        for projection in (layer.to_k_ip, layer.to_v_ip):
            assert (projection.in_features, projection.out_features) == (24, attn.to_k.out_features)
            assert projection.bias is None
    # The tiny layout has 16- and 32-wide levels, so the per-layer sizes really differ.
    assert set(adapter.config.layer_hidden_sizes) == {16, 32}
    tokens = adapter.tokens(torch.randn(2, 20))
    assert tokens.shape == (2, 3, 24)
    keys, values = adapter.key_value(names[0], tokens)
    assert keys.shape == values.shape == (2, 3, adapter.config.layer_hidden_sizes[0])
    with pytest.raises(KeyError):
        adapter.layer_index("down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor")
    with pytest.raises(ValueError, match="shape"):
        adapter.tokens(torch.randn(2, 21))
    adapter.check_unet(unet)


def test_adapter_refuses_a_unet_with_other_cross_attention_layers(unet):
    adapter = IdentityAdapter.from_unet(unet, image_embed_dim=20)
    other = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    with pytest.raises(ValueError, match="missing from the UNet"):
        adapter.check_unet(other)


def test_release_converts_onto_the_matching_layers(unet, tmp_path):
    release = synthetic_release(unet)
    # IP-Adapter numbers cross-attention layers among all processors: attn2 layers are the odd ones.
    assert sorted({int(key.split(".")[0]) for key in release["ip_adapter"]}) == list(range(1, 20, 2))
    path = tmp_path / "ip-adapter_sd15.bin"
    torch.save(release, path)
    adapter = load_ip_adapter(path, unet, image_embed_dim=20)
    assert adapter.config.num_tokens == 4 and adapter.config.image_embed_dim == 20
    for key, tensor in release["image_proj"].items():
        assert torch.equal(adapter.state_dict()[f"image_proj.{key}"], tensor), key
    all_names = list(unet.attn_processors)
    for key, tensor in release["ip_adapter"].items():
        index, projection = key.split(".")[:2]
        layer = adapter.layers[adapter.layer_index(all_names[int(index)])]
        assert torch.equal(getattr(layer, projection).weight, tensor), key
    with pytest.raises(ValueError, match="expects image embeddings of 20"):
        load_ip_adapter(path, unet, image_embed_dim=1024)


def test_a_missing_layer_is_named(unet):
    release = synthetic_release(unet)
    del release["ip_adapter"]["7.to_v_ip.weight"]
    release["ip_adapter"]["8.to_k_ip.weight"] = release["ip_adapter"]["7.to_k_ip.weight"]
    with pytest.raises(ValueError) as excinfo:
        convert_ip_adapter_state_dict(release, unet)
    message = str(excinfo.value)
    assert "ip_adapter.7.to_v_ip.weight" in message
    assert list(unet.attn_processors)[7] in message
    assert "unexpected ['ip_adapter.8.to_k_ip.weight']" in message


def test_a_wrong_shape_is_refused(unet):
    release = synthetic_release(unet)
    release["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(32, 24)
    with pytest.raises(ValueError, match=r"layers\.0\.to_k_ip\.weight: \(32, 24\), expected \(16, 24\)"):
        convert_ip_adapter_state_dict(release, unet)


def test_flat_safetensors_release_loads(unet, tmp_path):
    release = synthetic_release(unet, num_tokens=2)
    flat = {f"{part}.{key}": tensor for part, tensors in release.items() for key, tensor in tensors.items()}
    path = tmp_path / "ip-adapter_sd15.safetensors"
    save_file(flat, path)
    adapter = load_ip_adapter(path, unet)
    assert adapter.config.num_tokens == 2
    from_bin = convert_ip_adapter_state_dict(release, unet)
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(tensor, from_bin[key]), key


def test_identity_score_and_region_encoding(components):
    image_encoder, feature_extractor, _ = components
    source, other = gradient_image(48, 40), gradient_image(48, 40, phase=2.0)
    same, different = identity_score(image_encoder, feature_extractor, [source, source], [source, other])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert different < 1.0 - 1e-4

    region = Image.new("L", source.size, 0)
    region.paste(255, (0, 0, 24, 40))
    plain = encode_identity(image_encoder, feature_extractor, [source, source])
    masked = encode_identity(image_encoder, feature_extractor, [source, source], [region, None])
    assert plain.shape == (2, image_encoder.config.projection_dim) and plain.dtype == torch.float32
    assert not torch.allclose(plain[0], masked[0])
    assert torch.allclose(plain[1], masked[1])


def test_tiny_components_are_seeded_and_nonzero(unet, components):
    image_encoder, _, adapter = components
    _, _, again = build_tiny_identity_components(unet, seed=0)
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), key
    assert adapter.config.image_embed_dim == image_encoder.config.projection_dim
    assert all(
        layer.to_k_ip.weight.abs().sum() > 0 and layer.to_v_ip.weight.abs().sum() > 0 for layer in adapter.layers
    )
    adapter.check_unet(unet)


def test_save_and_load_round_trip(components, tmp_path):
    _, _, adapter = components
    adapter.save_pretrained(tmp_path / "identity", safe_serialization=True)
    assert (tmp_path / "identity" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = IdentityAdapter.from_pretrained(tmp_path / "identity")
    fields = ("image_embed_dim", "cross_attention_dim", "num_tokens", "layer_hidden_sizes", "layer_names")
    assert {key: loaded.config[key] for key in fields} == {key: adapter.config[key] for key in fields}
    assert loaded.layer_index(adapter.config.layer_names[-1]) == len(adapter.layers) - 1
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
