"""Drop-in payloads: field names that other SD workers' clients already send.

worker-sdxl (RunPod's official SDXL worker) and the A1111 txt2img API name the same things
differently. `normalize_payload` maps them onto the native schema before validation, so clients
can switch endpoints without rewriting. Two names for one field in the same payload is an error,
and unknown fields still fail validation: nothing is silently dropped.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

from handler.errors import InvalidInput, as_field, shown
from handler.schedulers import (
    DEFAULT_SCHEDULER,
    SCHEDULE_TYPES,
    SCHEDULER_NAMES,
    canonical_scheduler,
    sampler_named,
    split_schedule,
    takes_schedule,
)

# other name -> native name
FIELD_ALIASES = {
    # worker-sdxl / diffusers call arguments
    "num_inference_steps": "steps",
    # A1111
    "cfg_scale": "guidance_scale",
    "sampler_name": "scheduler",
    "denoising_strength": "strength",
    "inpainting_mask_invert": "invert_mask",
    "rescale_cfg": "guidance_rescale",  # Forge's built-in RescaleCFG
    # worker-sdxl
    "image_url": "image",
    # Replicate's cog-sdxl (the Cog form's names)
    "num_outputs": "num_images",
    "prompt_strength": "strength",
    "refine_steps": "refiner_inference_steps",
}
# worker-sdxl's default strength when it refines an `image_url` (ours is 0.75, as A1111's)
WORKER_SDXL_STRENGTH = 0.3
# Fields the native schema does not have, accepted only at the value that changes nothing.
A1111_NEUTRAL = {
    "restore_faces": False,
    "tiling": False,
    "send_images": True,
    "do_not_save_samples": (False, True),
    "do_not_save_grid": (False, True),
    "subseed": (-1, 0),
    "subseed_strength": 0,
    "seed_resize_from_h": (-1, 0),
    "seed_resize_from_w": (-1, 0),
    "override_settings_restore_afterwards": (True, False),
    "script_args": [],
    "alwayson_scripts": {},
    "styles": [],
    # img2img/inpainting: only the behaviour this worker has (A1111's defaults for
    # inpainting_fill and inpaint_full_res are read in _apply_inpaint_fields)
    "inpaint_full_res_padding": (0, 32),
    "mask_round": (True,),
    "include_init_images": (False,),
    "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None,),
    "firstpass_image": (None, ""),
    "s_noise": (None, 1, 1.0),
    "s_min_uncond": (None, 0, 0.0),
    "s_churn": (None, 0, 0.0),
    "s_tmin": (None, 0, 0.0),
    "s_tmax": (None, 0, 0.0),
    "disable_extra_networks": False,
    "firstphase_width": (0, None),
    "firstphase_height": (0, None),
    "comments": (None, {}, ""),
    "script_name": (None, ""),
    "force_task_id": (None, ""),
    "infotext": (None, ""),
}
# Fields A1111 ignores outside instruct-pix2pix, whatever their value: so does this worker
# (webuiapi, A1111's Python client, sends image_cfg_scale 1.5).
A1111_IGNORED = ("image_cfg_scale",)
# A1111's `eta`: the noise of its ancestral and SDE samplers (1, as diffusers runs them); its
# other samplers take none and ignore it, but DDIM, whose eta is the job's `eta`.
ETA_SAMPLERS = {"Euler a": 1, "DPM2 a": 1, "DPM++ SDE": 1, "DPM++ 2M SDE": 1}
# A1111 >= 1.9 names the noise schedule separately from the sampler. "Uniform" and "Normal"
# are the model's timesteps evenly spaced, as diffusers' default spacing does. Keys are
# lowercase with spaces: A1111's API also takes its internal names ("sgm_uniform").
A1111_SCHEDULE_TYPES = {
    "uniform": "",
    "normal": "",
    **{name.lower(): name for name in SCHEDULE_TYPES},
    # ComfyUI's: its ddim_uniform is diffusers' leading spacing with the configs' offset of 1
    # (the same timesteps when the steps divide 1000; otherwise ComfyUI adds a step at the top);
    # its simple takes every (1000 / steps)-th sigma from the top, as trailing spacing does,
    # rounding down where trailing rounds to the nearest (one timestep apart at most)
    "ddim uniform": "DDIM",
    "simple": "SGM Uniform",
}
# "Automatic" (or no schedule type) is the sampler's own default in A1111 >= 1.9
# (modules/sd_samplers_kdiffusion.py); the samplers not named here use the plain schedule.
A1111_AUTOMATIC_SCHEDULES = {
    "DPM++ 2M": "Karras",
    "DPM++ SDE": "Karras",
    "DPM2": "Karras",
    "DPM2 a": "Karras",
    "DPM++ 2M SDE": "Exponential",
}
# Other A1111 fields its clients send as null for "not set", besides the aliases and extras.
A1111_NULLABLE = (
    "override_settings",
    "sampler_index",
    "mask_blur",
    "mask_blur_x",
    "mask_blur_y",
    "inpainting_fill",
    "inpaint_full_res",
    "scheduler",
    "enable_hr",
    "batch_size",
    "n_iter",
    "init_images",
    "refiner_switch_at",
)
# A1111's default sampler_index, which its own clients send beside every sampler_name.
A1111_DEFAULT_SAMPLER_INDEX = "Euler"
# A1111 model titles carry a hash suffix: "v1-5-pruned-emaonly.safetensors [6ce0161689]".
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,12}\]$")
# A1111's latent upscalers: (torch interpolation mode, antialias, A1111's name)
LATENT_UPSCALERS = {
    "latent": ("bilinear", False, "Latent"),
    "latent-antialiased": ("bilinear", True, "Latent (antialiased)"),
    "latent-bicubic": ("bicubic", False, "Latent (bicubic)"),
    "latent-bicubic-antialiased": ("bicubic", True, "Latent (bicubic antialiased)"),
    "latent-nearest": ("nearest", False, "Latent (nearest)"),
    "latent-nearest-exact": ("nearest-exact", False, "Latent (nearest-exact)"),
}
# override_settings that name a job field, and the field.
OVERRIDE_FIELDS = {
    "sd_model_checkpoint": "checkpoint",
    "CLIP_stop_at_last_layers": "clip_skip",
    "sd_vae": "vae",
}
# Fields that name a model, where A1111 clients send its titles.
MODEL_NAME_FIELDS = ("checkpoint", "refiner_checkpoint", "vae")


def model_title_to_name(title: str) -> str:
    """An A1111 model title as a name here: the hash suffix dropped, and a Windows host's
    backslashes ("SDXL\\base.safetensors [31e35c80fc]") as slashes."""
    return _TITLE_HASH.sub("", title).replace("\\", "/")


def normalize_payload(payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map alias field names onto native ones; returns (native payload, warnings)."""
    _check_keys_are_text(payload, "input")
    data = dict(payload)
    warnings: list[str] = []
    # A1111's API models default many fields to null, and clients send them: null is absent.
    for name in (*A1111_NULLABLE, *FIELD_ALIASES, *A1111_NEUTRAL, *A1111_HIRES_FIELDS):
        if name in data and data[name] is None:
            del data[name]
    _apply_hires_fields(data, warnings)  # first: with enable_hr, denoising_strength is hires
    _apply_inpaint_fields(data, warnings)
    # Defaults other clients send explicitly or leave to their own defaults
    if "negative_prompt" in data and data["negative_prompt"] is None:  # worker-sdxl's null
        data["negative_prompt"] = ""
    strengths = ("strength", *(a for a, native in FIELD_ALIASES.items() if native == "strength"))
    if data.get("image_url") and not any(name in data for name in strengths):
        data["strength"] = WORKER_SDXL_STRENGTH  # worker-sdxl's own default for its image_url
    _apply_sampler_fields(data, warnings)
    _apply_refiner_switch_at(data, warnings)
    _apply_renames(data)  # two names for one field is ambiguous: refused
    _apply_a1111_fields(data)
    _drop_neutral_fields(data, warnings)
    for name in MODEL_NAME_FIELDS:  # A1111 model titles, "name.safetensors [hash]"
        if isinstance(data.get(name), str):
            data[name] = model_title_to_name(data[name])
    return data, warnings


def _apply_sampler_fields(data: dict[str, Any], warnings: list[str]) -> None:
    """A1111's deprecated sampler_index (which A1111 itself ignores beside sampler_name) and
    its schedule type sent alone ("Automatic" is the sampler's own)."""
    if "sampler_index" in data:
        index = data.pop("sampler_index")
        if "sampler_name" not in data and (
            "scheduler" not in data or _is_schedule_type(data["scheduler"], automatic=True)
        ):
            data["sampler_name"] = index
        elif index not in (data.get("sampler_name"), A1111_DEFAULT_SAMPLER_INDEX):
            warnings.append("sampler_index ignored: the sampler is given (as A1111 does)")
    scheduler = data.get("scheduler")
    # alone, "DDIM" is the sampler (the native field), not A1111's schedule type of that name
    if (
        "sampler_name" not in data
        and _is_schedule_type(scheduler, automatic=True)
        and not _is_sampler(scheduler)
    ):
        if _schedule_key(data["scheduler"]) != "automatic":
            raise InvalidInput(
                f"schedule type {shown(data['scheduler'])} needs a sampler_name",
                field="scheduler",
                accepted="a sampler such as 'DPM++ 2M Karras', or sampler_name + scheduler",
            )
        data.pop("scheduler")


def _apply_refiner_switch_at(data: dict[str, Any], warnings: list[str]) -> None:
    """A1111's refiner_switch_at is high_noise_frac; 1 never switches (no refiner)."""
    switch_at = data.pop("refiner_switch_at", None)
    if switch_at is not None and data.get("refiner_checkpoint"):
        if "high_noise_frac" in data:
            raise InvalidInput(
                "both refiner_switch_at and high_noise_frac are given",
                field="refiner_switch_at",
                accepted="one of them",
            )
        if switch_at == 1 and not isinstance(switch_at, bool):  # A1111 never switches
            data.pop("refiner_checkpoint")
            warnings.append("refiner_switch_at 1: the refiner does not run (as in A1111)")
        elif (
            not isinstance(switch_at, int | float)
            or isinstance(switch_at, bool)
            or not 0.05 <= switch_at <= 0.95
        ):
            raise InvalidInput(
                f"refiner_switch_at {shown(switch_at)} is out of range",
                field="refiner_switch_at",
                accepted="0.05 to 0.95, or 1 for no refiner",
            )
        else:
            data["high_noise_frac"] = switch_at


def _apply_renames(data: dict[str, Any]) -> None:
    """FIELD_ALIASES onto their native fields; beside sampler_name, A1111's `scheduler` is the
    schedule type."""
    renamed: dict[str, str] = {}  # native field -> the alias it came as
    for alias, native in FIELD_ALIASES.items():
        if alias not in data:
            continue
        value = data.pop(alias)
        if alias == "sampler_name" and (
            native not in data
            or not _is_sampler(data[native])
            or _is_schedule_type(data[native])  # "DDIM" beside a sampler: the schedule type
        ):
            # beside sampler_name, A1111's `scheduler` is the schedule type
            value = _with_schedule_type(value, data.pop(native, "Automatic"))
        elif native in data:
            other = renamed.get(native, native)
            raise InvalidInput(
                f"both {alias!r} and {other!r} are given; they name the same field",
                field=alias,
                accepted=f"one of {alias!r} or {other!r}",
            )
        data[native] = value
        renamed[native] = alias


def _apply_a1111_fields(data: dict[str, Any]) -> None:
    """A1111: seed -1 means random, batch_size x n_iter images, resize_mode by index, one
    init image, and the model, clip skip and VAE in override_settings."""
    if data.get("seed") in (-1, "-1"):
        data["seed"] = None
    if data.get("subseed_strength", 0) == 0:
        data.pop("subseed", None)  # A1111 ignores the subseed at strength 0
    if "batch_size" in data or "n_iter" in data:
        if "num_images" in data:
            raise InvalidInput(
                "both A1111's batch_size/n_iter and num_images are given",
                field="num_images",
                accepted="num_images, or batch_size and n_iter",
            )
        batch, iterations = data.pop("batch_size", 1), data.pop("n_iter", 1)
        whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (batch, iterations))
        if not whole or batch < 1 or iterations < 1 or batch * iterations > 8:
            raise InvalidInput(
                f"batch_size {shown(batch)} x n_iter {shown(iterations)} is not 1 to 8 images",
                field="batch_size",
                accepted="whole numbers from 1 up, with batch_size x n_iter from 1 to 8",
            )
        data["num_images"] = batch * iterations
    if "resize_mode" in data and type(data["resize_mode"]) is int:  # A1111's index, not a bool
        modes = {0: "just_resize", 1: "crop", 2: "fill", 3: "just_resize"}
        if data["resize_mode"] not in modes:
            raise InvalidInput(
                "must be 0 to 3 (A1111) or a name",
                field="resize_mode",
                accepted="just_resize, crop, fill (or A1111's 0, 1, 2, 3)",
            )
        data["resize_mode"] = modes[data["resize_mode"]]
    if "init_images" in data:
        if "image" in data:
            raise InvalidInput(
                "both init_images and image are given", field="init_images", accepted="one of them"
            )
        images = data.pop("init_images")
        if not isinstance(images, list) or len(images) != 1:
            raise InvalidInput(
                "must be a list with one image", field="init_images", accepted='["<base64 or URL>"]'
            )
        data["image"] = images[0]
    if "override_settings" in data:
        _apply_override_settings(data, data.pop("override_settings"))


def _drop_neutral_fields(data: dict[str, Any], warnings: list[str]) -> None:
    """Fields with no native equivalent: accepted at the value that changes nothing."""
    _check_eta(data)
    for name in A1111_IGNORED:
        data.pop(name, None)
    if data.pop("save_images", False) not in (False, None):  # SillyTavern sends true
        warnings.append("save_images ignored: the images are delivered, not kept on the worker")
    if _scripts_all_disabled(data.get("alwayson_scripts")):
        data.pop("alwayson_scripts")  # webuiapi sends the extensions it knows, switched off
    for name, neutral in A1111_NEUTRAL.items():
        if name in data:
            value = data.pop(name)
            allowed = neutral if isinstance(neutral, tuple) else (neutral,)
            if value not in allowed:
                raise InvalidInput(
                    # not quoted: these fields can hold prompts (infotext) and images (scripts)
                    f"{name} is not supported by this worker (it was {_kind(value)})",
                    field=name,
                    accepted=f"{name} omitted, or " + " or ".join(repr(v) for v in allowed),
                )


# A1111 sends these with every txt2img request; they only matter when enable_hr is true.
A1111_HIRES_FIELDS = (
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_checkpoint_name",
    "hr_additional_modules",
)


def _apply_inpaint_fields(data: dict[str, Any], warnings: list[str]) -> None:
    """A1111's img2img inpainting options: its defaults (fill, only masked) are accepted with a
    warning when there is a mask, since its clients send them unasked or leave them to A1111's
    defaults (an img2img payload, with `init_images`, that leaves them out gets them too); other
    choices that this worker does not have are refused. mask_blur_x / _y stand for mask_blur
    when it is absent."""
    a1111 = "init_images" in data
    blur_x, blur_y = data.pop("mask_blur_x", None), data.pop("mask_blur_y", None)
    if "mask_blur" not in data and (blur_x, blur_y) != (None, None):
        if blur_x != blur_y and None not in (blur_x, blur_y):
            raise InvalidInput(
                "different horizontal and vertical mask blurs are not supported",
                field="mask_blur_x",
                accepted="mask_blur, or equal mask_blur_x and mask_blur_y",
            )
        data["mask_blur"] = blur_x if blur_x is not None else blur_y
    fill = data.pop("inpainting_fill", 0 if a1111 else 1)
    if fill not in (0, 1):
        raise InvalidInput(
            f"inpainting_fill={shown(fill)} is not supported by this worker",
            field="inpainting_fill",
            accepted="1 (original; also what A1111's default 0 runs as here)",
        )
    whole = data.pop("inpaint_full_res", a1111) in (False, 0)
    if data.get("mask"):
        if fill == 0:
            warnings.append(
                "inpainting_fill 0 (fill) runs as 1 (original): the masked area starts from "
                "the image"
            )
        if not whole:
            warnings.append(
                "inpaint_full_res (only masked) is not supported: the whole picture is "
                "inpainted at its size"
            )


def _apply_hires_fields(data: dict[str, Any], warnings: list[str]) -> None:
    """A1111's enable_hr + hr_* fields -> `hires`; its denoising_strength is the hires strength."""
    enabled = data.pop("enable_hr", None)
    given = {name: data.pop(name) for name in A1111_HIRES_FIELDS if name in data}
    img2img = any(data.get(name) for name in ("init_images", "image", "image_url"))
    if not enabled:
        if not img2img:  # A1111's txt2img reads it only for the hires pass (webuiapi sends 0.7)
            data.pop("denoising_strength", None)
        return
    if img2img:
        # A1111's img2img has no hires fix: its denoising_strength stays the img2img strength
        warnings.append("enable_hr ignored: img2img has no hires fix (as in A1111)")
        return
    if "hires" in data:
        raise InvalidInput(
            "both enable_hr and hires are given", field="enable_hr", accepted="one of them"
        )
    if given.get("hr_resize_x") or given.get("hr_resize_y"):
        raise InvalidInput(
            "hr_resize_x/hr_resize_y are not supported; use hr_scale",
            field="hr_resize_x",
            accepted="hr_scale from 1 to 4",
        )
    _check_hires_same_as_first_pass(data, given)
    hires: dict[str, Any] = {"scale": given.get("hr_scale", 2.0)}
    if given.get("hr_second_pass_steps"):
        hires["steps"] = given["hr_second_pass_steps"]
    if "denoising_strength" in data:
        strength = data.pop("denoising_strength")
        if isinstance(strength, int | float) and not 0.05 <= strength <= 1:
            raise InvalidInput(
                f"with enable_hr, denoising_strength is the hires pass's strength: {strength}",
                field="denoising_strength",
                accepted="0.05 to 1.0 with enable_hr",
            )
        hires["strength"] = strength
    else:
        hires["strength"] = A1111_HIRES_STRENGTH
    upscaler = str(given.get("hr_upscaler") or "Latent")
    latent = {name.lower(): key for key, (_, _, name) in LATENT_UPSCALERS.items()}
    if upscaler.lower() in latent:
        hires["upscaler"] = latent[upscaler.lower()]
    else:
        hires["upscaler"] = "image"
        if upscaler.lower() != "lanczos":
            warnings.append(
                f"hr_upscaler {shown(upscaler)} is not available: the image upscaler is Lanczos"
            )
    data["hires"] = hires


# A1111's txt2img API default for denoising_strength, which is the hires pass's strength.
A1111_HIRES_STRENGTH = 0.75


# A1111's hires-pass choices that this worker does not have (its hires pass reuses the first
# pass's sampler, prompts and checkpoint): accepted only as "the same".
HIRES_SAME_AS_FIRST_PASS = {
    "hr_sampler_name": ("sampler_name", ("", "Use same sampler")),
    "hr_scheduler": ("scheduler", ("", "Use same scheduler")),
    "hr_prompt": ("prompt", ("",)),
    "hr_negative_prompt": ("negative_prompt", ("",)),
    "hr_checkpoint_name": ("checkpoint", ("", "Use same checkpoint")),
    "hr_additional_modules": (None, ([], ["Use same choices"])),
}


def _scripts_all_disabled(scripts: Any) -> bool:
    """Whether A1111's alwayson_scripts only switch extensions off: no arguments (ControlNet
    with no units), an enable flag first and false (ADetailer), or units all disabled."""
    if not isinstance(scripts, dict):
        return False
    for script in scripts.values():
        args = script.get("args") if isinstance(script, dict) else None
        if not isinstance(args, list):
            return False
        if not args or args[0] is False:
            continue
        if not all(isinstance(unit, dict) and unit.get("enabled") is False for unit in args):
            return False
    return True


def _check_eta(data: dict[str, Any]) -> None:
    """A1111's `eta`: DDIM's is the job's `eta`; for the others it is accepted where it changes
    nothing: its value for a sampler that takes one (webuiapi sends 1 with every request),
    anything for one that ignores it."""
    if data.get("eta") is None:
        data.pop("eta", None)
        return
    sampler = canonical_scheduler(str(data.get("scheduler") or DEFAULT_SCHEDULER))
    if sampler is None or split_schedule(sampler)[0] == "DDIM":
        return  # the schema checks it (and names an unknown sampler)
    eta = data.pop("eta")
    neutral = ETA_SAMPLERS.get(split_schedule(sampler)[0])
    if not isinstance(eta, int | float) or isinstance(eta, bool):
        raise InvalidInput("eta must be a number", field="eta", accepted="a number, or null")
    if neutral is not None and eta != neutral:
        raise InvalidInput(
            f"eta={shown(eta)} changes {sampler}'s noise, which this worker does not do",
            field="eta",
            accepted=f"eta omitted, or {neutral!r} for {sampler}",
        )


def _check_hires_same_as_first_pass(data: dict[str, Any], given: dict[str, Any]) -> None:
    for name, (first_pass, same) in HIRES_SAME_AS_FIRST_PASS.items():
        if name not in given or given[name] in same:
            continue
        if first_pass == "checkpoint":
            if _same_model(given[name], _first_pass_checkpoint(data)):
                continue
        elif first_pass == "scheduler" and isinstance(given[name], str):
            # A1111's schedule type; no scheduler beside sampler_name is its "Automatic"
            named = "sampler_name" in data or "sampler_index" in data
            first = data.get("scheduler") if named else None
            if _schedule_key(given[name]) == _schedule_key(str(first or "Automatic")):
                continue
        elif first_pass is not None and given[name] == data.get(first_pass):
            continue
        given_as = f"{name}={shown(given[name])}"  # a sampler's or a checkpoint's name
        if name.endswith("prompt"):  # prompt text is never quoted
            given_as = f"{name} differs from {first_pass}"
        raise InvalidInput(
            f"{given_as}: a different hires pass is not supported",
            field=name,
            accepted=f"{name} omitted, or {same[-1]!r} (the hires pass reuses the first pass's "
            "sampler, prompts and checkpoint)",
        )


def _first_pass_checkpoint(data: dict[str, Any]) -> Any:
    """The first pass's checkpoint: `checkpoint`, or A1111's override_settings (not yet applied
    when the hires fields are read)."""
    overrides = data.get("override_settings")
    if "checkpoint" not in data and isinstance(overrides, dict):
        return overrides.get("sd_model_checkpoint")
    return data.get("checkpoint")


def _same_model(a: Any, b: Any) -> bool:
    """Whether two model names or A1111 titles name one model ("x.safetensors [hash]" is "x")."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return _model_key(a) == _model_key(b)


def _model_key(name: str) -> str:
    name = model_title_to_name(name).strip()
    stem, dot, extension = name.rpartition(".")
    return (
        stem if dot and extension.lower() in ("safetensors", "ckpt", "pt", "pth", "bin") else name
    )


def _schedule_key(value: str) -> str:
    return value.lower().replace("_", " ")


def _kind(value: Any) -> str:
    """What a value is, without its content: 'a str of 1200 characters', 'a list of 2'."""
    if isinstance(value, str):
        return f"a str of {len(value)} characters"
    return shown(value)


def _is_schedule_type(value: Any, automatic: bool = False) -> bool:
    if not isinstance(value, str):
        return False
    key = _schedule_key(value)
    return key in A1111_SCHEDULE_TYPES or (automatic and key == "automatic")


def _is_sampler(value: Any) -> bool:
    return isinstance(value, str) and canonical_scheduler(value) is not None


def _with_schedule_type(sampler: Any, schedule: Any) -> Any:
    """'DPM++ 2M' + 'Karras' -> 'DPM++ 2M Karras'; 'Automatic' is the sampler's A1111 default;
    a schedule type the sampler does not have, or one diffusers does not have, is refused
    rather than run as something else."""
    if not _is_schedule_type(schedule, automatic=True):
        raise InvalidInput(
            f"schedule type {shown(schedule)} is not supported",
            field="scheduler",
            accepted="Automatic, Uniform, Normal, Simple, DDIM Uniform, "
            + ", ".join(SCHEDULE_TYPES),
        )
    automatic = _schedule_key(schedule) == "automatic"
    base = None
    if isinstance(sampler, str):
        base = canonical_scheduler(sampler) if automatic else sampler_named(sampler)
    if automatic:
        suffix = A1111_AUTOMATIC_SCHEDULES.get(base or "", "")
    else:
        suffix = A1111_SCHEDULE_TYPES[_schedule_key(schedule)]
    if base is None:
        return sampler  # an unknown sampler is the schema's error
    if not suffix:
        return base  # the plain schedule
    if split_schedule(base)[1] == suffix or (suffix == "DDIM" and base in ("DDIM", "PNDM")):
        return base  # "DPM++ 2M Karras" with "Karras"; DDIM and PNDM run on DDIM's schedule
    if split_schedule(base)[1] is None and takes_schedule(base, suffix):
        return f"{base} {suffix}"
    with_it = [
        n for n in SCHEDULER_NAMES if split_schedule(n)[1] is None and takes_schedule(n, suffix)
    ]
    raise InvalidInput(
        f"sampler {shown(sampler)} has no {suffix!r} schedule type",
        field="scheduler",
        accepted=f"{suffix} with one of: " + ", ".join(with_it),
    )


def _apply_override_settings(data: dict[str, Any], overrides: Any) -> None:
    """A1111's per-request settings that name a job field: the model, clip skip, the VAE.
    Clients send a field both ways (SillyTavern: clip_skip and CLIP_stop_at_last_layers):
    the same value twice is one value; two different ones are refused."""
    if not isinstance(overrides, dict):
        raise InvalidInput(
            "must be an object",
            field="override_settings",
            accepted='{"sd_model_checkpoint": "name"}',
        )
    overrides = dict(overrides)
    for key, native in OVERRIDE_FIELDS.items():
        if key not in overrides:
            continue
        value = overrides.pop(key)
        if native != "clip_skip":
            if native == "vae" and value in ("Automatic", "None", None, ""):
                continue  # the checkpoint's own VAE
            value = model_title_to_name(str(value))
        if native in data:
            given = data[native]
            same = given == value if native == "clip_skip" else _same_model(given, value)
            if not same:
                raise InvalidInput(
                    f"{native} and override_settings.{key} are both given, and differ",
                    field=f"override_settings.{key}",
                    accepted="one of them, or the same value in both",
                )
        data[native] = value
    # Forge's extra modules (text encoders, VAEs): SillyTavern sends the chosen VAE there too
    modules = overrides.pop("forge_additional_modules", [])
    vae = data.get("vae")
    if not isinstance(modules, list) or any(
        not isinstance(module, str) or not isinstance(vae, str) or _stem(module) != _stem(vae)
        for module in modules
    ):
        raise InvalidInput(
            "Forge's additional modules are not supported, but for the VAE",
            field="override_settings.forge_additional_modules",
            accepted="an empty list, or the VAE that sd_vae or vae names",
        )
    if overrides:
        unknown = ", ".join(shown(key) for key in sorted(overrides, key=str))
        first = sorted(overrides, key=str)[0]
        raise InvalidInput(
            f"unsupported override_settings: {unknown}",
            field=as_field(first, "override_settings"),
            accepted=", ".join([*OVERRIDE_FIELDS, "forge_additional_modules"]),
        )


def is_text(value: Any) -> bool:
    """A string that is valid text (JSON can carry a lone UTF-16 surrogate, which is not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_keys_are_text(value: Any, path: str) -> None:
    """Refuse field names that are not text, anywhere in the payload: errors name fields, and
    a reply holding a lone surrogate cannot be sent."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not is_text(key):
                raise InvalidInput(
                    "a field name is not valid text (it holds a lone UTF-16 surrogate)",
                    field=path,
                    accepted="field names in UTF-8",
                )
            # a key that is no field name (a prompt pasted as a key) is not quoted in `field`
            _check_keys_are_text(item, as_field(key, None if path == "input" else path) or path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_keys_are_text(item, f"{path}[{index}]")


def _stem(path: str) -> str:
    """A module's file name without folders or extension: 'C:\\VAE\\sdxl_vae.safetensors' ->
    'sdxl_vae'."""
    return PurePosixPath(path.replace("\\", "/")).stem
