"""Model roots on the volume: name resolution, architecture detection from headers.

A model name is a path relative to its folder (`checkpoints/`, `loras/`, ...), with or without
extension. It never leaves its root: absolute paths, `..` and symlinks that resolve outside the
root are refused. A single file's architecture is read from its safetensors header alone (no
weights load), a diffusers folder's from its JSON; a pickle (ALLOW_PICKLE=1 only) is read whole.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from handler.errors import InvalidInput, ModelNotFound, UnsupportedModel, shown
from handler.settings import Settings

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
HASH_CACHE_FILE = ".sd-worker-hashes.json"
MAX_LDM_CONFIG_BYTES = 64 * 1024  # A1111's NAME.yaml beside a checkpoint: about 2 KB

# Each kind of model lives in one of these folders inside a root (ours, then A1111's name).
FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoint": ("checkpoints", "Stable-diffusion"),
    "lora": ("loras", "Lora"),
    "embedding": ("embeddings",),
    "vae": ("vae", "VAE"),
}
SAFE_EXTENSIONS = (".safetensors",)
FileKey = tuple[str, float, int, int, int]  # `file_key`: path, mtime, size, inode, ctime
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_EXTENSIONS = SAFE_EXTENSIONS + PICKLE_EXTENSIONS
MAX_HEADER_BYTES = 100 * 1024 * 1024
VAE_SIDECAR_SUFFIX = ".vae.safetensors"  # a checkpoint's own VAE beside it, not a checkpoint
# Longest model name, and longest folder or file name in it (most file systems' limit).
MAX_NAME_CHARS = 1024
MAX_NAME_PART_BYTES = 255

# Architecture -> native image side in pixels.
NATIVE_SIZE = {
    "sd15": 512,
    "sd15-inpaint": 512,
    "sd2-512": 512,
    "sd2-768-v": 768,
    "sdxl": 1024,
    "sdxl-refiner": 1024,
    "sdxl-inpaint": 1024,
}


@dataclass(frozen=True)
class Detection:
    """What a checkpoint is, as read from its header (or its diffusers folder)."""

    architecture: str
    prediction_type: str = "epsilon"
    notes: tuple[str, ...] = ()
    # Trained with zero terminal SNR (NoobAI-XL v-pred's `ztsnr` key, or kohya's
    # `ss_zero_terminal_snr` metadata): its noise schedule is rescaled so the last step is pure
    # noise, as ComfyUI and reForge do for such files.
    zero_terminal_snr: bool = False
    has_vae: bool = True  # False for a single file without VAE weights ("no baked VAE")


@dataclass(frozen=True)
class ModelFile:
    """A resolved model on a root: its public name and the real path."""

    kind: str
    name: str
    path: Path
    root: Path

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


@dataclass
class Registry:
    """Finds models on the configured roots and tells what they are."""

    settings: Settings
    _detections: dict[FileKey, Detection] = field(default_factory=dict)
    _hashes: dict[FileKey, str] = field(default_factory=dict)  # whole sha256s
    _tensor_hashes: dict[FileKey, str] = field(default_factory=dict)
    _lora_hashes: dict[FileKey, str] = field(default_factory=dict)
    _hash_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def roots(self) -> list[Path]:
        """Existing model roots the worker's user can read, in search order."""
        roots = []
        for root in self.settings.model_roots:
            if not root.is_dir():
                continue
            if not os.access(root, os.R_OK | os.X_OK):
                _warn_unreadable(root)
                continue
            roots.append(root)
        return roots

    # -- names ----------------------------------------------------------------------------

    def resolve(self, kind: str, name: str, field_name: str) -> ModelFile:
        """Resolve `name` of `kind` to a file inside a root, or raise naming `field_name`."""
        relative = _checked_name(name, field_name)
        for root in self.roots:
            for folder in FOLDERS[kind]:
                base = root / folder
                for candidate in _candidates(base / relative, kind):
                    if not (
                        candidate.is_file()
                        and candidate.suffix.lower() in WEIGHT_EXTENSIONS
                        or _is_model_folder(candidate, kind)
                    ):
                        continue
                    if not _is_inside(candidate, root):
                        # not found, as a missing file: no probing of what exists outside
                        log.warning("a %s name resolves outside its model root; refused", kind)
                        continue
                    _inside_root(candidate, root, field_name, name)  # a folder's contents
                    self.check_not_pickled(candidate, field_name)
                    return ModelFile(kind, _public_name(candidate, base), candidate, root)
        loose = self._loose_match(kind, relative.as_posix(), field_name)
        if loose is not None:
            self.check_not_pickled(loose.path, field_name)
            return loose
        for root in self.roots:
            for folder in FOLDERS[kind]:
                other = root / folder / relative
                if other.is_file() and _is_inside(other, root):
                    raise InvalidInput(
                        f"{shown(name)} is not a weights file",
                        field=field_name,
                        accepted=", ".join(WEIGHT_EXTENSIONS),
                    )
        available = self.names(kind)
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.3)
        if close and len(available) > len(close):  # the close names are not all there is
            close.append(f"{len(available) - len(close)} more (list_models lists them)")
        raise ModelNotFound(
            f"no {kind} named {shown(name)} on the model roots "
            f"({', '.join(str(r) for r in self.roots) or 'none found'})",
            field=field_name,
            accepted=(close or available[:10]) or "nothing: the model root holds no " + kind,
        )

    def _loose_match(self, kind: str, name: str, field_name: str) -> ModelFile | None:
        """A1111-style lookups: extensions in any case, and a bare file name that is in a
        subfolder (`ink` for `styles/ink.safetensors`), when exactly one file matches. Names
        compare in one Unicode form (a macOS-made "é" is two code points, a typed one one)."""

        def folded(text: str) -> str:
            return unicodedata.normalize("NFC", text).lower()

        wanted = folded(name)
        for extension in WEIGHT_EXTENSIONS:
            wanted = wanted.removesuffix(extension)
        files = self.files(kind)
        same = [f for f in files if folded(f.name) == wanted]
        if len(same) == 1:
            return same[0]
        if "/" in wanted:
            return None
        by_file_name = [f for f in files if folded(f.name.rsplit("/", 1)[-1]) == wanted]
        if len(by_file_name) > 1:
            raise InvalidInput(
                f"{shown(name)} matches several {kind}s",
                field=field_name,
                accepted=[f.name for f in by_file_name],
            )
        return by_file_name[0] if by_file_name else None

    def check_inside_a_root(self, path: Path, field_name: str) -> None:
        """Refuse `path` (a folder found on a root by its fixed name) if it, or anything in
        it, resolves outside that root."""
        root = next(r for r in self.roots if r in path.parents)
        _inside_root(path, root, field_name, path.name)

    def check_not_pickled(self, path: Path, field_name: str) -> None:
        """Refuse a pickled weights file, or a folder with a part that has only pickled
        weights (`unet/diffusion_pytorch_model.bin`), unless ALLOW_PICKLE=1."""
        if self.settings.allow_pickle:
            return
        pickled = [path] if path.suffix.lower() in PICKLE_EXTENSIONS else []
        if path.is_dir():
            for folder, _, names in os.walk(path):
                if not any(n.endswith(SAFE_EXTENSIONS) for n in names):
                    pickled += [Path(folder, n) for n in names if n.endswith(PICKLE_EXTENSIONS)]
        if pickled:
            shown = pickled[0].relative_to(path) if pickled[0] != path else path.name
            raise InvalidInput(
                f"{shown} is a pickled file, which can run code when loaded; it is refused "
                "unless the worker sets ALLOW_PICKLE=1",
                field=field_name,
                accepted=".safetensors files or diffusers folders with .safetensors weights",
            )

    def files(self, kind: str, loadable_only: bool = False) -> list[ModelFile]:
        """Every model of `kind` on the roots (first root wins on equal names).

        `loadable_only` leaves out pickled files unless ALLOW_PICKLE=1.
        """
        found: dict[str, tuple[tuple, ModelFile]] = {}
        for root_index, root in enumerate(self.roots):
            for folder_index, folder in enumerate(FOLDERS[kind]):
                base = root / folder
                if not base.is_dir():
                    continue
                for path in sorted(base.rglob("*")):
                    if any(p.endswith(".config") for p in path.relative_to(base).parts):
                        continue  # sidecar config folders
                    if _is_model_folder(path, kind):
                        pass
                    elif not (path.is_file() and path.suffix.lower() in WEIGHT_EXTENSIONS):
                        continue
                    elif kind == "checkpoint" and path.name.lower().endswith(VAE_SIDECAR_SUFFIX):
                        continue  # as A1111 lists them: a checkpoint's VAE (`vae_sidecar`)
                    if (
                        loadable_only
                        and path.suffix.lower() in PICKLE_EXTENSIONS
                        and not self.settings.allow_pickle
                    ):
                        continue
                    if any(
                        _is_model_folder(p, kind)
                        for p in path.parents
                        if p != base and base in p.parents
                    ):
                        continue  # weights inside a diffusers folder
                    try:
                        _inside_root(path, root, kind, path.name)
                    except InvalidInput:
                        continue
                    name = _public_name(path, base)
                    # one name, several files: the one `resolve` picks (first root, then
                    # folder, then .safetensors before pickled extensions, files before folders)
                    suffix = path.suffix.lower()
                    rank = WEIGHT_EXTENSIONS.index(suffix) if path.is_file() else 99
                    order = (root_index, folder_index, rank)
                    if name not in found or order < found[name][0]:
                        found[name] = (order, ModelFile(kind, name, path, root))
        return [found[n][1] for n in sorted(found)]

    def names(self, kind: str) -> list[str]:
        """Public names of every model of `kind`."""
        return [f.name for f in self.files(kind)]

    # -- architectures --------------------------------------------------------------------

    def detect(self, model: ModelFile) -> Detection:
        """Architecture of a checkpoint, cached by path, size and mtime."""
        if model.path.suffix.lower() in PICKLE_EXTENSIONS and not self.settings.allow_pickle:
            raise UnsupportedModel(
                f"{model.name} is a pickled file: not opened unless the worker sets ALLOW_PICKLE=1",
                field="checkpoint",
                accepted=".safetensors files or diffusers folders",
            )
        key = file_key(model.path)
        if key not in self._detections:
            if model.is_folder:
                self._detections[key] = detect_diffusers_folder(model.path)
            elif model.path.suffix.lower() in SAFE_EXTENSIONS:
                self._detections[key] = detect_checkpoint(model.path, model.root)
            else:  # a pickle, allowed by ALLOW_PICKLE=1 (resolve refuses it otherwise)
                self._detections[key] = detect_pickled_checkpoint(model.path, model.root)
        return self._detections[key]

    # -- hashes -----------------------------------------------------------------------------

    def cached_hash(self, model: ModelFile) -> str | None:
        """The AutoV2 hash (first 10 hex digits of sha256) if known; never reads the weights."""
        sha256 = self._cached_sha256(model)
        return sha256[:10] if sha256 else None

    def _cached_sha256(self, model: ModelFile) -> str | None:
        if model.is_folder:
            return None
        key = file_key(model.path)
        if key not in self._hashes:
            entry = self._hash_cache_entry(model, key)
            if not entry:
                return None
            self._hashes[key] = entry["sha256"]
            if "tensor_sha256" in entry:
                self._tensor_hashes[key] = entry["tensor_sha256"]
        return self._hashes[key]

    def short_hash(self, model: ModelFile) -> str:
        """The first 12 hex digits of the whole file's sha256, as A1111 writes an embedding's in
        `TI hashes` (and a LoRA's that is no safetensors file); hashed now if not known."""
        if self._cached_sha256(model) is None:
            self.compute_hash(model)
        return self._hashes[file_key(model.path)][:12]

    def lora_hash(self, model: ModelFile) -> str:
        """A LoRA's hash as A1111 writes it in `Lora hashes`: for a safetensors file, the first
        12 hex digits of the sha256 of its tensor data (the file after its header: kohya's
        hash, civitai's AutoV3), or of the `sshs_model_hash` the file records; else the whole
        file's (`short_hash`)."""
        if model.path.suffix.lower() not in SAFE_EXTENSIONS:
            return self.short_hash(model)
        key = file_key(model.path)
        if key in self._lora_hashes:  # every job with the LoRA asks: read its header once
            return self._lora_hashes[key]
        recorded = read_safetensors_header(model.path, "loras")[1].get("sshs_model_hash", "")
        if len(recorded) >= 12 and all(c in "0123456789abcdefABCDEF" for c in recorded):
            self._lora_hashes[key] = recorded[:12]
            return recorded[:12]
        if key not in self._tensor_hashes:
            self.cached_hash(model)
        if key not in self._tensor_hashes:  # not cached, or cached before this hash was kept
            self.compute_hash(model)
        self._lora_hashes[key] = self._tensor_hashes[key][:12]
        return self._lora_hashes[key]

    def _hash_cache_entry(self, model: ModelFile, key: tuple) -> dict | None:
        """The root's sidecar entry for this file, if it still describes the file."""
        entry = self._read_hash_cache(model.root).get(_relative(model))
        if (
            entry
            and entry.get("size") == key[2]
            and entry.get("mtime") == key[1]
            and entry.get("ctime_ns", key[4]) == key[4]
        ):
            return entry
        return None

    def compute_hash(self, model: ModelFile) -> str:
        """Hash the file, remember it, and record it in the root's sidecar (when writable).
        A safetensors file's tensor data (after its header) is hashed too, in the same read."""
        key = file_key(model.path)
        digest = hashlib.sha256()
        tensors = hashlib.sha256() if model.path.suffix.lower() in SAFE_EXTENSIONS else None
        data_start = None  # where the tensor data begins: after the 8-byte length and header
        offset = 0
        with open(model.path, "rb") as handle:
            while chunk := handle.read(16 * 1024 * 1024):
                digest.update(chunk)
                if tensors is not None:
                    if data_start is None:
                        data_start = 8 + struct.unpack("<Q", chunk[:8].ljust(8, b"\0"))[0]
                    tensors.update(chunk[max(0, data_start - offset) :])
                offset += len(chunk)
        sha256 = digest.hexdigest()
        self._hashes[key] = sha256
        entry = {"size": key[2], "mtime": key[1], "ctime_ns": key[4], "sha256": sha256}
        if tensors is not None:
            self._tensor_hashes[key] = entry["tensor_sha256"] = tensors.hexdigest()
        with self._hash_lock:
            cache = self._read_hash_cache(model.root)
            cache[_relative(model)] = entry
            _write_hash_cache(model.root, cache)
        return sha256[:10]

    @staticmethod
    def _read_hash_cache(root: Path) -> dict:
        file = root / HASH_CACHE_FILE
        if file.is_symlink():  # never read (or, below, write) through a link out of the root
            return {}
        try:
            return json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def config_folder(self, model: ModelFile, detection: Detection) -> Path:
        """The diffusers config folder for a single-file checkpoint.

        A sidecar `NAME.config/` folder next to the file wins (custom sizes, other schedulers);
        otherwise the bundled folder for the detected architecture.
        """
        sidecar = model.path.with_name(model.path.stem + ".config")
        if (sidecar / "model_index.json").is_file():
            _inside_root(sidecar, model.root, "checkpoint", model.name)
            return sidecar
        return CONFIG_ROOT / detection.architecture


def _write_hash_cache(root: Path, cache: dict) -> None:
    """Replace the root's hash cache file. The new content goes to a file of its own, created
    here (never an existing name, which could be a link out of the root), then renamed over
    the cache file (a link there is replaced, not followed)."""
    try:
        handle, temporary = tempfile.mkstemp(prefix=HASH_CACHE_FILE, suffix=".tmp", dir=root)
    except OSError as error:  # a read-only volume: keep the hashes in memory only
        log.info("hash cache not written (%s)", type(error).__name__)
        return
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(temporary, root / HASH_CACHE_FILE)
    except OSError as error:
        log.info("hash cache not written (%s)", type(error).__name__)
        Path(temporary).unlink(missing_ok=True)


def vae_sidecar(model: ModelFile) -> Path | None:
    """A1111's VAE for one checkpoint: `NAME.vae.safetensors` beside it, if there is one (and
    it is inside the root). Checkpoints saved without VAE weights load with it."""
    sidecar = model.path.with_name(model.path.stem + VAE_SIDECAR_SUFFIX)
    return sidecar if sidecar.is_file() and _is_inside(sidecar, model.root) else None


def file_key(path: Path) -> FileKey:
    """What identifies a file's contents for the caches: path, mtime, size, inode and ctime.
    A file replaced by one of the same size with its old mtime restored (`cp -p`, `rsync -a`)
    still gets a new ctime, and usually a new inode."""
    stat = path.stat()
    return (str(path), stat.st_mtime, stat.st_size, stat.st_ino, stat.st_ctime_ns)


def _relative(model: ModelFile) -> str:
    return model.path.relative_to(model.root).as_posix()


def prefetch(model: ModelFile) -> threading.Thread:
    """Read a model's files into the OS page cache in a background thread.

    Started before torch and diffusers are imported, the multi-second disk read of a large
    checkpoint overlaps the imports (file reads release the GIL); the load then reads memory.
    """
    paths = [model.path] if model.path.is_file() else sorted(model.path.rglob("*.safetensors"))

    def read() -> None:
        buffer = bytearray(16 * 1024 * 1024)
        for path in paths:
            try:
                with open(path, "rb", buffering=0) as file:
                    while file.readinto(buffer):
                        pass
            except OSError:
                break  # the real load reports it
        thread.finished_at = time.time()  # type: ignore[attr-defined]

    thread = threading.Thread(target=read, name="prefetch", daemon=True)
    thread.start()
    return thread


@functools.cache
def _warn_unreadable(root: Path) -> None:
    log.warning("model root %s is not readable by this worker's user: it is skipped", root)


def prefetch_default_checkpoint(settings: Settings | None = None) -> threading.Thread | None:
    """Start prefetching DEFAULT_CHECKPOINT (if set and valid: a bad setting or name is
    reported by the worker's start-up)."""
    try:
        settings = settings or Settings.from_env()
        if not settings.default_checkpoint:
            return None
        model = Registry(settings).resolve(
            "checkpoint", settings.default_checkpoint, "DEFAULT_CHECKPOINT"
        )
    except (InvalidInput, ModelNotFound, OSError):
        return None
    return prefetch(model)


# -- name checks ---------------------------------------------------------------------------


def _checked_name(name: str, field_name: str) -> PurePosixPath:
    """Refuse names that could leave the root before touching the file system."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(
            "must be a non-empty model name", field=field_name, accepted="a name from list_models"
        )
    if "\x00" in name or "\\" in name:
        raise InvalidInput(
            "model names may not contain NUL or backslashes",
            field=field_name,
            accepted="a name relative to its folder, e.g. 'sdxl/juggernaut'",
        )
    if len(name) > MAX_NAME_CHARS or any(
        len(part.encode()) > MAX_NAME_PART_BYTES for part in name.split("/")
    ):
        raise InvalidInput(
            "is too long for a model name",
            field=field_name,
            accepted=f"names up to {MAX_NAME_CHARS} characters, "
            f"{MAX_NAME_PART_BYTES} bytes per folder or file name",
        )
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("~"):
        raise InvalidInput(
            "absolute paths are not accepted",
            field=field_name,
            accepted="a name relative to its folder, e.g. 'sdxl/juggernaut'",
        )
    if not path.parts:  # "." or "./": the folder itself, whose name + ".safetensors" is beside it
        raise InvalidInput(
            "must name a model, not its folder",
            field=field_name,
            accepted="a name from list_models",
        )
    if ".." in path.parts:
        raise InvalidInput(
            "'..' is not accepted in model names",
            field=field_name,
            accepted="a name relative to its folder, e.g. 'sdxl/juggernaut'",
        )
    return path


def _inside_root(path: Path, root: Path, field_name: str, name: str) -> None:
    """Refuse a path whose real location (after symlinks) is outside its root; for a folder,
    also one holding anything (a weights file, a part's folder) that resolves outside."""
    inside = _is_inside(path, root)
    if inside and path.is_dir():
        for folder, folders, files in os.walk(path):  # symlinked folders: checked, not entered
            if not all(_is_inside(Path(folder, n), root) for n in folders + files):
                inside = False
                break
    if not inside:
        raise InvalidInput(
            f"{shown(name)} resolves outside the model root",
            field=field_name,
            accepted="models stored inside the model root",
        )


def _is_inside(path: Path, root: Path) -> bool:
    real = Path(os.path.realpath(path))
    real_root = Path(os.path.realpath(root))
    return real == real_root or real_root in real.parents


def _candidates(base: Path, kind: str) -> list[Path]:
    """The paths a name may refer to: as given, or with each weight extension added."""
    if base.suffix.lower() in WEIGHT_EXTENSIONS:
        return [base]
    candidates = [base.with_name(base.name + ext) for ext in WEIGHT_EXTENSIONS]
    if kind in ("checkpoint", "vae"):
        candidates.append(base)  # a diffusers folder
    return candidates


def _is_model_folder(path: Path, kind: str) -> bool:
    """A diffusers-format model of `kind`: a pipeline folder for checkpoints, a model folder
    (config.json and its weights) for VAEs."""
    if kind == "checkpoint":
        return _is_diffusers_folder(path)
    return (
        kind == "vae"
        and path.is_dir()
        and (path / "config.json").is_file()
        and any(path.glob("diffusion_pytorch_model.*"))
    )


def _is_diffusers_folder(path: Path) -> bool:
    # NAME.config/ folders hold configs without weights: they are sidecars, not models.
    return (
        path.is_dir()
        and not path.name.endswith(".config")
        and (path / "model_index.json").is_file()
    )


def _public_name(path: Path, base: Path) -> str:
    relative = path.relative_to(base).as_posix()
    return relative[: -len(path.suffix)] if path.suffix.lower() in WEIGHT_EXTENSIONS else relative


# -- architecture detection ----------------------------------------------------------------


def read_safetensors_header(
    path: Path, field: str = "checkpoint"
) -> tuple[dict[str, dict], dict[str, str]]:
    """Tensor entries and metadata of a safetensors file, reading only its header; a file
    that is not a well-formed one is UnsupportedModel naming `field`, with what is wrong.

    safetensors' `safe_open` reads it too; the format's header is a length and a JSON object,
    read here so that a truncated file, an oversized header or one that is not JSON each get
    an error saying so, where safe_open raises its own."""

    def refuse(why: str, accepted: str = ".safetensors files") -> UnsupportedModel:
        return UnsupportedModel(f"{path.name} {why}", field=field, accepted=accepted)

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise refuse(f"is {size} bytes: too short to be a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > MAX_HEADER_BYTES or length > size - 8:
                raise refuse("is not a safetensors file (bad header length)")
            raw = handle.read(length)
    except OSError as error:  # a file the worker's user may not read, a volume that failed
        raise refuse(
            f"cannot be read ({error.strerror or type(error).__name__})",
            "files the worker's user can read",
        ) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise refuse("is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise refuse("has a malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        and all(_is_tensor_entry(entry) for entry in header.values())
    ):
        raise refuse("has a malformed safetensors header")
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + data_end > size:
        raise refuse(
            f"is truncated: its header describes {8 + length + data_end} bytes, the file has "
            f"{size}",
            "a complete .safetensors file",
        )
    return header, metadata


def _is_tensor_entry(entry: Any) -> bool:
    def integers(value: Any, count: int | None = None) -> bool:
        return (
            isinstance(value, list)
            and (count is None or len(value) == count)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        )

    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and integers(entry.get("shape"))
        and integers(entry.get("data_offsets"), 2)
    )


UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


def detect_pickled_checkpoint(path: Path, root: Path | None = None) -> Detection:
    """Architecture of a pickled .ckpt, loaded with weights_only=True (no code can run)."""
    import pickle

    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        raise UnsupportedModel(
            f"{path.name} could not be read as plain tensors ({type(error).__name__}); it may hold "
            "code, which is never run",
            field="checkpoint",
            accepted=".safetensors checkpoints",
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: {"shape": list(v.shape)} for k, v in state.items() if isinstance(v, torch.Tensor)}
    return detect_from_tensors(tensors, {}, path, root)


def detect_checkpoint(path: Path, root: Path | None = None) -> Detection:
    """Architecture of a single-file checkpoint, from its key names and shapes only."""
    tensors, metadata = read_safetensors_header(path)
    return detect_from_tensors(tensors, metadata, path, root)


def detect_from_tensors(
    tensors: dict[str, dict], metadata: dict[str, str], path: Path, root: Path | None = None
) -> Detection:
    """Architecture from tensor names and shapes ({name: {"shape": [...]}}); `root` (the
    checkpoint's folder when None) bounds where its `NAME.yaml` may lead."""
    keys = tensors.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    def found(what: str, advice: str = "") -> UnsupportedModel:
        return UnsupportedModel(
            f"{path.name} looks like {what}, not a Stable Diffusion 1.x, 2.x or XL checkpoint"
            + (f": {advice}" if advice else ""),
            field="checkpoint",
            accepted="SD 1.x, SD 2.x, SDXL base/refiner and their inpainting variants",
        )

    if any("lora_" in k or ".lora_A." in k or ".lora_down." in k for k in keys):
        raise found("a LoRA (it has lora_* keys)", "put it in loras/ and name it in `loras`")
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks.") or has("text_encoders."):
        raise found("Stable Diffusion 3")
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        raise found("Flux")
    if "emb_params" in keys or "string_to_param" in keys or keys == {"clip_l", "clip_g"}:
        raise found("a textual-inversion embedding", "put it in embeddings/")
    if "edm_mean" in keys:
        raise found("Playground v2.5")
    if UNET_IN not in tensors:
        if has("encoder.") and has("decoder."):
            raise found("a VAE", "put it in vae/ and name it in `vae`")
        sample = ", ".join(sorted(keys)[:3])
        raise found(f"something else (no SD UNet; first keys: {sample or 'none'})")

    shape = tensors[UNET_IN]["shape"]
    if len(shape) != 4:
        raise found(f"something else (its first UNet convolution has shape {shape})")
    in_channels = shape[1]
    if in_channels not in (4, 9):
        raise found(f"a UNet with {in_channels} input channels (e.g. InstructPix2Pix)")
    inpaint = in_channels == 9

    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        arch = "sdxl-inpaint" if inpaint else "sdxl"
    elif has("conditioner.embedders.0.model."):
        if inpaint:
            raise found("an SDXL refiner with an inpainting UNet")
        arch = "sdxl-refiner"
    elif has("cond_stage_model.model."):
        if inpaint:
            raise found("SD 2.x inpainting, which is not supported yet")
        arch = "sd2"
    elif has("cond_stage_model.transformer."):
        arch = "sd15-inpaint" if inpaint else "sd15"
    else:
        raise found("a UNet without a text encoder")

    prediction = _recorded_prediction_type(tensors, metadata, path, root or path.parent)
    notes: list[str] = []
    if arch == "sd2":
        if prediction is None:
            prediction = "v_prediction"
            notes.append(
                "SD 2.x prediction type is not recorded in the file; assumed v-prediction "
                "(SD 2.1 768). Add a `NAME.yaml` with `parameterization: eps` for 512 models."
            )
        arch = "sd2-768-v" if prediction == "v_prediction" else "sd2-512"
    return Detection(
        arch,
        prediction or "epsilon",
        tuple(notes),
        zero_terminal_snr="ztsnr" in tensors
        or metadata.get("ss_zero_terminal_snr", "").lower() == "true",
        has_vae=has("first_stage_model."),
    )


def _recorded_prediction_type(
    tensors: dict, metadata: dict[str, str], path: Path, root: Path
) -> str | None:
    """The prediction type the file records (modelspec / kohya metadata, a `v_pred` marker key,
    or A1111's sidecar `NAME.yaml`), or None when it records none."""
    spec = metadata.get("modelspec.prediction_type", "").lower()
    if spec in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if spec in ("epsilon", "eps"):
        return "epsilon"
    if metadata.get("ss_v_parameterization", "").lower() == "true" or "v_pred" in tensors:
        return "v_prediction"
    sidecar = path.with_suffix(".yaml")
    # a file (or a link to one) inside the root, and only as much as an LDM config takes
    if sidecar.is_file() and _is_inside(sidecar, root):
        with open(sidecar, "rb") as file:
            text = file.read(MAX_LDM_CONFIG_BYTES).decode(errors="replace")
        for line in text.splitlines():
            if line.strip().startswith("parameterization:"):
                value = line.split(":", 1)[1].split("#", 1)[0].strip().strip("\"'")
                return "v_prediction" if value == "v" else "epsilon"
        if "target:" in text:
            # an LDM config with no parameterization line is epsilon (v2-inference.yaml)
            return "epsilon"
    return None


def detect_diffusers_folder(path: Path) -> Detection:
    """Architecture of a diffusers-format folder, from its model_index and UNet config."""
    accepted = "a diffusers folder with model_index.json and unet/config.json"
    configs = {}
    for part in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        file = path / part
        if part.startswith("scheduler/") and not file.is_file():
            configs[part] = {}  # optional: the prediction type defaults to epsilon
            continue
        try:
            configs[part] = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            why = error.strerror if isinstance(error, OSError) else "not valid JSON"
            raise UnsupportedModel(
                f"{path.name}: unreadable diffusers folder ({part}: {why})",
                field="checkpoint",
                accepted=accepted,
            ) from None
        if not isinstance(configs[part], dict):
            raise UnsupportedModel(
                f"{path.name}: unreadable diffusers folder ({part} is not a JSON object)",
                field="checkpoint",
                accepted=accepted,
            )
    index, unet = configs["model_index.json"], configs["unet/config.json"]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        named = isinstance(index.get(part), list) and index[part][:1] != [None]
        if named and not (path / part).is_dir():
            raise UnsupportedModel(
                f"{path.name}: its model_index.json names a {part} the folder lacks",
                field="checkpoint",
                accepted=accepted + ", and every part it names",
            )
    prediction = configs["scheduler/scheduler_config.json"].get("prediction_type", "epsilon")
    pipeline = index.get("_class_name", "")
    inpaint = unet.get("in_channels") == 9
    if "XL" in pipeline:
        if index.get("text_encoder", [None])[0] is None:
            arch = "sdxl-refiner"
        else:
            arch = "sdxl-inpaint" if inpaint else "sdxl"
    elif unet.get("cross_attention_dim") == 1024 or "text_encoder" in index and _is_open_clip(path):
        if inpaint:
            raise UnsupportedModel(
                f"{path.name} is SD 2.x inpainting, which is not supported yet",
                field="checkpoint",
                accepted="Stable Diffusion 1.x, 2.x and XL diffusers folders",
            )
        arch = "sd2-768-v" if prediction == "v_prediction" else "sd2-512"
    elif pipeline.startswith("StableDiffusion"):
        arch = "sd15-inpaint" if inpaint else "sd15"
    else:
        raise UnsupportedModel(
            f"{path.name} is a {pipeline or 'unknown'} folder",
            field="checkpoint",
            accepted="Stable Diffusion 1.x, 2.x and XL diffusers folders",
        )
    zero_terminal_snr = configs["scheduler/scheduler_config.json"].get("rescale_betas_zero_snr")
    return Detection(arch, prediction, zero_terminal_snr=bool(zero_terminal_snr))


def _is_open_clip(path: Path) -> bool:
    try:
        config = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("hidden_act") == "gelu"


# LyCORIS algorithms other than LoRA/LoCon, by a key part only their files have. diffusers and
# peft load none of them (diffusers fails on their keys with a renaming error).
LYCORIS_KEY_PARTS = {
    ".hada_w1_": "LoHa",
    ".lokr_w": "LoKr",
    ".oft_blocks": "OFT",
    ".oft_diag": "OFT",
    ".boft_blocks": "BOFT",
    ".a1.weight": "GLoRA",
    ".on_input": "(IA)^3",
    ".diff.": "full-weight difference",  # a whole name part: not `model.diffusion_model.`
    ".diff_b.": "full-weight difference",
    # diffusers drops a kohya DoRA's magnitudes with a log line and loads it as a plain LoRA
    ".dora_scale": "DoRA",
    ".lora_magnitude_vector": "DoRA",  # peft's name
}


def lycoris_algorithm(tensors: dict[str, dict]) -> str | None:
    """The LyCORIS algorithm of a LoRA file's keys when it is one diffusers cannot load."""
    for key in tensors:
        for part, algorithm in LYCORIS_KEY_PARTS.items():
            if part in key + ".":
                return algorithm
    return None


def detect_lora(tensors: dict[str, dict]) -> str:
    """The base architecture a LoRA was trained for, from its header's key names and shapes
    (`read_safetensors_header`): sd15, sd2, sdxl, sdxl-refiner or "unknown"."""
    keys = list(tensors)
    if any(k.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    # The width of the cross-attention key projection tells the text encoder it was made for.
    widths = {768: "sd15", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
    for key in keys:
        shape = tensors[key]["shape"]
        if "attn2" in key and "to_k" in key and ("lora_down" in key or "lora_A" in key):
            found = widths.get(shape[1]) if len(shape) >= 2 else None
            if found:
                return found
    if any(k.startswith(("lora_te_", "text_encoder.")) for k in keys):
        return "sd15"
    return "unknown"
