"""Checkpoint loading (single-file with bundled configs, or diffusers folders) and its cache."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handler.errors import InvalidInput, UnsupportedModel
from handler.registry import CONFIG_ROOT, Detection, ModelFile, vae_sidecar

log = logging.getLogger(__name__)

PIPELINE_CLASSES = {
    "sd15": "StableDiffusionPipeline",
    "sd2-512": "StableDiffusionPipeline",
    "sd2-768-v": "StableDiffusionPipeline",
    "sd15-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
}


def clip_tokenizer(pad_token: str):
    """The bundled CLIP BPE tokenizer. SD1 pads with <|endoftext|>; OpenCLIP encoders with '!'."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(CONFIG_ROOT / "clip_tokenizer"), pad_token=pad_token)


def _tokenizers(architecture: str) -> dict[str, Any]:
    # Each pipeline gets its own tokenizer: embeddings add tokens to it for the length of a job.
    # Building one (35 ms on the CI machine) is faster than deep-copying a cached one (80 ms).
    def clip_l():
        return clip_tokenizer("<|endoftext|>")

    def open_clip():
        return clip_tokenizer("!")

    if architecture.startswith("sd15"):
        return {"tokenizer": clip_l()}
    if architecture.startswith("sd2"):
        return {"tokenizer": open_clip()}
    if architecture == "sdxl-refiner":
        return {"tokenizer_2": open_clip()}
    return {"tokenizer": clip_l(), "tokenizer_2": open_clip()}


# Pipelines derived (with shared weights) from a loaded checkpoint, per mode.
DERIVED_CLASSES = {
    ("sd15", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd2-512", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sd2-768-v", "img2img"): "StableDiffusionImg2ImgPipeline",
    ("sdxl", "img2img"): "StableDiffusionXLImg2ImgPipeline",
    # A regular checkpoint inpaints by blending latents with the mask each step.
    ("sd15", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sd2-512", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sd2-768-v", "inpaint"): "StableDiffusionInpaintPipeline",
    ("sdxl", "inpaint"): "StableDiffusionXLInpaintPipeline",
}


@dataclass
class LoadedCheckpoint:
    """A pipeline ready to run, with what the engine needs to know about it."""

    name: str
    model: ModelFile
    architecture: str
    pipeline: Any
    scheduler_config: dict[str, Any]
    load_ms: float
    import_ms: float = 0.0  # of load_ms: importing the pipeline's modules (first load only)
    derived: dict[str, Any] = field(default_factory=dict)
    adapters: Any = None  # handler.loras.ResidentAdapters, set by the engine
    graphs: Any = None  # handler.fastpath.UNetGraphs on CUDA, set by the engine
    host_chunks: list[torch.Tensor] = field(default_factory=list)  # its weights, while offloaded
    # A checkpoint without VAE weights or a VAE beside it: the file key of the job's VAE it was
    # loaded with (its jobs must all name a VAE).
    job_vae_key: tuple | None = None


@contextlib.contextmanager
def lowercase_suffix(path: Path):
    """`path`, or a temporary link to it ending in `.safetensors` when its extension has other
    case (`.SAFETENSORS`): diffusers picks its loader by the exact extension, and would try
    torch.load on anything else."""
    if path.suffix == path.suffix.lower():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="sd-worker-") as folder:
        link = Path(folder) / (path.stem + path.suffix.lower())
        link.symlink_to(path)
        yield link


def pipeline_for(loaded: LoadedCheckpoint, mode: str):
    """The pipeline for `mode` (txt2img, img2img, inpaint), sharing the loaded weights (`from_pipe`)."""
    import diffusers

    if mode == "txt2img" or loaded.architecture in ("sdxl-refiner", "sd15-inpaint", "sdxl-inpaint"):
        return loaded.pipeline  # refiner and inpainting checkpoints load as their own pipeline
    if mode not in loaded.derived:
        cls = getattr(diffusers, DERIVED_CLASSES[(loaded.architecture, mode)])
        # from_pipe casts every shared module to torch_dtype, float32 unless told otherwise.
        pipeline = cls.from_pipe(loaded.pipeline, torch_dtype=loaded.pipeline.dtype)
        pipeline.set_progress_bar_config(disable=True)
        loaded.derived[mode] = pipeline
    return loaded.derived[mode]


def load_checkpoint(
    model: ModelFile,
    detection: Detection,
    config_dir,
    device: torch.device,
    dtype: torch.dtype,
    allow_pickle: bool = False,
    vae: Any = None,
) -> LoadedCheckpoint:
    """Load a checkpoint into a diffusers pipeline on `device`, with no hub access (and, unless
    `allow_pickle`, from safetensors weights only).

    A single file saved without VAE weights takes the VAE beside it (`NAME.vae.safetensors`),
    else `vae` (a loaded VAE: the one its job named); without either it is refused.
    """
    import diffusers

    started = time.perf_counter()
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[detection.architecture])
    imported = time.perf_counter()
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if model.is_folder and not allow_pickle:
        kwargs["use_safetensors"] = True  # never a part's .bin, whatever sits beside it
    if model.is_folder:
        kwargs["variant"] = folder_variant(model.path / "unet")  # None: the plain files
    if "safety_checker" in pipeline_class._optional_components:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if not detection.has_vae:
        sidecar = vae_sidecar(model)
        if sidecar is not None:
            try:
                kwargs["vae"] = load_vae(sidecar, config_dir, dtype, allow_pickle)
            except Exception as error:  # a file that is no VAE fails in diffusers' own ways
                raise UnsupportedModel(
                    f"{model.name}'s VAE {sidecar.name} could not be loaded "
                    f"({type(error).__name__})",
                    field="checkpoint",
                    accepted="a VAE .safetensors file matching the checkpoint beside it",
                ) from None
        elif vae is not None:
            kwargs["vae"] = vae
        else:
            raise missing_vae(model)
    try:
        with _no_weight_init():
            if model.is_folder:
                pipeline = pipeline_class.from_pretrained(str(model.path), **kwargs)
            else:
                kwargs.update(_tokenizers(detection.architecture))
                with lowercase_suffix(model.path) as path:
                    pipeline = pipeline_class.from_single_file(
                        str(path), config=str(config_dir), **kwargs
                    )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        log.warning("loading %s failed: %s", model.name, error)
        # the client sees the model's name, not the host's paths
        detail = str(error).replace(str(model.path), model.name).replace(str(model.root), "")
        raise UnsupportedModel(
            f"{model.name} was detected as {detection.architecture} but could not be loaded "
            f"({type(error).__name__}: {detail[:300]})",
            field="checkpoint",
            accepted="complete SD 1.x, 2.x or XL checkpoints",
        ) from None

    scheduler_config = dict(pipeline.scheduler.config)
    recorded = {"prediction_type": detection.prediction_type}
    if detection.zero_terminal_snr:
        # As the paper that introduced it says, and as ComfyUI and reForge sample such models:
        # the rescaled schedule, and sampling that starts from its last (pure noise) timestep.
        recorded.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if any(scheduler_config.get(key) != value for key, value in recorded.items()):
        scheduler_config.update(recorded)
        pipeline.scheduler = type(pipeline.scheduler).from_config(scheduler_config)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return LoadedCheckpoint(
        name=model.name,
        model=model,
        architecture=detection.architecture,
        pipeline=pipeline,
        scheduler_config=scheduler_config,
        load_ms=(time.perf_counter() - started) * 1000,
        import_ms=(imported - started) * 1000,
    )


def folder_variant(folder: Path) -> str | None:
    """The variant a diffusers model folder's weights were saved as, when it holds only those:
    `save_pretrained(variant="fp16")` writes `diffusion_pytorch_model.fp16.safetensors`
    (sharded: `.fp16-00001-of-00002.safetensors`), which diffusers loads only when told. For a
    pipeline folder, its `unet/` decides."""
    names = [p.name for p in folder.glob("diffusion_pytorch_model*.safetensors")]
    plain = [
        n
        for n in names
        if n.startswith(("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-"))
    ]
    if not names or plain:
        return None
    return names[0].split(".")[1].split("-")[0]


def missing_vae(model: ModelFile) -> InvalidInput:
    """The error for a job on a checkpoint without VAE weights that names no VAE."""
    return InvalidInput(
        f"{model.name} has no VAE weights (it was saved without a baked VAE), so its jobs must "
        f"name one; or put the VAE made for it beside it, named {model.path.stem}.vae.safetensors",
        field="vae",
        accepted="a VAE under vae/ in every job on this checkpoint",
    )


def load_vae(path: Path, config_dir, dtype: torch.dtype, allow_pickle: bool = False):
    """A VAE file or diffusers folder; a single file is configured by the checkpoint's config
    folder (its scaling factor is part of what the VAE is). Raises what diffusers raises."""
    from diffusers import AutoencoderKL

    if path.is_dir():
        return AutoencoderKL.from_pretrained(
            str(path),
            torch_dtype=dtype,
            use_safetensors=not allow_pickle,
            local_files_only=True,
            variant=folder_variant(path),
        )
    with lowercase_suffix(path) as link:
        return AutoencoderKL.from_single_file(
            str(link),
            config=str(config_dir),
            subfolder="vae",
            torch_dtype=dtype,
            local_files_only=True,
        )


def _no_weight_init():
    """Skip random initialisation of modules whose weights are about to be loaded.

    diffusers builds the text encoders on the meta device, but transformers still runs its
    init functions on them (about a second for SDXL's two encoders on a slow CPU).
    """
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout: initialise as usual
        return contextlib.nullcontext()
    return no_init_weights()


class CheckpointCache:
    """Loaded checkpoints in two least-recently-used tiers: on the device, and offloaded to CPU RAM.

    A checkpoint pushed off the device moves to CPU RAM (in its run dtype, so fp16 stays fp16)
    while the RAM tier has room, and is dropped after that. Bringing it back from RAM reads no
    disk. On a CPU-only machine both tiers are RAM and the total is what counts.
    """

    def __init__(self, device_slots: int, ram_slots: int, device: torch.device) -> None:
        self.device_slots = max(1, device_slots)
        self.ram_slots = max(0, ram_slots)
        self.device = device
        self._entries: OrderedDict[tuple, LoadedCheckpoint] = OrderedDict()
        self._on_device: set[tuple] = set()
        self.host = HostChunks(pin_memory=device.type == "cuda")
        if self.host.pin_memory:
            self.host.locking_threads = page_lock_with_threads()

    def __contains__(self, key: tuple) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def on_device(self, key: tuple) -> bool:
        return key in self._on_device

    def get(
        self,
        key: tuple,
        load: Callable[[], LoadedCheckpoint],
        beside: LoadedCheckpoint | None = None,
    ) -> tuple[LoadedCheckpoint, bool]:
        """The entry for `key` on the device, loading it on a miss; returns (entry, was_cached).
        `beside` (a job's base, when this is its refiner) stays on the device with it, even
        beyond the device's slots."""
        kept = {k for k, entry in self._entries.items() if entry is beside}
        if key in self._entries:
            self._entries.move_to_end(key)
            entry = self._entries[key]
            if key not in self._on_device:
                self._make_room(keep={key} | kept)
                move_to_device(_modules(entry), self.device)
                self.host.give_back(entry.host_chunks)
                entry.host_chunks = []
                self._on_device.add(key)
            return entry, True
        # Make room first, so two full pipelines (but a base and its refiner) never sit on the
        # device at once.
        self._make_room(keep=kept)
        entry = load()
        self._entries[key] = entry
        self._on_device.add(key)
        return entry, False

    def _make_room(self, keep: set[tuple]) -> None:
        """Offload least-recently-used entries, but those in `keep`, until one more fits on the
        device (beside those kept)."""
        for key in list(self._entries):
            if len(self._on_device - keep) < self.device_slots:
                break
            if key in keep or key not in self._on_device:
                continue
            entry = self._entries[key]
            self._on_device.discard(key)
            if self.device.type != "cpu":
                log.info("offloading checkpoint %s to CPU RAM", entry.name)
                if entry.graphs is not None:
                    entry.graphs.clear()  # the graphs point at the weights' device memory
                entry.host_chunks = move_to_host(_modules(entry), self.host)
        offloaded = [k for k in self._entries if k not in self._on_device and k not in keep]
        while len(offloaded) > self.ram_slots:
            evicted = self._entries.pop(offloaded.pop(0))
            log.info("evicting checkpoint %s", evicted.name)
            if evicted.graphs is not None:
                evicted.graphs.uninstall()
            # Its chunks are reused once nothing holds its modules any more.
            self.host.retire(evicted.host_chunks, _modules(evicted))
            del evicted
            free_memory()


HOST_CHUNK_BYTES = 256 * 2**20
PAGE_LOCKING_THREADS = 8


def page_lock_with_threads(threads: int = PAGE_LOCKING_THREADS) -> int:
    """Have PyTorch page-lock host memory by touching its pages from several threads and then
    registering it with CUDA (`pinned_use_cuda_host_register`), instead of one `cudaHostAlloc`.

    On an H200 host (`benchmarks/probes/pinned-alloc-*`) a 256 MB chunk took 30 ms this way with
    8 threads, against 85-170 ms through `cudaHostAlloc`, which also stalled the GPU work of
    other threads while it ran. A pinning setting of the user's own in PYTORCH_ALLOC_CONF or
    PYTORCH_CUDA_ALLOC_CONF wins. Returns the threads set, 0 when nothing was set.
    """
    configured = (
        os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    )
    if "pinned_use_cuda_host_register" in configured:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable = max(1, min(threads, cores or 1))
    usable = 1 << (usable.bit_length() - 1)  # PyTorch takes a power of two
    ours = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{usable}"
    try:
        # This replaces the options parsed so far, so the user's own are given again first.
        torch._C._accelerator_setAllocatorSettings(",".join(filter(None, [configured, ours])))
    except (AttributeError, RuntimeError) as error:
        log.warning("page-locking stays single-threaded (%s)", error)
        return 0
    return usable


class HostChunks:
    """The RAM tier's host memory: chunks of `chunk_bytes` (page-locked with `pin_memory`),
    kept and reused by the worker.

    PyTorch's pinned-memory cache should recycle freed chunks, but on torch 2.11 with CUDA graphs
    captured it never did: every offload allocated new page-locked memory (about 170 ms per
    256 MB chunk on an H200, 0.9-4.0 s of each switch) and none was ever freed, 9.7 GB more per
    SDXL <-> SD 1.5 round trip (`benchmarks/probes/switch-phases-*`). So the cache keeps its
    chunks itself: an offloaded checkpoint holds its chunks, and bringing it back gives them back
    here for the next offload. The chunks held only grow to what the RAM tier needed at once.
    """

    def __init__(self, chunk_bytes: int = HOST_CHUNK_BYTES, pin_memory: bool = True) -> None:
        self.chunk_bytes = chunk_bytes
        self.pin_memory = pin_memory
        self.free: list[torch.Tensor] = []
        self.created = 0  # chunks allocated so far
        self.locking_threads = 0  # threads page-locking new chunks (`page_lock_with_threads`)
        self._retired: list[tuple[list[torch.Tensor], list[weakref.ref]]] = []

    def take(self, size: int) -> torch.Tensor:
        """A free chunk of at least `size` bytes (the smallest that fits), else a new one."""
        self._collect_retired()
        fitting = [i for i, chunk in enumerate(self.free) if chunk.numel() >= size]
        if fitting:
            return self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
        chunk = torch.empty(
            max(size, self.chunk_bytes), dtype=torch.uint8, pin_memory=self.pin_memory
        )
        self.created += 1
        return chunk

    def give_back(self, chunks: list[torch.Tensor]) -> None:
        """Chunks whose contents are no longer needed (the weights have left them)."""
        self.free += [c for c in chunks if c.is_pinned() == self.pin_memory]

    def retire(self, chunks: list[torch.Tensor], owners: list[torch.nn.Module]) -> None:
        """Chunks that `owners`' weights still point at: reused once the owners are gone."""
        if chunks:
            self._retired.append((chunks, [weakref.ref(m) for m in owners]))

    def _collect_retired(self) -> None:
        waiting = []
        for chunks, owners in self._retired:
            if any(ref() is not None for ref in owners):
                waiting.append((chunks, owners))
            else:
                self.give_back(chunks)
        self._retired = waiting


def move_to_host(modules: list[torch.nn.Module], host: HostChunks) -> list[torch.Tensor]:
    """Move the modules' weights to CPU RAM, packed into `host`'s chunks; returns the chunks
    they now occupy (for `host.give_back` once the weights have left them again).

    From page-locked memory, moving a checkpoint back to the GPU is one DMA at bus speed: 6.9 GB
    of SDXL took 0.15 s instead of 1.0 s from ordinary memory on an H100. Each weight keeps its
    Parameter object, dtype and strides (a channels_last UNet stays channels_last).
    """
    tensors = {
        id(t): t
        for module in modules
        for t in [*module.parameters(), *module.buffers()]
        if t.device.type != "cpu" or (host.pin_memory and not t.is_pinned())
    }
    chunks: list[torch.Tensor] = []
    try:
        pack_into_chunks(list(tensors.values()), host, chunks)
    except RuntimeError as error:
        if not host.pin_memory:
            raise
        # Page-locked memory refused (a container limit, an exhausted host): ordinary RAM
        # does, for the weights still on the device.
        log.warning("no page-locked host memory (%s); offloading to ordinary RAM", error)
        _synchronize()
        ordinary = HostChunks(host.chunk_bytes, pin_memory=False)
        chunks += move_to_host(modules, ordinary)
    if host.pin_memory:
        _synchronize()  # the copies land before anyone reads the host memory
    return chunks


def move_to_device(modules: list[torch.nn.Module], device: torch.device) -> None:
    """Bring offloaded weights back to `device`: non-blocking copies, one synchronize at the end
    (SDXL's 6.9 GB in 134 ms on an H200, against 220-290 ms through diffusers' `pipeline.to`).
    Each weight keeps its Parameter object. After this, the host chunks are free to reuse."""
    if device.type == "cpu":
        return
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.device.type == "cpu":
                    # Non-blocking only from page-locked memory: from ordinary memory PyTorch
                    # stages the copy through a page-locked block of its own cache.
                    source = tensor.data
                    tensor.data = source.to(device, non_blocking=source.is_pinned())
    _synchronize()


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pack_into_chunks(
    tensors: list[torch.Tensor], host: HostChunks, chunks: list[torch.Tensor]
) -> None:
    """Copy each tensor into chunks taken from `host` (a tensor larger than a chunk gets one of
    its own size; a strided one, ordinary memory) and point the tensor at its copy. Appends the
    chunks used to `chunks` as it goes, so a failure midway still accounts for them."""
    chunk, used = None, 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        dense = tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last)
        if not dense:  # rare (expanded buffers) and small: no chunk
            host_tensor = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype)
        else:
            if size > host.chunk_bytes:
                target, offset = host.take(size), 0
                chunks.append(target)
            else:
                if chunk is None or used + size > chunk.numel():
                    chunk, used = host.take(host.chunk_bytes), 0
                    chunks.append(chunk)
                target, offset = chunk, used
                used += -(-size // 512) * 512  # aligned for every dtype
            host_tensor = (
                target[offset : offset + size]
                .view(tensor.dtype)
                .as_strided(tensor.shape, tensor.stride())
            )
        host_tensor.copy_(tensor, non_blocking=host.pin_memory and dense)
        tensor.data = host_tensor


def _modules(entry: LoadedCheckpoint) -> list[torch.nn.Module]:
    """The checkpoint's modules, and its resident LoRAs' weights, which move with it."""
    components = entry.pipeline.components.values()
    adapters = entry.adapters.weight_modules() if entry.adapters is not None else []
    return [c for c in components if isinstance(c, torch.nn.Module)] + adapters


def free_memory() -> None:
    """Collect garbage and hand the CUDA allocator's free blocks back."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


TILE_PIXELS = 512  # a tiled decode's tile side, as ComfyUI's fallback uses


class LatentDecoder:
    """Decodes latents one image at a time (so encoding overlaps the next decode).

    A VAE whose config says `force_upcast` (SDXL's) is not blindly run in fp32, as diffusers
    does: it decodes in its run dtype first, and only when that overflows (non-finite pixels,
    which is how fp16 overflow shows) is the image decoded again in a dtype with fp32's range:
    bf16 on GPUs that have it (as fast as fp16), else fp32. A VAE that overflowed once goes
    straight to the wider dtype from then on. An fp16-safe VAE (SD 1.x's, or the SDXL fp16 fix)
    never pays for it. When the decoder closes, the VAE goes back to fp16 with its exact
    original weights: a cast to bf16 and back would round them (bf16 keeps 8 mantissa bits,
    fp16 10), and its encoder (img2img, inpainting) would then differ from a fresh worker's.

    A decode that runs out of GPU memory (a large hires image on a small GPU) is done again in
    overlapping tiles of TILE_PIXELS (diffusers' `tiled_decode`, with eager kernels: the tiles
    have shapes of their own), as ComfyUI does, and so is every later image of the job.
    """

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.vae = pipeline.vae
        self.may_upcast = self.vae.dtype == torch.float16 and getattr(
            self.vae.config, "force_upcast", False
        )
        self.upcast = False
        self.tiled = False  # whether a decode ran out of memory: tiles from then on
        self._fp16_weights: list[torch.Tensor] = []  # the originals, while upcast
        self.last_was_finite = True  # whether the last decoded image had only finite pixels
        on_cuda = self.vae.device.type == "cuda"
        self.wide_dtype = (
            torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
        )

    def __enter__(self) -> LatentDecoder:
        if self.may_upcast and getattr(self.vae, "_sd_worker_overflows", False):
            self._upcast()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.upcast:
            self.vae.to(dtype=torch.float16)
            with torch.no_grad():
                torch._foreach_copy_(list(self.vae.parameters()), self._fp16_weights)
            self._fp16_weights = []

    def _upcast(self) -> None:
        self._fp16_weights = [p.detach().clone() for p in self.vae.parameters()]
        self.vae.to(dtype=self.wide_dtype)
        self.upcast = True

    def decode(self, latents: torch.Tensor):
        """One PIL image from latents of shape [1, C, h, w]."""
        image = self._decode(latents)
        finite = bool(torch.isfinite(image).all())
        # Non-finite latents (a job's extreme prompt weight or LoRA scale) are no overflow of
        # the VAE's: no wider dtype mends them, and they must not change later jobs' decodes.
        if self.may_upcast and not self.upcast and not finite and latents.isfinite().all():
            self._upcast()
            image = self._decode(latents)
            finite = bool(torch.isfinite(image).all())
            if finite:
                log.info(
                    "fp16 VAE decode overflowed; this VAE decodes in %s from now on",
                    self.wide_dtype,
                )
                self.vae._sd_worker_overflows = True
        self.last_was_finite = finite
        return self.pipeline.image_processor.postprocess(image, output_type="pil")[0]

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        config = vae.config
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            channels = latents.shape[1]
            mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        if not self.tiled:
            try:
                return vae.decode(latents, return_dict=False)[0]
            except torch.OutOfMemoryError:
                if not hasattr(vae, "tiled_decode"):
                    raise
                self.tiled = True
            log.warning("the VAE decode ran out of GPU memory; decoding in tiles from now on")
            free_memory()
        return self._decode_in_tiles(latents)

    def _decode_in_tiles(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        sizes = (vae.tile_latent_min_size, vae.tile_sample_min_size)
        compiled = vae.decoder.__dict__.pop("forward", None)  # COMPILE=1's decoder
        scale = sizes[1] // sizes[0]  # pixels per latent
        vae.tile_latent_min_size = min(sizes[0], TILE_PIXELS // scale)
        vae.tile_sample_min_size = vae.tile_latent_min_size * scale
        try:
            return vae.tiled_decode(latents, return_dict=False)[0]
        finally:
            vae.tile_latent_min_size, vae.tile_sample_min_size = sizes
            if compiled is not None:
                vae.decoder.forward = compiled


@contextlib.contextmanager
def rescaled_guidance(pipeline: Any, rescale: float):
    """CFG rescale (diffusers' `guidance_rescale`, from "Common Diffusion Noise Schedules and
    Sample Steps are Flawed") for every pipeline, while the context lasts.

    diffusers' SD 1.x/2.x img2img and inpainting pipelines have no `guidance_rescale`, so it is
    applied here, around the UNet, for all of them alike: each guided call's prediction becomes
    diffusers' rescaled one. The pipeline still combines the halves itself
    (uncond + scale * (cond - uncond)); the cond half it gets back is chosen so that this
    combination gives the rescaled prediction. The UNet's own forward (a CUDA graph or not) is
    untouched, and put back as it was when the context ends.
    """
    if not rescale:
        yield
        return
    unet = pipeline.unet
    had_own_forward = "forward" in unet.__dict__
    inner = unet.forward

    def forward(*args: Any, **kwargs: Any):
        output = inner(*args, **kwargs)
        if not pipeline.do_classifier_free_guidance:
            return output
        prediction = rescale_guided(output[0], pipeline.guidance_scale, rescale)
        if isinstance(output, tuple):
            return (prediction, *output[1:])
        return type(output)(sample=prediction)

    unet.forward = forward
    try:
        yield
    finally:
        if had_own_forward:
            unet.forward = inner
        else:
            unet.__dict__.pop("forward", None)


def rescale_guided(prediction: torch.Tensor, scale: float, rescale: float) -> torch.Tensor:
    """A guided UNet output [uncond; cond] with its cond half replaced so that the pipeline's
    uncond + scale * (cond - uncond) gives diffusers' `rescale_noise_cfg` of the guided
    prediction: its standard deviation moved towards the cond prediction's by `rescale`."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    uncond, cond = prediction.float().chunk(2)
    target = rescale_noise_cfg(uncond + scale * (cond - uncond), cond, rescale)
    return torch.cat([uncond, uncond + (target - uncond) / scale]).to(prediction.dtype)
