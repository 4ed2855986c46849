"""Job validation: bounds, choices, unknown fields, scheduler aliases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handler.errors import InvalidInput
from handler.schedulers import SCHEDULER_NAMES, canonical_scheduler
from handler.schema import MAX_SEED, parse_job


def error_of(payload) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_job(payload)
    return info.value


@given(st.integers(min_value=8, max_value=256).map(lambda n: n * 8))
def test_sizes_in_range_and_multiple_of_8_are_accepted(side):
    job = parse_job({"prompt": "x", "width": side, "height": side})
    assert job.width == side


@given(st.integers(min_value=-10_000, max_value=10_000))
def test_sizes_outside_the_rules_name_the_field(side):
    if 64 <= side <= 2048 and side % 8 == 0:
        return
    error = error_of({"prompt": "x", "width": side})
    assert (
        error.field == "width"
        and "64 to 2048" in error.accepted
        and "multiple of 8" in error.accepted
    )


@pytest.mark.parametrize(
    ("field", "bad", "accepted"),
    [
        ("steps", 0, "1 to 150"),
        ("steps", 151, "1 to 150"),
        ("guidance_scale", 31, "0.0 to 30.0"),
        ("num_images", 9, "1 to 8"),
        ("num_images", 0, "1 to 8"),
        ("seed", -5, f"0 to {MAX_SEED}"),
        ("seed", MAX_SEED + 1, f"0 to {MAX_SEED}"),
        ("output_quality", 101, "1 to 100"),
    ],
)
def test_out_of_range_values_say_what_is_accepted(field, bad, accepted):
    error = error_of({"prompt": "x", field: bad})
    assert error.code == "invalid_input" and error.field == field and error.accepted == accepted
    assert str(error).startswith(f"invalid_input: {field}: ")


def test_prompt_is_required():
    assert error_of({"steps": 3}).field == "prompt"


def test_input_must_be_an_object():
    error = error_of("test")
    assert error.field == "input" and "object" in error.message


def test_unknown_fields_are_named_not_dropped():
    error = error_of({"prompt": "x", "stepz": 3})
    assert error.field == "stepz" and "stepz" in error.message


def test_output_format_choices():
    assert "png" in error_of({"prompt": "x", "output_format": "gif"}).accepted


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("Euler a", "Euler a"),
        ("euler_a", "Euler a"),
        ("K_EULER_ANCESTRAL", "Euler a"),
        ("K_EULER", "Euler"),
        ("DPMSolverMultistep", "DPM++ 2M"),
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("DPM++ SDE Karras", "DPM++ SDE Karras"),
        ("DDIMScheduler", "DDIM"),
        ("PNDM", "PNDM"),
        ("unipc", "UniPC"),
        ("lcm", "LCM"),
    ],
)
def test_scheduler_aliases(alias, name):
    assert canonical_scheduler(alias) == name
    assert parse_job({"prompt": "x", "scheduler": alias}).scheduler == name


def test_unknown_scheduler_lists_the_names():
    error = error_of({"prompt": "x", "scheduler": "magic"})
    assert error.field == "scheduler" and all(name in error.accepted for name in SCHEDULER_NAMES)


def test_seed_zero_and_max_are_valid():
    assert parse_job({"prompt": "x", "seed": 0}).seed == 0
    assert parse_job({"prompt": "x", "seed": MAX_SEED}).seed == MAX_SEED
