"""img2img and inpainting through the engine, and one inpainting job through the RunPod API."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from handler.errors import InvalidInput
from handler.schema import parse_job

INIT = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
HALF = np.zeros((64, 64), dtype="uint8")
HALF[:, 32:] = 255  # white right half: repaint it, keep the left


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pixels(result) -> np.ndarray:
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def inpaint_job(checkpoint: str, **extra) -> dict:
    return {
        "prompt": "a cube",
        "image": data_uri(INIT),
        "mask": data_uri(Image.fromarray(HALF)),
        "mask_blur": 0,
        "steps": 4,
        "seed": 3,
        "checkpoint": checkpoint,
        "strength": 1.0 if "inpaint" in checkpoint else 0.75,
        **extra,
    }


@pytest.mark.parametrize(
    "checkpoint", ["demo-sd15", "demo-sdxl", "demo-sd15-inpaint", "demo-sdxl-inpaint"]
)
def test_inpainting_keeps_pixels_outside_the_mask(engine, checkpoint):
    result = engine.run(parse_job(inpaint_job(checkpoint)))
    out, init = pixels(result), np.asarray(INIT, dtype=np.int16)
    assert (out[:, :32] == init[:, :32]).all()
    assert np.abs(out[:, 32:] - init[:, 32:]).mean() > 1
    again = engine.run(parse_job(inpaint_job(checkpoint)))
    assert (pixels(again) == out).all()


def test_a_blurred_mask_pastes_the_input_back_as_a1111_does(engine):
    from handler.engine import _overlay_mask

    paste = np.asarray(
        _overlay_mask(Image.fromarray(np.array([[0, 1, 100, 127, 128, 255]], "uint8")))
    )
    assert paste.tolist() == [[0, 2, 200, 254, 255, 255]]  # full repaint from half the blur up
    result = engine.run(parse_job(inpaint_job("demo-sd15", mask_blur=2)))
    out, init = pixels(result), np.asarray(INIT, dtype=np.int16)
    assert (out[:, :26] == init[:, :26]).all()  # beyond three blur radii: exactly the input
    assert (out[:, 26:32] != init[:, 26:32]).any()  # the blur's outer half blends


def test_a_larger_mask_is_scaled_down_by_area_a_smaller_one_keeps_sharp_edges():
    """Nearest-pixel scaling kept every other column of a mask drawn at twice the size: thin
    strokes on the even columns vanished, on the odd ones filled their whole area."""
    from handler.engine import Engine

    job = parse_job({"prompt": "x", "mask_blur": 0})
    for first in (0, 1):
        drawn = np.zeros((128, 128), "uint8")
        drawn[:, 64 + first :: 2] = 255  # 1-pixel strokes over the right half
        mask = np.asarray(Engine._mask_for(job, Image.fromarray(drawn), 64, 64))
        assert (mask[:, :32] == 0).all() and (abs(mask[:, 32:].astype(int) - 128) <= 1).all()
    small = Image.fromarray(HALF).resize((32, 32), Image.NEAREST)
    assert set(np.unique(np.asarray(Engine._mask_for(job, small, 64, 64)))) == {0, 255}


def test_inverted_mask_keeps_the_other_half(engine):
    result = engine.run(parse_job(inpaint_job("demo-sd15", invert_mask=True)))
    out, init = pixels(result), np.asarray(INIT, dtype=np.int16)
    assert (out[:, 32:] == init[:, 32:]).all() and np.abs(out[:, :32] - init[:, :32]).mean() > 1
    assert not result.warnings


def test_a_mask_that_repaints_nothing_says_so(engine):
    black = data_uri(Image.new("L", (64, 64), 0))
    result = engine.run(parse_job(inpaint_job("demo-sd15", mask=black)))
    assert (pixels(result) == np.asarray(INIT, dtype=np.int16)).all()
    assert any("nothing is repainted" in warning for warning in result.warnings)


def test_a1111_inpainting_names(engine):
    job = parse_job(
        {
            "prompt": "x",
            "init_images": [data_uri(INIT)],
            "mask": data_uri(Image.fromarray(HALF)),
            "mask_blur": 0,
            "inpainting_mask_invert": 1,
            "denoising_strength": 0.6,
            "inpainting_fill": 1,
            "inpaint_full_res": False,
        }
    )
    assert job.invert_mask is True and job.strength == 0.6 and job.image and job.mask


def test_mask_without_image_and_inpaint_model_without_mask_are_refused(engine):
    with pytest.raises(InvalidInput) as info:
        engine.run(
            parse_job(
                {"prompt": "x", "mask": data_uri(Image.fromarray(HALF)), "checkpoint": "demo-sd15"}
            )
        )
    assert info.value.field == "mask"
    with pytest.raises(InvalidInput) as info:
        engine.run(
            parse_job({"prompt": "x", "image": data_uri(INIT), "checkpoint": "demo-sd15-inpaint"})
        )
    assert info.value.field == "checkpoint"


def test_img2img_is_deterministic_and_follows_strength(engine):
    job = {"prompt": "x", "image": data_uri(INIT), "steps": 4, "seed": 8, "checkpoint": "demo-sd15"}
    weak, weak_again = (
        engine.run(parse_job({**job, "strength": 0.25})),
        engine.run(parse_job({**job, "strength": 0.25})),
    )
    strong = engine.run(parse_job({**job, "strength": 1.0}))
    init = np.asarray(INIT, dtype=np.int16)
    assert (pixels(weak) == pixels(weak_again)).all()
    assert np.abs(pixels(weak) - init).mean() < np.abs(pixels(strong) - init).mean()


def test_img2img_with_too_little_strength_names_the_field(engine):
    with pytest.raises(InvalidInput) as info:
        engine.run(
            parse_job(
                {
                    "prompt": "x",
                    "image": data_uri(INIT),
                    "steps": 2,
                    "strength": 0.2,
                    "checkpoint": "demo-sd15",
                }
            )
        )
    assert info.value.field == "strength"


# -- resize modes ------------------------------------------------------------------------------

from handler.inputs import fit_image  # noqa: E402


def test_resize_modes_follow_a1111():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 100))  # a blue left edge
    stretched = fit_image(wide, 64, 64, "just_resize")
    cropped = fit_image(wide, 64, 64, "crop")
    filled = fit_image(wide, 64, 64, "fill")
    assert stretched.size == cropped.size == filled.size == (64, 64)
    assert cropped.getpixel((0, 32))[0] > 200  # the blue edge was cropped away
    assert stretched.getpixel((0, 32))[2] > 200  # stretching keeps it
    assert filled.getpixel((32, 2)) == filled.getpixel(
        (32, 20)
    )  # top border stretched from the edge row


def test_resize_mode_reaches_the_job(engine):
    job = {
        "prompt": "x",
        "image": data_uri(INIT.resize((128, 64))),
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 1,
        "checkpoint": "demo-sd15",
    }
    crop = engine.run(parse_job({**job, "resize_mode": "crop"}))
    stretch = engine.run(parse_job({**job, "resize_mode": 0}))  # A1111's number works too
    assert np.abs(pixels(crop) - pixels(stretch)).max() > 0


@pytest.mark.parametrize(
    ("size", "default"),
    [
        ((100, 90), (96, 88)),  # rounded down to multiples of 8
        ((4032, 3024), (2048, 1536)),  # a phone photo keeps 4:3 (was stretched to 2048x2048)
        ((3000, 1000), (2048, 680)),
        ((30, 500), (64, 1064)),  # a thin strip grows to 64 wide, keeping its shape
    ],
)
def test_an_input_images_size_is_the_default_with_its_aspect_ratio(size, default):
    from handler.engine import _size_of_input

    assert _size_of_input(size, 2048 * 2048) == default
    width, height = _size_of_input(size, 1024 * 1024)  # MAX_IMAGE_PIXELS bounds it too
    assert width * height <= 1024 * 1024 or min(width, height) == 64


def test_the_default_size_from_an_input_image_reaches_the_job(engine):
    job = {"prompt": "x", "image": data_uri(INIT.resize((100, 90))), "steps": 2, "seed": 1}
    result = engine.run(parse_job({**job, "checkpoint": "demo-sd15"}))
    assert (result.width, result.height) == (96, 88)


# -- hires fix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["latent", "image"])
@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_hires_fix_doubles_the_size_deterministically(engine, checkpoint, upscaler):
    job = {
        "prompt": "x",
        "width": 72,
        "height": 64,
        "steps": 3,
        "seed": 4,
        "checkpoint": checkpoint,
        "hires": {"scale": 2, "strength": 0.5, "upscaler": upscaler},
    }
    first, again = engine.run(parse_job(job)), engine.run(parse_job(job))
    assert (first.width, first.height) == (144, 128) and first.images[0].width == 144
    assert (pixels(first) == pixels(again)).all()


def unet_calls_by_width(engine, job: dict) -> dict[int, int]:
    """How many UNet calls a job made at each latent width (CFG runs as one batched call)."""
    calls: dict[int, int] = {}

    def count(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        calls[sample.shape[-1]] = calls.get(sample.shape[-1], 0) + 1

    unet = engine.checkpoint(job["checkpoint"])[0].pipeline.unet
    hook = unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        engine.run(parse_job(job))
    finally:
        hook.remove()
    return calls


@pytest.mark.parametrize(
    ("hires", "runs"),
    [
        ({"steps": 6, "strength": 0.7}, 6),  # diffusers' img2img would run int(6 x 0.7) = 4
        ({"steps": 20, "strength": 0.3}, 20),
        ({"strength": 0.05}, 3),  # the job's 3 steps: no longer "leaves no hires step"
        ({"steps": 4, "strength": 1.0}, 4),
    ],
)
def test_the_hires_pass_runs_all_its_steps_as_a1111_does(engine, hires, runs):
    job = {"prompt": "x", "width": 64, "height": 64, "steps": 3, "seed": 1}
    job.update(checkpoint="demo-sd15", scheduler="Euler", hires={"scale": 1.5, **hires})
    assert unet_calls_by_width(engine, job) == {8: 3, 12: runs}


def test_a_hires_schedule_longer_than_the_scheduler_allows_runs_fewer_steps_and_says_so(engine):
    # LCM allows 50 steps: at strength 0.05 that leaves 2 of the job's 3 (A1111's would be 60)
    job = {"prompt": "x", "width": 64, "height": 64, "steps": 3, "seed": 1}
    job.update(checkpoint="demo-sd15", scheduler="LCM", hires={"scale": 1.5, "strength": 0.05})
    assert unet_calls_by_width(engine, job) == {8: 3, 12: 2}
    result = engine.run(parse_job(job))
    assert any("the hires pass runs 2 steps" in warning for warning in result.warnings)
    assert infotext_fields(result)["Hires steps"] == "2"  # what ran, not what was asked


def test_a1111_enable_hr_maps_onto_hires():
    job = parse_job(
        {
            "prompt": "x",
            "enable_hr": True,
            "hr_scale": 1.5,
            "hr_second_pass_steps": 7,
            "denoising_strength": 0.45,
            "hr_upscaler": "Latent (nearest)",
        }
    )
    assert job.hires.scale == 1.5 and job.hires.steps == 7 and job.hires.strength == 0.45
    assert job.hires.upscaler == "latent-nearest"
    plain = parse_job({"prompt": "x", "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent"})
    assert plain.hires is None


def test_hires_second_pass_has_its_own_limit(engine):
    with pytest.raises(InvalidInput) as info:
        engine.run(
            parse_job(
                {
                    "prompt": "x",
                    "width": 1024,
                    "height": 1024,
                    "checkpoint": "demo-sd15",
                    "hires": {"scale": 4},
                }
            )
        )
    assert info.value.field == "hires.scale"
    assert info.value.accepted == "a scale up to 2.00 at 1024x1024, or a smaller width and height"


# A1111's `parse_generation_parameters`: `name: value` pairs, a value JSON-quoted when it holds
# a comma, colon or line break
A1111_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(line: str) -> dict[str, str]:
    """The last line of an A1111 infotext, read as A1111's PNG Info reads it."""
    return {
        key: json.loads(value) if value.startswith('"') else value
        for key, value in A1111_PARAMETER.findall(line)
    }


def infotext_fields(result) -> dict[str, str]:
    """The last line of an image's A1111 infotext, as A1111's PNG Info reads it."""
    from handler.outputs import read_infotext

    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return parse_parameters(read_infotext(data).splitlines()[-1])


def test_hires_infotext_is_a1111s_first_pass_size_and_hires_fields(engine):
    job = {"prompt": "x", "width": 64, "height": 72, "steps": 2, "seed": 1}
    job.update(checkpoint="demo-sd15", hires={"scale": 2, "steps": 3, "strength": 0.4})
    result = engine.run(parse_job(job))
    assert (result.width, result.height) == (128, 144)  # the result says what was delivered
    fields = infotext_fields(result)
    assert fields["Size"] == "64x72" and fields["Hires upscale"] == "2"
    assert fields["Hires steps"] == "3" and fields["Hires upscaler"] == "Latent"
    assert fields["Denoising strength"] == "0.4"


@pytest.mark.parametrize(
    ("hr_upscaler", "upscaler"),
    [("Latent (nearest-exact)", "latent-nearest-exact"), ("Latent (bicubic antialiased)", None)],
)
def test_a1111s_latent_upscalers_each_upscale_their_own_way(engine, hr_upscaler, upscaler):
    """A1111's Latent (...) upscalers are torch interpolation modes: each gives its own image,
    and the infotext names it as A1111 does."""
    job = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 1}
    job.update(checkpoint="demo-sd15", enable_hr=True, hr_scale=2, denoising_strength=0.3)
    bilinear = engine.run(parse_job({**job, "hr_upscaler": "Latent"}))
    result = engine.run(parse_job({**job, "hr_upscaler": hr_upscaler}))
    assert not result.warnings and np.abs(pixels(result) - pixels(bilinear)).max() > 0
    assert infotext_fields(result)["Hires upscaler"] == hr_upscaler
    if upscaler:  # the native field's name for it draws the same
        hires = {"scale": 2, "strength": 0.3, "upscaler": upscaler}
        base = {k: v for k, v in job.items() if k not in ("enable_hr", "hr_scale")}
        native = engine.run(parse_job({**base, "hires": hires, "denoising_strength": None}))
        assert (pixels(native) == pixels(result)).all()


def test_img2img_with_hires_keeps_both_strengths_in_the_infotext(engine):
    job = {"prompt": "x", "image": data_uri(INIT), "strength": 0.5, "steps": 2}
    job.update(checkpoint="demo-sd15", hires={"scale": 1.5, "strength": 0.3})
    fields = infotext_fields(engine.run(parse_job(job)))
    assert fields["Denoising strength"] == "0.5" and fields["Hires denoising strength"] == "0.3"


def test_img2img_and_inpainting_infotext_name_their_strength_and_mask_blur(engine):
    img2img = {"prompt": "x", "image": data_uri(INIT), "strength": 0.6, "steps": 2}
    fields = infotext_fields(engine.run(parse_job({**img2img, "checkpoint": "demo-sd15"})))
    assert fields["Denoising strength"] == "0.6" and "Mask blur" not in fields
    inpaint = engine.run(parse_job(inpaint_job("demo-sd15", mask_blur=2)))
    fields = infotext_fields(inpaint)
    assert fields["Denoising strength"] == "0.75" and fields["Mask blur"] == "2"
    txt2img = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "checkpoint": "demo-sd15"}
    assert "Denoising strength" not in infotext_fields(engine.run(parse_job(txt2img)))


# -- safety checker ----------------------------------------------------------------------------


SAFETY_JOB = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 6}
SAFETY_JOB["checkpoint"] = "demo-sd15"


def test_safety_checker_blurs_flagged_images_and_keeps_the_batch(engine):
    job = {**SAFETY_JOB, "num_images": 2}
    plain = engine.run(parse_job(job))
    checked = engine.run(parse_job({**job, "safety_checker": True}))
    assert [image.nsfw for image in checked.images] == [True, True]  # the demo checker flags all
    assert len(checked.images) == 2 and all(image.image for image in checked.images)
    assert np.abs(pixels(checked) - pixels(plain)).mean() > 1
    assert all(image.nsfw is None for image in plain.images)


def test_withhold_policy_reports_without_delivering(settings):
    from dataclasses import replace

    from handler.engine import Engine

    strict = Engine(replace(settings, safety_checker=True, safety_policy="withhold"))
    result = strict.run(
        parse_job(
            {
                "prompt": "x",
                "width": 64,
                "height": 64,
                "steps": 1,
                "seed": 2,
                "checkpoint": "demo-sd15",
                "num_images": 2,
            }
        )
    )
    assert len(result.images) == 2
    assert all(i.nsfw and i.withheld and i.image is None and i.bytes == 0 for i in result.images)


def test_unflagged_images_pass_unchanged(engine):
    job = dict(SAFETY_JOB)
    checker, _ = engine._safety_checker_for(parse_job({**job, "safety_checker": True}))
    weights = checker.concept_embeds_weights.clone()
    try:
        checker.concept_embeds_weights.data.fill_(
            2.0
        )  # no cosine similarity reaches 2: nothing flagged
        checked = engine.run(parse_job({**job, "safety_checker": True}))
    finally:
        checker.concept_embeds_weights.data.copy_(weights)
    assert checked.images[0].nsfw is False
    assert (pixels(checked) == pixels(engine.run(parse_job(job)))).all()


def test_safety_checker_without_weights_fails_clearly(settings, tmp_path):
    from dataclasses import replace

    from handler.engine import Engine

    empty_root = tmp_path / "root"
    (empty_root / "checkpoints").mkdir(parents=True)
    source = settings.models_dir
    shutil.copy(f"{source}/checkpoints/demo-sd15.safetensors", empty_root / "checkpoints")
    shutil.copytree(
        f"{source}/checkpoints/demo-sd15.config", empty_root / "checkpoints/demo-sd15.config"
    )
    bare = Engine(replace(settings, models_dir=str(empty_root)))
    with pytest.raises(InvalidInput) as info:
        bare.run(parse_job({"prompt": "x", "checkpoint": "demo-sd15", "safety_checker": True}))
    assert info.value.field == "safety_checker" and "safety_checker/" in info.value.message


def test_safety_checker_folder_without_weights_fails_clearly(settings, tmp_path):
    from dataclasses import replace

    from handler.engine import Engine

    root = tmp_path / "root"
    (root / "safety_checker").mkdir(parents=True)
    source = settings.models_dir
    shutil.copy(f"{source}/safety_checker/config.json", root / "safety_checker")
    engine = Engine(replace(settings, models_dir=str(root)))
    with pytest.raises(InvalidInput) as info:
        engine.safety_checker()
    assert info.value.field == "safety_checker" and "could not be loaded" in info.value.message


# -- SDXL refiner ------------------------------------------------------------------------------

REFINE = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "seed": 21}
REFINE["checkpoint"] = "demo-sdxl"


def test_refiner_ensemble_and_refine_after_each_change_the_image_deterministically(engine):
    base = engine.run(parse_job(REFINE))
    ensemble_job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", "high_noise_frac": 0.5}
    after_job = {
        **REFINE,
        "refiner_checkpoint": "demo-sdxl-refiner",
        "refiner_inference_steps": 10,  # refine-after: 10 x 0.3 = 3 refiner steps
    }
    ensemble, ensemble_again = (
        engine.run(parse_job(ensemble_job)),
        engine.run(parse_job(ensemble_job)),
    )
    after, after_again = engine.run(parse_job(after_job)), engine.run(parse_job(after_job))
    assert (pixels(ensemble) == pixels(ensemble_again)).all()
    assert (pixels(after) == pixels(after_again)).all()
    for refined in (ensemble, after):
        assert np.abs(pixels(refined) - pixels(base)).max() > 0
        assert not refined.warnings
    assert np.abs(pixels(ensemble) - pixels(after)).max() > 0


@pytest.mark.parametrize("ram_slots", [1, 0])
def test_a_jobs_refiner_never_pushes_its_base_off_the_device(settings, monkeypatch, ram_slots):
    """With one device slot and no REFINER_CHECKPOINT (the defaults), a job naming its refiner
    runs with both on the device: loading the refiner does not offload (or, without a RAM
    tier, drop) the base the job is using. The next jobs find both where they were."""
    from dataclasses import replace

    from handler.engine import Engine

    engine = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=ram_slots))
    ensemble = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", "high_noise_frac": 0.5}
    seen = []
    denoise = engine._denoise

    def spy(plan, *args):
        seen.append([engine.cache.on_device(key) for key in engine.cache._entries])
        return denoise(plan, *args)

    monkeypatch.setattr(engine, "_denoise", spy)
    first = engine.run(parse_job(ensemble))
    assert seen == [[True, True]]  # the base and the refiner, both on the device
    again = engine.run(parse_job(ensemble))
    assert seen[-1] == [True, True] and (pixels(first) == pixels(again)).all()
    assert engine.run(parse_job(REFINE)).images  # the base alone: still cached
    other = engine.run(parse_job({**REFINE, "checkpoint": "demo-sd15"}))
    assert other.images and engine.cache.on_device(list(engine.cache._entries)[-1])
    assert sum(engine.cache.on_device(k) for k in engine.cache._entries) == 1
    assert len(engine.cache) == 1 + ram_slots


def test_refiner_fields_without_a_refiner_are_ignored_with_a_warning(engine):
    result = engine.run(parse_job({**REFINE, "high_noise_frac": 0.8}))
    assert any("no refiner checkpoint" in w for w in result.warnings)
    assert (pixels(result) == pixels(engine.run(parse_job(REFINE)))).all()
    sd15 = engine.run(
        parse_job({**REFINE, "checkpoint": "demo-sd15", "refiner_checkpoint": "demo-sdxl-refiner"})
    )
    assert any("the refiner is for SDXL" in w for w in sd15.warnings)


@pytest.mark.parametrize(("scheduler", "base_steps"), [("Euler", 16), ("DPM++ 2M Karras", 12)])
def test_the_refiner_takes_over_by_timestep_as_diffusers_and_a1111_do(
    engine, scheduler, base_steps
):
    """0.8 hands over at timestep 200: 16 of Euler's 20 steps are above it, 12 of Karras's."""
    job = {**REFINE, "steps": 20, "scheduler": scheduler, "high_noise_frac": 0.8}
    job["refiner_checkpoint"] = "demo-sdxl-refiner"
    refiner_unet = engine.checkpoint("demo-sdxl-refiner")[0].pipeline.unet
    calls = {"refiner": 0}
    hook = refiner_unet.register_forward_pre_hook(
        lambda *_: calls.update(refiner=calls["refiner"] + 1)
    )
    try:
        base = unet_calls_by_width(engine, job)
    finally:
        hook.remove()
    assert base == {8: base_steps} and calls["refiner"] == 20 - base_steps


def test_refiner_ensemble_infotext_names_the_refiner_and_its_switch(engine):
    job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", "high_noise_frac": 0.75}
    fields = infotext_fields(engine.run(parse_job(job)))
    assert fields["Refiner"] == "demo-sdxl-refiner" and fields["Refiner switch at"] == "0.75"


def refiner_unet_calls(engine, job: dict) -> tuple[int, dict]:
    """(the refiner UNet's calls, the result's infotext fields) of one job."""
    refiner_unet = engine.checkpoint("demo-sdxl-refiner")[0].pipeline.unet
    calls = []
    hook = refiner_unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        result = engine.run(parse_job(job))
    finally:
        hook.remove()
    return len(calls), result


@pytest.mark.parametrize(("strength", "runs"), [(None, 3), (0.6, 6)])
def test_a_txt2img_strength_is_the_refiners_when_it_refines_the_finished_image(
    engine, strength, runs
):
    """As worker-sdxl reads it: refine-after runs 10 x 0.3 steps by default, 10 x strength with
    one; the infotext says so, under names of its own (A1111 has no such pass)."""
    job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", "refiner_inference_steps": 10}
    if strength is not None:
        job["strength"] = strength
    calls, result = refiner_unet_calls(engine, job)
    assert calls == runs and not result.warnings
    fields = infotext_fields(result)
    assert fields["Refined by"] == "demo-sdxl-refiner" and "Refiner switch at" not in fields
    assert fields["Refiner strength"] == f"{strength or 0.3:g}" and fields["Refiner steps"] == "10"


@pytest.mark.parametrize(("strength", "field"), [(0.0, "strength"), (0.005, "strength")])
def test_a_refiner_strength_that_runs_no_step_is_refused_on_strength(engine, strength, field):
    job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", "strength": strength}
    with pytest.raises(InvalidInput) as info:
        engine.run(parse_job(job))
    assert info.value.field == field and "0.0067" in info.value.accepted
    with pytest.raises(InvalidInput) as info:  # 0.5 of 1 step: none; 2 would do
        engine.run(parse_job({**job, "strength": 0.5, "refiner_inference_steps": 1}))
    assert (
        info.value.field == "refiner_inference_steps" and info.value.accepted == "at least 2 steps"
    )


def test_a_strength_nothing_uses_is_ignored_with_a_warning(engine):
    result = engine.run(parse_job({**REFINE, "strength": 0.6}))
    assert any(w.startswith("strength ignored") for w in result.warnings)
    assert (pixels(result) == pixels(engine.run(parse_job(REFINE)))).all()


@pytest.mark.parametrize("refiner", [{"high_noise_frac": 0.5}, {"refiner_inference_steps": 4}])
def test_the_jobs_vae_decodes_the_refined_image_too(engine, refiner):
    job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", **refiner}
    plain = engine.run(parse_job(job))
    with_vae = engine.run(parse_job({**job, "vae": "DEMO-VAE-SD15"}))  # the refiner decodes
    assert np.abs(pixels(with_vae) - pixels(plain)).max() > 0  # it was ignored
    assert infotext_fields(with_vae)["VAE"] == "demo-vae-sd15"  # the file's name, as resolved


def test_the_refiner_reads_a1111_prompt_syntax_as_the_base_does(engine):
    refiner = engine.checkpoint("demo-sdxl-refiner")[0].pipeline
    seen = []

    def record(module, args, kwargs):
        seen.append(args[0].tolist())  # the token ids the refiner's text encoder reads

    hook = refiner.text_encoder_2.register_forward_pre_hook(record, with_kwargs=True)
    try:
        job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", "high_noise_frac": 0.5}
        engine.run(parse_job({**job, "prompt": "a (red:1.4) cube"}))
    finally:
        hook.remove()
    words = refiner.tokenizer_2.convert_ids_to_tokens(seen[0][0])
    assert "red</w>" in words and "(</w>" not in words and ":</w>" not in words


@pytest.mark.parametrize("refiner", [{"high_noise_frac": 0.5}, {"refiner_inference_steps": 4}])
def test_the_refiner_takes_an_sdxl_embeddings_clip_g_part(engine, refiner):
    """As in A1111 and ComfyUI, the refiner's one text encoder reads the embedding's vectors
    made for it; before, the refiner read the embedding's name as words."""
    from safetensors.torch import load_file

    pipeline = engine.checkpoint("demo-sdxl-refiner")[0].pipeline
    vocab = len(pipeline.tokenizer_2)
    clip_g = load_file(f"{engine.settings.models_dir}/embeddings/demo-sdxl-embedding.safetensors")
    seen = []

    def record(module, args, output):
        seen.append(output[-1].clone())  # the input embeddings of the last window

    hook = pipeline.text_encoder_2.get_input_embeddings().register_forward_hook(record)
    try:
        job = {**REFINE, "refiner_checkpoint": "demo-sdxl-refiner", **refiner}
        used = engine.run(parse_job({**job, "prompt": "demo-sdxl-embedding"}))
    finally:
        hook.remove()
    vectors = clip_g["clip_g"].to(seen[0].dtype)
    assert any(torch.equal(each[1 : 1 + len(vectors)], vectors) for each in seen)
    assert len(pipeline.tokenizer_2) == vocab  # and its tokens are gone after the job
    assert not used.warnings
    word = engine.run(parse_job({**job, "prompt": "demo sdxl embedding"}))
    assert np.abs(pixels(used) - pixels(word)).max() > 0


def test_hires_sizes_truncate_to_whole_latents_as_a1111_does(engine):
    # 64 x 1.37 = 87.7 px: A1111 truncates to 87 px, then to whole latents, 80 (not 88)
    job = {"prompt": "x", "width": 64, "height": 72, "steps": 2, "seed": 4}
    result = engine.run(parse_job({**job, "checkpoint": "demo-sd15", "hires": {"scale": 1.37}}))
    assert (result.width, result.height) == (80, 96)  # 72 x 1.37 = 98.6 -> 96
