"""The ``xmgie`` command, run as a user runs it: a separate process on the bundled examples."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from xmgie.editing.images import working_size

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def xmgie(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "xmgie.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"XMGIE_CACHE_DIR": str(cache_dir), "XMGIE_MODEL": "tiny", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_edit_writes_an_image_at_the_inputs_size(tmp_path, tiny_dir, model_cache):
    output = tmp_path / "out" / "cat.png"
    result = xmgie(
        "edit",
        str(EXAMPLES / "chelsea.png"),
        "--instruction",
        "make the cat wear a red hat",
        "--mask",
        str(EXAMPLES / "chelsea_mask.png"),
        "--steps",
        "2",
        "--max-side",
        "64",
        "--seed",
        "4",
        "--output",
        str(output),
        "--save-mask",
        str(tmp_path / "mask.png"),
        "--device",
        "cpu",
        cache_dir=model_cache,
    )
    assert result.returncode == 0, result.stderr
    assert Image.open(output).size == Image.open(EXAMPLES / "chelsea.png").size
    # The user's mask is what was used, and far outside it the photo is untouched.
    used = np.asarray(Image.open(tmp_path / "mask.png"))
    assert np.array_equal(used, np.asarray(Image.open(EXAMPLES / "chelsea_mask.png").convert("L")))
    # GB's σ is in working pixels: 3·σ_max = 15 of them, scaled to the input's size.
    width, height = Image.open(EXAMPLES / "chelsea.png").size
    working_width, working_height = working_size(width, height, max_side=64)
    far = ndimage.distance_transform_edt(used < 128) > 15 * math.sqrt(
        width * height / (working_width * working_height)
    )
    assert far.any()
    assert np.array_equal(np.asarray(Image.open(output))[far], np.asarray(Image.open(EXAMPLES / "chelsea.png"))[far])
    assert "expressive instruction:" in result.stdout
    assert "seed: 4" in result.stdout
    for stage in ("mllm", "edit_head", "diffusion", "vae_decode"):
        assert stage in result.stdout
    assert result.stderr == ""


def test_edit_without_a_mask_writes_the_automatic_mask_and_switches_work(tmp_path, model_cache):
    common = [
        "edit",
        str(EXAMPLES / "coffee.png"),
        "--instruction",
        "add steam above the cup",
        "--steps",
        "2",
        "--max-side",
        "64",
        "--seed",
        "3",
        "--device",
        "cpu",
    ]
    result = xmgie(
        *common,
        "--auto-mask-mode",
        "always",
        "--output",
        str(tmp_path / "a.png"),
        "--save-mask",
        str(tmp_path / "mask.png"),
        cache_dir=model_cache,
    )
    assert result.returncode == 0, result.stderr
    mask = Image.open(tmp_path / "mask.png")
    assert mask.size == Image.open(EXAMPLES / "coffee.png").size and mask.mode == "L"
    assert "(automatic)" in result.stdout and "identity score:" in result.stdout
    assert "edit scope: local" in result.stdout
    assert "preservation outside the mask: PSNR" in result.stdout

    # A level above any difference the edit makes: the estimate is empty, so the edit is global.
    result = xmgie(
        *common,
        "--auto-mask-mode",
        "auto",
        "--auto-mask-level",
        "10",
        "--output",
        str(tmp_path / "c.png"),
        cache_dir=model_cache,
    )
    assert result.returncode == 0, result.stderr
    assert "edit scope: global (100.0% of the image)" in result.stdout

    result = xmgie(
        *common,
        "--no-pfb",
        "--no-cam",
        "--no-ie",
        "--no-gb",
        "--no-auto-mask",
        "--output",
        str(tmp_path / "b.png"),
        "--save-mask",
        str(tmp_path / "none.png"),
        cache_dir=model_cache,
    )
    assert result.returncode == 0, result.stderr
    assert "no mask was used" in result.stdout and "identity score" not in result.stdout
    assert "edit scope: global (100.0% of the image)" in result.stdout
    assert not (tmp_path / "none.png").exists()
    assert Image.open(tmp_path / "a.png").tobytes() != Image.open(tmp_path / "b.png").tobytes()


def test_edit_reports_bad_input_with_its_code(tmp_path, model_cache):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not a picture")
    result = xmgie(
        "edit", str(not_an_image), "--instruction", "x", "--output", str(tmp_path / "o.png"), cache_dir=model_cache
    )
    assert result.returncode == 2
    assert "not_an_image" in result.stderr
    assert not (tmp_path / "o.png").exists()

    result = xmgie(
        "edit",
        str(EXAMPLES / "chelsea.png"),
        "--instruction",
        "  ",
        "--output",
        str(tmp_path / "o.png"),
        cache_dir=model_cache,
    )
    assert result.returncode == 2
    assert "empty_instruction" in result.stderr

    result = xmgie(
        "edit",
        str(EXAMPLES / "astronaut.png"),
        "--instruction",
        "x",
        "--mask",
        str(EXAMPLES / "chelsea_mask.png"),
        "--steps",
        "1",
        "--max-side",
        "64",
        "--output",
        str(tmp_path / "o.png"),
        cache_dir=model_cache,
    )
    assert result.returncode == 2
    assert "mask_aspect_mismatch" in result.stderr


def test_model_init_tiny_and_info(tmp_path, model_cache):
    target = tmp_path / "tiny-model"
    result = xmgie("model", "init-tiny", str(target), cache_dir=model_cache)
    assert result.returncode == 0, result.stderr
    result = xmgie("model", "info", str(target), cache_dir=model_cache)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(target)
    assert info["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert len(info["img_token_ids"]) == 8

    result = xmgie("model", "info", str(tmp_path / "missing"), cache_dir=model_cache)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
