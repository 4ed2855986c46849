"""Worker configuration, read from the environment in one place (every variable is in README)."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from handler.errors import InvalidInput

RUNPOD_VOLUME = "/runpod-volume"
# Where models sit on a network volume: our layout, and the installs of RunPod's A1111 and
# ComfyUI pod templates (under /workspace in a pod), whose volume a serverless worker mounts.
VOLUME_LAYOUTS = (
    "models",
    "",
    "stable-diffusion-webui/models",
    "stable-diffusion-webui",  # A1111's embeddings/ is beside its models/
    "ComfyUI/models",
)


def volume_roots(volume: str = RUNPOD_VOLUME) -> tuple[str, ...]:
    return tuple(str(Path(volume, layout)) for layout in VOLUME_LAYOUTS)


DEFAULT_MODEL_ROOTS = (*volume_roots(), "./models")


YES, NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
SAFETY_POLICIES = ("blur", "withhold")
# `auto` is PyTorch's pick; the others are preferred first (handler.fastpath.attention_backends)
ATTENTION_CHOICES = ("auto", "flash", "cudnn", "efficient", "math")


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in YES + NO:
        raise InvalidInput(
            f"{value!r} is neither yes nor no", field=name, accepted=", ".join(YES + NO)
        )
    return value in YES


def _int(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    return _number(int, name, default, minimum, maximum)


def _float(name: str, default: float, minimum: float = 0.0, maximum: float | None = None) -> float:
    return _number(float, name, default, minimum, maximum)


def _number(kind: type, name: str, default, minimum, maximum):
    """A numeric variable, or `default` when unset; anything else stops the worker, naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    accepted = f"{kind.__name__} from {minimum}" + (f" to {maximum}" if maximum else " up")
    try:
        value = kind(text)
    except ValueError:
        raise InvalidInput(f"{text!r} is not a number", field=name, accepted=accepted) from None
    if not math.isfinite(value):  # float("nan"), float("inf")
        raise InvalidInput(f"{text!r} is not a finite number", field=name, accepted=accepted)
    if value < minimum or (maximum is not None and value > maximum):
        raise InvalidInput(f"{text} is out of range", field=name, accepted=accepted)
    return value


def _str(name: str, default: str | None = None) -> str | None:
    value = (os.environ.get(name) or "").strip()  # a stray space from a template's form
    return value or default


# An AWS S3 endpoint's host: s3.amazonaws.com, s3.<region>.amazonaws.com,
# s3-<region>.amazonaws.com, s3.dualstack.<region>.amazonaws.com (and under amazonaws.com.cn),
# led by "<bucket>." in the virtual-hosted form that RunPod's docs give for BUCKET_ENDPOINT_URL
AWS_S3_HOST = re.compile(
    r"(?:(?P<bucket>.+)\.)?(?P<service>s3(?:-fips)?(?:\.dualstack)?)"
    r"(?:[.-](?P<region>[a-z]{2}(?:-[a-z]+)+-\d+))?\.(?P<domain>amazonaws\.com(?:\.cn)?)"
)


def _bucket_location() -> dict[str, Any]:
    """BUCKET_ENDPOINT_URL, BUCKET_NAME and BUCKET_REGION, completed from an AWS endpoint's host.

    The host gives the region when BUCKET_REGION is unset. A virtual-hosted host
    (https://<bucket>.s3.<region>.amazonaws.com) also gives the bucket, and the client then
    talks to the regional endpoint: boto3 would otherwise put the bucket in the path as well.
    So does a path of one segment (https://<account>.r2.cloudflarestorage.com/<bucket>), which
    boto3 would put before every key.
    """
    endpoint = _str("BUCKET_ENDPOINT_URL")
    bucket = _str("BUCKET_NAME")
    region = _str("BUCKET_REGION")
    parts = urlsplit(endpoint or "")
    aws = AWS_S3_HOST.fullmatch(parts.hostname or "")
    if aws:
        region = region or aws["region"]
    if aws and aws["bucket"]:
        if bucket and bucket != aws["bucket"]:
            raise InvalidInput(
                f"is {bucket!r}, but BUCKET_ENDPOINT_URL's host names the bucket {aws['bucket']!r}",
                field="BUCKET_NAME",
                accepted=f"{aws['bucket']!r} or unset, or a regional endpoint such as "
                "https://s3.<region>.amazonaws.com in BUCKET_ENDPOINT_URL",
            )
        bucket = aws["bucket"]
        host = ".".join(filter(None, (aws["service"], aws["region"], aws["domain"])))
        endpoint = f"{parts.scheme}://{host}"
    elif endpoint:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(
                "is not an http(s) URL",  # the URL is not quoted: it may carry a signature
                field="BUCKET_ENDPOINT_URL",
                accepted="https://host[:port], e.g. https://<account>.r2.cloudflarestorage.com",
            )
        path = parts.path.strip("/")
        if path:  # the bucket in the path, as R2 and AWS's path-style URLs show it
            if "/" in path or (bucket and bucket != path):
                raise InvalidInput(
                    "has a path that is not the bucket's name (BUCKET_NAME)",
                    field="BUCKET_ENDPOINT_URL",
                    accepted="https://host[:port], or https://host[:port]/<BUCKET_NAME>",
                )
            bucket = path
            endpoint = f"{parts.scheme}://{parts.netloc}"
    if not bucket and (endpoint or _str("BUCKET_ACCESS_KEY_ID")):
        where = f"BUCKET_ENDPOINT_URL ({parts.hostname})" if endpoint else "BUCKET_ACCESS_KEY_ID"
        _warn_once(
            f"{where} is set but BUCKET_NAME is not: images are returned inline as base64 "
            "until BUCKET_NAME is set"
        )
    if bucket and not endpoint and not _str("BUCKET_ACCESS_KEY_ID"):
        _warn_once(
            "BUCKET_NAME is set but neither BUCKET_ENDPOINT_URL nor BUCKET_ACCESS_KEY_ID is: "
            "images are returned inline as base64 until one of them is set"
        )
    return {
        "bucket_endpoint_url": endpoint,
        "bucket_name": bucket,
        "bucket_region": region or "us-east-1",
    }


def _bucket_credentials() -> dict[str, str | None]:
    """The key pair, both or neither: boto3 refuses half a pair only at the first upload."""
    key_id, secret = _str("BUCKET_ACCESS_KEY_ID"), _str("BUCKET_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        missing = "BUCKET_SECRET_ACCESS_KEY" if key_id else "BUCKET_ACCESS_KEY_ID"
        raise InvalidInput(
            "is not set, but its pair is",
            field=missing,
            accepted="BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY both, or neither "
            "(boto3's own credentials: an instance role, ~/.aws)",
        )
    return {"bucket_access_key_id": key_id, "bucket_secret_access_key": secret}


def _public_url() -> str | None:
    url = _str("BUCKET_PUBLIC_URL")
    if url and urlsplit(url).scheme not in ("http", "https"):
        raise InvalidInput(
            "is not an http(s) URL",
            field="BUCKET_PUBLIC_URL",
            accepted="https://host[/path], the public address the bucket's keys are served under",
        )
    return url


@functools.cache
def _warn_once(message: str) -> None:
    # the settings are read several times as a worker starts; the warning is said once
    logging.getLogger(__name__).warning(message)


@dataclass(frozen=True)
class Settings:
    """Everything the worker reads from the environment."""

    models_dir: str | None = None
    default_checkpoint: str | None = None
    allow_pickle: bool = False
    log_prompts: bool = False
    device: str | None = None
    max_pixels: int = 2048 * 2048
    gpu_checkpoints: int = 1
    cpu_checkpoints: int = 1
    max_lora_cache_bytes: int = 1024 * 1024 * 1024
    resident_loras: int = 8
    safety_checker: bool = False
    safety_policy: str = "blur"
    refiner_checkpoint: str | None = None
    cuda_graphs: bool = True
    graph_shapes: int = 4
    compile: bool = False
    compile_cache_dir: str | None = None
    compile_cache_keep_days: float = 14
    precompile: bool = True
    attention: str = "auto"
    warmup: bool = True
    require_gpu: bool = False
    max_inline_bytes: int = 9 * 1024 * 1024
    allow_http_inputs: bool = False
    allow_private_inputs: bool = False
    max_input_bytes: int = 20 * 1024 * 1024
    max_input_pixels: int = 4096 * 4096
    input_timeout_s: float = 15.0
    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = None
    bucket_secret_access_key: str | None = None
    bucket_name: str | None = None
    bucket_prefix: str = "images"
    bucket_region: str = "us-east-1"
    bucket_presign_ttl: int = 3600
    bucket_public_url: str | None = None
    bucket_path_style: bool = False
    input_buckets: tuple[str, ...] = ()  # buckets s3:// inputs may read, besides bucket_name

    extra_roots: tuple[str, ...] = field(default=DEFAULT_MODEL_ROOTS)

    def __post_init__(self) -> None:
        # settings made in code (tests, the benchmark) are checked as the environment's are
        if self.safety_policy not in SAFETY_POLICIES:
            raise InvalidInput(
                f"unknown policy {self.safety_policy!r}",
                field="SAFETY_POLICY",
                accepted=", ".join(SAFETY_POLICIES),
            )
        if self.attention not in ATTENTION_CHOICES:
            raise InvalidInput(
                f"unknown attention backend {self.attention!r}",
                field="ATTENTION_BACKEND",
                accepted=", ".join(ATTENTION_CHOICES),
            )

    @property
    def bucket_configured(self) -> bool:
        """True when uploads can go to a bucket."""
        return bool(self.bucket_name and (self.bucket_endpoint_url or self.bucket_access_key_id))

    @classmethod
    def from_env(cls) -> Settings:
        """Read the settings from the process environment; a malformed value stops the worker."""
        settings = cls(
            models_dir=_str("MODELS_DIR"),
            default_checkpoint=_str("DEFAULT_CHECKPOINT"),
            allow_pickle=_flag("ALLOW_PICKLE"),
            log_prompts=_flag("LOG_PROMPTS"),
            device=(_str("DEVICE") or "").lower() or None,
            max_pixels=_int("MAX_IMAGE_PIXELS", 2048 * 2048, minimum=64 * 64),
            gpu_checkpoints=_int("GPU_CHECKPOINTS", 1, minimum=1),
            cpu_checkpoints=_int("CPU_CHECKPOINTS", 1),
            max_lora_cache_bytes=_int("LORA_CACHE_MB", 1024) * 1024 * 1024,
            resident_loras=_int("RESIDENT_LORAS", 8, minimum=1),
            safety_checker=_flag("SAFETY_CHECKER"),
            safety_policy=_str("SAFETY_POLICY", "blur").lower(),
            refiner_checkpoint=_str("REFINER_CHECKPOINT"),
            cuda_graphs=_flag("CUDA_GRAPHS", True),
            graph_shapes=_int("GRAPH_SHAPES", 4, minimum=1),
            compile=_flag("COMPILE"),
            compile_cache_dir=_str("COMPILE_CACHE_DIR"),
            compile_cache_keep_days=_float("COMPILE_CACHE_KEEP_DAYS", 14, maximum=36500),
            precompile=_flag("PRECOMPILE", True),
            attention=_str("ATTENTION_BACKEND", "auto").lower(),
            warmup=_flag("WARMUP", True),
            require_gpu=_flag("REQUIRE_GPU"),
            max_inline_bytes=_int("MAX_INLINE_BYTES", 9 * 1024 * 1024, minimum=1),
            allow_http_inputs=_flag("ALLOW_HTTP_INPUTS"),
            allow_private_inputs=_flag("ALLOW_PRIVATE_INPUTS"),
            max_input_bytes=_int("MAX_INPUT_BYTES", 20 * 1024 * 1024, minimum=1),
            max_input_pixels=_int("MAX_INPUT_PIXELS", 4096 * 4096, minimum=1),
            input_timeout_s=_float("INPUT_TIMEOUT_S", 15, minimum=0.1, maximum=3600),
            **_bucket_location(),
            **_bucket_credentials(),
            bucket_prefix=_str("BUCKET_PREFIX", "images"),
            bucket_presign_ttl=_int("BUCKET_PRESIGN_TTL", 3600, minimum=1, maximum=7 * 86400),
            bucket_public_url=_public_url(),
            bucket_path_style=_flag("BUCKET_PATH_STYLE"),
            input_buckets=tuple(
                b.strip() for b in (_str("INPUT_BUCKETS") or "").split(",") if b.strip()
            ),
        )
        if settings.models_dir and not Path(settings.models_dir).is_dir():
            _warn_once(
                f"MODELS_DIR {settings.models_dir} is not a folder: models are searched in "
                f"{', '.join(settings.extra_roots)} only"
            )
        return settings

    @property
    def model_roots(self) -> list[Path]:
        """Model roots in search order: $MODELS_DIR, then the RunPod volume, then ./models."""
        roots = [self.models_dir] if self.models_dir else []
        roots += [r for r in self.extra_roots if r not in roots]
        return [Path(r) for r in roots]
