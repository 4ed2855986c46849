"""The GPU fast path: the UNet replayed from CUDA graphs, one per input shape, optionally compiled.

Eager diffusers launches thousands of small kernels per UNet call, and a serverless host CPU is
often too slow to keep the GPU fed: the GPU waits on Python. A CUDA graph launches the whole
captured UNet call at once. Graphs run the same kernels on the same weights, so they change
the speed, not the math.

- A graph is captured the first time a shape is seen (a warm-up call, then the capture; about
  two eager UNet calls) and kept in a small LRU. Calls the graphs do not cover (ControlNet
  residuals, attention kwargs, python-number timesteps) run eagerly.
- The graphs read the UNet's weights where they are. Changing weights in place (LoRAs are
  merged that way, see `handler.loras`) needs no recapture; moving the weights (offloading a
  checkpoint to CPU RAM) must `clear()` the graphs first.
- `COMPILE=1` captures torch.compile's (inductor's) kernels instead of eager ones, and compiles
  the VAE decoder (channels_last: 47 instead of 106 ms at 1024x1024 on an H200). Compiling takes a
  minute or more per shape on first use; the cache lives on the volume (`COMPILE_CACHE_DIR`)
  so later workers load it. If compiling fails the worker logs it and stays on eager kernels:
  compile never fails a job.
- With `COMPILE=1`, the first worker also saves dynamo's and inductor's work for each UNet and
  VAE decoder shape ahead of time (`torch.compile(...).aot_compile`, `save_compiled_function`),
  and later workers load it instead of tracing them again (`precompiled_forward`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 2  # before a capture: lazy initialisation (and compilation) stay out of the graph


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor


class UNetGraphs:
    """Stands in for a UNet's `forward`: replays a CUDA graph per input shape (LRU of `capacity`).

    `install()` puts it on the module instance, `uninstall()` takes it off; both are cheap.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        capacity: int = 4,
        compile_unet: bool = False,
        attention: str = "auto",
        layouts: LayoutCache | None = None,
        precompiled_dir: Path | None = None,
    ):
        self.unet = unet
        self.layouts = layouts
        self.precompiled_dir = precompiled_dir if compile_unet else None
        # Per input signature: the forward loaded from (or saved to) precompiled_dir, or None
        # where that failed and the regular compiled forward is used.
        self._precompiled: dict[tuple, Callable | None] = {}
        self.precompiled_from_volume = 0  # how many shapes were loaded rather than traced
        self.capacity = max(1, capacity)
        self.attention = attention
        self._eager = type(unet).forward.__get__(unet)
        self._forward = self._eager
        self.compiled = False
        if compile_unet:
            self._forward = self._compiled_forward()
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._pool = None
        self.disabled = False
        self.layout_ms: dict[str, float] | None = None  # set by choose_layout()
        self.layout_from_volume = False  # the choice came from LayoutCache, not from timing
        self.captures = 0
        self.replays = 0
        # New shapes' first calls: compiling or loading, capturing, choosing the layout
        self.first_calls_ms = 0.0

    # -- installation -------------------------------------------------------------------

    def install(self) -> UNetGraphs:
        self.unet.forward = self
        return self

    def uninstall(self) -> None:
        self.unet.__dict__.pop("forward", None)
        self.clear()

    def clear(self) -> None:
        """Drop every graph (before the weights move, or to free their memory)."""
        self._graphs.clear()
        self._pool = None

    def __len__(self) -> int:
        return len(self._graphs)

    # -- calls ----------------------------------------------------------------------------

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        def eager():
            return self._forward(
                sample,
                timestep,
                encoder_hidden_states,
                *args,
                added_cond_kwargs=added_cond_kwargs,
                return_dict=return_dict,
                **kwargs,
            )

        inputs = self._graph_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if self.disabled or inputs is None or args or any(v is not None for v in kwargs.values()):
            return eager()
        key = tuple((name, tuple(t.shape), _static_dtype(name, t)) for name, t in inputs.items())
        with torch.inference_mode():
            graph = self._graphs.get(key)
            if graph is None:
                started = time.perf_counter()
                if self.layout_ms is None:
                    self.layout_ms = self._known_layout(key)
                graph = self._capture(key, inputs)
                if graph is not None and self.layout_ms is None:
                    self.layout_ms = self.choose_layout()  # once per UNet, at its first capture
                    graph = self._graphs.get(key)
                self.first_calls_ms += (time.perf_counter() - started) * 1000
                if graph is None:  # capture failed: this call (and later ones) run eagerly
                    return eager()
            self._graphs.move_to_end(key)
            for name, static in graph.inputs.items():
                value = inputs[name]
                if value.device.type == "cpu" and value.numel() == 1:
                    static.fill_(value.item())  # a kernel argument: no copy, no host sync
                else:
                    static.copy_(value, non_blocking=True)
            graph.graph.replay()
            self.replays += 1
            # A copy: the graph's output buffer is overwritten by the next replay, and some
            # schedulers keep past model outputs.
            output = graph.output.clone()
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=output)
        return (output,)

    @staticmethod
    def _graph_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs):
        """The call's tensors by name, or None when a graph cannot stand in for it."""
        if sample.device.type != "cuda" or not torch.is_tensor(timestep):
            return None
        if not torch.is_tensor(encoder_hidden_states):
            return None
        inputs = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
        }
        for name, value in sorted((added_cond_kwargs or {}).items()):
            if not torch.is_tensor(value):
                return None
            inputs[f"added.{name}"] = value
        return inputs

    @staticmethod
    def _static_call(static: dict[str, torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
        added = {k.removeprefix("added."): v for k, v in static.items() if k.startswith("added.")}
        args = (static["sample"], static["timestep"], static["encoder_hidden_states"])
        return args, {"added_cond_kwargs": added or None, "return_dict": False}

    def _run_static(self, static: dict[str, torch.Tensor], forward: Callable) -> torch.Tensor:
        args, kwargs = self._static_call(static)
        return forward(*args, **kwargs)[0]

    def _precompile(self, key: tuple, static: dict[str, torch.Tensor]) -> Callable | None:
        """This input signature's compiled forward, from the volume or compiled ahead of time
        now and saved there for later workers; None when that cannot be done."""
        weights = next(self.unet.parameters())
        path = precompiled_path(
            self.precompiled_dir,
            "unet",
            [self._layout_key(key), _layout_of(self.unet), str(weights.dtype)],
        )
        with attention_backends(self.attention):  # inductor bakes in the attention kernel
            precompiled = precompiled_forward(self.unet, path, *self._static_call(static))
        if precompiled is None:
            return None
        forward, loaded = precompiled
        self.precompiled_from_volume += loaded
        return forward

    def _capture(self, key: tuple, inputs: dict[str, torch.Tensor]) -> _Graph | None:
        device = inputs["sample"].device
        static = {
            name: t.detach().to(device, _static_dtype(name, t), copy=True)
            for name, t in inputs.items()
        }
        forward = self._forward
        if self.compiled and self.precompiled_dir is not None:
            if key not in self._precompiled:
                self._precompiled[key] = self._precompile(key, static)
            forward = self._precompiled[key] or self._forward
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            # The attention kernel chosen now is the one the graph replays.
            with attention_backends(self.attention):
                with torch.cuda.stream(stream):
                    for _ in range(WARMUP_CALLS):
                        self._run_static(static, forward)
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    output = self._run_static(static, forward)
        except Exception as error:  # never fail a job over the fast path
            if forward is not self._forward:
                log.warning(
                    "precompiled UNet failed (%s); compiling it in this worker",
                    _brief(error),
                )
                self._precompiled[key] = None
                return self._capture(key, inputs)
            if self.compiled:
                log.warning(
                    "compiled UNet failed (%s); falling back to eager kernels",
                    _brief(error),
                )
                self._forward, self.compiled = self._eager, False
                self.clear()
                return self._capture(key, inputs)
            log.warning(
                "CUDA graph capture failed (%s); this UNet runs eagerly from now on",
                _brief(error),
            )
            self.disabled = True
            self.clear()
            return None
        self._pool = graph.pool()
        entry = _Graph(graph, static, output)
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.capacity:
            self._graphs.popitem(last=False)
        return entry

    def choose_layout(self, calls: int = 5) -> dict[str, float]:
        """Time the newest graph with the UNet's weights channels_last and contiguous, and keep
        the faster layout (with its graph). Returns milliseconds per call for each layout.

        Which layout is faster depends on the GPU and kernels: cuDNN's fp16 convolutions like
        channels_last, PyTorch's group norm and upsampling do not (on an H200 the SDXL VAE
        decoded 40% slower in channels_last). Compiled UNets keep their layout (changing it
        would recompile).
        """
        if self.compiled or self.disabled or not self._graphs:
            return {}
        key, graph = next(reversed(self._graphs.items()))
        inputs = {name: t.clone() for name, t in graph.inputs.items()}
        layouts = [
            _layout_of(self.unet),
            "contiguous" if _layout_of(self.unet) != "contiguous" else "channels_last",
        ]
        timings: dict[str, float] = {}
        for layout in layouts:
            if layout != _layout_of(self.unet):
                self._set_layout(layout)
                graph = self._capture(key, inputs)
                if graph is None:
                    break
            timings[layout] = _time_replays(graph.graph, calls)
        best = min(timings, key=timings.get)
        if best != _layout_of(self.unet):
            self._set_layout(best)
            self._capture(key, inputs)
        if self.layouts is not None:
            self.layouts.put(self._layout_key(key), best, timings)
        log.info(
            "UNet layout: %s (%s)",
            best,
            ", ".join(f"{layout} {ms:.1f} ms/call" for layout, ms in timings.items()),
        )
        return timings

    def _known_layout(self, key: tuple) -> dict[str, float] | None:
        """Take the layout an earlier worker chose for this UNet and shape (skipping the timing:
        about 1 s for SDXL on an H100); None when there is none."""
        if self.layouts is None or self.compiled or self.disabled:
            return None
        known = self.layouts.get(self._layout_key(key))
        if known is None:
            return None
        if known["best"] != _layout_of(self.unet):
            self._set_layout(known["best"])
        log.info("UNet layout: %s (chosen by an earlier worker)", known["best"])
        self.layout_from_volume = True
        return known["ms_per_call"]

    def _layout_key(self, key: tuple) -> str:
        return "|".join(
            [
                torch.cuda.get_device_name(self.unet.device),
                f"torch {torch.__version__}",
                f"attention {self.attention}",
                config_fingerprint(self.unet),
                repr(key),
            ]
        )

    def _set_layout(self, layout: str) -> None:
        self.clear()  # the graphs point at the weights, which the conversion moves
        memory_format = (
            torch.channels_last if layout == "channels_last" else torch.contiguous_format
        )
        # Not as inference tensors: LoRAs are later merged into these weights in place.
        with torch.inference_mode(False):
            self.unet.to(memory_format=memory_format)

    def _compiled_forward(self):
        try:
            compiled = torch.compile(self._eager, dynamic=False)
        except Exception as error:
            log.warning("torch.compile unavailable (%s); using eager kernels", error)
            return self._eager
        self.compiled = True
        return compiled


# Guards that cannot be saved (object identities, closures, dict versions, function defaults):
# a later worker's modules are new objects.
_UNSAVED_GUARDS = {"ID_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE", "DICT_VERSION"}
# Guards on the compiled module's own structure: its submodules' types, list lengths, dict keys,
# attributes and (empty) hooks, and its parameters' metadata. SDXL's UNet has about 22,500, and
# rebuilding them took 2.2 s of each load on an H200 (benchmarks/probes/guard-trim-*). They are
# left out: the file name pins the architecture, weight layout and dtype, and a module whose
# structure changed (a LoRA's peft layers) still fails the guards kept on its attributes' values,
# whose paths run through the structure.
_MODULE_STRUCTURE_GUARDS = {
    "TYPE_MATCH",
    "SEQUENCE_LENGTH",
    "DICT_KEYS_MATCH",
    "DICT_CONTAINS",
    "HASATTR",
    "NOT_PRESENT_IN_GENERIC_DICT",
    "EMPTY_NN_MODULE_HOOKS_DICT",
    "TENSOR_MATCH",
}


def _brief(error: BaseException) -> str:
    """An exception's type and the start of its message, for a log line."""
    return f"{type(error).__name__}: {str(error)[:200]}"


def _saveable_guards(entries: list) -> list[bool]:
    """Which of dynamo's guards a precompiled forward keeps (its `guard_filter_fn`)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaved = _UNSAVED_GUARDS | set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    return [
        not (
            entry.is_global
            or entry.guard_type in unsaved
            or unsaved & set(entry.derived_guard_types)
            or "__defaults__" in entry.orig_guard.name
            or "__kwdefaults__" in entry.orig_guard.name
            # the module is the compiled bound method's `self`
            or (
                entry.orig_guard.name.startswith("L['self']")
                and entry.guard_type in _MODULE_STRUCTURE_GUARDS
            )
        )
        for entry in entries
    ]


def precompiled_path(folder: Path, stem: str, parts: list[str]) -> Path:
    """The file holding one module's code compiled for one input signature: named by a hash of
    `parts` (architecture, layout, signature) and of the diffusers and Python versions, since
    the saved code is theirs. The folder is already per GPU and torch version."""
    import diffusers

    key = "|".join(
        [*parts, f"diffusers {diffusers.__version__}", f"python {platform.python_version()}"]
    )
    return folder / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.bin"


def precompiled_forward(
    module: torch.nn.Module, path: Path, args: tuple, kwargs: dict[str, Any]
) -> tuple[Callable, bool] | None:
    """`module.forward`, compiled for exactly these arguments' signature, and whether it was
    loaded from `path` (saved there by an earlier worker) rather than compiled ahead of time now
    and saved to `path`. A file that cannot be loaded is compiled again and replaced.

    Loading skips dynamo's trace, which a plain torch.compile repeats in every process even with
    inductor's cache filled. The compiled code reads the module's parameters at each call, so
    in-place weight changes (LoRA merges) apply. Returns None, after a warning, when torch lacks
    the API or compiling fails: the caller then compiles the usual way. A failed save is logged,
    and the function still used. Either failure leaves a `.failed` file beside `path`, so later
    workers go straight to the usual compile instead of paying for both.
    """
    config = torch._dynamo.config
    if hasattr(config, "enable_aot_compile"):  # off by default in torch 2.11
        config.enable_aot_compile = True
    what = type(module).__name__
    if _has_adapter_layers(module):
        # The saved code would hold this worker's set of LoRA layers, which later workers would
        # not have: compile it the usual way, and save nothing. (handler.loras takes them out
        # right after loading, so this only guards a UNet that someone else wrapped.)
        log.info("%s holds LoRA layers: compiled the usual way, not saved", what)
        return None
    failed = path.with_name(path.name + ".failed")
    if failed.is_file():
        log.info("%s is compiled the usual way: an earlier worker could not save it", what)
        return None
    eager = type(module).forward
    # Objects the saved code refers to that a later process must supply: the module itself,
    # and the undecorated forward (diffusers wraps UNet2DConditionModel.forward).
    external = {"module": module, "undecorated_forward": inspect.unwrap(eager)}
    compiled = None
    if path.is_file():
        try:
            with path.open("rb") as file:
                compiled = torch.compiler.load_compiled_function(file, external_data=external)
            log.info("compiled %s loaded from %s", what, path.name)
        except Exception as error:
            log.warning(
                "could not load the precompiled %s (%s); compiling it again",
                what,
                _brief(error),
            )
    loaded = compiled is not None
    if compiled is None:
        # dynamo saves the module's attributes along with the guards; a stand-in installed as
        # its `forward` (UNetGraphs, CompiledForward, holding graphs and compiled code) is
        # taken off meanwhile: it cannot be saved, and the compiled code does not call it.
        stand_in = module.__dict__.pop("forward", None)
        try:
            compiled = _compile_and_save(module, eager, path, failed, args, kwargs, external)
        finally:
            if stand_in is not None:
                module.forward = stand_in
        if compiled is None:
            return None

    def forward(*call_args: Any, **call_kwargs: Any) -> Any:
        return compiled(module, *call_args, **call_kwargs)

    return forward, loaded


def _compile_and_save(
    module: torch.nn.Module,
    eager: Callable,
    path: Path,
    failed: Path,
    args: tuple,
    kwargs: dict[str, Any],
    external: dict[str, Any],
) -> Any:
    """`precompiled_forward`'s compile and save; None when compiling fails."""
    what = type(module).__name__
    started = time.perf_counter()
    try:
        compiled = torch.compile(
            eager.__get__(module),
            fullgraph=True,
            dynamic=False,
            options={"guard_filter_fn": _saveable_guards},
        ).aot_compile((args, kwargs))
    except Exception as error:
        log.warning(
            "could not compile %s ahead of time (%s); compiling it the usual way",
            what,
            _brief(error),
        )
        _mark_failed(failed, error)
        return None
    # Written beside it, then renamed: workers starting together on a fresh volume never load
    # a half-written file from each other.
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        compiled.save_compiled_function(str(partial), external_data=external)
        os.replace(partial, path)
        log.info(
            "compiled %s ahead of time in %.1f s, saved as %s",
            what,
            time.perf_counter() - started,
            path.name,
        )
    except Exception as error:  # still good for this worker
        log.warning(
            "could not save the compiled %s (%s); later workers will compile it the usual way",
            what,
            _brief(error),
        )
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        _mark_failed(failed, error)
    return compiled


def _has_adapter_layers(module: torch.nn.Module) -> bool:
    """Whether peft has wrapped any of the module's layers (LoRA adapters loaded into it)."""
    return any(type(layer).__module__.startswith("peft.") for layer in module.modules())


def _mark_failed(marker: Path, error: BaseException) -> None:
    with contextlib.suppress(OSError):  # a read-only volume: later workers try again
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(_brief(error) + "\n")


def _signature(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What a compiled function is specialised on: each tensor's shape, dtype, strides and
    device, and every other argument's value."""
    return tuple(
        (name, tuple(v.shape), str(v.dtype), v.stride(), v.device.type)
        if torch.is_tensor(v)
        else (name, repr(v))
        for name, v in [*enumerate(args), *sorted(kwargs.items())]
    )


class CompiledForward:
    """Stands in for a module's `forward`: torch.compile'd, and eager from then on after any
    error other than running out of memory (logged once), so compiling never fails a job.

    With `precompiled_dir`, each input signature's compiled code is loaded from there, or
    compiled ahead of time and saved there for later workers (`precompiled_forward`); a
    signature where that fails, or whose loaded code fails, is compiled the usual way.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        what: str,
        precompiled_dir: Path | None = None,
        fingerprint: str = "",
    ) -> None:
        self.module = module
        self.eager = type(module).forward.__get__(module)
        self.what = what
        self.failed = False
        self.compiled = torch.compile(self.eager, dynamic=False)
        self.precompiled_dir = precompiled_dir
        self.fingerprint = fingerprint  # the architecture, for the precompiled file's name
        self._forwards: dict[tuple, Callable] = {}  # per input signature
        self.precompiled_from_volume = 0  # signatures loaded rather than traced
        self.first_calls_ms = 0.0  # each signature's first call: compiling or loading, and running

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            try:
                return self._compiled_call(args, kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:
                log.warning(
                    "compiled %s failed (%s); falling back to eager kernels",
                    self.what,
                    _brief(error),
                )
                self.failed = True
        return self.eager(*args, **kwargs)

    def _compiled_call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        key = _signature(args, kwargs)
        if key in self._forwards:
            return self._call(key, args, kwargs)
        started = time.perf_counter()
        self._forwards[key] = self._precompile(key, args, kwargs) or self.compiled
        try:
            return self._call(key, args, kwargs)
        finally:
            self.first_calls_ms += (time.perf_counter() - started) * 1000

    def _call(self, key: tuple, args: tuple, kwargs: dict[str, Any]) -> Any:
        forward = self._forwards[key]
        try:
            return forward(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # e.g. a guard of the loaded code does not hold
            if forward is self.compiled:
                raise  # __call__ falls back to eager
            log.warning(
                "precompiled %s failed (%s); compiling it in this worker",
                self.what,
                _brief(error),
            )
            self._forwards[key] = self.compiled
            return self.compiled(*args, **kwargs)

    def _precompile(self, key: tuple, args: tuple, kwargs: dict[str, Any]) -> Callable | None:
        if self.precompiled_dir is None:
            return None
        weights = next(self.module.parameters(), None)
        path = precompiled_path(
            self.precompiled_dir,
            self.what.lower().replace(" ", "-"),
            [self.fingerprint, str(getattr(weights, "dtype", None)), repr(key)],
        )
        precompiled = precompiled_forward(self.module, path, args, kwargs)
        if precompiled is None:
            return None
        forward, loaded = precompiled
        self.precompiled_from_volume += loaded
        return forward


def compile_vae_decoder(vae: Any, precompiled_dir: Path | None = None) -> None:
    """COMPILE=1's VAE decoder: channels_last, compiled (fused group norms), and with
    `precompiled_dir` saved there ahead of time for later workers. Eager and contiguous is
    faster without compile, so the VAE keeps that layout otherwise."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None or isinstance(decoder.__dict__.get("forward"), CompiledForward):
        return
    try:
        forward = CompiledForward(
            decoder,
            "VAE decoder",
            precompiled_dir,
            fingerprint=config_fingerprint(vae) if precompiled_dir is not None else "",
        )
    except Exception as error:
        log.warning("torch.compile unavailable (%s); the VAE decodes eagerly", error)
        return
    with torch.inference_mode(False):
        decoder.to(memory_format=torch.channels_last)
    decoder.forward = forward


def compiled_vae_decoder(pipeline: Any) -> CompiledForward | None:
    """The pipeline's compiled VAE decoder (see `compile_vae_decoder`), or None."""
    decoder = getattr(getattr(pipeline, "vae", None), "decoder", None)
    forward = decoder.__dict__.get("forward") if decoder is not None else None
    return forward if isinstance(forward, CompiledForward) else None


ATTENTION_BACKENDS = {  # settings.ATTENTION_CHOICES, besides "auto"
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def attention_backends(choice: str):
    """A context preferring one scaled-dot-product attention kernel (`auto`: PyTorch's pick)."""
    if choice == "auto" or choice not in ATTENTION_BACKENDS:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, ATTENTION_BACKENDS[choice])
    others = [getattr(SDPBackend, n) for n in ATTENTION_BACKENDS.values() if n != first.name]
    return sdpa_kernel([first, *others], set_priority=True)


def host_side_timesteps(scheduler: Any) -> Any:
    """Make a (per-job) scheduler keep its timesteps on the CPU.

    Several diffusers schedulers compare or index with the current timestep (PNDM's
    `prev_timestep >= 0`, DDIM's `alphas_cumprod[timestep]`); with timesteps on the GPU each of
    those is a host sync per step, which stops the CPU from queueing the next step while the
    GPU works. With CPU timesteps those stay on the CPU, and the graphed UNet takes the value as
    a kernel argument.
    """
    set_timesteps = scheduler.set_timesteps

    def on_cpu(*args: Any, **kwargs: Any) -> Any:
        kwargs["device"] = "cpu"
        return set_timesteps(*args, **kwargs)

    scheduler.set_timesteps = on_cpu
    return scheduler


def _static_dtype(name: str, tensor: torch.Tensor) -> torch.dtype:
    # The UNet turns timesteps into float32 before using them, so integer and float timesteps
    # (DDIM's vs Euler's) give the same result through one float32 graph input.
    return torch.float32 if name == "timestep" else tensor.dtype


def config_fingerprint(model) -> str:
    """A short hash of a diffusers model's architecture (its config), the same in every worker
    process.

    Only the public config keys count: diffusers' private `_use_default_values` is a list
    built from a set, so its order changes with each process's hash seed."""
    public = {name: value for name, value in model.config.items() if not name.startswith("_")}
    config = json.dumps(public, sort_keys=True, default=str)
    return hashlib.sha256(config.encode()).hexdigest()[:16]


def _layout_of(unet: torch.nn.Module) -> str:
    weight = unet.conv_in.weight
    return (
        "channels_last"
        if weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        else "contiguous"
    )


def _time_replays(graph: Any, calls: int) -> float:
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1000


class LayoutCache:
    """The UNet weight layout each (GPU, torch, UNet config, input shape) ran faster in, kept in
    a JSON file on the volume so that later workers start without timing both.

    Only speed depends on it: an unreadable or unwritable file means timing again, never an
    error. Writes replace the file whole, so concurrent workers never see half of one.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._read().get(key)
        if not isinstance(entry, dict) or entry.get("best") not in ("channels_last", "contiguous"):
            return None
        timings = entry.get("ms_per_call")
        return {"best": entry["best"], "ms_per_call": timings if isinstance(timings, dict) else {}}

    def put(self, key: str, best: str, timings: dict[str, float]) -> None:
        if self.path is None:
            return
        entries = self._read()
        entries[key] = {"best": best, "ms_per_call": {k: round(v, 3) for k, v in timings.items()}}
        partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(entries, indent=1, sort_keys=True))
            os.replace(partial, self.path)
        except OSError as error:
            log.warning("could not save the UNet layout choice (%s)", error)
            with contextlib.suppress(OSError):
                partial.unlink()

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


def accelerate(
    pipeline: Any,
    graph_shapes: int,
    compile_unet: bool,
    attention: str = "auto",
    layouts: LayoutCache | None = None,
    precompiled_dir: Path | None = None,
) -> UNetGraphs | None:
    """Install the fast path on a pipeline whose weights are on a CUDA device; None on CPU."""
    unet = getattr(pipeline, "unet", None)
    if unet is None or next(unet.parameters()).device.type != "cuda" or graph_shapes < 1:
        return None
    # The UNet starts channels_last (cuDNN's native fp16 layout); the warm-up measures both
    # layouts and keeps the faster (`UNetGraphs.choose_layout`). The eager VAE stays
    # contiguous: measured on an H200, its decode was 40% slower channels_last.
    unet.to(memory_format=torch.channels_last)
    graphs = UNetGraphs(
        unet,
        graph_shapes,
        compile_unet=compile_unet,
        attention=attention,
        layouts=layouts,
        precompiled_dir=precompiled_dir,
    )
    if compile_unet and getattr(pipeline, "vae", None) is not None:
        compile_vae_decoder(pipeline.vae, precompiled_dir)
    return graphs.install()


def worker_cache_dir(roots: list[Path]) -> Path | None:
    """`.sd-worker-cache` on the first writable model root on a mounted volume, where every
    worker finds it, else on the first writable model root; None when none is writable.

    In the worker image the baked `/models` comes first, but it lives on the container's own
    disk, which each new worker starts without: a cache there would be compiled again by every
    worker. The network volume (`/runpod-volume`) is a mount, so it is preferred.
    """
    writable = [r for r in roots if r.is_dir() and os.access(r, os.W_OK)]
    on_volumes = [r for r in writable if _on_mounted_volume(r)]
    chosen = on_volumes or writable
    return chosen[0] / ".sd-worker-cache" if chosen else None


def _on_mounted_volume(path: Path) -> bool:
    """Whether `path` lives on a filesystem mounted below `/` (a volume, a bind mount) rather
    than on the root filesystem (a container's own disk)."""
    path = path.resolve()
    for folder in (path, *path.parents):
        if os.path.ismount(folder):
            return folder != Path(folder.anchor)
    return False


def compile_cache_dir(configured: str | None, roots: list[Path]) -> Path | None:
    """Where inductor keeps its cache: COMPILE_CACHE_DIR, else a folder in the worker cache
    (`worker_cache_dir`), keyed by GPU and torch version (compiled kernels are only valid for
    both)."""
    if configured:
        base = Path(configured)
    else:
        shared = worker_cache_dir(roots)
        if shared is None:
            return None
        base = shared / "torch-compile"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    key = f"{gpu}-torch{torch.__version__}".replace(" ", "-").replace("/", "-")
    return base / key


LAST_USED = ".last-used"  # touched at each start: marks a compile cache as the worker's own


def use_compile_cache(folder: Path | None) -> Path | None:
    """Point inductor's and triton's on-disk caches at `folder` (before anything compiles);
    returns it, or None when it cannot be written (then compiles are kept by this worker only,
    in torch's default places)."""
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LAST_USED).touch()
    except OSError as error:
        log.warning(
            "compile cache %s cannot be written (%s): compiling without a shared cache",
            folder,
            error.strerror or type(error).__name__,
        )
        return None
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return folder


def prune_compile_caches(folder: Path, keep_days: float) -> list[str]:
    """Delete the other GPU/torch-version caches beside `folder` that no worker has started
    with for `keep_days` (an image upgrade leaves the old version's behind). Only folders
    holding the worker's `.last-used` marker are touched. Returns the names removed."""
    if keep_days <= 0 or not folder.parent.is_dir():
        return []
    cutoff = time.time() - keep_days * 86400
    removed = []
    for other in sorted(folder.parent.iterdir()):
        marker = other / LAST_USED
        if other == folder or not marker.is_file() or marker.stat().st_mtime >= cutoff:
            continue
        shutil.rmtree(other, ignore_errors=True)
        if not other.exists():
            removed.append(other.name)
            log.info("removed the compile cache %s: unused for %g days", other.name, keep_days)
    return removed
