"""The job schema: one pydantic model of a job's input and of its result.

This is the single source of truth for field names, defaults and bounds; the Cog predictor's
inputs are checked against it by a parity test.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from handler.aliases import FIELD_ALIASES, LATENT_UPSCALERS, is_text, normalize_payload
from handler.errors import FIELD_NAME, InvalidInput, as_field, shown, shown_key
from handler.schedulers import (
    DEFAULT_SCHEDULER,
    SCHEDULE_TYPES,
    SCHEDULER_NAMES,
    canonical_scheduler,
    split_schedule,
)

MAX_SEED = 2**64 - 1
MAX_STEPS = 150  # steps of a pass: the job's, the hires pass's, the refiner's
# Characters of a prompt or negative prompt: about 5,000 tokens or more, 70 windows of CLIP's
# 77. Longer texts only cost time and memory (and quadratic time in tag parsing).
MAX_PROMPT_CHARS = 20_000
OutputFormat = Literal["png", "jpeg", "webp"]


class JobModel(BaseModel):
    """A part of a job's input. pydantic would take `true` for 1 in a number field: a client's
    bug that should be an error, not one step or one image (Cog's form refuses it too). NaN and
    infinity are no numbers here, and text must be text: JSON can carry a lone UTF-16
    surrogate ("\\ud800"), which no tokenizer, file name or image metadata can take."""

    model_config = ConfigDict(allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info) -> Any:
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            kinds = typing.get_args(annotation) or (annotation,)
            if bool not in kinds and (int in kinds or float in kinds):
                raise ValueError("must be a number, not true or false")
        if isinstance(value, str) and not is_text(value):
            raise ValueError("is not valid text (it holds a lone UTF-16 surrogate)")
        return value


class LoraSpec(JobModel):
    """One LoRA of a job's stack."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="LoRA name under loras/ (extension optional).")
    scale: float = Field(1.0, ge=-4.0, le=4.0, description="LoRA strength.")


class HiresFix(JobModel):
    """A1111's hires fix: generate, upscale, then an img2img pass at the larger size."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(2.0, ge=1.0, le=4.0, description="Upscale factor of the second pass.")
    steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="Steps the second pass runs, all of them, as in A1111. Empty uses the "
        "job's steps.",
    )
    strength: float = Field(0.55, ge=0.05, le=1.0, description="Second-pass denoising strength.")
    upscaler: Literal[(*LATENT_UPSCALERS, "image")] = Field(  # type: ignore[valid-type]
        "latent",
        description="Upscale the latents (bilinear; or as A1111's other Latent upscalers), or "
        "the decoded image (Lanczos).",
    )


class Job(JobModel):
    """One generation job, after validation."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str = Field(
        description="What to draw. A1111 syntax is accepted.", max_length=MAX_PROMPT_CHARS
    )
    negative_prompt: str = Field(
        "", description="What to keep out of the image.", max_length=MAX_PROMPT_CHARS
    )
    checkpoint: str | None = Field(
        None,
        description="Checkpoint name on the model root (relative to checkpoints/, extension "
        "optional). Empty means the worker's DEFAULT_CHECKPOINT, else the first checkpoint by "
        "name.",
    )
    width: int | None = Field(
        None,
        ge=64,
        le=2048,
        multiple_of=8,
        description="Image width in pixels, a multiple of 8. Empty means the input image's size, "
        "else the checkpoint's native size.",
    )
    height: int | None = Field(
        None,
        ge=64,
        le=2048,
        multiple_of=8,
        description="Image height in pixels, a multiple of 8. Empty means the input image's size, "
        "else the checkpoint's native size.",
    )
    steps: int = Field(30, ge=1, le=MAX_STEPS, description="Denoising steps.")
    guidance_scale: float = Field(
        7.0, ge=0.0, le=30.0, description="Classifier-free guidance (CFG) scale."
    )
    guidance_rescale: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="CFG rescale (diffusers' guidance_rescale): 0 is off; about 0.7 suits "
        "v-prediction and zero-terminal-SNR models. Needs guidance_scale above 1.",
    )
    scheduler: str = Field(
        DEFAULT_SCHEDULER,
        description="Sampler. A1111 names, worker-sdxl K_* names and diffusers class names are accepted.",
        json_schema_extra={"enum": list(SCHEDULER_NAMES)},
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed of the first image; image i uses seed + i. Empty means random.",
    )
    num_images: int = Field(1, ge=1, le=8, description="Number of images.")
    output_format: OutputFormat = Field("png", description="Image file format.")
    output_quality: int = Field(90, ge=1, le=100, description="Quality for jpeg and webp (1-100).")
    image: str | None = Field(
        None,
        description="Init image for img2img: an https URL, s3://bucket/key (the worker's "
        "buckets), a data URI or raw base64.",
    )
    strength: float = Field(
        0.75,
        ge=0.0,
        le=1.0,
        description="img2img: how much of the init image is repainted (1.0 ignores it).",
    )
    resize_mode: Literal["just_resize", "crop", "fill"] = Field(
        "just_resize",
        description="How image (and mask) fit width x height: stretch, crop to fill, or fit and "
        "fill the borders (A1111's just resize / crop and resize / resize and fill).",
    )
    hires: HiresFix | None = Field(
        None, description="Hires fix: {scale, steps, strength, upscaler}. Empty means one pass."
    )
    mask: str | None = Field(
        None,
        description="Inpainting mask (white repaints, black keeps), same forms as image; needs image.",
    )
    mask_blur: int = Field(4, ge=0, le=64, description="Inpainting: mask edge blur in pixels.")
    invert_mask: bool = Field(False, description="Inpainting: repaint the black part instead.")
    refiner_checkpoint: str | None = Field(
        None,
        description="SDXL refiner checkpoint. Empty means the worker's REFINER_CHECKPOINT, "
        "which runs only for jobs that send high_noise_frac or refiner_inference_steps.",
    )
    high_noise_frac: float | None = Field(
        None,
        ge=0.05,
        le=0.95,
        description="SDXL refiner ensemble: where the base hands over to the refiner, as the "
        "fraction of the noise schedule done (timestep 1000 x (1 - value)), as diffusers' "
        "denoising_end and A1111's refiner_switch_at do.",
    )
    refiner_inference_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="SDXL refiner schedule length: it runs the part after high_noise_frac, or, "
        "refining the finished image when high_noise_frac is empty, strength of it (0.3 unless "
        "a txt2img job sends strength).",
    )

    loras: list[LoraSpec] = Field(
        default_factory=list,
        max_length=8,
        description="LoRA stack: [{name, scale}]. A1111's <lora:name:scale> in the prompt also works.",
    )
    vae: str | None = Field(
        None, description="VAE name under vae/ to use instead of the checkpoint's."
    )
    eta: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="DDIM's eta (A1111's 'Eta for DDIM'): 0, its default, is deterministic; 1 "
        "adds fresh noise at every step, as DDPM. Only DDIM takes it.",
    )
    clip_skip: int = Field(
        1,
        ge=1,
        le=12,
        description=(
            "A1111's CLIP skip: 1 uses the last text-encoder layer, 2 the one before. "
            "SDXL already uses the one before: 1 and 2 are the same there."
        ),
    )
    safety_checker: bool | None = Field(
        None,
        description="Check images with the safety checker from the volume. Empty means the "
        "worker's SAFETY_CHECKER setting.",
    )
    destination: Literal["auto", "s3", "base64"] = Field(
        "auto",
        description="Where images go: s3 (presigned URLs), base64 (inline), or auto "
        "(s3 when the worker has a bucket, else base64).",
    )
    strip_metadata: bool = Field(
        False, description="Write no generation parameters (infotext) into the image files."
    )
    sidecar: bool = Field(
        False, description="Also upload a job.json (inputs, seeds, timings) next to the images."
    )

    _notes: list[str] = PrivateAttr(default_factory=list)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        name = canonical_scheduler(value)
        if name is None:
            for schedule in SCHEDULE_TYPES:  # "Euler a Karras": a sampler, a type it lacks
                base = value[: -len(schedule)].strip()
                if value.lower().endswith(schedule.lower()) and canonical_scheduler(base or "?"):
                    raise ValueError(
                        f"sampler {canonical_scheduler(base)!r} has no {schedule!r} schedule type"
                    )
            raise ValueError(f"unknown scheduler {shown(value)}")
        return name

    @field_validator("output_format", mode="before")
    @classmethod
    def _format_in_any_case(cls, value: Any) -> Any:
        """ "PNG", "JPEG" and "jpg" (the extension, as Replicate's models name it) too."""
        if isinstance(value, str) and value.lower() in ("png", "jpeg", "jpg", "webp"):
            return "jpeg" if value.lower() == "jpg" else value.lower()
        return value

    @field_validator("vae", mode="before")
    @classmethod
    def _checkpoints_own_vae(cls, value: Any) -> Any:
        """A1111's names for the checkpoint's own VAE, as its `sd_vae` setting takes them."""
        return None if value in ("Automatic", "None", "") else value

    @field_validator("image", "mask")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: send an image, or leave the field out")
        return value

    @field_validator("eta")
    @classmethod
    def _only_ddim_takes_eta(cls, value: float | None, info) -> float | None:
        scheduler = info.data.get("scheduler")
        if value is not None and scheduler is not None and split_schedule(scheduler)[0] != "DDIM":
            raise ValueError(f"{scheduler} takes no eta; DDIM does")
        return value

    def image_seeds(self) -> list[int]:
        """The seed of every image: seed + i, wrapping at 2**64."""
        assert self.seed is not None
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]


class ImageResult(BaseModel):
    """One delivered image."""

    index: int
    seed: int
    width: int
    height: int
    format: OutputFormat
    bytes: int
    image: str | None = Field(None, description="data URI, when delivered inline")
    url: str | None = Field(None, description="presigned or public URL, when uploaded")
    bucket: str | None = None
    key: str | None = None
    nsfw: bool | None = Field(None, description="safety checker verdict, when it ran")
    withheld: bool | None = Field(None, description="true when the policy withheld a flagged image")


class Result(BaseModel):
    """What a finished job returns."""

    images: list[ImageResult]
    seed: int
    checkpoint: str
    architecture: str
    width: int
    height: int
    steps: int
    scheduler: str
    timings_ms: dict[str, float]
    warnings: list[str] = Field(default_factory=list)


def _owner(loc: tuple) -> tuple[type[BaseModel], Any]:
    """The model that holds the field an error's location ends at, and that field (None for
    an unknown name or a list item): ("hires", "strength") -> (HiresFix, its strength)."""
    model: type[BaseModel] = Job
    field = None
    for part in loc:
        if isinstance(part, int):
            continue  # a list item: its model is the list's
        if field is not None:
            nested = _nested_model(field.annotation)
            if nested is None:
                break
            model = nested
        field = model.model_fields.get(str(part))
        if field is None:
            break
    return model, field


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `list[X]`, if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for member in typing.get_args(annotation):
        found = _nested_model(member)
        if found is not None:
            return found
    return None


def _accepted(error: dict[str, Any]) -> str | None:
    """Describe what would have been accepted for one pydantic error."""
    ctx = error.get("ctx") or {}
    kind = error["type"]
    loc = tuple(error["loc"])
    model, bounds = _owner(loc)
    if loc == ("scheduler",):
        schedules = ", ".join(SCHEDULE_TYPES)
        return ", ".join(SCHEDULER_NAMES) + f"; or a sampler and a schedule type ({schedules})"
    if kind == "literal_error":
        return ctx.get("expected")
    if kind == "extra_forbidden":
        return "fields: " + ", ".join(model.model_fields)
    if loc and isinstance(loc[-1], int) or kind in ("model_type", "model_attributes_type"):
        item = _nested_model(bounds.annotation) if bounds else None
        if item is not None:  # a list item or an object of the wrong kind
            return "an object with " + ", ".join(item.model_fields)
    if kind == "too_long" and "max_length" in ctx:
        return f"a list of at most {ctx['max_length']}"
    if kind == "string_too_long" and "max_length" in ctx:
        return f"text of at most {ctx['max_length']} characters"
    if kind == "value_error" and "surrogate" in error["msg"]:
        return "UTF-8 text"
    if kind == "value_error" and "is empty" in error["msg"]:
        return "an image: https URL, s3://bucket/key, data URI or base64"
    if kind in ("greater_than_equal", "less_than_equal", "multiple_of") and bounds is not None:
        low = high = step = None
        for rule in bounds.metadata:
            low = getattr(rule, "ge", low)
            high = getattr(rule, "le", high)
            step = getattr(rule, "multiple_of", step)
        text = f"{low} to {high}"
        return text + (f", a multiple of {step}" if step else "")
    if bounds is not None:  # missing, or of the wrong type: say the type (and its range)
        described = _type_name(bounds.annotation)
        low = next((r.ge for r in bounds.metadata if getattr(r, "ge", None) is not None), None)
        high = next((r.le for r in bounds.metadata if getattr(r, "le", None) is not None), None)
        if low is not None and high is not None:
            described += f" from {low} to {high}"
        return described
    return None


def field_path(loc: tuple) -> str | None:
    """A pydantic location as the engine names fields: ("loras", 0, "scale") -> loras[0].scale."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _type_name(annotation: Any) -> str:
    """'a string', 'an integer', ... for a field's annotation (first non-None member)."""
    import types

    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    base = next((m for m in members if m is not type(None)), annotation)
    if typing.get_origin(base) is typing.Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(base))
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if base in names:
        return names[base]
    if typing.get_origin(base) is list:
        return "a list"
    return "an object" if isinstance(base, type) and issubclass(base, BaseModel) else "a value"


# Other tools' names for fields, which no payload format here takes as they are
OTHER_TOOLS_NAMES = {
    "cfg": "guidance_scale",  # ComfyUI's KSampler
    "denoise": "strength",  # ComfyUI's KSampler
    "noise_seed": "seed",  # ComfyUI's KSamplerAdvanced
    "ckpt_name": "checkpoint",  # ComfyUI's checkpoint loader
    "num_images_per_prompt": "num_images",  # diffusers' pipelines
}


def _did_you_mean(key: Any, loc: tuple) -> str:
    """' (did you mean guidance_scale?)' for an unknown key close to a field of the object
    holding it (at the top, A1111's names too), or another tool's name for one."""
    if not isinstance(key, str) or not FIELD_NAME.fullmatch(key):
        return ""
    model, _ = _owner(tuple(loc))  # an unknown key: the object that holds it
    names = list(model.model_fields) + (list(FIELD_ALIASES) if model is Job else [])
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    guess = (OTHER_TOOLS_NAMES.get(key) if model is Job else None) or (close[0] if close else None)
    return f" (did you mean {guess}?)" if guess else ""


def invalid_input_from(error: ValidationError) -> InvalidInput:
    """Turn pydantic's first error into our InvalidInput (code, field, accepted)."""
    errors = error.errors()
    extra = [e for e in errors if e["type"] == "extra_forbidden"]
    if extra:
        places = [(field_path(e["loc"][:-1]), e["loc"][-1]) for e in extra]
        unknown = [f"{p}.{shown_key(k)}" if p else shown_key(k) for p, k in places]
        parent, key = places[0]
        unknown[0] += _did_you_mean(key, extra[0]["loc"])  # the first one's, beside it
        return InvalidInput(
            f"unknown field(s): {', '.join(unknown)}",
            field=as_field(key, parent) or parent or "input",
            accepted=_accepted(extra[0]),
        )
    first = errors[0]
    field = field_path(first["loc"])
    message = first["msg"].removeprefix("Value error, ")  # our own validators' messages
    kind, context = first["type"], first.get("ctx") or {}
    if kind == "missing":
        message = "is required"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "must be an object"  # not pydantic's "instance of HiresFix"
    elif kind == "list_type":
        message = "must be a list"
    elif kind == "too_long" and "actual_length" in context:
        message = f"has {context['actual_length']} items"
    accepted = _accepted(first)
    if first["loc"][:1] == ("loras",) and kind == "list_type":
        accepted = 'a list of objects, e.g. [{"name": "ink", "scale": 0.8}]'
    elif first["loc"][:1] == ("loras",) and kind == "model_type":
        accepted = 'an object with name and scale, e.g. {"name": "ink", "scale": 0.8}'
    return InvalidInput(message, field=field, accepted=accepted)


# Native fields (or parts) under the names other clients send, where those are not plain
# renames (FIELD_ALIASES): A1111's override_settings, init_images and hires fields.
SENT_AS = [
    ("clip_skip", "override_settings.CLIP_stop_at_last_layers"),
    ("checkpoint", "override_settings.sd_model_checkpoint"),
    ("vae", "override_settings.sd_vae"),
    ("image", "init_images[0]"),
    ("hires.scale", "hr_scale"),
    ("hires.steps", "hr_second_pass_steps"),
    ("hires.strength", "denoising_strength"),
    ("scheduler", "sampler_index"),  # A1111's deprecated name, alone
    ("mask_blur", "mask_blur_x"),
    ("mask_blur", "mask_blur_y"),
]


def field_as_sent(field: str | None, payload: dict[str, Any]) -> str | None:
    """An error's field under the name the client used: `cfg_scale`, not `guidance_scale`."""
    if field is None or _top(field) in payload:
        return field
    candidates = [(a, n) for a, n in FIELD_ALIASES.items()] + [(a, n) for n, a in SENT_AS]
    for alias, native in candidates:
        if (field == native or field.startswith((f"{native}.", f"{native}["))) and _sent(
            alias, payload
        ):
            return alias + field[len(native) :]
    if _top(field) == "hires" and "enable_hr" in payload:
        return "enable_hr"  # A1111's default hr_scale, say: the hires pass it asked for
    return field


def _top(field: str) -> str:
    return field.split(".", 1)[0].split("[", 1)[0]


def _sent(alias: str, payload: dict[str, Any]) -> bool:
    top, _, rest = alias.partition(".")
    value = payload.get(_top(top))
    return value is not None and (not rest or (isinstance(value, dict) and rest in value))


def parse_job(payload: Any) -> Job:
    """Validate a job input dict into a Job, or raise InvalidInput naming the field."""
    if not isinstance(payload, dict):
        raise InvalidInput(
            f"the job input must be a JSON object, got {type(payload).__name__}",
            field="input",
            accepted='{"prompt": "...", ...}',
        )
    native, notes = normalize_payload(payload)
    try:
        job = Job.model_validate(native)
    except ValidationError as error:
        refused = invalid_input_from(error)
        refused.field = field_as_sent(refused.field, payload)
        raise refused from None
    job._notes = notes
    return job
