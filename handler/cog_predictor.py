"""Cog adapter for Replicate: typed web-form inputs -> schema -> engine -> image files.

Defaults, bounds and choices are literals (Cog's static schema parser reads this file without
running it); tests/test_cog_predictor.py checks every one against handler/schema.py.
"""

from __future__ import annotations

import base64
import contextvars
import io
import logging
import queue
import re
import tempfile
import threading
import time
from pathlib import Path as FilePath
from urllib.parse import urlsplit

from cog import BaseRunner, Input, Path

from handler.errors import ContentWithheld, InternalError, InvalidInput, WorkerError, shown
from handler.registry import prefetch_default_checkpoint
from handler.schedulers import (
    SCHEDULE_TYPES,
    canonical_scheduler,
    sampler_named,
    split_schedule,
)
from handler.schema import parse_job
from handler.settings import Settings

log = logging.getLogger(__name__)
# The form's hires_strength default: any other value without hires_scale would be ignored.
HIRES_STRENGTH_DEFAULT = 0.55
# cog-sdxl's scheduler names that A1111's do not cover (its DDIM and PNDM are A1111's too)
COG_SDXL_SCHEDULERS = (
    "K_EULER",
    "K_EULER_ANCESTRAL",
    "DPMSolverMultistep",
    "KarrasDPM",
    "HeunDiscrete",
)
# Schema fields (as errors name them) under their name in the form
FORM_NAMES = {
    "steps": "num_inference_steps",
    "num_images": "num_outputs",
    "strength": "prompt_strength",
    "refiner_inference_steps": "refine_steps",
    "hires": "hires_scale",
    "hires.scale": "hires_scale",
    "hires.strength": "hires_strength",
    "safety_checker": "disable_safety_checker",
}


def parse_lora_list(text: str) -> list[dict]:
    """'name:0.8, other' -> [{"name": "name", "scale": 0.8}, {"name": "other", "scale": 1.0}]."""
    loras = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, scale = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            value = float(scale) if scale.strip() else 1.0
        except ValueError:
            raise InvalidInput(
                f"{shown(item)}: the scale is not a number",
                field="loras",
                accepted="'name:scale, name:scale', e.g. 'ink:0.8, detail'",
            ) from None
        loras.append({"name": name.strip(), "scale": value})
    return loras


def fetch_url_inputs_like_the_worker(settings: Settings) -> None:
    """Make Cog fetch `image` / `mask` URLs through the worker's own fetcher.

    coglet downloads a `Path` input given as an http(s) URL itself, before `run()` is called,
    with plain requests: any scheme it knows, any address (loopback, private, link-local).
    cog builds those downloads from `cog.types.File.validate`, so this routes http(s) values
    there through `handler.inputs.fetch_url`: https only unless ALLOW_HTTP_INPUTS, every address
    checked and pinned, with its size and time caps, as a RunPod job's URLs are. Data URIs,
    which the web form and `cog predict` send for uploaded files, are left to cog.
    """
    import cog.types

    from handler.inputs import fetch_url

    cog_validate = cog.types.File.validate.__func__

    def validate(cls, value):
        if isinstance(value, str) and urlsplit(value.strip()).scheme in ("http", "https"):
            return io.BytesIO(fetch_url(value.strip(), "image or mask", settings))
        return cog_validate(cls, value)

    cog.types.File.validate = classmethod(validate)


# The files cog wrote for `image` / `mask` inputs (uploads, data URIs, fetched URLs) and run()
# has not read yet. cog turns any other string given for a `Path` input into a path on the
# server; run() reads only these.
_WRITTEN_BY_COG: set[str] = set()


def record_the_files_cog_writes() -> None:
    """Record the files cog writes for `Path` inputs (`URLPath.convert`), so that run() can
    refuse a path that names a file already on the server instead of reading it."""
    import cog.types

    cog_convert = cog.types.URLPath.convert

    def convert(self):
        path = cog_convert(self)
        _WRITTEN_BY_COG.add(str(path))
        return path

    cog.types.URLPath.convert = convert


def read_input_file(path: FilePath, field: str) -> bytes:
    """The bytes cog wrote for the input `field`; anything else is refused, unread and unnamed."""
    if str(path) not in _WRITTEN_BY_COG:
        raise InvalidInput(
            "takes an uploaded file, a data: URI or a URL; other text (raw base64, a path on "
            "the server) is not read",
            field=field,
            accepted="an uploaded file, a data: URI (data:image/png;base64,...) or an https:// URL",
        )
    _WRITTEN_BY_COG.discard(str(path))
    return FilePath(path).read_bytes()


class _Handoff:
    """One prediction's job on its way to the predictions thread, and back."""

    def __init__(self, job) -> None:
        self.job = job
        self.context = contextvars.copy_context()  # the prediction's, for coglet's log routing
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.submitted = self.taken = False
        self.result = self.error = None


def name_fields_as_the_form(error: WorkerError) -> None:
    """An error's field as the form names it: `num_inference_steps`, not `steps`; `loras`
    (the form's "name:scale, ..." string) for `loras[1].scale`, with the entry's place."""
    if error.field is not None and error.field.startswith("loras["):
        entry = re.match(r"loras\[(\d+)\]", error.field)
        if entry:
            error.message = f"LoRA {int(entry.group(1)) + 1} of loras: {error.message}"
        error.field = "loras"
    elif error.field is not None:
        error.field = FORM_NAMES.get(error.field, error.field)


class _LogProgress:
    """Prints denoising progress to the prediction log, at most about twice a second, as tqdm
    lines (` 50%|#####     | 15/30 [denoising]`): Replicate's clients read progress from the
    log's last line of that shape (replicate-javascript's `parseProgressFromLogs`)."""

    BAR = 20

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, progress) -> None:
        now = time.monotonic()
        if progress.phase in ("denoising", "hires", "refining") and (
            now - self._last >= 0.5 or progress.step == progress.total
        ):
            self._last = now
            done = progress.step / progress.total
            bar = ("#" * round(done * self.BAR)).ljust(self.BAR)
            print(
                f"{done:4.0%}|{bar}| {progress.step}/{progress.total} [{progress.phase}]",
                flush=True,
            )


class Predictor(BaseRunner):
    """Stable Diffusion 1.x / 2.x / XL from the model root baked into the image (./models)."""

    def setup(self) -> None:
        # The engine's line per job, as the RunPod worker logs it (coglet sets up no logging:
        # without this, INFO lines would be dropped)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        # As `python -m handler` does: the checkpoint's disk read overlaps importing torch and
        # diffusers (this module leaves them to here).
        prefetch_default_checkpoint()
        from handler.engine import Engine

        settings = Settings.from_env()
        fetch_url_inputs_like_the_worker(settings)
        record_the_files_cog_writes()
        self.engine = Engine(settings)
        if not self.engine.has_a_checkpoint():
            # the image's models are baked in: an empty root is a build mistake, and a
            # container that says READY would fail every prediction
            raise InvalidInput(
                "no checkpoint on the model roots "
                f"({', '.join(str(r) for r in settings.model_roots)})",
                field="MODELS_DIR",
                accepted="checkpoints under ./models/checkpoints in the image, or MODELS_DIR",
            )
        self.engine.setup()
        self.outputs = FilePath(tempfile.mkdtemp(prefix="sd-outputs-"))
        self.gpu_unusable = False
        self.start_job_thread()

    def start_job_thread(self) -> None:
        """The one thread that runs every prediction's job (see `_run_shielded`)."""
        self._jobs: queue.SimpleQueue[_Handoff] = queue.SimpleQueue()
        self._count = 0  # predictions handed to the engine: their job ids in its log
        threading.Thread(target=self._run_jobs, name="predictions", daemon=True).start()

    def _run_jobs(self) -> None:
        while True:
            handoff = self._jobs.get()
            if handoff.taken:  # handed over twice: a cancel landed between put and its note
                continue
            handoff.taken = True
            try:
                # in the prediction's context (coglet's log routing)
                self._count += 1
                handoff.result = handoff.context.run(
                    self.engine.run,
                    handoff.job,
                    progress=_LogProgress(),
                    cancelled=handoff.cancel.is_set,
                    job_id=f"prediction-{self._count}",
                )
            except BaseException as error:  # handed to run()'s thread, which raises it
                handoff.error = error
            finally:
                handoff.done.set()

    def healthcheck(self) -> bool:
        """coglet's user health check (GET /health-check): unhealthy once a prediction failed in
        a way that may have poisoned the CUDA context (RunPod's refresh_worker), so that the
        container can be replaced instead of failing every later prediction."""
        return not getattr(self, "gpu_unusable", False)

    def _run_shielded(self, job):
        """Run the job in the predictions thread, and return its result.

        coglet cancels a prediction by raising CancelationException in the thread that runs
        run(), at whatever line it is on. Inside the engine that could be a `finally` that is
        undoing the job's LoRAs, embeddings or scheduler, and would leave them applied for the
        next prediction. Here it lands in this wait instead: the engine is told to stop at its
        next check (a denoising step, an image, delivery), undoes its changes itself, and the
        exception is raised again once it has. The job goes to one long-lived thread, not a
        new one per prediction: a cancel that arrived while a new thread was starting could
        kill it unseen, and leave run() waiting for it forever (the container stuck busy). A
        cancel at any line here still finds the job handed over once and finished.
        """
        handoff, jobs = _Handoff(job), self._jobs  # (set up by setup())
        interrupted = None
        while not handoff.done.is_set():  # again only after a cancel escaped the loop below
            try:
                while not handoff.done.is_set():
                    if not handoff.submitted:
                        jobs.put(handoff)
                        handoff.submitted = True
                    # A plain sleep: an exception raised inside Thread.join() or Event.wait()
                    # can leave their locks marking a running thread as finished.
                    time.sleep(0.01)
            except BaseException as error:  # coglet's cancellation, raised in this thread
                handoff.cancel.set()
                interrupted = interrupted or error
        if interrupted is not None:
            raise interrupted
        if handoff.error is not None:
            raise handoff.error
        return handoff.result

    def _refiner_fields(
        self,
        refine: str,
        checkpoint: str | None,
        high_noise_frac: float,
        steps: int | None,
        without_refiner: bool,
    ) -> dict:
        """The job's refiner fields for cog-sdxl's `refine`: none, the ensemble (the base hands
        over at high_noise_frac), or refining the finished image (no high_noise_frac). As in
        cog-sdxl, high_noise_frac (always sent by the form) matters only to the ensemble.
        `without_refiner`: the job inpaints or runs the hires fix, which run without it (a
        RunPod job gets a warning; here the choice was explicit)."""
        if refine == "no_refiner":
            if checkpoint or steps is not None:
                raise InvalidInput(
                    "refiner_checkpoint and refine_steps choose how a refiner runs, and refine "
                    "is no_refiner",
                    field="refine",
                    accepted="expert_ensemble_refiner or base_image_refiner with them",
                )
            return {}
        if without_refiner:
            raise InvalidInput(
                "inpainting (a mask) and the hires fix (hires_scale) run without the refiner",
                field="refine",
                accepted="no_refiner with a mask or hires_scale",
            )
        name = checkpoint or self.engine.settings.refiner_checkpoint
        if not name:
            raise InvalidInput(
                f"{refine} needs an SDXL refiner, and this model sets no REFINER_CHECKPOINT",
                field="refine",
                accepted="no_refiner, or a refiner_checkpoint with it",
            )
        return {
            "refiner_checkpoint": name,
            "high_noise_frac": high_noise_frac if refine == "expert_ensemble_refiner" else None,
            "refiner_inference_steps": steps,
        }

    def _fresh_outputs(self) -> FilePath:
        """The output folder, emptied of the previous prediction's files (uploaded by now)."""
        for old in self.outputs.iterdir():
            old.unlink(missing_ok=True)
        return self.outputs

    def run(
        self,
        prompt: str = Input(description="What to draw. A1111 syntax works, e.g. <lora:name:0.8>."),
        negative_prompt: str = Input(default="", description="What to keep out of the image."),
        checkpoint: str | None = Input(
            default=None,
            description="Checkpoint name on the model root (e.g. sdxl/juggernaut). Empty uses the model's default checkpoint.",
        ),
        width: int | None = Input(
            default=None,
            ge=64,
            le=2048,
            description="Width in pixels, a multiple of 8. Empty uses the init image's size (rounded down to a multiple of 8), else the checkpoint's native size.",
        ),
        height: int | None = Input(
            default=None,
            ge=64,
            le=2048,
            description="Height in pixels, a multiple of 8. Empty uses the init image's size (rounded down to a multiple of 8), else the checkpoint's native size.",
        ),
        num_inference_steps: int = Input(default=30, ge=1, le=150, description="Denoising steps."),
        guidance_scale: float = Input(
            default=7.0, ge=0.0, le=30.0, description="Classifier-free guidance (CFG) scale."
        ),
        guidance_rescale: float = Input(
            default=0.0,
            ge=0.0,
            le=1.0,
            description="CFG rescale (diffusers' guidance_rescale): 0 is off; about 0.7 suits v-prediction and zero-terminal-SNR models. Needs guidance_scale above 1.",
        ),
        scheduler: str = Input(
            default="DPM++ 2M Karras",
            choices=[
                "Euler",
                "Euler a",
                "Heun",
                "LMS",
                "DPM2",
                "DPM2 a",
                "DPM++ 2M",
                "DPM++ 2M Karras",
                "DPM++ 2M SDE",
                "DPM++ 2M SDE Karras",
                "DPM++ SDE",
                "DPM++ SDE Karras",
                "DDIM",
                "PNDM",
                "UniPC",
                "LCM",
                "K_EULER",
                "K_EULER_ANCESTRAL",
                "DPMSolverMultistep",
                "KarrasDPM",
                "HeunDiscrete",
            ],
            description="Sampler (A1111 names; cog-sdxl's names, the last five, work too).",
        ),
        schedule_type: str = Input(
            default="Automatic",
            choices=["Automatic", "Karras", "Exponential", "Beta", "SGM Uniform", "DDIM"],
            description="A1111's schedule type for the sampler: Automatic keeps the sampler's own (Karras for 'DPM++ 2M Karras').",
        ),
        seed: int | None = Input(
            default=None,
            ge=0,
            le=18446744073709551615,
            description="Seed of the first image; image i uses seed + i. Empty means random.",
        ),
        num_outputs: int = Input(default=1, ge=1, le=8, description="Number of images."),
        loras: str = Input(
            default="",
            description="LoRAs as 'name:scale, name:scale' (names under loras/). <lora:name:scale> in the prompt works too.",
        ),
        image: Path | None = Input(
            default=None, description="Init image for img2img, or the image to inpaint."
        ),
        mask: Path | None = Input(
            default=None, description="Inpainting mask: white is repainted, black is kept."
        ),
        mask_blur: int = Input(
            default=4, ge=0, le=64, description="Inpainting: mask edge blur in pixels."
        ),
        invert_mask: bool = Input(
            default=False, description="Inpainting: repaint the black part instead."
        ),
        prompt_strength: float = Input(
            default=0.75,
            ge=0.0,
            le=1.0,
            description="img2img and inpainting: how much of the image is repainted (1.0 ignores it). It runs num_inference_steps x prompt_strength steps, which must be at least 1.",
        ),
        resize_mode: str = Input(
            default="just_resize",
            choices=["just_resize", "crop", "fill"],
            description="How image (and mask) fit width x height: stretch, crop to fill, or fit and fill the borders (A1111's just resize / crop and resize / resize and fill).",
        ),
        hires_scale: float | None = Input(
            default=None,
            ge=1.0,
            le=4.0,
            description="Hires fix: upscale factor of a second img2img pass. Empty means one pass.",
        ),
        hires_strength: float = Input(
            default=0.55,
            ge=0.05,
            le=1.0,
            description="Hires fix (needs hires_scale): second-pass denoising strength.",
        ),
        vae: str | None = Input(
            default=None, description="VAE name under vae/ to use instead of the checkpoint's."
        ),
        clip_skip: int = Input(
            default=1,
            ge=1,
            le=12,
            description="A1111's CLIP skip: 1 uses the last text-encoder layer, 2 the one before. SDXL already uses the one before: 1 and 2 are the same there.",
        ),
        refine: str = Input(
            default="no_refiner",
            choices=["no_refiner", "expert_ensemble_refiner", "base_image_refiner"],
            description="SDXL refiner, as cog-sdxl runs it: expert_ensemble_refiner hands the last part of the noise schedule (1 - high_noise_frac) to the refiner; base_image_refiner refines the finished image.",
        ),
        refiner_checkpoint: str | None = Input(
            default=None,
            description="The SDXL refiner checkpoint for refine. Empty uses the model's REFINER_CHECKPOINT.",
        ),
        high_noise_frac: float = Input(
            default=0.8,
            ge=0.05,
            le=0.95,
            description="For expert_ensemble_refiner: the fraction of the noise schedule the base model denoises (0.8: down to timestep 200).",
        ),
        refine_steps: int | None = Input(
            default=None,
            ge=1,
            le=150,
            description="The refiner's schedule length: it runs the part after high_noise_frac (expert_ensemble_refiner), or 0.3 of it (base_image_refiner). Empty uses num_inference_steps.",
        ),
        output_format: str = Input(
            default="png",
            choices=["png", "jpeg", "jpg", "webp"],
            description="Image file format (jpg is jpeg).",
        ),
        output_quality: int = Input(
            default=90, ge=1, le=100, description="Quality for jpeg and webp (1-100)."
        ),
        strip_metadata: bool = Input(
            default=False,
            description="API only: write no generation parameters (infotext) into the files.",
        ),
        disable_safety_checker: bool = Input(
            default=False,
            description="API only: skip the safety checker for this prediction (when the model runs one).",
        ),
    ) -> list[Path]:
        """Generate images; each file's name and infotext carry its seed."""
        try:  # what the predictor refuses itself, before the engine (which logs the rest)
            if schedule_type != "Automatic":
                # a diffusers class name is its sampler alone here (its default gives way)
                sampler = sampler_named(scheduler)
                if split_schedule(sampler or scheduler)[1] is not None:
                    raise InvalidInput(
                        f"{scheduler} already names its schedule type",
                        field="schedule_type",
                        accepted="Automatic with it, or the sampler without one (DPM++ 2M)",
                    )
                if sampler and not canonical_scheduler(f"{scheduler} {schedule_type}"):
                    raise InvalidInput(
                        f"{sampler} has no {schedule_type} schedule type",
                        field="schedule_type",
                        accepted=", ".join(
                            ["Automatic"]
                            + [t for t in SCHEDULE_TYPES if canonical_scheduler(f"{sampler} {t}")]
                        ),
                    )
                scheduler = f"{scheduler} {schedule_type}"
            if hires_scale is None and hires_strength != HIRES_STRENGTH_DEFAULT:
                raise InvalidInput(
                    "hires_strength only applies to the hires fix's second pass",
                    field="hires_strength",
                    accepted="a hires_scale (1.0 to 4.0) with it, or the default",
                )
            payload = {
                "prompt": prompt,
                "negative_prompt": negative_prompt,
                "checkpoint": checkpoint or None,
                "width": width,
                "height": height,
                "steps": num_inference_steps,
                "guidance_scale": guidance_scale,
                "guidance_rescale": guidance_rescale,
                "scheduler": scheduler,
                "seed": seed,
                "num_images": num_outputs,
                "loras": parse_lora_list(loras),
                "resize_mode": resize_mode,
                "hires": {"scale": hires_scale, "strength": hires_strength}
                if hires_scale
                else None,
                "mask_blur": mask_blur,
                "invert_mask": invert_mask,
                "vae": vae or None,
                "clip_skip": clip_skip,
                **self._refiner_fields(
                    refine,
                    refiner_checkpoint,
                    high_noise_frac,
                    refine_steps,
                    without_refiner=mask is not None or hires_scale is not None,
                ),
                "safety_checker": False if disable_safety_checker else None,
                "output_format": output_format,
                "output_quality": output_quality,
                "strip_metadata": strip_metadata,
                "destination": "base64",
            }
            for name, path in (("image", image), ("mask", mask)):
                if path is not None:
                    payload[name] = base64.b64encode(read_input_file(path, name)).decode("ascii")
            if image is not None:  # without one, the refiner runs at cog-sdxl's 0.3
                payload["strength"] = prompt_strength
            job = parse_job(payload)
        except WorkerError as error:
            name_fields_as_the_form(error)
            log.info("prediction refused: %s", error.code)
            raise
        # A WorkerError fails the prediction with "<code>: <field>: ..."; anything else, as on
        # RunPod, with internal_error and the traceback in the log only.
        try:
            result = self._run_shielded(job)
        except WorkerError as error:
            name_fields_as_the_form(error)
            if error.refresh_worker:
                log.error("this container's GPU may be unusable: health check now fails")
                self.gpu_unusable = True
            raise
        except Exception:
            log.exception("prediction: unexpected error")
            raise InternalError("unexpected error; the worker log has the details") from None
        outputs, files = self._fresh_outputs(), []
        for item in result.images:
            if item.withheld:  # the safety policy kept it back: reported, not delivered
                print(f"image {item.index}: seed {item.seed}, withheld by the safety checker")
                continue
            path = outputs / f"{item.index}-{item.seed}.{item.format}"
            path.write_bytes(base64.b64decode(item.image.split(",", 1)[1]))
            flagged = ", flagged and blurred by the safety checker" if item.nsfw else ""
            print(f"image {item.index}: seed {item.seed}{flagged}")
            files.append(Path(path))
        for warning in result.warnings:
            print(f"warning: {warning}")
        if not files:  # an empty output would read as success, as a list nobody can index
            raise ContentWithheld(
                f"the safety checker withheld all {len(result.images)} images",
                accepted="another seed or prompt (the images' seeds are in the log)",
            )
        return files
