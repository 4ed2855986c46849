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
    assert "(did you mean steps?)" in error.message
    # other tools' names for a field: ComfyUI's KSampler, diffusers' pipelines
    assert "(did you mean guidance_scale?)" in error_of({"prompt": "x", "cfg": 7}).message
    error = error_of({"prompt": "x", "num_images_per_prompt": 2})
    assert "(did you mean num_images?)" in error.message
    error = error_of({"prompt": "x", "hires": {"scale": 2, "strenght": 0.5}})
    assert error.field == "hires.strenght" and "(did you mean strength?)" in error.message
    # a nested key is matched against its own object's fields, a top-level one A1111's too
    assert "(did you mean upscaler?)" in error_of({"prompt": "x", "hires": {"upscalr": 1}}).message
    assert "did you mean" not in error_of({"prompt": "x", "hires": {"seed": 1}}).message
    assert "(did you mean cfg_scale?)" in error_of({"prompt": "x", "cfg_scal": 7}).message


def test_shape_errors_say_what_to_send_in_plain_words():
    """Not pydantic's "a valid dictionary or instance of HiresFix"."""
    error = error_of({"prompt": "x", "hires": True})
    assert (error.field, error.message) == ("hires", "must be an object")
    error = error_of({"prompt": "x", "loras": "ink:0.8"})  # the Cog form's way, sent to RunPod
    assert error.message == "must be a list" and '[{"name": "ink", "scale": 0.8}]' in error.accepted
    error = error_of({"prompt": "x", "loras": ["ink"]})
    assert error.field == "loras[0]" and '{"name": "ink", "scale": 0.8}' in error.accepted
    error = error_of({"prompt": "x", "loras": [{"name": "ink"}] * 9})
    assert error.message == "has 9 items" and error.accepted == "a list of at most 8"


@pytest.mark.parametrize(
    "sent, field",
    [
        ({"sampler_index": "Euler z"}, "sampler_index"),  # A1111's deprecated name, alone
        ({"sampler_index": 5}, "sampler_index"),
        ({"mask_blur_x": 100}, "mask_blur_x"),
        ({"mask_blur_y": "a"}, "mask_blur_y"),
    ],
)
def test_errors_name_a1111s_other_field_names_as_sent(sent, field):
    assert error_of({"prompt": "x", **sent}).field == field


@pytest.mark.parametrize("under", ["", "hires", "loras", "override_settings"])
def test_a_key_that_is_no_field_name_is_not_quoted_whole(under):
    """A prompt pasted as a JSON key: errors show it cut, and their field is its parent."""
    key = "a secret prompt about someone, far longer than forty characters"
    payload = {
        "": {"prompt": "x", key: 1},
        "hires": {"prompt": "x", "hires": {"scale": 2, key: 1}},
        "loras": {"prompt": "x", "loras": [{"name": "a", key: 1}]},
        "override_settings": {"prompt": "x", "override_settings": {key: 1}},
    }[under]
    error = error_of(payload)
    assert key not in str(error) and key[:40] in error.message
    assert error.field == {"": "input", "loras": "loras[0]"}.get(under, under)


def test_a_bad_key_under_a_key_that_is_no_field_name_names_neither_whole():
    key = "a secret prompt about someone, far longer than forty characters"
    for payload, field in (
        ({key: {"\ud800": 1}}, "input"),
        ({"hires": {key: {"\ud800": 1}}}, "hires"),
    ):
        error = error_of({"prompt": "x", **payload})
        assert error.field == field and key not in str(error)


def test_a1111s_names_for_the_checkpoints_own_vae_are_no_vae():
    for name in ("Automatic", "None", ""):
        assert parse_job({"prompt": "x", "vae": name}).vae is None


def test_output_format_choices():
    assert "png" in error_of({"prompt": "x", "output_format": "gif"}).accepted
    for sent, format in (("PNG", "png"), ("jpg", "jpeg"), ("JPG", "jpeg"), ("WebP", "webp")):
        assert parse_job({"prompt": "x", "output_format": sent}).output_format == format


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("Euler a", "Euler a"),
        ("euler_a", "Euler a"),
        ("K_EULER_ANCESTRAL", "Euler a"),
        ("K_EULER", "Euler"),
        ("DPMSolverMultistep", "DPM++ 2M DDIM"),  # diffusers' own default spacing
        ("EulerAncestralDiscreteScheduler", "Euler a DDIM"),
        ("EulerDiscreteScheduler karras", "Euler Karras"),
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("euler_ancestral", "Euler a"),  # ComfyUI's names
        ("dpm_2_ancestral", "DPM2 a"),
        ("dpmpp_2m_sde_gpu", "DPM++ 2M SDE"),
        ("uni_pc", "UniPC"),
        ("DPM++ 2M Uniform", "DPM++ 2M"),  # the schedule they run on without a type
        ("euler normal", "Euler"),
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


@pytest.mark.parametrize(
    ("sampler_name", "schedule", "name"),
    [
        ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M", "Exponential", "DPM++ 2M Exponential"),
        ("Euler", "Beta", "Euler Beta"),
        ("Euler a", "SGM Uniform", "Euler a SGM Uniform"),
        ("DPM++ 2M SDE", "karras", "DPM++ 2M SDE Karras"),
        ("DPM++ 2M Karras", "Karras", "DPM++ 2M Karras"),
        ("Heun", "Automatic", "Heun"),
        ("LMS", None, "LMS"),
        ("Euler", "sgm_uniform", "Euler SGM Uniform"),  # A1111's internal name
        # "Automatic" or none: the sampler's own default in A1111 >= 1.9
        ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),
        ("DPM++ 2M", None, "DPM++ 2M Karras"),
        ("DPM++ SDE", "Automatic", "DPM++ SDE Karras"),
        ("DPM2", None, "DPM2 Karras"),
        ("DPM2 a", "Automatic", "DPM2 a Karras"),
        ("DPM++ 2M SDE", None, "DPM++ 2M SDE Exponential"),
        ("Euler a", "Automatic", "Euler a"),
        ("DPM++ 2M", "Uniform", "DPM++ 2M"),
        ("k_euler_a", None, "Euler a"),
        ("k_dpmpp_2m_ka", None, "DPM++ 2M Karras"),
        ("EulerDiscreteScheduler", "Karras", "Euler Karras"),  # a class name gives way
        ("EulerDiscreteScheduler", "Uniform", "Euler"),
        ("DPMSolverMultistepScheduler", None, "DPM++ 2M DDIM"),  # diffusers' own default
        ("euler", "simple", "Euler SGM Uniform"),  # ComfyUI's sampler and scheduler
        ("dpmpp_2m", "ddim_uniform", "DPM++ 2M DDIM"),
        ("euler_ancestral", "normal", "Euler a"),
    ],
)
def test_a1111_sampler_and_schedule_type(sampler_name, schedule, name):
    job = parse_job({"prompt": "x", "sampler_name": sampler_name, "scheduler": schedule})
    assert job.scheduler == name


@pytest.mark.parametrize(
    ("payload", "message", "accepted"),
    [
        ({"sampler_name": "Euler a", "scheduler": "Karras"}, "no 'Karras'", "Karras with one of"),
        ({"sampler_name": "DDIM", "scheduler": "Exponential"}, "no 'Exponential'", "DPM++ 2M"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Align Your Steps"}, "not supported", "Beta"),
        ({"sampler_name": "DPM++ 2M Karras", "scheduler": "Beta"}, "no 'Beta'", "Euler"),
    ],
)
def test_a_schedule_type_the_sampler_lacks_is_refused(payload, message, accepted):
    error = error_of({"prompt": "x", **payload})
    assert error.field == "scheduler" and message in str(error) and accepted in error.accepted


def test_a_native_name_with_a_schedule_type_its_sampler_lacks_says_so():
    error = error_of({"prompt": "x", "scheduler": "Euler a Karras"})
    assert error.field == "scheduler" and "'Euler a' has no 'Karras' schedule type" in str(error)


def test_the_native_scheduler_field_is_taken_as_written():
    # only A1111's sampler_name gets A1111's automatic schedule; ours names it exactly
    assert parse_job({"prompt": "x", "scheduler": "DPM++ 2M"}).scheduler == "DPM++ 2M"
    assert parse_job({"prompt": "x", "sampler_index": "DPM++ 2M"}).scheduler == "DPM++ 2M Karras"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hr_prompt", "a dog"),
        ("hr_negative_prompt", "blurry"),
        ("hr_sampler_name", "DDIM"),
        ("hr_scheduler", "Karras"),
        ("hr_checkpoint_name", "other"),
        ("hr_additional_modules", ["Use no module"]),
    ],
)
def test_a_different_hires_pass_is_refused_not_dropped(field, value):
    payload = {"prompt": "a cat", "enable_hr": True, "sampler_name": "Euler"}
    error = error_of({**payload, field: value})
    assert error.field == field and "reuses the first pass" in error.accepted
    if field.endswith("prompt"):  # prompt text stays out of errors (and so of logs)
        assert value not in str(error) and "differs from" in str(error)
    same = {
        "hr_prompt": "a cat",
        "hr_negative_prompt": "",
        "hr_sampler_name": "Use same sampler",
        "hr_scheduler": "Use same scheduler",
        "hr_checkpoint_name": "Use same checkpoint",
        "hr_additional_modules": ["Use same choices"],
    }
    assert parse_job({**payload, **same}).hires is not None
    assert parse_job({**payload, "hr_sampler_name": "Euler"}).hires is not None


def test_hr_checkpoint_name_equal_to_the_first_pass_model_in_any_spelling_is_accepted():
    title = "demo-sd15.safetensors [8ad5ffc01f]"
    payload = {"prompt": "x", "enable_hr": True}
    via_overrides = {**payload, "override_settings": {"sd_model_checkpoint": title}}
    for same in (title, "demo-sd15", "demo-sd15.safetensors"):
        assert parse_job({**via_overrides, "hr_checkpoint_name": same}).hires is not None
        assert parse_job({**payload, "checkpoint": "demo-sd15", "hr_checkpoint_name": same}).hires
    error = error_of({**via_overrides, "hr_checkpoint_name": "other.safetensors [0123456789]"})
    assert error.field == "hr_checkpoint_name"


def test_a1111_subseed_at_strength_zero_string_seed_and_neutral_hints():
    assert parse_job({"prompt": "x", "subseed": 12345, "subseed_strength": 0}).seed is None
    assert parse_job({"prompt": "x", "subseed": 12345}).seed is None
    assert error_of({"prompt": "x", "subseed": 5, "subseed_strength": 0.5}).field == "subseed"
    assert parse_job({"prompt": "x", "seed": "-1"}).seed is None
    assert "1.0" in error_of({"prompt": "x", "s_noise": 0.9}).accepted
    # empty values that A1111's own /docs example and its clients send
    empty = {"firstpass_image": "", "comments": "", "image_cfg_scale": 0}
    assert parse_job({"prompt": "x", **empty}).prompt == "x"


def test_every_sampler_and_schedule_type_builds_and_steps():
    import inspect

    import diffusers

    from handler.schedulers import (
        NO_SIGMA_SCHEDULES,
        SCHEDULE_TYPES,
        SCHEDULERS,
        build_scheduler,
        split_schedule,
    )

    base = dict(diffusers.PNDMScheduler().config)  # an SD 1.x checkpoint's default scheduler
    built = 0
    for sampler, (class_name, _) in SCHEDULERS.items():
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        assert ("use_karras_sigmas" in params) == (sampler not in NO_SIGMA_SCHEDULES), sampler
        for schedule in SCHEDULE_TYPES:
            name = canonical_scheduler(f"{sampler} {schedule}")
            if name is None or name == sampler:  # DDIM and PNDM on their own DDIM schedule
                continue
            assert split_schedule(name) == (split_schedule(sampler)[0], schedule)
            scheduler = build_scheduler(name, base)
            for key, value in SCHEDULE_TYPES[schedule].items():
                assert scheduler.config[key] == value, (name, key)
            scheduler.set_timesteps(8)
            built += 1
    assert built >= 30


@pytest.mark.parametrize("name", ["Euler", "Euler a", "Heun", "LMS", "DPM++ 2M", "K_EULER"])
def test_k_diffusion_samplers_run_on_a1111s_uniform_schedule(name):
    """A1111 runs them from the last timestep (sigma_max 14.6 on SD) down to the first;
    diffusers' SD configs start lower ("leading": 951 at 20 steps), which is A1111's DDIM
    schedule type and what "Euler DDIM" asks for."""
    import json

    from handler.registry import CONFIG_ROOT
    from handler.schedulers import build_scheduler

    base = json.loads((CONFIG_ROOT / "sd15/scheduler/scheduler_config.json").read_text())
    assert base["timestep_spacing"] == "leading"
    scheduler = build_scheduler(canonical_scheduler(name), base)
    scheduler.set_timesteps(20)
    assert int(scheduler.timesteps[0]) == 999
    if name != "DPM++ 2M":  # diffusers' multistep solvers end on their last step to sigma 0
        assert int(scheduler.timesteps[-1]) == 0
        assert float(scheduler.sigmas[0]) == pytest.approx(14.615, abs=1e-3)
    leading = build_scheduler(canonical_scheduler(f"{name} DDIM"), base)
    leading.set_timesteps(20)
    assert int(leading.timesteps[0]) == (941 if name == "DPM++ 2M" else 951)
    # a checkpoint that chose its spacing (zero terminal SNR: trailing) keeps it
    trailing = build_scheduler(canonical_scheduler(name), {**base, "timestep_spacing": "trailing"})
    assert trailing.config.timestep_spacing == "trailing"


def test_diffusers_class_names_run_as_diffusers_runs_them_by_default():
    """A diffusers user naming EulerDiscreteScheduler expects the images of
    `EulerDiscreteScheduler.from_config(pipe.scheduler.config)`, not A1111's Uniform."""
    import json

    import diffusers

    from handler.registry import CONFIG_ROOT
    from handler.schedulers import DIFFUSERS_CLASSES, build_scheduler

    sd15 = json.loads((CONFIG_ROOT / "sd15/scheduler/scheduler_config.json").read_text())
    # a zero-terminal-SNR checkpoint's config, as the loader records it: "trailing" spacing
    ztsnr = {**sd15, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
    for config in ("sd15", "sdxl", "ztsnr"):
        base = (
            ztsnr
            if config == "ztsnr"
            else json.loads((CONFIG_ROOT / f"{config}/scheduler/scheduler_config.json").read_text())
        )
        for class_name in DIFFUSERS_CLASSES:
            if class_name == "PNDMScheduler" and config == "sdxl":
                continue  # SDXL's config (Euler's) leaves PNDM its Runge-Kutta warm-up: skipped,
                # as SD's config does and A1111's PLMS
            ours = build_scheduler(canonical_scheduler(class_name), base)
            real_name = class_name.removesuffix("Scheduler") + "Scheduler"  # DPMSolverMultistep
            theirs = getattr(diffusers, real_name).from_config(base)
            for scheduler in (ours, theirs):
                scheduler.set_timesteps(30)
            assert type(ours) is type(theirs)
            if config == "ztsnr":  # the spacing is theirs; the betas are rescaled here,
                # also for the classes that have no rescale_betas_zero_snr (diffusers drops it)
                assert ours.config.timestep_spacing == "trailing", class_name
                continue
            assert ours.timesteps.tolist() == theirs.timesteps.tolist(), (config, class_name)


def test_null_a1111_fields_are_absent():
    fields = ("restore_faces", "tiling", "styles", "script_args", "alwayson_scripts")
    payload = {"prompt": "x", **dict.fromkeys(fields), "override_settings": None}
    payload.update(denoising_strength=None, sampler_index=None, scheduler=None, enable_hr=None)
    assert parse_job(payload).scheduler == parse_job({"prompt": "x"}).scheduler


def test_unknown_scheduler_lists_the_names():
    error = error_of({"prompt": "x", "scheduler": "magic"})
    assert error.field == "scheduler" and all(name in error.accepted for name in SCHEDULER_NAMES)


def test_seed_zero_and_max_are_valid():
    assert parse_job({"prompt": "x", "seed": 0}).seed == 0
    assert parse_job({"prompt": "x", "seed": MAX_SEED}).seed == MAX_SEED


def test_a_full_a1111_txt2img_payload_is_accepted():
    """Every field A1111's /sdapi/v1/txt2img model sends, at the values its clients default to."""
    payload = {
        "prompt": "a castle",
        "negative_prompt": "",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "batch_size": 1,
        "n_iter": 2,
        "steps": 20,
        "cfg_scale": 7,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "eta": 0,
        "denoising_strength": 0,
        "s_min_uncond": 0,
        "s_churn": 0,
        "s_tmax": None,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "refiner_checkpoint": None,
        "refiner_switch_at": None,
        "disable_extra_networks": False,
        "firstphase_width": 0,
        "firstphase_height": 0,
        "comments": {},
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "hr_resize_x": 0,
        "hr_resize_y": 0,
        "hr_prompt": "",
        "hr_negative_prompt": "",
        "sampler_index": "Euler",
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    job = parse_job(payload)
    assert job.scheduler == "DPM++ 2M Karras" and job.steps == 20 and job.num_images == 2
    assert job.seed is None and job.hires is None
    assert not job._notes  # A1111's own default sampler_index beside sampler_name is no news
    other = parse_job({**payload, "sampler_index": "DDIM"})
    assert any("sampler_index ignored" in note for note in other._notes)
    assert (
        parse_job({"prompt": "x", "scheduler": "Automatic"}).scheduler
        == parse_job({"prompt": "x"}).scheduler
    )
    assert parse_job({"prompt": "x", "sampler_index": "Euler a"}).scheduler == "Euler a"


def test_worker_sdxl_defaults_are_accepted():
    job = parse_job(
        {
            "prompt": "a castle",
            "negative_prompt": None,
            "height": 1024,
            "width": 1024,
            "seed": None,
            "scheduler": "K_EULER",
            "num_inference_steps": 25,
            "refiner_inference_steps": 50,
            "guidance_scale": 7.5,
            "strength": 0.3,
            "image_url": None,
            "num_images": 1,
            "high_noise_frac": None,
        }
    )
    assert job.negative_prompt == "" and job.steps == 25 and job.image is None


def test_a_worker_sdxl_image_url_without_strength_takes_worker_sdxls_default():
    """worker-sdxl refines an image_url at strength 0.3 when none is sent; ours is 0.75."""
    url = "https://example.com/a.png"
    assert parse_job({"prompt": "x", "image_url": url}).strength == 0.3
    assert parse_job({"prompt": "x", "image_url": url, "strength": 0.6}).strength == 0.6
    assert parse_job({"prompt": "x", "image": url}).strength == 0.75


@pytest.mark.parametrize(
    ("payload", "field", "accepted"),
    [
        ({}, "prompt", "a string"),
        ({"prompt": 3}, "prompt", "a string"),
        ({"prompt": "x", "steps": "many"}, "steps", "an integer from 1 to 150"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "png"),
    ],
)
def test_type_errors_say_what_would_be_accepted(payload, field, accepted):
    with pytest.raises(InvalidInput) as info:
        parse_job(payload)
    assert info.value.field == field and accepted in str(info.value.accepted)


def test_hires_denoising_strength_out_of_range_names_the_field_sent():
    error = error_of({"prompt": "x", "enable_hr": True, "denoising_strength": 0})
    assert error.field == "denoising_strength" and error.accepted == "0.05 to 1.0 with enable_hr"


@pytest.mark.parametrize("field", ["image", "mask"])
def test_an_empty_image_is_refused_not_ignored(field):
    error = error_of({"prompt": "x", field: "  "})
    assert error.field == field and "is empty" in str(error)


def test_an_unknown_field_beside_another_error_lists_the_fields():
    error = error_of({"prompt": "x", "steps": "many", "frobnicate": 1})
    assert error.field == "frobnicate" and error.accepted.startswith("fields: prompt")


def test_a_full_a1111_img2img_inpainting_payload_is_accepted_with_warnings():
    """The fields A1111's /sdapi/v1/img2img model adds, at the values its clients default to."""
    payload = {
        "prompt": "a castle",
        "init_images": ["aGVsbG8="],
        "mask": "aGVsbG8=",
        "denoising_strength": 0.75,
        "resize_mode": 0,
        "mask_blur": None,
        "mask_blur_x": 4,
        "mask_blur_y": 4,
        "mask_round": True,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": None,
        "latent_mask": None,
        "image_cfg_scale": None,
        "include_init_images": False,
        "firstpass_image": None,
        "sampler_index": "Euler",
        "sampler_name": "Euler a",
        "script_args": [],
        "alwayson_scripts": {},
    }
    job = parse_job(payload)
    assert job.mask_blur == 4 and job.strength == 0.75 and job.scheduler == "Euler a"
    assert any("inpainting_fill 0 (fill) runs as 1" in note for note in job._notes)
    assert any("inpaint_full_res" in note for note in job._notes)
    assert error_of({**payload, "inpainting_fill": 2}).field == "inpainting_fill"
    assert error_of({**payload, "mask_blur_x": 8}).field == "mask_blur_x"
    assert error_of({**payload, "include_init_images": True}).field == "include_init_images"


def test_an_unavailable_hires_upscaler_is_named_in_the_warnings():
    job = parse_job({"prompt": "x", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"})
    assert job.hires.upscaler == "image"
    assert any("'R-ESRGAN 4x+' is not available" in note for note in job._notes)
    assert not parse_job({"prompt": "x", "enable_hr": True, "hr_upscaler": "Lanczos"})._notes


def test_enable_hr_beside_an_init_image_is_ignored_as_a1111_img2img_does():
    payload = {"prompt": "x", "init_images": ["aGVsbG8="], "denoising_strength": 0.3}
    job = parse_job({**payload, "enable_hr": True, "hr_scale": 2})
    assert job.hires is None and job.strength == 0.3
    assert any("enable_hr ignored" in note for note in job._notes)


def test_enable_hr_without_denoising_strength_takes_a1111s_api_default():
    assert parse_job({"prompt": "x", "enable_hr": True}).hires.strength == 0.75


def test_refiner_switch_at_1_runs_no_refiner_and_other_values_name_the_field_sent():
    payload = {"prompt": "x", "refiner_checkpoint": "refiner"}
    job = parse_job({**payload, "refiner_switch_at": 1})
    assert job.refiner_checkpoint is None and job.high_noise_frac is None
    assert any("the refiner does not run" in note for note in job._notes)
    assert parse_job({**payload, "refiner_switch_at": 0.8}).high_noise_frac == 0.8
    for value in (0.99, 0.02, "late"):
        error = error_of({**payload, "refiner_switch_at": value})
        assert error.field == "refiner_switch_at" and "1 for no refiner" in error.accepted


@pytest.mark.parametrize(
    ("batch_size", "n_iter"), [(-1, -1), (-2, -4), (0, 3), (3, 3), (2, "2"), (True, 2)]
)
def test_a1111_batch_size_and_n_iter_outside_1_to_8_images_name_batch_size(batch_size, n_iter):
    error = error_of({"prompt": "x", "batch_size": batch_size, "n_iter": n_iter})
    assert error.field == "batch_size" and "from 1 to 8" in error.accepted


def test_a1111_batch_size_times_n_iter_is_num_images():
    assert parse_job({"prompt": "x", "batch_size": 2, "n_iter": 4}).num_images == 8


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"steps": True}, "steps"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"seed": False}, "seed"),
        ({"num_images": True}, "num_images"),
        ({"width": True}, "width"),
        ({"resize_mode": True}, "resize_mode"),
        ({"loras": [{"name": "x", "scale": True}]}, "loras[0].scale"),
        ({"enable_hr": True, "hr_scale": True}, "hr_scale"),  # as the client sent it
        ({"refiner_checkpoint": "r", "refiner_switch_at": True}, "refiner_switch_at"),
    ],
)
def test_true_or_false_is_no_number(payload, field):
    """pydantic would read true as 1: one step, one image, a refiner switched off."""
    error = error_of({"prompt": "x", **payload})
    assert error.field == field
    assert "true or false" in str(error) or "resize_mode" == field or "switch" in field


def test_booleans_and_numbers_as_text_still_go_where_they_belong():
    job = parse_job({"prompt": "x", "steps": "20", "enable_hr": True, "tiling": False})
    assert job.steps == 20 and job.hires is not None
    assert "Value error" not in str(error_of({"prompt": "x", "image": " "}))


@pytest.mark.parametrize(
    ("sampler", "eta", "accepted"),
    [
        ("Euler a", 1.0, True),  # webuiapi, A1111's Python client, sends eta 1 every time
        ("Euler a", 0, False),  # A1111 would turn the ancestral noise off
        ("DPM++ SDE", 1, True),
        ("DPM++ 2M", 1.0, True),  # a sampler without eta: A1111 ignores it
        ("Euler", 0.4, True),
        ("DDIM", 0, True),
        ("DDIM", 1.0, True),  # A1111's stochastic DDIM: the job's eta
        ("DDIM", 1.5, False),
        ("Euler", "x", False),
    ],
)
def test_eta_is_accepted_where_a1111_would_change_nothing_or_ddim_takes_it(sampler, eta, accepted):
    payload = {"prompt": "x", "sampler_name": sampler, "eta": eta}
    if accepted:
        assert parse_job(payload).scheduler.startswith(sampler)
    else:
        assert error_of(payload).field == "eta"


def test_webuiapis_default_payloads_are_accepted():
    """The defaults mix1009/sdwebuiapi sends with every txt2img and img2img call."""
    common = {
        "prompt": "a cube",
        "negative_prompt": "",
        "styles": [],
        "seed": -1,
        "subseed": -1,
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "sampler_name": "Euler a",
        "scheduler": None,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 20,
        "cfg_scale": 7.0,
        "width": 512,
        "height": 512,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "eta": 1.0,
        "s_min_uncond": 0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "script_args": [],
        "script_name": None,
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
        "sampler_index": "Euler a",
    }
    txt2img = parse_job({**common, "enable_hr": False, "denoising_strength": 0.7})
    assert txt2img.scheduler == "Euler a" and txt2img.image is None
    image = "data:image/png;base64,iVBORw0KGgo="
    img2img = parse_job(
        {**common, "init_images": [image], "denoising_strength": 0.7, "image_cfg_scale": 1.5}
    )
    assert img2img.image == image and img2img.strength == 0.7


@pytest.mark.parametrize(
    ("payload", "field", "accepted"),
    [
        ({"infotext": "SECRET prompt\nSteps: 20"}, "infotext", "infotext omitted"),
        ({"styles": ["SECRET style"]}, "styles", "styles omitted"),
        ({"firstpass_image": "QUFB" * 500}, "firstpass_image", "omitted"),
        (
            {"alwayson_scripts": {"controlnet": {"args": [{"image": "QUFB" * 500}]}}},
            "alwayson_scripts",
            "omitted",
        ),
        ({"scheduler": "SECRET" * 2000}, "scheduler", "Euler"),
        ({"sampler_name": "Euler", "scheduler": "SECRET" * 2000}, "scheduler", "Karras"),
        ({"refiner_switch_at": "SECRET" * 2000}, "refiner_switch_at", "0.05 to 0.95"),
    ],
)
def test_errors_never_quote_what_may_be_a_prompt_or_image_data(payload, field, accepted):
    with pytest.raises(InvalidInput) as info:
        parse_job(
            {
                "prompt": "x",
                **payload,
                **({"refiner_checkpoint": "r"} if field.startswith("refiner") else {}),
            }
        )
    assert info.value.field == field and accepted in str(info.value.accepted)
    text = str(info.value)
    assert "QUFBQUFB" not in text and text.count("SECRET") <= 7 and len(text) < 2000


@pytest.mark.parametrize(
    ("payload", "field", "expected"),
    [
        ({"prompt": "a \ud800 cube"}, "prompt", "UTF-8 text"),
        ({"negative_prompt": "\udfff"}, "negative_prompt", "UTF-8 text"),
        ({"checkpoint": "model\ud800"}, "checkpoint", "UTF-8 text"),
        ({"loras": [{"name": "\ud800"}]}, "loras[0].name", "UTF-8 text"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "0.0 to 30.0"),
        ({"strength": float("inf")}, "strength", "0.0 to 1.0"),
        ({"loras": [{"name": "a", "scale": float("-inf")}]}, "loras[0].scale", "-4.0 to 4.0"),
        ({"hires": {"scale": float("nan")}}, "hires.scale", "1.0 to 4.0"),
        ({"loras": [{"name": "a"}] * 9}, "loras", "at most 8"),
    ],
)
def test_text_that_is_no_text_and_numbers_that_are_no_numbers_are_invalid_input(
    payload, field, expected
):
    with pytest.raises(InvalidInput) as info:
        parse_job({"prompt": "x", **payload})
    assert info.value.field == field and expected in str(info.value.accepted), info.value


@pytest.mark.parametrize("scale", ["nan", "inf", "1:nan"])
def test_an_inline_lora_scale_that_is_no_finite_number_is_refused_as_such(scale):
    from handler.loras import extract_inline_loras

    with pytest.raises(InvalidInput) as info:
        extract_inline_loras(f"a cube <lora:detail:{scale}>")
    assert "not a number" in info.value.message and info.value.field == "prompt"


def test_sillytaverns_forge_payload_runs():
    """SillyTavern sends clip skip both ways, save_images true, and the VAE twice on Forge."""
    job = parse_job(
        {
            "prompt": "x",
            "clip_skip": 2,
            "save_images": True,
            "override_settings": {
                "CLIP_stop_at_last_layers": 2,
                "sd_vae": "sdxl_vae.safetensors",
                "forge_additional_modules": ["/forge/models/VAE/sdxl_vae.safetensors"],
            },
            "override_settings_restore_afterwards": True,
        }
    )
    assert (job.clip_skip, job.vae) == (2, "sdxl_vae.safetensors")
    assert any("save_images ignored" in note for note in job._notes)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"clip_skip": 1, "override_settings": {"CLIP_stop_at_last_layers": 2}}, "CLIP_stop"),
        ({"vae": "a", "override_settings": {"sd_vae": "b.safetensors"}}, "sd_vae"),
        ({"checkpoint": "a", "override_settings": {"sd_model_checkpoint": "b [0123abcd]"}}, "sd_"),
        ({"override_settings": {"forge_additional_modules": ["clip_l.safetensors"]}}, "forge"),
    ],
)
def test_override_settings_that_disagree_with_the_fields_are_refused(payload, field):
    with pytest.raises(InvalidInput) as info:
        parse_job({"prompt": "x", **payload})
    assert info.value.field.startswith(f"override_settings.{field}")


def test_cog_sdxls_names_are_the_native_fields():
    """A payload written for Replicate's cog-sdxl runs on RunPod too."""
    job = parse_job(
        {
            "prompt": "x",
            "num_outputs": 2,
            "num_inference_steps": 7,
            "prompt_strength": 0.5,
            "refine_steps": 9,
            "scheduler": "KarrasDPM",
        }
    )
    assert (job.num_images, job.steps, job.strength, job.refiner_inference_steps) == (2, 7, 0.5, 9)
    assert job.scheduler == "DPM++ 2M Karras"
    with pytest.raises(InvalidInput) as info:
        parse_job({"prompt": "x", "num_outputs": 2, "num_images": 3})
    assert info.value.field == "num_outputs"


def test_an_a1111_inpainting_payload_without_its_fill_fields_gets_a1111s_defaults_warnings():
    """Open WebUI sends init_images, mask and denoising_strength only: A1111 would fill the
    masked area and inpaint only the masked region (its defaults), which this worker does not."""
    job = parse_job({"prompt": "x", "init_images": ["aGk="], "mask": "aGk=", "batch_size": 1})
    assert len(job._notes) == 2 and "inpainting_fill 0" in job._notes[0]
    native = parse_job({"prompt": "x", "image": "aGk=", "mask": "aGk="})
    assert native._notes == []


@pytest.mark.parametrize(
    "scripts",
    [
        {"ADetailer": {"args": [False]}, "ControlNet": {"args": []}},  # webuiapi's, switched off
        {"ControlNet": {"args": [{"enabled": False, "image": None}]}},
    ],
)
def test_alwayson_scripts_that_only_switch_extensions_off_are_accepted(scripts):
    assert parse_job({"prompt": "x", "alwayson_scripts": scripts}).prompt == "x"


@pytest.mark.parametrize(
    "scripts",
    [
        {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}},
        {"ControlNet": {"args": [{"enabled": True, "image": "QUFB"}]}},
        {"ControlNet": []},
    ],
)
def test_alwayson_scripts_that_would_run_are_refused(scripts):
    assert error_of({"prompt": "x", "alwayson_scripts": scripts}).field == "alwayson_scripts"


def test_hr_scheduler_automatic_is_the_first_pass_schedule_type():
    job = {"prompt": "x", "enable_hr": True, "hr_scheduler": "Automatic"}
    assert parse_job(job).hires is not None
    karras = {**job, "sampler_name": "DPM++ 2M", "scheduler": "Karras", "hr_scheduler": "Karras"}
    assert parse_job(karras).scheduler == "DPM++ 2M Karras"
    assert error_of({**karras, "hr_scheduler": "Exponential"}).field == "hr_scheduler"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"vae": 5, "override_settings": {"forge_additional_modules": ["a.safetensors"]}}, "ov"),
        ({"override_settings": {"k\ud800": 1}}, "override_settings"),
        ({"k\ud800": 1}, "input"),
        ({"loras": [{"n\udc00": 1}]}, "loras[0]"),
    ],
)
def test_odd_payloads_are_invalid_input_on_a_field_that_can_be_sent_back(payload, field):
    error = error_of({"prompt": "x", **payload})
    assert error.field.startswith(field) if field != "ov" else "override_settings" in error.field
    assert "\ud800" not in str(error) and "\udc00" not in str(error)
    str(error).encode("utf-8")  # the reply can be serialised


def test_hr_scheduler_is_read_against_sampler_index_as_against_sampler_name():
    job = {"prompt": "x", "enable_hr": True, "sampler_index": "Euler", "scheduler": "Karras"}
    assert parse_job({**job, "hr_scheduler": "Karras"}).scheduler == "Euler Karras"
    assert error_of({**job, "hr_scheduler": "Automatic"}).field == "hr_scheduler"


def test_cog_sdxls_prompt_strength_beside_an_image_url_is_the_strength():
    job = parse_job(
        {"prompt": "x", "image_url": "https://example.com/a.png", "prompt_strength": 0.5}
    )
    assert job.strength == 0.5
    error = error_of({"prompt": "x", "strength": 0.4, "prompt_strength": 0.5, "image": "aGk="})
    assert error.field == "prompt_strength" and "'strength'" in error.message


def test_a1111_txt2img_denoising_strength_without_enable_hr_is_ignored_as_a1111_does():
    job = parse_job({"prompt": "x", "denoising_strength": 0.7, "enable_hr": False})
    assert "strength" not in job.model_fields_set  # no refiner strength, no warning
    img2img = parse_job({"prompt": "x", "init_images": ["aGk="], "denoising_strength": 0.4})
    assert img2img.strength == 0.4


@pytest.mark.parametrize(("name", "canonical"), [("DDIM DDIM", "DDIM"), ("PLMS DDIM", "PNDM")])
def test_ddim_and_pndm_on_the_ddim_schedule_are_themselves(name, canonical):
    assert parse_job({"prompt": "x", "scheduler": name}).scheduler == canonical
