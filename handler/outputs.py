"""Image encoding and delivery (inline base64 here; S3 delivery builds on the same encoder)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from PIL import Image

MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# zlib level 1: see README "Encoding" for the measurement behind it.
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class EncodedImage:
    """One image as file bytes, with what the result reports about it."""

    index: int
    seed: int
    width: int
    height: int
    format: str
    data: bytes

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.format]

    def data_uri(self) -> str:
        return f"data:{self.mime_type};base64,{base64.b64encode(self.data).decode('ascii')}"


def encode_image(image: Image.Image, index: int, seed: int, fmt: str, quality: int) -> EncodedImage:
    """Encode a PIL image as png, jpeg or webp."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return EncodedImage(index, seed, image.width, image.height, fmt, buffer.getvalue())
