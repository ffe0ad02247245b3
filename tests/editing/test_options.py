"""EditOptions: every per-item knob validated, unknown keys refused."""

from __future__ import annotations

import pytest

from xmgie.editing.errors import EditInputError
from xmgie.editing.options import EditOptions


def test_guidance_defaults_to_the_models_and_the_working_side_to_512():
    options = EditOptions()
    # None: the pipeline takes the model's guidance (InstructPix2Pix's 7.5/1.5 when the model sets none).
    assert (options.guidance_scale, options.image_guidance_scale, options.max_side) == (None, None, 512)
    assert EditOptions.from_dict({"guidance_scale": None}).guidance_scale is None
    # The automatic mask's mode is the model's too; switching it off has one spelling either way.
    assert (options.auto_mask.enabled, options.auto_mask.mode) == (True, None)
    assert EditOptions.from_dict({"auto_mask": False}).auto_mask.mode == "off"


def test_round_trip_through_json_form():
    options = EditOptions(num_inference_steps=12, seed=5, guidance_scale=5.0, max_side=256)
    assert EditOptions.from_dict(options.to_dict()) == options


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_inference_steps", 0),
        ("num_inference_steps", 2.5),
        ("guidance_scale", -1),
        ("guidance_scale", "7.5"),
        ("image_guidance_scale", True),
        ("seed", -3),
        ("max_side", 500),
        ("max_new_tokens", 4),
        ("detail", "no"),
    ],
)
def test_invalid_values_name_the_option(field, value):
    with pytest.raises(EditInputError) as error:
        EditOptions.from_dict({field: value})
    assert error.value.code == "invalid_option"
    assert field in error.value.message


@pytest.mark.parametrize(
    "auto_mask, name",
    [
        ({"mode": "sometimes"}, "auto_mask.mode"),
        ({"chunk": 0}, "auto_mask.chunk"),
        ({"ratio": 0}, "auto_mask.ratio"),
        ({"global_fraction": 1.5}, "auto_mask.global_fraction"),
        ({"min_spread": -1}, "auto_mask.min_spread"),
        ({"level": -0.1}, "auto_mask.level"),
        ({"smoothing": 20}, "auto_mask.smoothing"),
        ({"strength": 0}, "auto_mask.strength"),
    ],
)
def test_invalid_auto_mask_options_name_the_option(auto_mask, name):
    with pytest.raises(EditInputError) as error:
        EditOptions.from_dict({"auto_mask": auto_mask})
    assert error.value.code == "invalid_option" and name in error.value.message


def test_auto_mask_off_has_one_spelling():
    off = EditOptions.from_dict({"auto_mask": {"mode": "off"}})
    assert off.auto_mask == EditOptions(auto_mask=False).auto_mask
    assert off.auto_mask.enabled is False and EditOptions(auto_mask=False).auto_mask.mode == "off"
    assert EditOptions().auto_mask.mode is None  # the model's
    assert EditOptions.from_dict(off.to_dict()) == off


def test_unknown_option_is_refused_not_ignored():
    with pytest.raises(EditInputError, match="guidence_scale"):
        EditOptions.from_dict({"guidence_scale": 3.0})


def test_batch_key_separates_incompatible_items():
    assert EditOptions(seed=1).batch_key() == EditOptions(seed=2).batch_key()
    assert EditOptions(num_inference_steps=10).batch_key() != EditOptions(num_inference_steps=20).batch_key()
    assert EditOptions(detail=False).batch_key() != EditOptions().batch_key()


def test_pfb_levels_name_resolutions_and_exclude_blocks():
    assert EditOptions().pfb.levels == ("1/4", "1/8", "mid")
    assert EditOptions.from_dict({"pfb": {"levels": [0.25, "1/8", "1/8"]}}).pfb.levels == ("1/4", "1/8")
    legacy = EditOptions.from_dict({"pfb": {"blocks": ["mid_block", "up_blocks.1"]}}).pfb
    assert (legacy.blocks, legacy.levels) == (("mid_block", "up_blocks.1"), ())
    assert EditOptions.from_dict(EditOptions(pfb=legacy).to_dict()).pfb == legacy
    for bad in ({"levels": ["1/3"]}, {"levels": "1/4"}, {"levels": ["1/4"], "blocks": ["mid_block"]}):
        with pytest.raises(EditInputError, match="pfb.levels") as error:
            EditOptions.from_dict({"pfb": bad})
        assert error.value.code == "invalid_option"
