"""Image encoding (png/jpeg/webp with A1111 infotext) and delivery (S3 or inline base64).

Nothing is reported that was not delivered: an uploaded image appears in the result only after
S3 accepted it with a matching Content-MD5, and a job whose upload fails after retries fails
with upload_failed (or, when it asked for `auto`, falls back to inline base64 and says so).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import numpy as np
from PIL import ExifTags, Image, PngImagePlugin

from handler.aliases import A1111_AUTOMATIC_SCHEDULES
from handler.errors import Cancelled, InvalidInput, OutputTooLarge, UploadFailed
from handler.schedulers import split_schedule
from handler.schema import ImageResult, Job
from handler.settings import Settings

log = logging.getLogger(__name__)

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: see README "Encoding" for the measurement behind it.
PNG_COMPRESS_LEVEL = 1
UPLOAD_ATTEMPTS = 4  # in all, the first included: boto3's retries, backoff with jitter


@dataclass(frozen=True)
class EncodedImage:
    """One image as file bytes, with what the result reports about it."""

    index: int
    seed: int
    width: int
    height: int
    format: str
    data: bytes
    nsfw: bool | None = None  # the safety checker's verdict, when it ran

    @property
    def withheld(self) -> bool:
        """A flagged image the policy keeps back: reported, but not delivered."""
        return self.nsfw is True and not self.data

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.format]

    def data_uri(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"


def encode_image(
    image: Image.Image, index: int, seed: int, fmt: str, quality: int, infotext: str | None = None
) -> EncodedImage:
    """Encode a PIL image as png, jpeg or webp, with A1111 "parameters" infotext unless None.

    Input images lose their own metadata when decoded (`handler.inputs.decode_image`), so an
    inpainted output, composited over its init image, carries none of it either.
    """
    buffer = io.BytesIO()
    if fmt == "png" and image.mode in PNG_COLOR_TYPES:
        return EncodedImage(
            index, seed, image.width, image.height, fmt, encode_png(image, infotext)
        )
    if fmt == "png":
        info = None
        if infotext:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", infotext)
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, pnginfo=info)
    else:
        extra: dict[str, Any] = {}
        if infotext:
            extra["exif"] = a1111_exif(infotext)
        pil_format = "JPEG" if fmt == "jpeg" else "WEBP"
        image.convert("RGB").save(buffer, format=pil_format, quality=quality, **extra)
    return EncodedImage(index, seed, image.width, image.height, fmt, buffer.getvalue())


def a1111_exif(infotext: str) -> bytes:
    """An EXIF block holding the infotext as A1111 writes it for jpeg and webp (with piexif):
    the Exif IFD's UserComment, typed UNDEFINED, "UNICODE\\0" then UTF-16BE. Pillow's Exif
    would type it BYTE, which A1111's PNG Info cannot read (piexif hands it a tuple)."""
    comment = b"UNICODE\0" + infotext.encode("utf-16-be")
    entry = struct.Struct(">HHHII")  # entry count (1), then tag, type, count, value or offset
    # big-endian TIFF header; IFD0 at 8 points to the Exif IFD at 26, whose data starts at 44
    ifd0 = entry.pack(1, EXIF_IFD_POINTER, TIFF_LONG, 1, 26) + b"\0\0\0\0"
    exif_ifd = entry.pack(1, USER_COMMENT, TIFF_UNDEFINED, len(comment), 44) + b"\0\0\0\0"
    return b"Exif\0\0MM\0*\0\0\0\x08" + ifd0 + exif_ifd + comment


EXIF_IFD_POINTER, USER_COMMENT = ExifTags.IFD.Exif, ExifTags.Base.UserComment
TIFF_LONG, TIFF_UNDEFINED = 4, 7
# A jpeg's EXIF segment holds 64 KiB: about 32,700 characters of infotext in UTF-16
JPEG_MAX_EXIF_BYTES = 65533


PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
PNG_CHUNK_ROWS = 64  # rows per deflate chunk: chunks compress in parallel threads
_png_pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="png")


def encode_png(image: Image.Image, infotext: str | None = None) -> bytes:
    """A PNG written with the "Up" row filter and zlib level 1, deflated in parallel chunks.

    Pillow's encoder tries every row filter and deflates in one thread: about 150 ms for a
    1024x1024 image on a server CPU, as long as the GPU work of a fast SDXL job. Here the filter
    is one numpy subtraction, and horizontal bands of rows are deflated on several threads
    (zlib releases the GIL) as separate raw-deflate blocks ended with a sync flush, which
    concatenate into one valid zlib stream, as pigz does.
    """
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up: each byte minus the byte above it (the first row: minus 0)
    flat = pixels.reshape(height, width * channels)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:], dtype=np.uint8, casting="unsafe")
    raw = rows.tobytes()
    bands = [
        raw[start : start + PNG_CHUNK_ROWS * rows.shape[1]]
        for start in range(0, len(raw), PNG_CHUNK_ROWS * rows.shape[1])
    ]

    def deflate(band: tuple[int, bytes]) -> bytes:
        index, data = band
        compressor = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, -15)
        last = index == len(bands) - 1
        return compressor.compress(data) + compressor.flush(
            zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
        )

    deflated = b"".join(_png_pool.map(deflate, enumerate(bands)))
    stream = b"\x78\x01" + deflated + struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOR_TYPES[image.mode], 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    if infotext:
        try:
            chunks.append(_png_chunk(b"tEXt", b"parameters\0" + infotext.encode("latin-1")))
        except UnicodeEncodeError:  # international text: iTXt, uncompressed, UTF-8
            text = b"parameters\0\0\0\0\0" + infotext.encode("utf-8")
            chunks.append(_png_chunk(b"iTXt", text))
    chunks += [_png_chunk(b"IDAT", stream), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def read_infotext(data: bytes) -> str | None:
    """The A1111 parameters stored in an encoded image (png text chunk or EXIF UserComment)."""
    image = Image.open(io.BytesIO(data))
    if "parameters" in image.info:
        return image.info["parameters"]
    comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be")
    return None


def a1111_infotext(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
    loras: list[tuple[str, float, str | None]] = (),
    embeddings: list[tuple[str, str]] = (),
    extra: dict[str, Any] | None = None,
) -> str:
    """The "parameters" text A1111 writes, so dropping the file into A1111 restores the settings.

    LoRAs are named by file name, without subfolders, as A1111 finds them; a value with a comma,
    a colon or a line break is quoted, as A1111 quotes it, so that its parser reads it whole.
    """
    loras = [(PurePosixPath(name).name, scale, digest) for name, scale, digest in loras]
    prompt_line = prompt + "".join(f" <lora:{name}:{scale:g}>" for name, scale, _ in loras)
    fields: dict[str, Any] = {"Steps": steps}
    fields["Sampler"], schedule = split_schedule(sampler)
    if schedule is None and fields["Sampler"] in A1111_AUTOMATIC_SCHEDULES:
        # without it A1111 reads "Automatic": Karras (or Exponential) for these samplers
        schedule = "Uniform"
    if schedule:
        fields["Schedule type"] = schedule
    fields.update({"CFG scale": f"{cfg_scale:g}", "Seed": seed, "Size": f"{width}x{height}"})
    if model_hash:
        fields["Model hash"] = model_hash
    fields["Model"] = model
    hashes = [f"{_hash_name(name)}: {digest}" for name, _, digest in loras if digest]
    if hashes:
        fields["Lora hashes"] = ", ".join(hashes)
    if embeddings:
        fields["TI hashes"] = ", ".join(f"{_hash_name(n)}: {d}" for n, d in embeddings)
    fields.update(extra or {})
    lines = [prompt_line]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _quote(value: Any) -> Any:
    """A1111's `quote`: JSON-quoted when a comma, colon or line break would split it."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else value


def _hash_name(name: str) -> str:
    """A name as A1111 writes it in `Lora hashes` / `TI hashes`: without , and :."""
    return name.replace(":", "").replace(",", "")


def job_infotext(job: Job, model: str, seed: int, model_hash, lora_info, fields) -> str:
    """One image's A1111 infotext: the job's prompts and settings, its own seed, and `fields`
    (the size and extras of what ran: the engine's `_infotext_fields`)."""
    return a1111_infotext(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        steps=job.steps,
        sampler=job.scheduler,
        cfg_scale=job.guidance_scale,
        seed=seed,
        model=model,
        model_hash=model_hash,
        loras=lora_info,
        **fields,
    )


def check_fits_a_jpeg(job: Job, model: str, loras, infotext_fields: dict[str, Any]) -> None:
    """A jpeg's infotext goes into a 64 KiB EXIF segment, as UTF-16: a job whose infotext would
    not fit is refused before it runs (saving the image would fail after it)."""
    hash_ = "0" * 12  # the longest seed and hashes there can be
    lora_info = [(lora.name, lora.scale, hash_) for lora in loras]
    longest = job_infotext(job, model, 2**64 - 1, hash_, lora_info, infotext_fields)
    size = len(a1111_exif(longest))
    if size > JPEG_MAX_EXIF_BYTES:
        raise InvalidInput(
            f"its metadata, the prompts in UTF-16, is {size} bytes: over a jpeg's 64 KiB EXIF",
            field="output_format",
            accepted="png or webp, strip_metadata, or shorter prompts",
        )


def public_inputs(job: Job) -> dict[str, Any]:
    """The job's inputs for the sidecar: no image data, and URLs without their query strings
    (signatures) or user:password."""
    inputs = job.model_dump(exclude_none=True)
    for name in ("image", "mask"):
        value = inputs.get(name)
        if not value:
            continue
        if value[:8].lower().startswith(("https://", "http://", "s3://")):
            parts = urlsplit(value)
            host = parts.netloc.rpartition("@")[2]  # without user:password@
            inputs[name] = urlunsplit((parts.scheme, host, parts.path, "", ""))
        else:
            inputs[name] = f"<inline image, {len(value)} characters>"
    return inputs


# -- delivery ------------------------------------------------------------------------------------


def s3_client(
    settings: Settings,
    attempts: int = UPLOAD_ATTEMPTS,
    connect_timeout: float = 5,
    read_timeout: float = 30,
):
    """A boto3 S3 client for the configured endpoint and credentials, retrying transient errors
    (5xx, throttling, dropped connections) `attempts` times in all. botocore's "legacy" mode:
    its "standard" mode draws retries from a budget that only successes refill, so a few
    failed jobs during an outage left a worker that (kept for its life) never retried again."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=settings.bucket_endpoint_url,
        aws_access_key_id=settings.bucket_access_key_id,
        aws_secret_access_key=settings.bucket_secret_access_key,
        region_name=settings.bucket_region,
        config=Config(
            retries={"total_max_attempts": attempts, "mode": "legacy"},
            s3={"addressing_style": "path" if settings.bucket_path_style else "auto"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            signature_version="s3v4",
        ),
    )


class Storage:
    """An S3-compatible bucket reached through boto3, configured from the environment."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket_name
        self.client = s3_client(settings)

    def key(self, job_id: str, name: str) -> str:
        prefix = self.settings.bucket_prefix.strip("/")
        return f"{prefix}/{job_id}/{name}" if prefix else f"{job_id}/{name}"

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload and confirm: S3 checks the Content-MD5 and refuses a body that doesn't match.

        The ETag is compared too where it is the object's MD5; with SSE-KMS or SSE-C
        encryption it is not (AWS documents this), and then the Content-MD5 check stands alone.
        """
        digest = hashlib.md5(data).digest()  # noqa: S324 - integrity check, not security
        response = self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            ContentMD5=base64.b64encode(digest).decode("ascii"),
        )
        encrypted = str(response.get("ServerSideEncryption", "")).startswith(
            "aws:kms"
        ) or response.get("SSECustomerAlgorithm")
        etag = str(response.get("ETag", "")).strip('"')
        if not encrypted and len(etag) == 32 and "-" not in etag and etag != digest.hex():
            raise UploadFailed(
                f"the bucket stored different bytes for {key}",
                field="destination",
                accepted="a bucket (and any proxy before it) that stores the bytes it is sent",
            )

    def delete_quietly(self, keys: list[str]) -> int:
        """Delete `keys` at once, logging (not raising) what fails: cleanup after a failed
        batch, which may have failed because the bucket is unreachable. Returns how many of
        them could not be deleted."""

        def delete(key: str) -> bool:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
                return True
            except Exception as error:
                log.warning(
                    "could not delete %s after a failed upload (%s)", key, type(error).__name__
                )
                return False

        with ThreadPoolExecutor(max_workers=min(8, len(keys)) or 1) as pool:
            return list(pool.map(delete, keys)).count(False)

    def url(self, key: str) -> str:
        """A public URL when BUCKET_PUBLIC_URL is set, else a presigned GET."""
        if self.settings.bucket_public_url:
            # the key as a URL path: a prefix with a space, # or ? must not end the path
            return f"{self.settings.bucket_public_url.rstrip('/')}/{quote(key, safe='/~')}"
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": key},
            ExpiresIn=self.settings.bucket_presign_ttl,
        )


NO_BUCKET_ADVICE = (
    "a bucket on the worker (BUCKET_ENDPOINT_URL, BUCKET_NAME, BUCKET_ACCESS_KEY_ID, "
    "BUCKET_SECRET_ACCESS_KEY) to get URLs"
)


def check_destination(destination: str, storage: Storage | None) -> None:
    """Refuse `s3` on a worker without a bucket (the engine asks before a job runs)."""
    if destination == "s3" and storage is None:
        raise InvalidInput(
            "no bucket is configured on this worker",
            field="destination",
            accepted="base64 or auto, or configure BUCKET_ENDPOINT_URL and BUCKET_NAME",
        )


def deliver(
    images: list[EncodedImage],
    *,
    destination: str,
    job_id: str,
    storage: Storage | None,
    inline_limit: int | None,
    sidecar: dict[str, Any] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> tuple[list[ImageResult], list[str]]:
    """Deliver encoded images to S3 or inline; returns (results, warnings). A job cancelled
    while its images upload fails as cancelled, and they are deleted: nobody will get the URLs."""
    check_destination(destination, storage)
    unwritten = (
        ["sidecar not written: job.json goes beside images in the bucket, and these are inline"]
        if sidecar is not None
        else []
    )
    if destination == "base64" or storage is None:
        advice = NO_BUCKET_ADVICE if storage is None else "destination s3 or auto to get URLs"
        return _inline(images, inline_limit, advice), unwritten
    try:
        return _upload(images, storage, job_id, sidecar, cancelled)
    except UploadFailed as error:
        if destination == "s3":
            raise
        log.warning("job %s: upload failed, falling back to base64: %s", job_id, error.message)
        try:
            results = _inline(images, inline_limit, "")
        except OutputTooLarge as too_large:
            raise UploadFailed(
                f"{error.message}, and inline the images are too large: {too_large.message}",
                field="destination",
                accepted="a reachable bucket with write access, or fewer or smaller images",
            ) from None
        warning = f"upload to the bucket failed ({error.message}); images are inline base64 instead"
        return results, [warning, *unwritten]


def _inline(images: list[EncodedImage], inline_limit: int | None, advice: str) -> list[ImageResult]:
    results = [
        _result(encoded) if encoded.withheld else _result(encoded, image=encoded.data_uri())
        for encoded in images
    ]
    size = sum(len(r.image or "") for r in results)
    if inline_limit is not None and size > inline_limit:
        one = len(results) == 1
        raise OutputTooLarge(
            f"{'the image is' if one else f'the {len(results)} images are'} {size} bytes as "
            f"base64, over the {inline_limit}-byte reply limit",
            field="num_images",
            accepted=("a smaller image" if one else "fewer or smaller images")
            + ", jpeg/webp output"
            + (f", or {advice}" if advice else ""),
        )
    return results


def _upload(
    images: list[EncodedImage],
    storage: Storage,
    job_id: str,
    sidecar: dict[str, Any] | None,
    cancelled: Callable[[], bool],
) -> tuple[list[ImageResult], list[str]]:
    """Upload the batch in parallel; every image must be confirmed or the whole batch fails,
    and then the images it did upload are deleted (best effort): a failed job leaves none.
    A sidecar that cannot be written is a warning: the images are delivered."""
    delivered = [image for image in images if not image.withheld]
    keys = [storage.key(job_id, f"{i.index}-{i.seed}.{i.format}") for i in delivered]

    def put(pair: tuple[EncodedImage, str]) -> None:
        image, key = pair
        try:
            storage.put(key, image.data, image.mime_type)
        except UploadFailed:
            raise
        except Exception as error:  # botocore's, after its retries of transient errors
            raise UploadFailed(
                f"image {image.index} could not be uploaded ({_describe(error)})",
                field="destination",
                accepted="a reachable bucket with write access",
            ) from None

    try:
        with ThreadPoolExecutor(max_workers=min(8, len(delivered)) or 1) as pool:
            list(pool.map(put, zip(delivered, keys, strict=True)))
    except UploadFailed as error:
        # every key, not only those S3 confirmed: a PUT whose reply was lost may be stored
        left = storage.delete_quietly(keys)
        if left:  # the client should know that the bucket may still hold some of them
            error.message += f"; {left} of the batch's {len(keys)} keys could not be deleted"
        raise
    if cancelled():
        storage.delete_quietly(keys)
        raise Cancelled("the job was cancelled; its uploaded images were deleted")
    urls = {
        image.index: _result(image, url=storage.url(key), bucket=storage.bucket, key=key)
        for image, key in zip(delivered, keys, strict=True)
    }
    results = [urls.get(image.index) or _result(image) for image in images]
    warnings = []
    if sidecar is not None:
        sidecar = {
            **sidecar,
            "images": [{"key": r.key, "seed": r.seed, "nsfw": r.nsfw} for r in results],
        }
        body = json.dumps(sidecar, indent=2).encode()
        keys.append(storage.key(job_id, "job.json"))  # stored, perhaps, though its reply is lost
        try:
            storage.put(keys[-1], body, "application/json")
        except Exception as error:
            log.warning("job %s: sidecar upload failed (%s)", job_id, _describe(error))
            warnings.append(f"sidecar not written: its upload failed ({_describe(error)})")
        if cancelled():  # while the sidecar uploaded
            storage.delete_quietly(keys)
            raise Cancelled("the job was cancelled; its uploaded images were deleted")
    return results, warnings


def _describe(error: Exception) -> str:
    """An upload error for a reply: its type, S3's error code and botocore's attempts, when
    known (errors that cannot succeed, such as AccessDenied, are not retried)."""
    from botocore.exceptions import ConnectionError as EndpointUnreachable
    from botocore.exceptions import HTTPClientError

    response = getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
    text = f"{type(error).__name__}: {code}" if code else type(error).__name__
    if retries:
        return f"{text}, after {retries + 1} attempts"
    if isinstance(error, EndpointUnreachable | HTTPClientError):  # retried, no reply to say so
        return f"{text}, after {UPLOAD_ATTEMPTS} attempts"
    return text


def _result(encoded: EncodedImage, **delivery: Any) -> ImageResult:
    return ImageResult(
        index=encoded.index,
        seed=encoded.seed,
        width=encoded.width,
        height=encoded.height,
        format=encoded.format,
        bytes=len(encoded.data),
        nsfw=encoded.nsfw,
        withheld=True if encoded.withheld else None,
        **delivery,
    )
