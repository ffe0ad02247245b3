"""Editing metrics: pixel distances and preservation by hand computation, encoders with tiny random weights."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import pre_tokenizers

from tests.conftest import gradient_image
from xmgie.eval_arguments import add_eval_arguments
from xmgie.metrics import (
    ClipEncoder,
    DinoEncoder,
    clip_i,
    clip_t,
    dino,
    evaluate_folder,
    identity_score,
    l1_distance,
    l2_distance,
    load_captions,
    preservation,
    run_eval,
)

SIZE = 32


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP directory with random weights, a byte-level CLIP tokenizer without merges and a Pil processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("clip")
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [char + "</w>" for char in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file = directory / "vocab.json"
    merges_file = directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    merges_file.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file))
    vocab_file.unlink()
    merges_file.unlink()

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokens),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
            "bos_token_id": len(tokens) - 2,
            "eos_token_id": len(tokens) - 1,
            "pad_token_id": len(tokens) - 1,
        },
        vision_config={
            "image_size": SIZE,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        directory
    )
    return directory


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViT directory with random weights and ``ViTImageProcessorPil``."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    directory = tmp_path_factory.mktemp("dino")
    torch.manual_seed(1)
    config = ViTConfig(
        image_size=SIZE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_encoder(clip_dir: Path) -> ClipEncoder:
    return ClipEncoder.from_pretrained(clip_dir)


@pytest.fixture(scope="module")
def dino_encoder(dino_dir: Path) -> DinoEncoder:
    return DinoEncoder.from_pretrained(dino_dir)


def solid(value: int, size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def test_l1_l2_of_black_and_white_are_one() -> None:
    assert l1_distance(solid(0), solid(255)) == pytest.approx(1.0)
    assert l2_distance(solid(0), solid(255)) == pytest.approx(1.0)
    assert l1_distance(solid(17), solid(17)) == 0.0


def test_l1_l2_of_half_changed_image() -> None:
    pixels = np.zeros((6, 8, 3), dtype=np.uint8)
    pixels[:, 4:] = 255
    assert l1_distance(Image.fromarray(pixels), solid(0)) == pytest.approx(0.5)
    assert l2_distance(Image.fromarray(pixels), solid(0)) == pytest.approx(0.5)
    # A grey of 51 differs by 0.2 everywhere: L2 is the mean square 0.04, not its root.
    assert l1_distance(solid(51), solid(0)) == pytest.approx(0.2)
    assert l2_distance(solid(51), solid(0)) == pytest.approx(0.04)


def test_l1_resizes_output_to_target_size(tmp_path: Path) -> None:
    # A uniform image stays uniform under bicubic resizing, so the figure is exact at any size.
    assert l1_distance(solid(255, (16, 12)), solid(0, (8, 6))) == pytest.approx(1.0)
    path = tmp_path / "grey.png"
    solid(102, (20, 15)).save(path)
    assert l1_distance(path, solid(0, (8, 6))) == pytest.approx(0.4)


def test_preservation_ignores_changes_inside_mask() -> None:
    source = np.full((6, 8, 3), 100, dtype=np.uint8)
    output = source.copy()
    output[:3, :] = 200
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[:3, :] = 255
    kept = preservation(Image.fromarray(source), Image.fromarray(output), Image.fromarray(mask, "L"))
    assert kept == {"psnr": math.inf, "l1": 0.0}


def test_preservation_of_one_changed_outside_pixel() -> None:
    source = np.full((6, 8, 3), 100, dtype=np.uint8)
    output = source.copy()
    output[:3, :] = 0
    output[5, 7] = (151, 100, 100)
    mask = np.zeros((6, 8), dtype=np.float32)
    mask[:3, :] = 1.0
    kept = preservation(Image.fromarray(source), Image.fromarray(output), mask)
    # 24 outside pixels x 3 channels; one channel differs by 51/255 = 0.2.
    mse = 0.2**2 / 72
    assert kept["l1"] == pytest.approx(0.2 / 72)
    assert kept["psnr"] == pytest.approx(10 * math.log10(1 / mse))
    assert math.isfinite(kept["psnr"])


def test_preservation_threshold_and_full_mask() -> None:
    source = solid(0)
    output = solid(255)
    below = np.full((6, 8), 0.49)
    assert preservation(source, output, below)["l1"] == pytest.approx(1.0)
    full = preservation(source, output, np.full((6, 8), 0.5))
    assert math.isnan(full["psnr"]) and math.isnan(full["l1"])
    with pytest.raises(ValueError, match="shape"):
        preservation(source, output, np.zeros((3, 3)))


def test_identity_score() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    assert identity_score(a, a * 4) == pytest.approx(1.0)
    assert identity_score(a, -a) == pytest.approx(-1.0)
    assert identity_score(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        identity_score(a, torch.ones(4))


def test_clip_embeddings_are_normalised(clip_encoder: ClipEncoder) -> None:
    images = clip_encoder.image_embeddings([gradient_image(), gradient_image(40, 24, 1.0)])
    texts = clip_encoder.text_embeddings(["a red cat", "two dogs on a sofa in the snow"])
    assert images.shape == (2, 16) and texts.shape == (2, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clip_i_and_dino_of_identical_and_different_images(
    clip_encoder: ClipEncoder, dino_encoder: DinoEncoder
) -> None:
    image = gradient_image()
    other = Image.fromarray(255 - np.asarray(gradient_image(phase=2.0)))
    assert clip_i(image, image.copy(), clip_encoder) == pytest.approx(1.0, abs=1e-5)
    assert dino(image, image.copy(), dino_encoder) == pytest.approx(1.0, abs=1e-5)
    assert clip_i(image, other, clip_encoder) < 1.0 - 1e-4
    assert dino(image, other, dino_encoder) < 1.0 - 1e-4


def test_clip_t_is_a_cosine_that_depends_on_the_caption(clip_encoder: ClipEncoder) -> None:
    image = gradient_image()
    first = clip_t(image, "a red cat", clip_encoder)
    second = clip_t(image, "two dogs on a sofa in the snow", clip_encoder)
    assert -1.0 <= first <= 1.0 and -1.0 <= second <= 1.0
    assert abs(first - second) > 1e-4


def test_load_captions_formats(tmp_path: Path) -> None:
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text('{"id": "0001", "caption": "a cat"}\n\n{"id": "0002", "caption": "a dog"}\n')
    assert load_captions(jsonl) == {"0001": "a cat", "0002": "a dog"}
    mapping = tmp_path / "captions.json"
    mapping.write_text(json.dumps({"0001": "a cat"}))
    assert load_captions(mapping) == {"0001": "a cat"}
    duplicate = tmp_path / "duplicate.jsonl"
    duplicate.write_text('{"id": "1", "caption": "a"}\n{"id": "1", "caption": "b"}\n')
    with pytest.raises(ValueError, match="two captions"):
        load_captions(duplicate)


def write_items(root: Path) -> dict[str, Path]:
    """Three items: 0001 and 0002 complete, 0003 without a target; masks keep the lower half."""
    folders = {name: root / name for name in ("sources", "outputs", "targets", "masks")}
    for folder in folders.values():
        folder.mkdir()
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[: SIZE // 2] = 255
    for index, stem in enumerate(("0001", "0002", "0003")):
        source = gradient_image(SIZE, SIZE, phase=float(index))
        output = np.asarray(source).copy()
        output[: SIZE // 2] = 255 - output[: SIZE // 2]
        output[-1, -1] = 0 if index == 1 else output[-1, -1]
        source.save(folders["sources"] / f"{stem}.png")
        Image.fromarray(output).save(folders["outputs"] / f"{stem}.png")
        Image.fromarray(mask, "L").save(folders["masks"] / f"{stem}.png")
        if stem != "0003":
            gradient_image(SIZE, SIZE, phase=index + 0.5).save(folders["targets"] / f"{stem}.jpg")
    captions = root / "captions.jsonl"
    captions.write_text(
        "\n".join(json.dumps({"id": stem, "caption": f"picture number {stem}"}) for stem in ("0001", "0002", "0003"))
    )
    return {**folders, "captions": captions}


def test_evaluate_folder_means_and_missing(tmp_path: Path, clip_encoder: ClipEncoder, dino_encoder: DinoEncoder):
    paths = write_items(tmp_path)
    result = evaluate_folder(**paths, clip=clip_encoder, dino=dino_encoder)
    items = result["items"]
    assert sorted(items) == ["0001", "0002", "0003"]
    assert result["missing"] == [{"id": "0003", "missing": ["target"]}]
    assert set(items["0001"]) == {
        "l1",
        "l2",
        "clip_i",
        "dino",
        "clip_t",
        "preservation_psnr",
        "preservation_l1",
        "source_similarity",
    }
    assert set(items["0003"]) == {"clip_t", "preservation_psnr", "preservation_l1", "source_similarity"}
    assert items["0001"]["l1"] == pytest.approx(
        l1_distance(paths["outputs"] / "0001.png", paths["targets"] / "0001.jpg")
    )
    assert items["0002"]["dino"] == pytest.approx(
        dino(paths["outputs"] / "0002.png", paths["targets"] / "0002.jpg", dino_encoder), abs=1e-6
    )
    assert items["0001"]["preservation_psnr"] == math.inf
    assert math.isfinite(items["0002"]["preservation_psnr"])
    for name, mean in result["means"].items():
        values = [figures[name] for figures in items.values() if name in figures]
        assert result["counts"][name] == len(values)
        assert mean == pytest.approx(sum(values) / len(values))
    assert result["counts"]["l1"] == 2 and result["counts"]["clip_t"] == 3
    assert result["means"]["l1"] == pytest.approx((items["0001"]["l1"] + items["0002"]["l1"]) / 2)


def test_evaluate_folder_without_optional_inputs(tmp_path: Path) -> None:
    paths = write_items(tmp_path)
    (paths["outputs"] / "0002.png").unlink()
    result = evaluate_folder(sources=paths["sources"], outputs=paths["outputs"])
    assert result["means"] == {}
    assert result["items"] == {"0001": {}, "0003": {}}
    assert result["missing"] == [{"id": "0002", "missing": ["output"]}]


def test_run_eval_writes_json(tmp_path: Path, clip_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_items(tmp_path)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "report" / "metrics.json"
    args = parser.parse_args(
        [
            "--sources",
            str(paths["sources"]),
            "--outputs",
            str(paths["outputs"]),
            "--targets",
            str(paths["targets"]),
            "--masks",
            str(paths["masks"]),
            "--clip",
            str(clip_dir),
            "--json",
            str(out),
        ]
    )
    assert args.device == "cpu"
    assert run_eval(args) == 0
    report = json.loads(out.read_text())
    assert sorted(report["items"]) == ["0001", "0002", "0003"]
    assert report["missing"] == [{"id": "0003", "missing": ["target"]}]
    assert report["items"]["0001"]["preservation_psnr"] == "inf"
    assert report["means"]["l1"] == pytest.approx((report["items"]["0001"]["l1"] + report["items"]["0002"]["l1"]) / 2)
    printed = capsys.readouterr().out
    assert "clip_i" in printed and "missing: 0003 (target)" in printed
