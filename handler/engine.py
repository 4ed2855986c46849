"""The engine: set up once, then run(job) -> Result. It knows nothing of RunPod or Cog."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from handler.errors import Cancelled, InvalidInput, WorkerError
from handler.outputs import EncodedImage, encode_image
from handler.pipelines import CheckpointCache, LoadedCheckpoint, load_checkpoint
from handler.registry import NATIVE_SIZE, Registry
from handler.schedulers import build_scheduler
from handler.schema import ImageResult, Job, Result
from handler.settings import Settings

log = logging.getLogger(__name__)

TXT2IMG_ARCHITECTURES = ("sd15", "sd2-512", "sd2-768-v", "sdxl")


@dataclass(frozen=True)
class Progress:
    """Where a job is: phase is loading, denoising or delivering; step counts within it."""

    phase: str
    step: int
    total: int


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


def pick_device(requested: str | None) -> torch.device:
    """CUDA when present (or as requested), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine:
    """Loads checkpoints from the model roots and runs generation jobs, one at a time."""

    def __init__(self, settings: Settings | None = None) -> None:
        _quiet_libraries()
        self.settings = settings or Settings.from_env()
        self.registry = Registry(self.settings)
        self.device = pick_device(self.settings.device)
        # fp16 on the GPU; fp32 on the CPU, where half precision is slow and inexact.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.cache = CheckpointCache(self.settings.cpu_checkpoints)
        self._encoders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")
        self._lock = threading.Lock()

    def setup(self) -> None:
        """Preload DEFAULT_CHECKPOINT, so the first job does not pay for it."""
        if self.settings.default_checkpoint:
            self.checkpoint(self.settings.default_checkpoint)

    # -- checkpoints ----------------------------------------------------------------------

    def default_checkpoint_name(self) -> tuple[str, str | None]:
        """DEFAULT_CHECKPOINT, else the first checkpoint by name (as A1111 does), with a warning."""
        if self.settings.default_checkpoint:
            return self.settings.default_checkpoint, None
        names = self.registry.names("checkpoint")
        if not names:
            raise InvalidInput(
                "no checkpoint named, no DEFAULT_CHECKPOINT set, and the model roots hold none",
                field="checkpoint",
                accepted=f"a checkpoint under checkpoints/ in one of {self.settings.model_roots}",
            )
        if len(names) == 1:
            return names[0], None
        return names[0], f"no checkpoint named and no DEFAULT_CHECKPOINT set; used {names[0]!r}"

    def checkpoint(self, name: str, field: str = "checkpoint") -> tuple[LoadedCheckpoint, bool]:
        """The loaded checkpoint `name` (from the cache when possible), and whether it was cached."""
        model = self.registry.resolve("checkpoint", name, field)
        detection = self.registry.detect(model)
        stat = model.path.stat()
        key = (str(model.path), stat.st_mtime, stat.st_size)
        config_dir = self.registry.config_folder(model, detection)
        return self.cache.get(
            key, lambda: load_checkpoint(model, detection, config_dir, self.device, self.dtype)
        )

    # -- jobs -----------------------------------------------------------------------------

    def run(
        self,
        job: Job,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> Result:
        """Run one txt2img job and return its encoded images, seeds and timings."""
        with self._lock:
            return self._run(job, progress or (lambda p: None), cancelled or (lambda: False))

    def _run(self, job: Job, progress: ProgressCallback, cancelled: CancelCheck) -> Result:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        warnings: list[str] = []

        # 1. Resolve and load the checkpoint
        progress(Progress("loading", 0, 1))
        name = job.checkpoint
        if not name:
            name, warning = self.default_checkpoint_name()
            warnings += [warning] if warning else []
        loaded, _ = self.checkpoint(name)
        timings["load"] = _ms(started)
        if loaded.architecture not in TXT2IMG_ARCHITECTURES:
            raise InvalidInput(
                f"{loaded.name} is an {loaded.architecture} checkpoint, which cannot run txt2img",
                field="checkpoint",
                accepted="SD 1.x, SD 2.x or SDXL base checkpoints",
            )

        # 2. Check the request against this checkpoint
        native = NATIVE_SIZE[loaded.architecture]
        width, height = job.width or native, job.height or native
        if width * height > self.settings.max_pixels:
            raise InvalidInput(
                f"{width}x{height} is {width * height} pixels, over this worker's MAX_IMAGE_PIXELS",
                field="width",
                accepted=f"width x height up to {self.settings.max_pixels} pixels",
            )
        seed = job.seed if job.seed is not None else secrets.randbits(32)
        job = job.model_copy(update={"seed": seed})
        seeds = job.image_seeds()

        # 3. Denoise and decode
        images, denoise_ms, decode_ms = self._generate(
            loaded, job, width, height, seeds, progress, cancelled
        )
        timings["denoise"] = denoise_ms
        timings["decode"] = decode_ms

        # 4. Encode
        progress(Progress("delivering", 0, len(images)))
        encode_started = time.perf_counter()
        encoded = list(
            self._encoders.map(
                lambda item: encode_image(
                    item[1], item[0], seeds[item[0]], job.output_format, job.output_quality
                ),
                enumerate(images),
            )
        )
        timings["encode"] = _ms(encode_started)
        timings["total"] = _ms(started)
        return Result(
            images=[_inline(image) for image in encoded],
            seed=seed,
            checkpoint=loaded.name,
            architecture=loaded.architecture,
            width=width,
            height=height,
            steps=job.steps,
            scheduler=job.scheduler,
            timings_ms={k: round(v, 1) for k, v in timings.items()},
            warnings=warnings,
        )

    def _generate(self, loaded, job, width, height, seeds, progress, cancelled):
        """Run the pipeline; returns (PIL images, denoise ms, decode ms)."""
        pipeline = loaded.pipeline
        original_scheduler = pipeline.scheduler
        pipeline.scheduler = build_scheduler(job.scheduler, loaded.scheduler_config)
        # CPU generators: the same seed gives the same noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        marks = {"start": time.perf_counter(), "last_step": None}

        def on_step_end(pipe, step, timestep, callback_kwargs):
            if cancelled():
                raise Cancelled("the job was cancelled", field=None)
            if step + 1 == job.steps:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                marks["last_step"] = time.perf_counter()
            progress(Progress("denoising", step + 1, job.steps))
            return callback_kwargs

        try:
            with torch.inference_mode():
                output = pipeline(
                    prompt=[job.prompt] * len(seeds),
                    negative_prompt=[job.negative_prompt] * len(seeds),
                    width=width,
                    height=height,
                    num_inference_steps=job.steps,
                    guidance_scale=job.guidance_scale,
                    generator=generators,
                    callback_on_step_end=on_step_end,
                )
        except WorkerError:
            raise
        finally:
            pipeline.scheduler = original_scheduler
        done = time.perf_counter()
        last_step = marks["last_step"] or done
        return output.images, (last_step - marks["start"]) * 1000, (done - last_step) * 1000


def _quiet_libraries() -> None:
    """diffusers' progress bars and load chatter would drown the one log line per job."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _inline(image: EncodedImage) -> ImageResult:
    return ImageResult(
        index=image.index,
        seed=image.seed,
        width=image.width,
        height=image.height,
        format=image.format,
        bytes=len(image.data),
        image=image.data_uri(),
    )


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
