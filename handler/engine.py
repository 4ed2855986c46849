"""The engine: set up once, then run(job) -> Result. It knows nothing of RunPod or Cog."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from handler import fastpath
from handler.aliases import LATENT_UPSCALERS
from handler.errors import (
    Cancelled,
    InternalError,
    InvalidInput,
    ModelNotFound,
    OutOfMemory,
    UnsupportedModel,
    WorkerError,
)
from handler.inputs import fit_image, load_image
from handler.loras import (
    AppliedLora,
    ResidentAdapters,
    StateDictCache,
    check_compatible,
    embeddings_for,
    extract_inline_loras,
    job_additions,
    unloadable_lycoris,
)
from handler.outputs import (
    EncodedImage,
    Storage,
    check_destination,
    check_fits_a_jpeg,
    deliver,
    encode_image,
    job_infotext,
    public_inputs,
)
from handler.pipelines import (
    TILE_PIXELS,
    CheckpointCache,
    LatentDecoder,
    LoadedCheckpoint,
    free_memory,
    load_checkpoint,
    load_vae,
    missing_vae,
    pipeline_for,
    rescaled_guidance,
)
from handler.prompts import (
    check_syntax,
    comfyui_embeddings,
    encode_sd,
    encode_sd_texts,
    encode_sdxl,
    encode_sdxl_texts,
    is_scheduled,
    needs_own_encoding,
    prompt_schedule,
    text_at,
)
from handler.registry import (
    NATIVE_SIZE,
    ModelFile,
    Registry,
    detect_lora,
    file_key,
    read_safetensors_header,
    vae_sidecar,
)
from handler.schedulers import build_scheduler
from handler.schema import MAX_STEPS, Job, Result, parse_job
from handler.settings import Settings

log = logging.getLogger(__name__)

GENERATOR_ARCHITECTURES = ("sd15", "sd2-512", "sd2-768-v", "sdxl")
INPAINT_ARCHITECTURES = ("sd15-inpaint", "sdxl-inpaint")
MAX_LORAS = 8
# worker-sdxl's default strength for refining a finished base image.
REFINE_AFTER_STRENGTH = 0.3
# list_models' reason for a .ckpt/.pt/.bin file on a worker that refuses them
PICKLED_UNOPENED = "a pickled file: not opened unless the worker sets ALLOW_PICKLE=1"


@dataclass(frozen=True)
class Progress:
    """Where a job is: phase is loading, denoising, hires, refining or uploading."""

    phase: str
    step: int
    total: int


@dataclass
class PromptSteps:
    """A pass's prompt schedule (A1111's prompt editing and alternation), encoded: the last
    sampler step of each entry and the pipeline's prompt arguments for it."""

    ends: list[int]
    args: list[dict[str, torch.Tensor]]
    offset: int = 0  # sampler steps before this pass's first (the refiner continues the base's)
    rate: float = 1.0  # schedule steps per step of this pass (a refiner with its own count)
    steps_run: int = 0  # counted by the step callback

    def args_at(self, step: int) -> dict[str, torch.Tensor]:
        """The arguments for this pass's 0-based sampler step: the first entry ending at or
        after it (past the schedule's end, the last)."""
        step = self.offset + step * self.rate
        index = next((i for i, end in enumerate(self.ends) if end >= step), len(self.ends) - 1)
        return self.args[index]

    def pipeline_args(self) -> dict[str, Any]:
        """The first step's arguments, and the loop's tensors the step callback replaces."""
        first = self.args_at(0)
        names = ["latents", *_loop_inputs(first, guided=False)]
        return {**first, "callback_on_step_end_tensor_inputs": names}


@dataclass
class JobPlan:
    """What a job runs, all decided before it denoises: its models and additions, its input
    images fitted to the first pass's size, the delivered size, seeds and infotext."""

    job: Job  # with its seed set and its prompts' LoRA tags taken out
    loaded: LoadedCheckpoint
    refiner: LoadedCheckpoint | None
    loras: list[AppliedLora]
    embeddings: list[ModelFile]
    vae: Any  # the job's own VAE, or None
    init_image: Image.Image | None
    mask: Image.Image | None
    width: int  # the first pass's size
    height: int
    final_width: int  # the delivered size (the hires pass's)
    final_height: int
    seeds: list[int]
    infotext_fields: dict[str, Any]
    safety: Any  # the safety checker, when the job's images are checked

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"


def _loop_inputs(args: dict[str, torch.Tensor], guided: bool) -> dict[str, torch.Tensor]:
    """Prompt arguments as diffusers' denoising loop holds them: negative then positive (each
    repeated per image) under classifier-free guidance, positive alone without; SDXL's pooled
    embeddings are its `add_text_embeds`."""
    pairs = {"prompt_embeds": ("negative_prompt_embeds", "prompt_embeds")}
    if "pooled_prompt_embeds" in args:
        pairs["add_text_embeds"] = ("negative_pooled_prompt_embeds", "pooled_prompt_embeds")
    return {
        name: torch.cat([args[negative], args[positive]]) if guided else args[positive]
        for name, (negative, positive) in pairs.items()
    }


ProgressCallback = Callable[[Progress], None]
CancelCheck = Callable[[], bool]


def pick_device(requested: str | None) -> torch.device:
    """CUDA when present (or as requested), else CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "cpu, cuda or cuda:N for a GPU that is present, or unset (cuda when present)"
    try:
        device = torch.device(requested.strip())
    except RuntimeError:
        raise InvalidInput(
            f"{requested!r} is not a device", field="DEVICE", accepted=accepted
        ) from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InvalidInput(f"{requested!r}: no such GPU here", field="DEVICE", accepted=accepted)
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput(f"{requested!r} is not supported", field="DEVICE", accepted=accepted)
    return device


class Engine:
    """Loads checkpoints from the model roots and runs generation jobs, one at a time."""

    def __init__(self, settings: Settings | None = None) -> None:
        started = time.perf_counter()
        _quiet_libraries()
        library_import_ms = _ms(started)
        self.settings = settings or Settings.from_env()
        self.registry = Registry(self.settings)
        self.device = pick_device(self.settings.device)
        if self.settings.require_gpu and self.device.type != "cuda":
            # before minutes of loading on the CPU; both platforms stop at start
            raise InvalidInput(
                f"is set, but this worker would run on {self.device.type}: CUDA is not available"
                if not torch.cuda.is_available()
                else f"is set, but DEVICE is {self.device.type}",
                field="REQUIRE_GPU",
                accepted="a worker with a CUDA GPU, or REQUIRE_GPU unset",
            )
        # fp16 on the GPU; fp32 on the CPU, where half precision is slow and inexact.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        # A configured refiner stays on the device beside the base checkpoint.
        device_slots = self.settings.gpu_checkpoints + (
            1 if self.settings.refiner_checkpoint else 0
        )
        self.cache = CheckpointCache(device_slots, self.settings.cpu_checkpoints, self.device)
        self.state_dicts = StateDictCache(self.settings.max_lora_cache_bytes)
        self._vaes: OrderedDict[tuple, Any] = OrderedDict()
        self._encoders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")
        self._lock = threading.Lock()
        self._storage: Storage | None = None
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        self._safety = None
        # What start-up spent, for logs and benchmarks
        self.startup_ms: dict[str, float] = {"library_import": library_import_ms}
        self._starting = False
        self._to_hash: list = []
        shared_cache = fastpath.worker_cache_dir(self.settings.model_roots)
        self.layouts = fastpath.LayoutCache(
            shared_cache / "unet-layouts.json" if shared_cache is not None else None
        )
        # Where the first COMPILE=1 worker saves each compiled UNet and VAE decoder shape for
        # later ones
        self.precompiled_dir: Path | None = None
        if self.settings.compile and self.device.type != "cuda":
            log.warning("COMPILE=1 applies on CUDA only: this worker on %s runs eager", self.device)
        if self.settings.compile and self.device.type == "cuda":
            compile_cache = fastpath.use_compile_cache(
                fastpath.compile_cache_dir(
                    self.settings.compile_cache_dir, self.settings.model_roots
                )
            )
            if compile_cache is not None:
                fastpath.prune_compile_caches(compile_cache, self.settings.compile_cache_keep_days)
                if self.settings.precompile:
                    self.precompiled_dir = compile_cache / "precompiled"

    @property
    def storage(self) -> Storage | None:
        """The configured bucket, or None (then images are delivered inline)."""
        if self._storage is None and self.settings.bucket_configured:
            self._storage = Storage(self.settings)
        return self._storage

    def setup(self) -> None:
        """Preload DEFAULT_CHECKPOINT (or the only checkpoint on the roots) and
        REFINER_CHECKPOINT, so the first job does not wait.

        On a GPU, a two-step job at the checkpoint's native size then captures the UNet's CUDA
        graph (and compiles it, with COMPILE=1) before the worker takes jobs.
        """
        self._starting = True
        try:
            if self.settings.safety_checker:
                self.safety_checker()  # a worker told to check images must be able to
            # DEFAULT_CHECKPOINT, or the only checkpoint there is (a Cog image's baked model)
            default = self.settings.default_checkpoint
            if not default:
                names = self._base_checkpoint_names()
                default = names[0] if len(names) == 1 else None
            with _named_as("DEFAULT_CHECKPOINT"):
                if default and not self._preloadable(default, "DEFAULT_CHECKPOINT", refiner=False):
                    default = None
                if default:
                    started = time.perf_counter()
                    loaded, _ = self.checkpoint(default, "DEFAULT_CHECKPOINT")
                    self.startup_ms["load"] = loaded.load_ms
                    self.startup_ms["pipeline_import"] = loaded.import_ms
                    self.startup_ms["resolve_and_load"] = _ms(started)
            refiner = self.settings.refiner_checkpoint
            with _named_as("REFINER_CHECKPOINT"):
                if refiner and self._preloadable(refiner, "REFINER_CHECKPOINT", refiner=True):
                    self.checkpoint(refiner, "REFINER_CHECKPOINT")
            if default and self.settings.warmup and self.device.type == "cuda":
                self.startup_ms["warm_up"] = self.warm_up(default)
        finally:
            self._starting = False
            self._hash_pending()

    def _preloadable(self, name: str, field: str, refiner: bool) -> bool:
        """Check a configured checkpoint's kind from its file, before anything loads. False for
        one without VAE weights or a VAE beside it: it loads with its first job, which (as
        every job on it) must name a VAE."""
        if refiner:
            model, detection = self._check_refiner(name, field)
        else:
            model = self.registry.resolve("checkpoint", name, field)
            detection = self.registry.detect(model)
        if not refiner and detection.architecture == "sdxl-refiner":
            raise InvalidInput(
                f"{name} is an SDXL refiner, which cannot start a generation",
                field=field,
                accepted="a base checkpoint; set the refiner as REFINER_CHECKPOINT",
            )
        if not refiner and detection.architecture.endswith("inpaint"):
            log.warning(
                "%s %s is an inpainting checkpoint: jobs without a mask on it are refused",
                field,
                model.name,
            )
        native = NATIVE_SIZE.get(detection.architecture, 0)
        if not refiner and native * native > self.settings.max_pixels:
            log.warning(
                "%s %s draws %dx%d by default, over MAX_IMAGE_PIXELS: its jobs must send a "
                "smaller width and height",
                field,
                model.name,
                native,
                native,
            )
        if detection.has_vae or vae_sidecar(model) is not None:
            return True
        log.warning(
            "%s has no VAE weights and no VAE beside it: not preloaded; it loads with the first "
            "job on it, which must name a vae, as every job on it must",
            model.name,
        )
        return False

    def warm_up(self, checkpoint: str) -> float:
        """Run a two-step job on `checkpoint` (delivered nowhere); returns its milliseconds."""
        started = time.perf_counter()
        job = parse_job(
            {"prompt": "warm-up", "checkpoint": checkpoint, "steps": 2, "destination": "base64"}
        )
        self.run(job, job_id="warm-up")
        loaded, _ = self.checkpoint(checkpoint)
        if loaded.graphs is not None:
            # The warm-up's share spent on the UNet's and the VAE decoder's first calls:
            # compiling (or loading) them, capturing the graph, choosing the layout
            self.startup_ms["unet_first_calls"] = loaded.graphs.first_calls_ms
            if loaded.graphs.layout_ms:
                self.startup_ms.update(
                    {f"unet_{k}_ms_per_call": v for k, v in loaded.graphs.layout_ms.items()}
                )
        decoder = fastpath.compiled_vae_decoder(loaded.pipeline)
        if decoder is not None:
            self.startup_ms["vae_decoder_first_calls"] = decoder.first_calls_ms
        elapsed = _ms(started)
        log.info("warm-up on %s took %.0f ms", checkpoint, elapsed)
        return elapsed

    # -- models ---------------------------------------------------------------------------

    def has_a_checkpoint(self) -> bool:
        """Whether generation jobs have a checkpoint to run on: DEFAULT_CHECKPOINT, or any
        checkpoint on the model roots (an empty volume: is it attached?)."""
        return bool(self.settings.default_checkpoint or self.registry.names("checkpoint"))

    def default_checkpoint_name(self) -> tuple[str, str | None]:
        """DEFAULT_CHECKPOINT, else the first checkpoint by name (as A1111 does), with a warning."""
        if self.settings.default_checkpoint:
            return self.settings.default_checkpoint, None
        names = self._base_checkpoint_names()
        if not names:
            roots = ", ".join(str(r) for r in self.registry.roots) or "none found"
            raise ModelNotFound(
                "no checkpoint named, no DEFAULT_CHECKPOINT set, and the model roots "
                f"({roots}) hold no checkpoint that can start a generation",
                field="checkpoint",
                accepted="a checkpoint under checkpoints/ on a model root (see list_models)",
            )
        if len(names) == 1:
            return names[0], None
        return names[0], f"no checkpoint named and no DEFAULT_CHECKPOINT set; used {names[0]!r}"

    def _base_checkpoint_names(self) -> list[str]:
        """Checkpoints that can start a txt2img job: loadable, of a base architecture."""
        names = []
        for model in self.registry.files("checkpoint", loadable_only=True):
            try:
                if self.registry.detect(model).architecture in GENERATOR_ARCHITECTURES:
                    names.append(model.name)
            except (UnsupportedModel, OSError):
                continue
        return names

    def checkpoint(
        self,
        name: str,
        field: str = "checkpoint",
        job_vae: str | None = None,
        beside: LoadedCheckpoint | None = None,
    ) -> tuple[LoadedCheckpoint, bool]:
        """The loaded checkpoint `name` (from the cache when possible), and whether it was cached.
        `beside`: the job's base, which its refiner must not push off the device.

        `job_vae` (the job's `vae`) is the VAE of a checkpoint saved without one and without its
        VAE beside it; every job on such a checkpoint must name a VAE. That is checked, and the
        VAE loaded, before the cache makes room: a refused job pushes no checkpoint out.
        """
        with _named_as(field):  # a refiner's file and load errors name its field
            model = self.registry.resolve("checkpoint", name, field)
            detection = self.registry.detect(model)
            key = file_key(model.path)
            config_dir = self.registry.config_folder(model, detection)
            vae = vae_file = None
            if not detection.has_vae:
                sidecar = vae_sidecar(model)
                # a sidecar added (or replaced) since the checkpoint was loaded means loading again
                key += (file_key(sidecar) if sidecar else None,)
                if sidecar is None:
                    if not job_vae:
                        raise missing_vae(model)
                    vae_file = self.registry.resolve("vae", job_vae, "vae")
                    if key not in self.cache:
                        vae = self._load_vae(vae_file, config_dir, detection.architecture)

            def load() -> LoadedCheckpoint:
                loaded = load_checkpoint(
                    model,
                    detection,
                    config_dir,
                    self.device,
                    self.dtype,
                    self.settings.allow_pickle,
                    vae=vae,
                )
                if vae is not None:
                    loaded.job_vae_key = file_key(vae_file.path)
                if self.settings.cuda_graphs:
                    loaded.graphs = fastpath.accelerate(
                        loaded.pipeline,
                        self.settings.graph_shapes,
                        self.settings.compile,
                        self.settings.attention,
                        self.layouts,
                        self.precompiled_dir,
                    )
                return loaded

            loaded, cached = self.cache.get(key, load, beside)
        if not cached and not model.is_folder and self.registry.cached_hash(model) is None:
            # The AutoV2 hash (for infotext and list_models) is computed off the job's path,
            # and not while the worker starts, where it would compete with loading.
            self._to_hash.append(model)
            if not self._starting:
                self._hash_pending()
        return loaded, cached

    def _hash_pending(self) -> None:
        while self._to_hash:
            self._hasher.submit(self.registry.compute_hash, self._to_hash.pop())

    def list_models(self) -> dict[str, list[dict[str, Any]]]:
        """What the model roots hold: checkpoints with architecture, LoRAs with base, etc."""
        files = self.registry.files
        return {
            "checkpoints": [self._checkpoint_entry(model) for model in files("checkpoint")],
            "loras": [self._lora_entry(model) for model in files("lora")],
            "embeddings": [self._file_entry(model) for model in files("embedding")],
            "vaes": [self._file_entry(model) for model in files("vae")],
        }

    def _checkpoint_entry(self, model: ModelFile) -> dict[str, Any]:
        """A checkpoint for list_models: its format and architecture, or why it is unusable."""
        entry: dict[str, Any] = {
            "name": model.name,
            "format": "diffusers" if model.is_folder else "single_file",
        }
        if not model.is_folder:
            entry["size_bytes"] = model.path.stat().st_size
            entry["hash"] = self.registry.cached_hash(model)
        try:
            detection = self.registry.detect(model)
            entry["architecture"] = detection.architecture
            if not detection.has_vae and vae_sidecar(model) is None:
                entry["needs_vae"] = True  # saved without one: its jobs must name a vae
            if detection.notes:
                entry["notes"] = list(detection.notes)  # what was assumed about the file
            if model.is_folder:
                self.registry.check_not_pickled(model.path, "checkpoint")
        except (UnsupportedModel, InvalidInput) as error:
            entry["architecture"] = "unsupported"
            entry["reason"] = error.message
        return entry

    def _lora_entry(self, model: ModelFile) -> dict[str, Any]:
        """A LoRA for list_models: the architecture it was made for, read from its header."""
        entry: dict[str, Any] = {
            "name": model.name,
            "size_bytes": model.path.stat().st_size,
            "hash": self.registry.cached_hash(model),
        }
        if model.path.suffix.lower() != ".safetensors":
            entry["base"] = "unknown" if self.settings.allow_pickle else "unsupported"
            if not self.settings.allow_pickle:
                entry["reason"] = PICKLED_UNOPENED
            return entry
        try:
            tensors = read_safetensors_header(model.path, "loras")[0]
        except UnsupportedModel as error:
            return {**entry, "base": "unreadable", "reason": error.message}
        unloadable = unloadable_lycoris(tensors)
        entry["base"] = "unsupported" if unloadable else detect_lora(tensors)
        if unloadable:
            entry["reason"] = unloadable
        return entry

    def _file_entry(self, model: ModelFile) -> dict[str, Any]:
        """A VAE or embedding for list_models, with the reason it cannot be used, if any."""
        if model.is_folder:
            return {"name": model.name, "format": "diffusers"}
        entry: dict[str, Any] = {"name": model.name, "size_bytes": model.path.stat().st_size}
        if model.path.suffix.lower() != ".safetensors":
            if not self.settings.allow_pickle:
                entry["reason"] = PICKLED_UNOPENED
            return entry
        try:
            read_safetensors_header(model.path, model.kind)
        except UnsupportedModel as error:
            entry["reason"] = error.message
        return entry

    # -- jobs -----------------------------------------------------------------------------

    def run(
        self,
        job: Job,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
        inline_limit: int | None = None,
        job_id: str = "local",
    ) -> Result:
        """Run one job and return its delivered images, seeds and timings.

        `inline_limit` caps the total size of the base64 images (a platform's reply limit);
        `job_id` names the job's folder in the bucket.
        """
        with self._lock:
            started = time.perf_counter()
            try:
                result = self._run_on_the_gpu(job, progress, cancelled, inline_limit, job_id)
            except WorkerError as error:
                log.info("job %s failed: %s (%.0f ms)", job_id, error.code, _ms(started))
                raise
        # one line per job, without its prompt unless LOG_PROMPTS=1 (never image data or URLs)
        prompt = f" prompt={job.prompt!r}" if self.settings.log_prompts else ""
        log.info(
            "job %s done: model=%s size=%dx%d steps=%d images=%d timings_ms=%s%s",
            job_id,
            result.checkpoint,
            result.width,
            result.height,
            result.steps,
            len(result.images),
            result.timings_ms,
            prompt,
        )
        return result

    def _run_on_the_gpu(
        self,
        job: Job,
        progress: ProgressCallback | None,
        cancelled: CancelCheck | None,
        inline_limit: int | None,
        job_id: str,
    ) -> Result:
        """`_run`, with the GPU's failures outside its own retries made job errors."""
        try:
            return self._run(
                job,
                progress or (lambda p: None),
                cancelled or (lambda: False),
                inline_limit,
                job_id,
            )
        except torch.OutOfMemoryError:
            # outside the denoise and decode retries: loading or moving models, LoRAs, VAEs
            log.warning("out of memory while loading this job's models")
            free_memory()
            raise OutOfMemory(
                "the GPU ran out of memory loading this job's models",
                accepted="fewer models resident on the GPU (GPU_CHECKPOINTS), or a new worker",
                refresh_worker=True,
            ) from None
        except RuntimeError as error:
            _raise_if_cuda_failure(error)
            raise

    def _run(
        self,
        job: Job,
        progress: ProgressCallback,
        cancelled: CancelCheck,
        inline_limit: int | None,
        job_id: str,
    ) -> Result:
        started = time.perf_counter()
        timings: dict[str, float] = {}
        warnings: list[str] = list(job._notes)

        # 1. Check what the job alone decides, and read its images, before any model loads: a
        # refused job pushes no checkpoint out of the cache.
        progress(Progress("loading", 0, 1))
        check_destination(job.destination, self.storage)
        if job.mask and not job.image:
            raise InvalidInput(
                "a mask needs the image it masks", field="mask", accepted="image and mask together"
            )
        if job.guidance_rescale and job.guidance_scale <= 1:
            raise InvalidInput(
                f"guidance_scale {job.guidance_scale:g} runs no CFG, so there is none to rescale",
                field="guidance_rescale",
                accepted="0, or a guidance_scale above 1",
            )
        init_image = load_image(job.image, "image", self.settings) if job.image else None
        if init_image is not None and int(job.steps * job.strength) < 1:
            accepted = f"a strength of at least {1 / job.steps:.3f} at {job.steps} steps"
            if job.strength > 0:  # or the steps it would take (a default strength, say)
                steps = math.ceil(1 / job.strength)
                steps += int(steps * job.strength) < 1  # 1 / (1/3) may round below 3
                accepted += f", or at least {steps} steps at strength {job.strength:g}"
            raise InvalidInput(
                f"steps x strength = {job.steps} x {job.strength:g} leaves no denoising step",
                field="strength",
                accepted=accepted,
            )
        job_mask = load_image(job.mask, "mask", self.settings, as_mask=True) if job.mask else None

        # 2. Check what the checkpoint's file decides (its architecture, from its header): the
        #    size, the hires pass, the LoRAs and the VAE's name. Then load it.
        name = job.checkpoint
        if not name:
            name, warning = self.default_checkpoint_name()
            warnings += [warning] if warning else []
        model = self.registry.resolve("checkpoint", name, "checkpoint")
        self._check_generator(model, job)
        if job.refiner_checkpoint:
            self._check_refiner(job.refiner_checkpoint)
        detection = self.registry.detect(model)
        architecture = detection.architecture
        native = NATIVE_SIZE[architecture]
        default_w, default_h = (
            (native, native)
            if init_image is None
            else _size_of_input(init_image.size, self.settings.max_pixels)
        )
        width, height = job.width or default_w, job.height or default_h
        if width * height > self.settings.max_pixels:
            native_size = not job.width and not job.height and init_image is None
            default = f" (the size {model.name} draws at)" if native_size else ""
            raise InvalidInput(
                f"{width}x{height}{default} is {width * height} pixels, over this worker's "
                "MAX_IMAGE_PIXELS",
                field="width",
                accepted=f"width x height up to {self.settings.max_pixels} pixels",
            )
        final_w, final_h = self._check_hires(job, width, height)
        job, loras = self._loras_for(job, architecture, warnings)
        if job.vae:
            self.registry.resolve("vae", job.vae, "vae")
        loaded, _ = self.checkpoint(name, job_vae=job.vae)
        warnings += detection.notes  # what was assumed about the file
        refiner = self._refiner_for(job, loaded, warnings)
        embeddings = self._embeddings_for(job, loaded, warnings)
        vae, vae_name = self._vae_for(job, loaded)
        timings["load"] = _ms(started)

        # 3. Check the request against this checkpoint
        if refiner is not None and job.high_noise_frac is None:
            refine_steps = job.refiner_inference_steps or job.steps
            strength = refine_after_strength(job)
            needed = math.ceil(1 / strength) if strength > 0 else MAX_STEPS + 1
            if needed > MAX_STEPS:
                raise InvalidInput(
                    f"a refiner strength of {strength:g} runs no step in {MAX_STEPS}",
                    field="strength",
                    accepted=f"a strength of at least {1 / MAX_STEPS:.4f} for the refiner's "
                    f"pass, or none (it runs at {REFINE_AFTER_STRENGTH:g})",
                )
            if int(refine_steps * strength) < 1:
                raise InvalidInput(
                    f"refining after the base runs {refine_steps} x {strength:g} steps: none",
                    field="refiner_inference_steps",
                    accepted=f"at least {needed} steps",
                )
        elif not job.image and "strength" in job.model_fields_set:
            warnings.append(
                "strength ignored: it is img2img's and inpainting's (with an image), or the "
                "refiner's when it refines the finished image"
            )
        if init_image is not None:
            init_image = fit_image(init_image, width, height, job.resize_mode)
        mask = self._mask_for(job, job_mask, width, height) if job_mask is not None else None
        if mask is not None and mask.getextrema()[1] == 0:
            warnings.append(
                "the mask is black all over: nothing is repainted (white repaints; invert_mask "
                "repaints the black part instead)"
            )
        hires_steps = self._hires_schedule(loaded, job)[0] if job.hires else None
        if job.hires and hires_steps < (job.hires.steps or job.steps):
            warnings.append(
                f"the hires pass runs {hires_steps} steps: at strength {job.hires.strength:g}, "
                f"more would need a longer schedule than {job.scheduler} allows"
            )
        mode = "inpaint" if mask is not None else "img2img" if init_image is not None else "txt2img"
        infotext_fields = _infotext_fields(job, mode, refiner, vae_name, width, height, hires_steps)
        if embeddings and not job.strip_metadata:  # A1111's TI hashes: small files, hashed now
            infotext_fields["embeddings"] = [
                (PurePosixPath(e.name).name, self.registry.short_hash(e)) for e in embeddings
            ]
        if job.output_format == "jpeg" and not job.strip_metadata:
            check_fits_a_jpeg(job, loaded.name, loras, infotext_fields)
        seed = job.seed if job.seed is not None else secrets.randbits(32)
        job = job.model_copy(update={"seed": seed})
        plan = JobPlan(
            job=job,
            loaded=loaded,
            refiner=refiner,
            loras=loras,
            embeddings=embeddings,
            vae=vae,
            init_image=init_image,
            mask=mask,
            width=width,
            height=height,
            final_width=final_w,
            final_height=final_h,
            seeds=job.image_seeds(),
            infotext_fields=infotext_fields,
            safety=self._safety_checker_for(job),
        )

        # 4. Denoise with the job's LoRAs, embeddings and VAE, all undone afterwards (an OOM
        #    gets one retry after the CUDA cache is emptied), then decode and encode
        encoded = self._generate(plan, progress, cancelled, timings, warnings)

        # 5. Deliver
        progress(Progress("uploading", 0, len(plan.seeds)))
        upload_started = time.perf_counter()
        sidecar = None
        if job.sidecar:
            sidecar = {
                "job_id": job_id,
                "inputs": public_inputs(job),
                "checkpoint": loaded.name,
                "seeds": plan.seeds,
                "timings_ms": dict(timings),
                "warnings": warnings,
            }
        if cancelled():
            raise Cancelled("the job was cancelled")
        results, delivery_warnings = deliver(
            encoded,
            destination=job.destination,
            job_id=job_id,
            storage=self.storage,
            inline_limit=inline_limit,
            sidecar=sidecar,
            cancelled=cancelled,
        )
        warnings += delivery_warnings
        timings["upload"] = _ms(upload_started)
        timings["total"] = _ms(started)
        return Result(
            images=results,
            seed=seed,
            checkpoint=loaded.name,
            architecture=loaded.architecture,
            width=final_w,
            height=final_h,
            steps=job.steps,
            scheduler=job.scheduler,
            timings_ms={k: round(v, 1) for k, v in timings.items()},
            warnings=warnings,
        )

    def _generate(
        self,
        plan: JobPlan,
        progress: ProgressCallback,
        cancelled: CancelCheck,
        timings: dict[str, float],
        warnings: list[str],
    ) -> list:
        """Apply the job's LoRAs, embeddings and VAE, denoise, decode and encode; every change
        to the shared pipelines is undone on the way out, whatever happens."""
        loaded, refiner = plan.loaded, plan.refiner
        pipelines = [loaded.pipeline, pipeline_for(loaded, plan.mode)]
        if plan.job.hires:
            pipelines.append(pipeline_for(loaded, "img2img"))
        if refiner is not None:  # it decodes the image: the job's VAE is its VAE too
            pipelines += [refiner.pipeline, pipeline_for(refiner, "img2img")]
        with contextlib.ExitStack() as undo:
            if loaded.adapters is None:
                loaded.adapters = ResidentAdapters(self.settings.resident_loras)
            applying = time.perf_counter()
            undo.enter_context(
                job_additions(
                    loaded.pipeline, plan.loras, plan.embeddings, self.state_dicts, loaded.adapters
                )
            )
            if refiner is not None and plan.embeddings:  # an SDXL embedding's clip_g part
                if refiner.adapters is None:
                    refiner.adapters = ResidentAdapters(self.settings.resident_loras)
                undo.enter_context(
                    job_additions(
                        refiner.pipeline, [], plan.embeddings, self.state_dicts, refiner.adapters
                    )
                )
            if plan.loras or plan.embeddings:
                timings["loras"] = _ms(applying)  # loading (first use) and merging, embeddings
            if plan.vae is not None:
                undo.enter_context(_swapped_vae(pipelines, plan.vae))
            latents, decoder_pipeline, denoise_ms = _with_oom_retry(
                lambda: self._denoise(plan, progress, cancelled)
            )
            timings["denoise"] = denoise_ms
            return self._decode_and_encode(
                plan, decoder_pipeline, latents, timings, warnings, cancelled
            )

    def _decode_and_encode(
        self,
        plan: JobPlan,
        decoder_pipeline: Any,
        latents: torch.Tensor,
        timings: dict[str, float],
        warnings: list[str],
        cancelled: CancelCheck,
    ) -> list[EncodedImage]:
        """Decode image by image; each is encoded in the pool while the next one decodes.

        For inpainting, the init image is pasted back outside the mask (`_overlay_mask`).
        """
        job, loaded, seeds = plan.job, plan.loaded, plan.seeds
        width, height = plan.final_width, plan.final_height
        overlay = (plan.init_image, _overlay_mask(plan.mask)) if plan.mask is not None else None
        model_hash = lora_info = None
        if not job.strip_metadata:  # a LoRA's hash may read its whole file: only for infotext
            model_hash = self.registry.cached_hash(loaded.model)
            lora_info = [(x.name, x.scale, self.registry.lora_hash(x.model)) for x in plan.loras]

        def encode(index: int, image, nsfw: bool | None):
            infotext = None
            if not job.strip_metadata:
                infotext = job_infotext(
                    job, loaded.name, seeds[index], model_hash, lora_info, plan.infotext_fields
                )
            encoded = encode_image(
                image, index, seeds[index], job.output_format, job.output_quality, infotext
            )
            return dataclasses.replace(encoded, nsfw=nsfw)

        decode_started = time.perf_counter()
        pending = []
        with torch.inference_mode(), LatentDecoder(decoder_pipeline) as decoder:
            for index in range(len(seeds)):
                if cancelled():
                    raise Cancelled("the job was cancelled")
                tiled_before = decoder.tiled
                image = _with_oom_retry(lambda i=index: decoder.decode(latents[i : i + 1]))
                if decoder.tiled and not tiled_before:
                    warnings.append(
                        f"image {index} (seed {seeds[index]}) and any after it: the VAE ran out "
                        f"of GPU memory and decoded in {TILE_PIXELS}-pixel tiles (blended at "
                        "their overlaps)"
                    )
                if not decoder.last_was_finite:
                    warnings.append(
                        f"image {index} (seed {seeds[index]}): the model produced non-finite "
                        "values (NaN or inf); those pixels are black"
                    )
                if overlay is not None:
                    image = Image.composite(image, overlay[0], overlay[1])
                nsfw = self._flagged(plan.safety, image) if plan.safety else None
                if nsfw and self.settings.safety_policy == "withhold":
                    withheld = EncodedImage(
                        index, seeds[index], width, height, job.output_format, b"", nsfw
                    )
                    pending.append(_completed_future(withheld))
                    continue
                if nsfw:
                    image = image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 8))
                pending.append(self._encoders.submit(encode, index, image, nsfw))
        timings["decode"] = _ms(decode_started)
        encode_wait = time.perf_counter()
        encoded = [future.result() for future in pending]
        timings["encode"] = _ms(encode_wait)  # the encoding not hidden behind decoding
        return encoded

    def _loras_for(self, job: Job, architecture: str, warnings: list[str]):
        """The job with its prompts' LoRA tags taken out and their syntax checked, and its LoRA
        stack (list + tags), each found and checked against the checkpoint's architecture:
        all before the checkpoint loads."""
        prompt, inline = extract_inline_loras(job.prompt)
        negative, in_negative = extract_inline_loras(job.negative_prompt, "negative_prompt")
        if in_negative:
            warnings.append(
                "LoRA tags in negative_prompt are removed and not applied: a LoRA changes the "
                "model for the whole image (put it in prompt or loras)"
            )
        prompt, prompt_warnings = check_syntax(prompt, "prompt")
        negative, negative_warnings = check_syntax(negative, "negative_prompt")
        warnings += prompt_warnings + negative_warnings
        if "embedding:" in (prompt + negative).lower():  # ComfyUI's syntax
            names = [embedding.name for embedding in self.registry.files("embedding")]
            prompt, prompt_warnings = comfyui_embeddings(prompt, names, "prompt")
            negative, negative_warnings = comfyui_embeddings(negative, names, "negative_prompt")
            warnings += prompt_warnings + negative_warnings
        requested = [(s.name, s.scale, f"loras[{i}].name", None) for i, s in enumerate(job.loras)]
        requested += [
            (name, scale, "prompt", f"LoRA tag {n}") for n, (name, scale) in enumerate(inline, 1)
        ]
        if len(requested) > MAX_LORAS:
            raise InvalidInput(
                f"{len(requested)} LoRAs requested",
                field="loras",
                accepted=f"at most {MAX_LORAS} LoRAs per job",
            )
        loras = []
        for name, scale, field, tag in requested:
            try:
                if tag:
                    model = self._inline_lora_file(name, tag)
                else:
                    model = self.registry.resolve("lora", name, field)
            except ModelNotFound as error:  # suggest only the LoRAs that would fit
                error.accepted = self._loras_that_fit(error.accepted, architecture)
                raise
            check_compatible(model, architecture, field)
            loras.append(AppliedLora(model.name, scale, model, field))
        return job.model_copy(update={"prompt": prompt, "negative_prompt": negative}), loras

    def _embeddings_for(self, job: Job, loaded: LoadedCheckpoint, warnings: list[str]):
        """The embeddings the job's prompts use that this checkpoint's text encoders take."""
        embeddings, embedding_warnings = embeddings_for(
            [job.prompt, job.negative_prompt],
            self.registry.files("embedding"),
            loaded.pipeline,
            self.state_dicts,
            self.settings.allow_pickle,
        )
        warnings += embedding_warnings
        return embeddings

    def _loras_that_fit(self, names: Any, architecture: str) -> Any:
        """Of the LoRA names a not-found error suggests, those made for `architecture`."""
        if not isinstance(names, list):
            return names
        fitting = []
        for name in names:
            try:
                check_compatible(
                    self.registry.resolve("lora", name, "loras"), architecture, "loras"
                )
            except WorkerError:
                continue
            fitting.append(name)
        return fitting or f"a LoRA for {architecture}: none of the close names is one"

    def _inline_lora_file(self, name: str, tag: str):
        """The file a prompt's LoRA tag names; errors say which tag, without quoting its name
        (a tag missing its `>` runs on into the prompt, whose text stays out of logs)."""
        try:
            return self.registry.resolve("lora", name, "prompt")
        except (ModelNotFound, InvalidInput) as error:
            if isinstance(error, ModelNotFound):
                what = "names no LoRA on the model roots"
            elif isinstance(error.accepted, list):  # the files of that name, in subfolders
                what = "matches several LoRAs: name one with its folder"
            else:
                what = "names no usable LoRA"
            raise type(error)(
                f"{tag} of prompt {what}", field="prompt", accepted=error.accepted
            ) from None

    def _vae_for(self, job: Job, loaded: LoadedCheckpoint):
        """The job's VAE override, loaded once and kept (two at most), and its name; or None."""
        if not job.vae:
            return None, None
        model = self.registry.resolve("vae", job.vae, "vae")
        if loaded.job_vae_key == file_key(model.path):  # what this checkpoint without one holds
            return loaded.pipeline.vae, model.name
        # A single-file VAE takes its config from the checkpoint's config folder, which a
        # sidecar `NAME.config/` may change (its scaling factor): part of what the VAE is.
        config = self.registry.config_folder(loaded.model, self.registry.detect(loaded.model))
        key = (*file_key(model.path), loaded.architecture, None if model.is_folder else config)
        if key not in self._vaes:
            vae = self._load_vae(model, config, loaded.architecture)
            self._vaes[key] = vae.to(self.device).eval()
            while len(self._vaes) > 2:
                self._vaes.popitem(last=False)
        self._vaes.move_to_end(key)
        return self._vaes[key], model.name

    def _load_vae(self, model, config_dir, architecture: str):
        """A job's VAE, on the CPU; a file that is not one is the job's `vae` at fault."""
        try:
            return load_vae(model.path, config_dir, self.dtype, self.settings.allow_pickle)
        except Exception as error:  # a file that is no VAE fails in diffusers' own ways
            raise InvalidInput(
                f"{model.name} could not be loaded as a VAE for {architecture} "
                f"({type(error).__name__})",
                field="vae",
                accepted="SD/SDXL VAE .safetensors files matching the checkpoint",
            ) from None

    def _refiner_for(
        self, job: Job, base: LoadedCheckpoint, warnings: list[str]
    ) -> LoadedCheckpoint | None:
        """The SDXL refiner this job should use, or None (with a warning if it asked for one)."""
        asked = job.high_noise_frac is not None or job.refiner_inference_steps is not None
        name = job.refiner_checkpoint or (self.settings.refiner_checkpoint if asked else None)
        if not name:
            if asked:
                warnings.append(
                    "high_noise_frac/refiner_inference_steps ignored: no refiner checkpoint is "
                    "configured (set REFINER_CHECKPOINT or refiner_checkpoint)"
                )
            return None
        if job.mask or job.hires:
            warnings.append("refiner ignored: inpainting and hires fix run without the refiner")
            return None
        if base.architecture != "sdxl":
            warnings.append(
                f"refiner ignored: {base.name} is {base.architecture}, the refiner is for SDXL"
            )
            return None
        self._check_refiner(name)
        refiner, _ = self.checkpoint(name, "refiner_checkpoint", job_vae=job.vae, beside=base)
        return refiner

    def _safety_checker_for(self, job: Job):
        """(checker, image processor) when this job is checked, else None."""
        enabled = self.settings.safety_checker if job.safety_checker is None else job.safety_checker
        return self.safety_checker() if enabled else None

    def safety_checker(self):
        """(checker, image processor), loaded once from `<model root>/safety_checker/`."""
        if self._safety is None:
            folder = next(
                (
                    root / "safety_checker"
                    for root in self.registry.roots
                    if (root / "safety_checker" / "config.json").is_file()
                ),
                None,
            )
            if folder is None:
                raise InvalidInput(
                    "the safety checker is on but no safety_checker/ folder is on the model roots",
                    field="safety_checker",
                    accepted="safety_checker false, or a diffusers StableDiffusionSafetyChecker "
                    "folder (with preprocessor_config.json) at <model root>/safety_checker",
                )
            from diffusers.pipelines.stable_diffusion.safety_checker import (
                StableDiffusionSafetyChecker,
            )
            from transformers import CLIPImageProcessor

            self.registry.check_inside_a_root(folder, "safety_checker")
            self.registry.check_not_pickled(folder, "safety_checker")
            try:
                checker = StableDiffusionSafetyChecker.from_pretrained(
                    str(folder),
                    torch_dtype=self.dtype,
                    local_files_only=True,
                    use_safetensors=not self.settings.allow_pickle,
                )
                processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, KeyError, RuntimeError) as error:
                raise InvalidInput(
                    f"the safety checker in {folder} could not be loaded "
                    f"({type(error).__name__}: {str(error)[:200]})",
                    field="safety_checker",
                    accepted="a complete diffusers StableDiffusionSafetyChecker folder "
                    "(config.json, weights, preprocessor_config.json), or safety_checker false",
                ) from None
            self._safety = (checker.to(self.device).eval(), processor)
        return self._safety

    def _flagged(self, safety, image) -> bool:
        """The safety checker's verdict on one image."""
        checker, processor = safety
        pixels = processor([image], return_tensors="pt").pixel_values.to(self.device, self.dtype)
        with torch.inference_mode():
            _, flags = checker(clip_input=pixels, images=[np.asarray(image)])
        return bool(flags[0])

    def _check_hires(self, job: Job, width: int, height: int) -> tuple[int, int]:
        """The final size: the hires target when hires is on, checked against the limits."""
        if not job.hires:
            return width, height
        if job.mask:
            raise InvalidInput(
                "hires fix does not combine with inpainting",
                field="hires",
                accepted="hires without mask",
            )
        final_w, final_h = (_hires_side(side * job.hires.scale) for side in (width, height))
        if max(final_w, final_h) > 2048 or final_w * final_h > self.settings.max_pixels:
            largest = min(
                2048 / max(width, height), (self.settings.max_pixels / (width * height)) ** 0.5
            )
            fits = f"up to {math.floor(largest * 100) / 100:.2f}" if largest >= 1 else "none"
            raise InvalidInput(
                f"the second pass would be {final_w}x{final_h}, over 2048 a side or "
                f"{self.settings.max_pixels} pixels (MAX_IMAGE_PIXELS)",
                field="hires.scale",
                accepted=f"a scale {fits} at {width}x{height}, or a smaller width and height",
            )
        return final_w, final_h

    def _hires_schedule(self, loaded: LoadedCheckpoint, job: Job) -> tuple[int, int, float]:
        """(steps run, schedule length, diffusers' strength) of the hires pass.

        As A1111 does, all of the pass's steps run (`hires.steps`, else the job's), from
        `strength`'s noise level: they are the last steps of a schedule of steps / strength
        steps. diffusers' img2img would instead run steps x strength of them. The schedule is
        capped at what the scheduler allows (its training timesteps; LCM's original steps), and
        the steps run with it.
        """
        scheduler = build_scheduler(job.scheduler, loaded.scheduler_config).config
        limit = scheduler.get("original_inference_steps") or scheduler.num_train_timesteps
        strength = job.hires.strength
        steps = min(job.hires.steps or job.steps, int(limit * strength))
        schedule = max(steps, min(int(steps / min(strength, 0.999)), limit))
        # diffusers runs int(schedule x strength) steps: the half step makes that exactly `steps`
        return steps, schedule, min(1.0, (steps + 0.5) / schedule)

    def _hires_pass(self, loaded, job, text, latents, width, height, generators, callback):
        """Upscale the first pass (latents, or decoded images) and run img2img at the new size."""
        final_w, final_h = self._check_hires(job, width, height)
        if job.hires.upscaler in LATENT_UPSCALERS:
            mode, antialias, _ = LATENT_UPSCALERS[job.hires.upscaler]
            image = torch.nn.functional.interpolate(
                latents,
                size=(final_h // 8, final_w // 8),
                mode=mode,
                antialias=antialias,
                **({} if mode.startswith("nearest") else {"align_corners": False}),
            )
        else:
            with LatentDecoder(pipeline_for(loaded, "txt2img")) as decoder:
                image = [
                    decoder.decode(latents[i : i + 1]).resize((final_w, final_h), Image.LANCZOS)
                    for i in range(latents.shape[0])
                ]
        _, schedule, strength = self._hires_schedule(loaded, job)
        args = {
            **text,
            "num_inference_steps": schedule,
            "guidance_scale": job.guidance_scale,
            "output_type": "latent",
            "image": image,
            "strength": strength,
            "generator": generators,
        }
        return self._call(loaded, "img2img", job, args, callback)

    @staticmethod
    def _text_args(pipeline, job: Job, count: int) -> dict[str, Any]:
        """The prompt arguments of a pipeline call.

        Plain prompts that fit one 77-token window go to diffusers as text (its own encoding);
        A1111 weights, BREAK and longer prompts are encoded here, chunked, never truncated.
        """
        # Clip skip is encoded here too: diffusers applies it to the prompt but not to the
        # negative prompt, while A1111 applies it to both. SDXL's usual layer is already the
        # penultimate one, A1111's clip skip 2 (see encode_sdxl).
        sdxl = hasattr(pipeline, "text_encoder_2")
        usual_layer = job.clip_skip <= (2 if sdxl else 1)
        if usual_layer and not needs_own_encoding(pipeline, [job.prompt, job.negative_prompt]):
            return {
                "prompt": [job.prompt] * count,
                # No negative prompt is None, not "": SDXL then uses zero embeddings
                # (force_zeros_for_empty_prompt), as diffusers and A1111 do.
                "negative_prompt": [job.negative_prompt] * count if job.negative_prompt else None,
            }
        _check_clip_skip(pipeline, job)
        encode = encode_sdxl if sdxl else encode_sd
        embeds = encode(pipeline, job.prompt, job.negative_prompt, job.clip_skip)
        return {
            name: tensor.repeat(count, *([1] * (tensor.dim() - 1)))
            for name, tensor in embeds.items()
        }

    @staticmethod
    def _prompt_steps(
        pipeline, job: Job, count: int, steps: int, first_pass_steps: int | None = None
    ) -> PromptSteps:
        """The prompts' A1111 schedules over `steps` sampler steps (the hires pass's with
        `first_pass_steps`), merged into one and encoded, each distinct text once. All texts
        are padded to the same number of windows: the UNet's input shape (and its CUDA graph)
        stays the same from step to step."""
        _check_clip_skip(pipeline, job)
        positive = prompt_schedule(job.prompt, steps, first_pass_steps)
        negative = prompt_schedule(job.negative_prompt, steps, first_pass_steps)
        ends = sorted({end for end, _ in positive + negative})
        pairs = [(text_at(positive, end), text_at(negative, end)) for end in ends]
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        prompts = {prompt for prompt, _ in pairs}
        fields = ["prompt" if text in prompts else "negative_prompt" for text in texts]
        sdxl = hasattr(pipeline, "text_encoder_2")
        if sdxl:
            embeds = encode_sdxl_texts(pipeline, texts, fields, job.clip_skip)
        else:
            embeds = [(e, None) for e in encode_sd_texts(pipeline, texts, fields, job.clip_skip)]

        def repeated(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return tensor if tensor is None else tensor.repeat(count, *([1] * (tensor.dim() - 1)))

        # repeated once per text, shared by its entries (an alternation has one per step)
        encoded = {
            text: (repeated(states), repeated(pooled))
            for text, (states, pooled) in zip(texts, embeds, strict=True)
        }
        # As in A1111: zeros only for a negative prompt that is empty at every step
        zeros = (
            sdxl
            and not job.negative_prompt
            and pipeline.config.get("force_zeros_for_empty_prompt", False)
        )
        if zeros:
            zero_pair = tuple(torch.zeros_like(t) for t in encoded[texts[0]])

        args = []
        for prompt, negative_prompt in pairs:
            (embeds, pooled), (negative_embeds, negative_pooled) = (
                encoded[prompt],
                encoded[negative_prompt],
            )
            if zeros:
                negative_embeds, negative_pooled = zero_pair
            entry = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
            if sdxl:
                entry |= {
                    "pooled_prompt_embeds": pooled,
                    "negative_pooled_prompt_embeds": negative_pooled,
                }
            args.append(entry)
        return PromptSteps(ends, args)

    def _check_refiner(self, name: str, field: str = "refiner_checkpoint"):
        """The refiner's file and its detection; one that is no SDXL refiner is refused, from
        its file alone (nothing loads)."""
        model = self.registry.resolve("checkpoint", name, field)
        with _named_as(field):
            detection = self.registry.detect(model)
        if detection.architecture != "sdxl-refiner":
            raise InvalidInput(
                f"{model.name} is {detection.architecture}, not an SDXL refiner",
                field=field,
                accepted="an SDXL refiner checkpoint",
            )
        return model, detection

    def _check_generator(self, model: ModelFile, job: Job) -> None:
        """Refuse a checkpoint that cannot run this job, from its file alone (nothing loads)."""
        detection = self.registry.detect(model)
        architecture = detection.architecture
        if architecture in INPAINT_ARCHITECTURES and not job.mask:
            raise InvalidInput(
                f"{model.name} is an inpainting checkpoint: it needs image and mask",
                field="checkpoint",
                accepted="image + mask with this checkpoint, or an SD 1.x/2.x/XL base checkpoint",
            )
        if architecture not in GENERATOR_ARCHITECTURES + INPAINT_ARCHITECTURES:
            raise InvalidInput(
                f"{model.name} is an {architecture} checkpoint, which cannot start a generation",
                field="checkpoint",
                accepted="SD 1.x, SD 2.x or SDXL base checkpoints",
            )

    @staticmethod
    def _mask_for(job: Job, mask, width: int, height: int):
        """The job's mask (an L image) at the output size: white repaints; blurred if asked.
        Scaled by area: down, a thin stroke turns grey rather than vanishing between samples;
        up, that is each output pixel's nearest, so the edges stay sharp."""
        mask = fit_image(mask, width, height, job.resize_mode, resample=Image.BOX)
        if job.invert_mask:
            mask = ImageOps.invert(mask)
        if job.mask_blur:
            mask = mask.filter(ImageFilter.GaussianBlur(job.mask_blur))
        return mask

    def _denoise(self, plan: JobPlan, progress: ProgressCallback, cancelled: CancelCheck):
        """Run the pipeline(s) to final latents; returns (latents, pipeline to decode with, ms)."""
        started = time.perf_counter()
        job, loaded, refiner, seeds = plan.job, plan.loaded, plan.refiner, plan.seeds
        init_image, mask, width, height = plan.init_image, plan.mask, plan.width, plan.height
        mode, count = plan.mode, len(seeds)
        # A1111's prompt editing and alternation: schedules over the sampler's steps, counted as
        # A1111 counts them, one per UNet call (twice the steps for second-order samplers)
        scheduled = is_scheduled(job.prompt) or is_scheduled(job.negative_prompt)
        order = build_scheduler(job.scheduler, loaded.scheduler_config).order if scheduled else 1
        schedule = None
        if scheduled:
            schedule = self._prompt_steps(pipeline_for(loaded, mode), job, count, job.steps * order)
            text = schedule.pipeline_args()
        else:
            text = self._text_args(pipeline_for(loaded, mode), job, count)
        common = {
            **text,
            "num_inference_steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "output_type": "latent",
        }

        def generators() -> list[torch.Generator]:
            return [torch.Generator("cpu").manual_seed(s) for s in seeds]

        args: dict[str, Any] = {**common, "generator": generators()}
        if mask is not None:
            args.update(
                image=[init_image] * len(seeds),
                mask_image=[mask] * len(seeds),
                strength=job.strength,
                width=width,
                height=height,
            )
        elif init_image is not None:
            args.update(image=[init_image] * len(seeds), strength=job.strength)
        else:
            args.update(width=width, height=height)

        refine_args = None
        refine_schedule = None
        if refiner is not None:
            # The refiner has its own text encoder (OpenCLIP's, the base's second): its prompts
            # are encoded for it, with the same A1111 syntax and clip skip.
            refiner_pipeline = pipeline_for(refiner, "img2img")
            if scheduled:
                # In the ensemble the refiner goes on with the base's schedule, as A1111's
                # refiner does; refining a finished image is an img2img pass of its own.
                refine_steps = job.steps
                if job.high_noise_frac is None:
                    refine_steps = job.refiner_inference_steps or job.steps
                refine_schedule = self._prompt_steps(
                    refiner_pipeline, job, count, refine_steps * order
                )
                refine_text = refine_schedule.pipeline_args()
            else:
                refine_text = self._text_args(refiner_pipeline, job, count)
            refine_args = {
                **{key: value for key, value in common.items() if key not in text},
                **refine_text,
                "generator": generators(),
            }
            if job.high_noise_frac is not None:
                # Ensemble of experts: the base denoises the high-noise part, the refiner the rest.
                args["denoising_end"] = job.high_noise_frac
                refine_args["denoising_start"] = job.high_noise_frac
                if job.refiner_inference_steps:
                    refine_args["num_inference_steps"] = job.refiner_inference_steps
            else:
                refine_args["num_inference_steps"] = job.refiner_inference_steps or job.steps
                refine_args["strength"] = refine_after_strength(job)

        def on_step_end(phase, schedule: PromptSteps | None = None):
            def callback(pipe, step, timestep, callback_kwargs):
                if cancelled():
                    raise Cancelled("the job was cancelled")
                total = getattr(pipe, "_num_timesteps", None) or job.steps
                progress(Progress(phase, step + 1, total))
                if schedule is not None:
                    # the prompts for the next step, where the schedule moves on
                    schedule.steps_run = step + 1
                    following = schedule.args_at(step + 1)
                    if following is not schedule.args_at(step):
                        guided = pipe.do_classifier_free_guidance
                        for name, tensor in _loop_inputs(following, guided).items():
                            current = callback_kwargs[name]
                            callback_kwargs[name] = tensor.to(current.device, current.dtype)
                return callback_kwargs

            return callback

        with torch.inference_mode():
            output = self._call(loaded, mode, job, args, on_step_end("denoising", schedule))
            final = loaded
            if refine_args is not None:
                refine_args["image"] = output.images
                if refine_schedule is not None and job.high_noise_frac is not None:
                    refine_schedule.offset = schedule.steps_run
                    if job.refiner_inference_steps:
                        # its steps are counted in the base's: 4 of 8 stand for 2 each
                        refine_schedule.rate = job.steps / job.refiner_inference_steps
                    refine_args.update(refine_schedule.args_at(0))
                output = self._call(
                    refiner, "img2img", job, refine_args, on_step_end("refining", refine_schedule)
                )
                final = refiner
            if job.hires:
                hires_text, hires_schedule = text, None
                if scheduled:
                    # A1111's hires schedule: over the pass's own steps, with `when` beyond the
                    # first pass's steps (or above 1.0) counting into it
                    hires_steps = self._hires_schedule(loaded, job)[0] * order
                    hires_schedule = self._prompt_steps(
                        pipeline_for(loaded, "img2img"), job, count, hires_steps, job.steps * order
                    )
                    hires_text = hires_schedule.pipeline_args()
                output = self._hires_pass(
                    loaded,
                    job,
                    hires_text,
                    output.images,
                    width,
                    height,
                    generators(),
                    on_step_end("hires", hires_schedule),
                )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return output.images, pipeline_for(final, "txt2img"), _ms(started)

    def _call(self, loaded: LoadedCheckpoint, mode: str, job: Job, args: dict, callback):
        """Call one pipeline with this job's scheduler, restoring the shared one afterwards."""
        pipeline = pipeline_for(loaded, mode)
        original = pipeline.scheduler
        pipeline.scheduler = build_scheduler(job.scheduler, loaded.scheduler_config)
        if hasattr(pipeline.scheduler, "noise_sampler_seed"):
            # DPM++ SDE draws its noise from a Brownian tree, randomly seeded unless told: one
            # tree per image, seeded like its generator, keeps each image reproducible alone.
            pipeline.scheduler.noise_sampler_seed = [g.initial_seed() for g in args["generator"]]
        if loaded.graphs is not None and not loaded.graphs.disabled:
            fastpath.host_side_timesteps(pipeline.scheduler)
        if job.eta:  # DDIM's (the schema allows it no other sampler)
            args = {**args, "eta": job.eta}
        try:
            with rescaled_guidance(pipeline, job.guidance_rescale):
                return pipeline(**args, callback_on_step_end=callback)
        finally:
            pipeline.scheduler = original


def _check_clip_skip(pipeline, job: Job) -> None:
    """Refuse a clip skip deeper than the checkpoint's text encoders."""
    encoders = [getattr(pipeline, name, None) for name in ("text_encoder", "text_encoder_2")]
    deepest = min(e.config.num_hidden_layers for e in encoders if e is not None)
    if job.clip_skip > deepest:
        raise InvalidInput(
            f"clip_skip {job.clip_skip} goes past this checkpoint's text encoder "
            f"({deepest} layers)",
            field="clip_skip",
            accepted=f"1 to {deepest}",
        )


@contextlib.contextmanager
def _named_as(variable: str):
    """A checkpoint's errors name the field or variable that named it (`refiner_checkpoint`,
    `DEFAULT_CHECKPOINT`): the file's checks and load name `checkpoint`."""
    try:
        yield
    except WorkerError as error:
        if error.field == "checkpoint":
            error.field = variable
        raise


@contextlib.contextmanager
def _swapped_vae(pipelines: list[Any], vae: Any):
    """Use `vae` in every pipeline view of a checkpoint for one job, then put the original back."""
    originals = [(p, p.vae) for p in pipelines]
    try:
        for pipeline, _ in originals:
            pipeline.vae = vae
        yield
    finally:
        for pipeline, original in originals:
            pipeline.vae = original


def _with_oom_retry(call):
    """Run `call`; on a CUDA OOM empty the cache and retry once. Poisoned contexts ask for a refresh."""
    for attempt in (1, 2):
        try:
            return call()
        except WorkerError:
            raise
        except torch.OutOfMemoryError:
            log.warning("out of memory (attempt %d); emptying the CUDA cache", attempt)
            free_memory()
            if attempt == 2:
                raise OutOfMemory(
                    "the GPU ran out of memory even after emptying its cache",
                    field="width",
                    accepted="a smaller size or fewer images",
                    refresh_worker=True,
                ) from None
        except RuntimeError as error:
            _raise_if_cuda_failure(error)
            raise


def _raise_if_cuda_failure(error: RuntimeError) -> None:
    """A CUDA error that may have poisoned the context becomes a job error asking for a new
    worker; any other RuntimeError is left to the caller."""
    text = str(error)
    if "device-side assert" in text or "CUDA error" in text:
        log.error("CUDA error; the worker should be replaced", exc_info=error)
        raise InternalError("a CUDA error left the GPU unusable", refresh_worker=True) from None


def _completed_future(value):
    """A finished future holding `value` (for images that need no encoding)."""
    future: Future = Future()
    future.set_result(value)
    return future


def _overlay_mask(mask: Image.Image) -> Image.Image:
    """The mask for pasting the input back over an inpainted image: the blurred mask at twice
    its strength, as A1111 pastes, so the repainted area stays fully repainted up to where the
    blur falls to half and the blend happens over the blur's outer half."""
    return mask.point(lambda value: min(255, 2 * value))


def _infotext_fields(
    job: Job, mode: str, refiner, vae_name, width: int, height: int, hires_steps: int | None
) -> dict[str, Any]:
    """A1111's infotext fields for what ran beyond txt2img: its size is the first pass's, and
    img2img, inpainting, hires fix, the refiner ensemble, clip skip and a VAE add their own."""
    extra: dict[str, Any] = {}
    if vae_name:
        extra["VAE"] = vae_name
    if mode != "txt2img":
        extra["Denoising strength"] = f"{job.strength:g}"
    if job.guidance_rescale:
        extra["Rescale CFG"] = f"{job.guidance_rescale:g}"  # Forge's name for it
    if job.clip_skip > 1:
        extra["Clip skip"] = job.clip_skip
    if job.eta:
        extra["Eta DDIM"] = f"{job.eta:g}"
    if mode == "inpaint":
        extra["Mask blur"] = job.mask_blur
        if job.invert_mask:  # A1111 reads no Mask mode as "Inpaint masked"
            extra["Mask mode"] = "Inpaint not masked"
    if job.hires:
        # A1111's hires fix follows txt2img, where "Denoising strength" is the hires pass's
        key = "Denoising strength" if mode == "txt2img" else "Hires denoising strength"
        extra[key] = f"{job.hires.strength:g}"
        extra["Hires upscale"] = f"{job.hires.scale:g}"
        if hires_steps != job.steps:  # the steps the pass ran; A1111 leaves out "same as first"
            extra["Hires steps"] = hires_steps
        extra["Hires upscaler"] = LATENT_UPSCALERS.get(job.hires.upscaler, (0, 0, "Lanczos"))[2]
    if refiner is not None and job.high_noise_frac is not None:
        extra["Refiner"] = refiner.name
        extra["Refiner switch at"] = f"{job.high_noise_frac:g}"
    elif refiner is not None:  # A1111 has no such pass: names of its own, which A1111 ignores
        extra["Refined by"] = refiner.name
        extra["Refiner strength"] = f"{refine_after_strength(job):g}"
        if job.refiner_inference_steps:
            extra["Refiner steps"] = job.refiner_inference_steps
    return {"width": width, "height": height, "extra": extra}


def refine_after_strength(job: Job) -> float:
    """The refiner's strength when it refines the finished image: 0.3, worker-sdxl's and
    cog-sdxl's default; a txt2img job's own `strength`, which has no other use there, sets it,
    as worker-sdxl reads it."""
    if not job.image and "strength" in job.model_fields_set:
        return job.strength
    return REFINE_AFTER_STRENGTH


def _hires_side(value: float) -> int:
    """An upscaled side as A1111 sizes it: truncated to pixels, then to whole latents (8)."""
    return max(64, int(value) // 8 * 8)


def _size_of_input(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """An input image's size as a job's default: scaled to fit 64-2048 a side and max_pixels,
    keeping its aspect ratio (a phone photo stays 4:3), then rounded down to multiples of 8."""
    width, height = size
    scale = min(1.0, 2048 / max(size), (max_pixels / (width * height)) ** 0.5)
    scale = max(scale, 64 / min(size))  # a thin strip grows to 64; only then is it clamped
    return tuple(max(64, min(2048, int(side * scale) // 8 * 8)) for side in size)  # type: ignore[return-value]


def _quiet_libraries() -> None:
    """The libraries' progress bars and load chatter would drown the one log line per job
    (and reach a Replicate user's prediction logs): their loggers, their tqdm bars, and the
    warnings that are about their own APIs, not about the job."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
    # peft, when a second adapter loads into a model: adapters are what this worker keeps
    warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
    # torchsde, when DPM++ SDE's Brownian tree is asked for a time it rounds past (harmless)
    warnings.filterwarnings("ignore", message=r"Should have t[ab][<>]=t[01]", category=UserWarning)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000
