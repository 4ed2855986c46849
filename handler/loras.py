"""LoRA stacks and textual-inversion embeddings, applied per job and always removed after.

LoRAs load through diffusers/peft (which reads kohya and diffusers/peft files) as named
adapters that stay loaded between jobs, but out of the forward path: right after loading, peft's
wrapper layers are taken out of the model again (the plain layers go back in their place) and
kept aside, so no job pays for them at run time. For a job, each layer's delta (peft's
`up @ down x scaling`, times the job's scale) is added into the base weight in place, as A1111
does; the touched weights are copied first and copied back after the job, so the checkpoint
returns bit for bit. Merged weights cost nothing per denoising step, and because the weights
change in place (same storage), captured CUDA graphs of the UNet stay valid.

Embeddings are added as tokens and removed the same way. Both happen inside `job_additions`,
whose `finally` undoes them whether the job succeeded, failed or was cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from handler.errors import InvalidInput, LoraIncompatible
from handler.prompts import embedding_token
from handler.registry import (
    ModelFile,
    detect_lora,
    file_key,
    lycoris_algorithm,
    read_safetensors_header,
)

log = logging.getLogger(__name__)
# CUDA's own errors (torch 2.8 and later; before, RuntimeErrors the engine reads by their text)
ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", torch.OutOfMemoryError)

# A1111's inline syntax: <lora:name>, <lora:name:scale>, and the text-encoder / UNet split
# <lora:name:te:unet> or <lora:name:te=..:unet=..>; <lyco:...> the same; any case.
# A tag's text ends at the next "<" too: searching on to a ">" from every unclosed "<lora:"
# took time quadratic in the prompt's length (12 s for 96 kB of them).
INLINE_LORA = re.compile(r"<(?:lora|lyco):([^<>]*)>", re.IGNORECASE)
_UNCLOSED_LORA = re.compile(r"<(?:lora|lyco):", re.IGNORECASE)
# The bound of a LoRA's scale, inline as in the `loras` list (schema.LoraSpec).
MAX_LORA_SCALE = 4.0
INLINE_ACCEPTED = (
    f"<lora:name> or <lora:name:scale>, scale from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}"
)
# Which LoRA bases fit which checkpoint architectures.
LORA_FAMILIES = {
    "sd15": "sd15",
    "sd15-inpaint": "sd15",
    "sd2-512": "sd2",
    "sd2-768-v": "sd2",
    "sdxl": "sdxl",
    "sdxl-inpaint": "sdxl",
    "sdxl-refiner": "sdxl-refiner",
}


def extract_inline_loras(prompt: str, field: str = "prompt") -> tuple[str, list[tuple[str, float]]]:
    """Remove `<lora:...>` tags from a prompt; returns (clean prompt, [(name, scale)]).

    A tag this worker cannot apply as written is refused, never left as prompt text: a scale
    that is not a number or is out of bounds, or different text-encoder and UNet weights
    (merged LoRAs take one scale). Errors name the tag by its number, never quote it: a tag
    missing its `>` runs on into the prompt, whose text must stay out of logs.
    """
    found = [
        _inline_lora(f"LoRA tag {number} of {field}", match.group(1), field)
        for number, match in enumerate(INLINE_LORA.finditer(prompt), 1)
    ]
    clean = INLINE_LORA.sub("", prompt)
    if _UNCLOSED_LORA.search(clean):
        raise InvalidInput(
            f"a LoRA tag of {field} is not closed: '>' must end it, before any other '<'",
            field=field,
            accepted=INLINE_ACCEPTED,
        )
    # the spaces a tag leaves collapse; the prompt's line breaks stay (the infotext shows them)
    return re.sub(r"[ \t]{2,}", " ", clean).strip(), found


def _inline_lora(tag: str, body: str, field: str) -> tuple[str, float]:
    """(name, scale) of one tag's body; `tag` is how errors name the tag."""
    name, *args = (part.strip() for part in body.split(":"))
    named = dict(arg.split("=", 1) for arg in args if "=" in arg)
    positional = [arg for arg in args if "=" not in arg]
    te = named.pop("te", positional[0] if positional else "1")
    unet = named.pop("unet", positional[1] if len(positional) > 1 else te)
    if not name or named or len(positional) > 2:
        raise InvalidInput(
            f"{tag} is not a LoRA tag this worker reads", field=field, accepted=INLINE_ACCEPTED
        )
    try:
        te_scale, unet_scale = float(te), float(unet)
        if not math.isfinite(te_scale) or not math.isfinite(unet_scale):
            raise ValueError
    except ValueError:
        raise InvalidInput(
            f"{tag}: the scale is not a number", field=field, accepted=INLINE_ACCEPTED
        ) from None
    if te_scale != unet_scale:
        raise InvalidInput(
            f"{tag}: separate text-encoder and UNet weights are not supported",
            field=field,
            accepted=INLINE_ACCEPTED,
        )
    if abs(te_scale) > MAX_LORA_SCALE:
        raise InvalidInput(f"{tag}: scale out of range", field=field, accepted=INLINE_ACCEPTED)
    return name, te_scale


class StateDictCache:
    """A least-recently-used cache of LoRA / embedding state dicts, bounded by bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # disk reads (the tests count them)

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def get(self, path: Path) -> dict[str, torch.Tensor]:
        key = file_key(path)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        state = _read_state_dict(path)
        self.loads += 1
        size = sum(t.numel() * t.element_size() for t in state.values())
        with self._lock:
            self._entries[key] = (state, size)
            # the newest goes too when it alone is over the limit (LORA_CACHE_MB=0 caches none)
            while self.size_bytes > self.max_bytes:
                self._entries.popitem(last=False)
        return state


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        return load_file(str(path))
    # Pickles get here only with ALLOW_PICKLE=1, and even then no code runs.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        return {}
    # A1111 .pt embeddings: {"string_to_param": {"*": tensor}, "name": ..., "step": ...}
    vectors = state.get("string_to_param")
    if isinstance(vectors, dict) and vectors:
        return {"emb_params": next(iter(vectors.values()))}
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class AppliedLora:
    """A LoRA of a job: its name, scale and file, and the field that asked for it (an entry
    of `loras`, or `prompt` for a `<lora:...>` tag)."""

    name: str
    scale: float
    model: ModelFile
    field: str = "loras"


def check_compatible(model: ModelFile, architecture: str, field: str) -> None:
    """Refuse a LoRA made for another architecture, before the pipeline is touched."""
    if model.path.suffix.lower() != ".safetensors":
        return  # a pickle (ALLOW_PICKLE=1): its keys are not read before loading
    tensors = read_safetensors_header(model.path, field)[0]
    unloadable = unloadable_lycoris(tensors)
    if unloadable is not None:
        raise LoraIncompatible(
            f"{model.name} is {unloadable}",
            field=field,
            accepted="LoRA and LoCon files (kohya, LyCORIS LoCon, or diffusers/peft)",
        )
    base = detect_lora(tensors)
    family = LORA_FAMILIES[architecture]
    if base != "unknown" and base != family:
        raise LoraIncompatible(
            f"{model.name} is a LoRA for {base}, the checkpoint is {architecture}",
            field=field,
            accepted=f"LoRAs made for {family}",
        )


def unloadable_lycoris(tensors: dict[str, dict]) -> str | None:
    """What a LyCORIS file that diffusers cannot load is ("a LoHa file (LyCORIS), ..."), from
    its header's keys, or None for LoRA and LoCon files."""
    algorithm = lycoris_algorithm(tensors)
    if algorithm is None:
        return None
    return f"a {algorithm} file (LyCORIS), which diffusers cannot load"


class ResidentAdapters:
    """LoRA adapters kept loaded in one pipeline between jobs (their layers aside, out of the
    forward path), least recently used first out. Re-using one costs a merge instead of a
    multi-second load."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.names: OrderedDict[tuple, str] = OrderedDict()
        self.layers: dict[str, list[Any]] = {}  # adapter name -> its peft layers, kept aside
        self._counter = 0

    def key(self, lora: AppliedLora) -> tuple:
        return file_key(lora.model.path)

    def new_name(self) -> str:
        self._counter += 1
        return f"lora_{self._counter}"

    def weight_modules(self) -> list[torch.nn.Module]:
        """The modules that hold the resident adapters' own weights (not the base layers), for
        moving them with their checkpoint between the GPU and the RAM tier."""
        return [
            weights
            for layers in self.layers.values()
            for layer in layers
            for weights in (layer.lora_A, layer.lora_B)
        ]


@contextlib.contextmanager
def job_additions(
    pipeline: Any,
    loras: list[AppliedLora],
    embeddings: list[ModelFile],
    cache: StateDictCache,
    resident: ResidentAdapters,
) -> Iterator[None]:
    """Apply a job's LoRAs and embeddings to `pipeline` (whose modules its img2img view shares);
    on exit, put every merged weight back and remove the embedding tokens.

    If anything goes wrong mid-way, the adapters are unloaded as well, rather than trusted.
    """
    added_tokens: list[str] = []
    merged: MergedWeights | None = None
    clean_exit = False
    loading = False  # a LoRA load that fails half-way leaves its first layers in the model
    try:
        # 1. LoRAs: reuse resident adapters, load the others under fresh names
        names = []
        for lora in loras:
            key = resident.key(lora)
            if key in resident.names:
                resident.names.move_to_end(key)
            else:
                name = resident.new_name()
                loading = True
                try:
                    pipeline.load_lora_weights(dict(cache.get(lora.model.path)), adapter_name=name)
                except (torch.OutOfMemoryError, ACCELERATOR_ERROR):
                    raise  # the GPU's failure, not the LoRA's: the engine reports it
                except Exception as error:
                    raise LoraIncompatible(
                        f"{lora.model.name} could not be applied ({type(error).__name__}: {str(error)[:200]})",
                        field=lora.field,
                        accepted="kohya or diffusers/peft LoRAs for this checkpoint's architecture",
                    ) from None
                resident.names[key] = name
                resident.layers[name] = adapter_layers(pipeline, name)
                take_out_of_forward(pipeline)  # their deltas are merged instead
                loading = False
            names.append(resident.names[key])
        _evict(pipeline, resident, keep=set(names))
        # 2. Merge the stack into the weights, keeping the originals
        if names:
            scales: dict[str, float] = {}
            for name, lora in zip(names, loras, strict=True):
                scales[name] = scales.get(name, 0.0) + lora.scale
            layers = {id(m): m for name in scales for m in resident.layers[name]}
            merged = merge_adapters(list(layers.values()), scales)
        # 3. Embeddings, as new tokens
        for embedding in embeddings:
            added_tokens += _load_embedding(pipeline, embedding, cache)
        yield
        clean_exit = True
    finally:
        # each undo runs even if one before it fails; the first failure is raised after them
        _undo_all(
            merged.restore if merged is not None else None,
            (lambda: _unload_embeddings(pipeline, added_tokens)) if added_tokens else None,
            # a failed or cancelled job: drop every adapter, trust nothing half-applied
            (lambda: _drop_adapters(pipeline, resident))
            if not clean_exit and (resident.names or loading)
            else None,
            # a job with more LoRAs than RESIDENT_LORAS keeps them only while it runs
            (lambda: _evict(pipeline, resident, keep=set())) if clean_exit else None,
        )


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def adapter_layers(pipeline: Any, name: str) -> list[Any]:
    """The peft LoRA layers of the UNet and text encoders that hold adapter `name`."""
    from peft.tuners.lora import LoraLayer

    return [
        module
        for component in (getattr(pipeline, c, None) for c in LORA_COMPONENTS)
        if component is not None
        for module in component.modules()
        if isinstance(module, LoraLayer) and name in module.lora_A
    ]


def take_out_of_forward(pipeline: Any) -> None:
    """Put each peft-wrapped layer's base layer back in its place, unmerged (as diffusers'
    `unload_lora_weights` does, but keeping the adapters: their layers stay in
    `ResidentAdapters`, their configs registered, so diffusers still lists and deletes them).

    Even disabled, peft's wrappers would cost every later job their Python overhead in the
    eager text encoders (SDXL has 264), and they change the UNet's structure, which a saved
    compiled UNet is specialised on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in (getattr(pipeline, c, None) for c in LORA_COMPONENTS):
        if component is None:
            continue
        for parent in list(component.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    setattr(parent, child_name, child.get_base_layer())


# Deltas held at once while merging: bounds the extra memory (SDXL's attention layers are
# 3-6 MB each; a LoRA on its feed-forward layers has 26 MB ones).
MERGE_CHUNK_BYTES = 256 * 2**20


@dataclass
class MergedWeights:
    """Base weights with adapter deltas added in place, and copies of their original values."""

    weights: list[torch.Tensor]
    originals: list[torch.Tensor]

    def restore(self) -> None:
        """Put every weight back exactly (one batched copy, not one per layer)."""
        if self.weights:
            with torch.no_grad():
                torch._foreach_copy_(self.weights, self.originals)


def merge_adapters(layers: list[Any], scales: dict[str, float]) -> MergedWeights:
    """Add `scale x delta` of each named adapter into its base layers' weights, in place.

    A swap is bound by the host CPU (SDXL has about 850 LoRA layers), so the work is batched:
    the copies and additions are `torch._foreach_*` calls per chunk of layers
    (`MERGE_CHUNK_BYTES`), and the deltas of plain linear layers are one `bmm` per group of
    same-shaped layers (`_linear_deltas`). Other layers (convolutions) take peft's own
    `get_delta_weight`. Returns the touched weights with their original values for an exact
    `restore()`; on an error the weights are restored here.
    """
    for module in layers:
        if any(module.use_dora.get(n) for n in scales if n in module.lora_A):
            raise LoraIncompatible(
                "DoRA LoRAs are not supported",
                field="loras",
                accepted="plain LoRA / LoCon files (kohya or diffusers/peft)",
            )
    weights = [module.get_base_layer().weight for module in layers]
    with torch.no_grad():
        merged = MergedWeights(weights, [torch.empty_like(w) for w in weights])
        if weights:
            torch._foreach_copy_(merged.originals, weights)
        try:
            for chunk in _chunks(list(zip(layers, weights, strict=True)), MERGE_CHUNK_BYTES):
                for name, scale in scales.items():
                    for targets, deltas, alpha in _deltas(chunk, name):
                        torch._foreach_add_(targets, deltas, alpha=alpha * scale)
        except BaseException:
            merged.restore()
            raise
    return merged


def _deltas(
    chunk: list[tuple[Any, torch.Tensor]], name: str
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor], float]]:
    """Adapter `name`'s deltas for the layers of `chunk` that hold it, in groups of
    (base weights, deltas, factor): each weight gets `factor x delta` added."""
    from peft.tuners.lora.layer import Linear

    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for module, weight in chunk:
        if name not in module.lora_A:
            continue
        if type(module) is Linear and not module.fan_in_fan_out:
            down, up = module.lora_A[name].weight, module.lora_B[name].weight
            key = (down.shape, up.shape, down.dtype, down.device, module.scaling[name])
            groups.setdefault(key, []).append((weight, down, up))
        else:
            yield [weight], [module.get_delta_weight(name).to(weight.dtype)], 1.0
    for (*_, scaling), members in groups.items():
        weights, downs, ups = zip(*members, strict=True)
        yield list(weights), _linear_deltas(list(downs), list(ups), weights[0].dtype), scaling


def _linear_deltas(
    downs: list[torch.Tensor], ups: list[torch.Tensor], dtype: torch.dtype
) -> list[torch.Tensor]:
    """`up @ down` for same-shaped linear LoRA pairs, in one batched product (peft's
    `get_delta_weight` without its scaling, which the caller applies). Half precision on the
    CPU is computed in fp32, as peft does, since CPUs multiply it slowly."""
    down, up = torch.stack(downs), torch.stack(ups)
    if down.device.type == "cpu" and down.dtype in (torch.float16, torch.bfloat16):
        down, up = down.float(), up.float()
    return list(torch.bmm(up, down).to(dtype).unbind(0))


def _chunks(pairs: list[tuple[Any, torch.Tensor]], max_bytes: int) -> Iterator[list]:
    """Consecutive runs of (layer, weight) whose weights add up to at most `max_bytes` (at
    least one each)."""
    chunk, size = [], 0
    for layer, weight in pairs:
        nbytes = weight.numel() * weight.element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append((layer, weight))
        size += nbytes
    if chunk:
        yield chunk


def _evict(pipeline: Any, resident: ResidentAdapters, keep: set[str]) -> None:
    """Delete least-recently-used adapters beyond the capacity (never one this job uses)."""
    for key in list(resident.names):
        if len(resident.names) <= resident.capacity:
            break
        if resident.names[key] not in keep:
            name = resident.names.pop(key)
            resident.layers.pop(name, None)
            pipeline.delete_adapters([name])


def _undo_all(*undos: Callable[[], None] | None) -> None:
    failure = None
    for undo in undos:
        try:
            if undo is not None:
                undo()
        except BaseException as error:
            failure = failure or error
    if failure is not None:
        raise failure


def _drop_adapters(pipeline: Any, resident: ResidentAdapters) -> None:
    pipeline.unload_lora_weights()
    resident.names.clear()
    resident.layers.clear()


def _load_embedding(pipeline: Any, embedding: ModelFile, cache: StateDictCache) -> list[str]:
    """Add one A1111 embedding's token(s) to the text encoder(s) it was made for."""
    name = Path(embedding.name).name
    parts = _embedding_parts(cache.get(embedding.path), pipeline)
    if isinstance(parts, str):
        raise InvalidInput(
            f"embedding {name} cannot be used here ({parts})",
            field="prompt",
            accepted="embeddings made for this checkpoint",
        )
    token = embedding_token(name)
    first = parts[0][0]
    count = first.shape[0] if first.ndim == 2 else 1
    # A multi-vector embedding becomes the tokens "token", "token_1", ... "token_{n-1}".
    tokens = [token] + [f"{token}_{i}" for i in range(1, count)]
    try:
        for vectors, tokenizer, encoder in parts:
            pipeline.load_textual_inversion(
                {"emb_params": vectors}, token=token, text_encoder=encoder, tokenizer=tokenizer
            )
    except BaseException:
        _unload_embeddings(pipeline, tokens)  # all or nothing: no token of it stays behind
        raise
    return tokens


def _vectors(state: dict[str, Any]) -> torch.Tensor | None:
    """An SD 1.x/2.x embedding's vectors, in diffusers' or A1111's layout."""
    vectors = state.get("emb_params")  # `_read_state_dict` flattens A1111's string_to_param
    return vectors if isinstance(vectors, torch.Tensor) else None


def _embedding_parts(state: dict[str, Any], pipeline: Any) -> list[tuple[Any, Any, Any]] | str:
    """Each (vectors, tokenizer, text encoder) an embedding adds its token to, or why it does
    not fit the pipeline. An SDXL embedding holds one part per text encoder; the SDXL refiner
    has only the second, and takes only that part."""
    is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
    if "clip_l" in state and "clip_g" in state:
        if not is_sdxl:
            return "made for SDXL"
        parts = [
            (state["clip_l"], pipeline.tokenizer, pipeline.text_encoder),
            (state["clip_g"], pipeline.tokenizer_2, pipeline.text_encoder_2),
        ]
        parts = [part for part in parts if part[2] is not None]
    else:
        vectors = _vectors(state)
        if vectors is None:
            return "no vectors"
        if is_sdxl:
            return "made for SD 1.x/2.x"
        parts = [(vectors, pipeline.tokenizer, pipeline.text_encoder)]
    counts = set()
    for vectors, _, encoder in parts:
        width = encoder.get_input_embeddings().weight.shape[1]
        if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2):
            return "its vectors are not a list of vectors"
        if vectors.shape[-1] != width:
            return f"{vectors.shape[-1]}-wide vectors; this model's text encoder takes {width}"
        if vectors.ndim == 2 and vectors.shape[0] == 0:
            return "no vectors"
        counts.add(vectors.shape[0] if vectors.ndim == 2 else 1)
    if len(counts) > 1:
        return "its clip_l and clip_g parts hold different numbers of vectors"
    return parts


def _unload_embeddings(pipeline: Any, tokens: list[str]) -> None:
    _unload_tokens(pipeline, tokens)
    # diffusers resizes the embedding matrix back but leaves config.vocab_size at the larger size.
    for encoder in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if encoder is not None:
            encoder.config.vocab_size = encoder.get_input_embeddings().weight.shape[0]


def _unload_tokens(pipeline: Any, tokens: list[str]) -> None:
    """Remove the tokens each text encoder has (diffusers refuses a list with none of them: an
    embedding whose load failed, or SDXL's second part never added)."""
    for tokenizer, encoder in (
        (pipeline.tokenizer, pipeline.text_encoder),
        (getattr(pipeline, "tokenizer_2", None), getattr(pipeline, "text_encoder_2", None)),
    ):
        if encoder is None:
            continue
        vocab = tokenizer.get_vocab()
        mine = [t for t in tokens if t in vocab or any(k.startswith(f"{t}_") for k in vocab)]
        if mine:
            pipeline.unload_textual_inversion(mine, tokenizer=tokenizer, text_encoder=encoder)


def embeddings_for(
    prompts: list[str],
    available: list[ModelFile],
    pipeline: Any,
    cache: StateDictCache,
    allow_pickle: bool,
) -> tuple[list[ModelFile], list[str]]:
    """The embeddings the prompts name that this pipeline can take, and a warning for each named
    one it cannot, whose word then stays plain text (A1111 skips embeddings that do not fit the
    model). Two files with one word: the first is used."""
    chosen: dict[str, ModelFile] = {}
    warnings = []
    for embedding in embeddings_in(prompts, available):
        word = Path(embedding.name).name.lower()  # found in any case
        if word in chosen:
            warnings.append(
                f"embeddings {chosen[word].name} and {embedding.name} share the word "
                f"{Path(embedding.name).name!r}: {chosen[word].name} was used"
            )
            continue
        why = _why_unusable(embedding, pipeline, cache, allow_pickle)
        if why:
            warnings.append(f"embedding {embedding.name} not applied ({why}): its word is text")
        else:
            chosen[word] = embedding
    return list(chosen.values()), warnings


def _why_unusable(
    embedding: ModelFile, pipeline: Any, cache: StateDictCache, allow_pickle: bool
) -> str | None:
    if embedding.path.suffix.lower() != ".safetensors" and not allow_pickle:
        return "a pickled file, loaded only if the worker sets ALLOW_PICKLE=1"
    try:
        state = cache.get(embedding.path)
    except Exception as error:  # safetensors and torch raise their own types
        return f"unreadable: {type(error).__name__}"
    parts = _embedding_parts(state, pipeline)
    return parts if isinstance(parts, str) else None


def embeddings_in(prompts: list[str], available: list[ModelFile]) -> list[ModelFile]:
    """The embeddings whose file name appears as a word in any prompt (A1111 behaviour)."""
    used = []
    for embedding in available:
        token = Path(embedding.name).name
        # in any case, as A1111 finds them (its tokenizer lowercases)
        pattern = re.compile(rf"(?<![\w-]){re.escape(token)}(?![\w-])", re.IGNORECASE)
        if any(pattern.search(p) for p in prompts):
            used.append(embedding)
    return used
