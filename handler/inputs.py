"""Input images: data URIs, raw base64 and URLs, fetched without reaching private addresses.

A URL is resolved once, every address it resolves to must be public, and the connection goes to
that checked address (so a second DNS answer cannot swap in a private one). Redirects are
followed by hand and each hop is checked the same way. Size, time (one deadline for the whole
fetch, every hop, the TLS handshake and the headers included) and pixel counts are capped.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from PIL import Image, ImageChops, ImageCms, ImageOps

from handler.errors import InputFetchFailed, InvalidInput, shown
from handler.settings import Settings

MAX_REDIRECTS = 3
SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
URL_PATH_KEPT = "/?#[]@!$&'()*+,;=:%~"  # what percent-encoding leaves: reserved characters, %XX
URL_SAFE_TO_STANDARD = str.maketrans("-_", "+/")
IMAGE_FORMATS = "png, jpeg or webp (or another format Pillow reads: gif, bmp, tiff, ...)"


def load_image(value: str, field: str, settings: Settings, as_mask: bool = False) -> Image.Image:
    """Decode an image given as a data URI, raw base64, an https URL or s3://bucket/key, as RGB
    flattened onto white (or, with `as_mask`, as the L mask it stands for)."""
    value = value.strip()
    head = value[:8].lower()  # schemes are case-insensitive (RFC 3986)
    if head.startswith(("https://", "http://")):
        data = fetch_url(value, field, settings)
    elif head.startswith("data:"):
        header, _, payload = value.partition(",")
        if ";base64" not in header.lower():
            raise InvalidInput(
                "data URIs must be base64-encoded",
                field=field,
                accepted="data:image/png;base64,...",
            )
        data = _b64decode(payload, field)
    elif head.startswith("s3://"):
        data = fetch_s3(value, field, settings)
    elif "://" in value:
        raise InvalidInput(
            f"URLs of the scheme {shown(value.split('://', 1)[0])} are not accepted",
            field=field,
            accepted="https URLs, s3://bucket/key, data URIs or raw base64",
        )
    else:
        data = _b64decode(value, field)
    return decode_image(data, field, settings, as_mask)


def decode_image(data: bytes, field: str, settings: Settings, as_mask: bool = False) -> Image.Image:
    """Open image bytes, refusing decompression bombs before any pixel is decoded; turned
    upright by their EXIF orientation, as viewers show them."""
    if Image.MAX_IMAGE_PIXELS and Image.MAX_IMAGE_PIXELS < 4 * settings.max_input_pixels:
        # Pillow's own bomb limit (an error at twice it) must not refuse what is accepted: any
        # image up to MAX_INPUT_PIXELS, and a JPEG up to 8 times it, decoded at a fraction of
        # its size (below). It is global: only ever raised here, never lowered.
        Image.MAX_IMAGE_PIXELS = 4 * settings.max_input_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _over_pixel_cap("has more pixels than the input cap", field, settings) from None
    except Exception:
        raise InvalidInput("is not a readable image", field=field, accepted=IMAGE_FORMATS) from None
    pixels = image.width * image.height
    if (
        image.format == "JPEG"
        and settings.max_input_pixels < pixels <= 8 * settings.max_input_pixels
    ):
        # A camera photo (24-100 MP): decoded at 1/2, 1/4 or 1/8 of its size, as large as fits,
        # which the JPEG format does cheaply. The job scales it down to its size anyway.
        scale = next(
            (
                s
                for s in (2, 4, 8)
                if (image.width // s) * (image.height // s) <= settings.max_input_pixels
            ),
            8,
        )
        image.draft(image.mode, (image.width // scale, image.height // scale))
    if image.width * image.height > settings.max_input_pixels:
        raise _over_pixel_cap(
            f"is {image.width}x{image.height} pixels, over the input cap", field, settings
        )
    try:
        image = _as_8_bit(ImageOps.exif_transpose(image))
        if as_mask:
            image = _mask_channel(image)  # a mask is data: its colour profile does not apply
        else:
            image = _on_white(_in_srgb(image))
        image.info.clear()  # an input's ICC profile or comments never reach an output file
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _over_pixel_cap("has a frame or tile over the input cap", field, settings) from None
    except Exception:
        raise InvalidInput("could not be decoded", field=field, accepted=IMAGE_FORMATS) from None


def _over_pixel_cap(message: str, field: str, settings: Settings) -> InvalidInput:
    return InvalidInput(
        message,
        field=field,
        accepted=f"images up to {settings.max_input_pixels} pixels (JPEGs up to "
        f"{8 * settings.max_input_pixels}, read at a fraction of their size)",
    )


def _as_8_bit(image: Image.Image) -> Image.Image:
    """Greyscale of more than 8 bits as L. Pillow's convert() clips it to 255 (near white)
    instead of scaling it: 16-bit modes (and 32-bit integer I, which Pillow also opens 16-bit
    PGMs as) are scaled by 1/257, floating point (F, as in a float TIFF) from 0-1."""
    if image.mode in (*SIXTEEN_BIT_GREY_MODES, "I"):
        scale = 1 / 257
    elif image.mode == "F":
        scale = 255
    else:
        return image
    return image.convert("F").point(lambda value: value * scale).convert("L")


# 512 colours (8 levels a channel) that show whether a profile is sRGB's in effect: its
# colorants and its tone curve
_LEVELS = (0, 36, 73, 109, 146, 182, 219, 255)
_PROBE = Image.frombytes(
    "RGB", (64, 8), bytes(v for r in _LEVELS for g in _LEVELS for b in _LEVELS for v in (r, g, b))
)


def _in_srgb(image: Image.Image) -> Image.Image:
    """An image whose embedded colour profile is not sRGB (a phone's Display P3, Adobe RGB, a
    printer's CMYK) converted to sRGB, the colours a browser shows: the model works in sRGB and
    outputs carry no profile. A profile that maps colours to within one level of sRGB's, one
    that does not fit the pixels, or one that cannot be read leaves the pixels as they are."""
    icc = image.info.get("icc_profile")
    if not icc:
        return image
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if space == "RGB" and image.mode in ("P", "RGB") and _has_transparency(image):
            image = image.convert("RGBA")  # a palette's or tRNS's clear colour, kept as alpha
        elif space == "RGB" and image.mode == "P":
            image = image.convert("RGB")
        if (space, image.mode) not in (("RGB", "RGB"), ("RGB", "RGBA"), ("CMYK", "CMYK")):
            return image
        intent = ImageCms.Intent.RELATIVE_COLORIMETRIC
        srgb = ImageCms.createProfile("sRGB")
        if space == "RGB":
            probe = ImageCms.profileToProfile(_PROBE, profile, srgb, renderingIntent=intent)
            difference = ImageChops.difference(probe, _PROBE).getextrema()
            if max(high for _, high in difference) <= 1:
                return image
        mode = "RGBA" if image.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(
            image, profile, srgb, renderingIntent=intent, outputMode=mode
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return image


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _on_white(image: Image.Image) -> Image.Image:
    """An image as RGB, flattened onto white where it is transparent, as A1111 flattens
    img2img inputs (its img2img_background_color): the colour under a clear pixel is arbitrary,
    often black."""
    if not _has_transparency(image):
        return image.convert("RGB")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def _mask_channel(image: Image.Image) -> Image.Image:
    """A mask as L: its alpha when part of it is clear (as A1111 reads one drawn on a clear
    layer), rounded at half opacity as A1111's default `mask_round` does; else its brightness.
    Unlike A1111, a mask opaque all over but for a few pixels (an editor's anti-aliased edge)
    is read by its brightness: read by its alpha, it would repaint everything."""
    if _has_transparency(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] <= 128:
            return alpha.point(lambda value: 255 if value > 128 else 0)
    return image.convert("L")


def _b64decode(payload: str, field: str) -> bytes:
    accepted = "https URLs, s3://bucket/key, data URIs or raw base64"
    # line breaks (MIME-style base64, 76 characters a line) and spaces are not data
    text = "".join(payload.split())
    if not text:
        raise InvalidInput("holds no image data (it is empty)", field=field, accepted=accepted)
    if "+" not in text and "/" not in text:  # one alphabet or the other, never both
        text = text.translate(URL_SAFE_TO_STANDARD)  # the URL-safe alphabet's - and _
    text += "=" * (-len(text) % 4)  # the padding some encoders leave out
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(
            "is neither a URL nor valid base64", field=field, accepted=accepted
        ) from None


def fetch_s3(url: str, field: str, settings: Settings) -> bytes:
    """Read s3://bucket/key with the worker's configured bucket credentials, size-capped."""
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket or not key:
        raise InvalidInput("is not an s3://bucket/key URL", field=field, accepted="s3://bucket/key")
    if not (settings.bucket_access_key_id or settings.bucket_endpoint_url):
        raise InvalidInput(
            "s3:// inputs need the worker's bucket credentials",
            field=field,
            accepted="https URLs or data URIs, or configure BUCKET_* on the worker",
        )
    readable = [b for b in (settings.bucket_name, *settings.input_buckets) if b]
    if bucket not in readable:
        # the credentials may reach more buckets than a client should read through a job
        raise InvalidInput(
            f"s3:// inputs are read from the worker's own buckets, not {shown(bucket)}",
            field=field,
            accepted=", ".join(readable) + " (BUCKET_NAME, INPUT_BUCKETS)"
            if readable
            else "none: set BUCKET_NAME or INPUT_BUCKETS",
        )
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectTimeoutError,
        ReadTimeoutError,
    )

    deadline = time.monotonic() + settings.input_timeout_s
    try:
        response = _input_s3_client(settings).get_object(Bucket=bucket, Key=key)
        if response.get("ContentLength", 0) > settings.max_input_bytes:
            raise InvalidInput(
                f"the object is {response['ContentLength']} bytes, over the input cap",
                field=field,
                accepted=f"images up to {settings.max_input_bytes} bytes",
            )

        def check_time() -> None:
            if time.monotonic() > deadline:
                raise _timed_out(field, settings, accepted=_PROMPT_BUCKET)

        return _read_capped(response["Body"].read, "the object", field, settings, check_time)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "error")
        raise InputFetchFailed(
            f"the bucket answered {code}",
            field=field,
            accepted="an existing object the worker's credentials can read",
        ) from None
    except (ConnectTimeoutError, ReadTimeoutError):
        raise _timed_out(field, settings, accepted=_PROMPT_BUCKET) from None
    except BotoCoreError as error:
        raise InputFetchFailed(
            f"reading the object failed ({type(error).__name__})",
            field=field,
            accepted="a reachable bucket",
        ) from None


_PROMPT_BUCKET = "a bucket that serves the object promptly"


def _read_capped(
    read: Callable[[int], bytes],
    what: str,
    field: str,
    settings: Settings,
    after_each_chunk: Callable[[], None] | None = None,
) -> bytes:
    """A body read in chunks, refused as soon as it passes MAX_INPUT_BYTES."""
    chunks, received = [], 0
    while chunk := read(64 * 1024):
        received += len(chunk)
        if received > settings.max_input_bytes:
            raise InvalidInput(
                f"{what} is over the input size cap",
                field=field,
                accepted=f"images up to {settings.max_input_bytes} bytes",
            )
        if after_each_chunk is not None:
            after_each_chunk()
        chunks.append(chunk)
    return b"".join(chunks)


def _input_s3_client(settings: Settings):
    """The upload client (handler.outputs.s3_client), but one attempt, and half of
    INPUT_TIMEOUT_S to connect and half to answer: with the upload client's retries and
    timeouts, an endpoint that never answered held a job 2 minutes."""
    from handler.outputs import s3_client

    half = settings.input_timeout_s / 2
    return s3_client(settings, attempts=1, connect_timeout=half, read_timeout=half)


def fetch_url(url: str, field: str, settings: Settings) -> bytes:
    """GET `url`, following up to 3 redirects, with every hop's address checked, all within
    INPUT_TIMEOUT_S (a server that trickles bytes cannot hold the job)."""
    deadline = time.monotonic() + settings.input_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urlsplit(url)
            port = parts.port  # raises for a port out of range or not a number
        except ValueError:  # also an unclosed "[" of an IPv6 host; the URL is not quoted
            raise InvalidInput(
                "the URL is malformed", field=field, accepted="https://host[:port]/path"
            ) from None
        if parts.scheme != "https" and not (parts.scheme == "http" and settings.allow_http_inputs):
            raise InvalidInput(
                f"{parts.scheme[:20]}:// URLs are not accepted",  # a redirect's: cut short
                field=field,
                accepted="https URLs"
                + (" (http needs ALLOW_HTTP_INPUTS=1)" if parts.scheme == "http" else ""),
            )
        if not parts.hostname:
            raise InvalidInput("the URL has no host", field=field, accepted="https://host/path")
        address = _public_address(parts.hostname, port, field, settings, deadline)
        status, location, body = _get(parts, address, field, settings, deadline)
        if status in (301, 302, 303, 307, 308) and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise InputFetchFailed(
                f"the server answered HTTP {status}",
                field=field,
                accepted="a URL that answers 200 with an image",
            )
        return body
    raise InputFetchFailed(
        f"more than {MAX_REDIRECTS} redirects",
        field=field,
        accepted=f"URLs with at most {MAX_REDIRECTS} redirects",
    )


def _public_address(
    host: str, port: int | None, field: str, settings: Settings, deadline: float
) -> str:
    """Resolve `host` and return an address, refusing private, loopback and link-local ones."""
    infos = _resolve(host, port or 443, field, settings, deadline)
    addresses = [info[4][0] for info in infos]
    if not settings.allow_private_inputs:
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if not all(_is_public(a) for a in _with_embedded_ipv4(ip)):
                raise InvalidInput(
                    f"{host} resolves to a non-public address ({ip})",
                    field=field,
                    accepted="URLs on public hosts",
                )
    return addresses[0]


def _resolve(host: str, port: int, field: str, settings: Settings, deadline: float) -> list:
    """getaddrinfo within the fetch's deadline. The lookup itself cannot be interrupted (a slow
    resolver retries for up to about 30 s), so it runs in a daemon thread that is left to
    finish on its own when the deadline passes first."""
    found: dict[str, Any] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:  # UnicodeError: a name IDNA cannot encode
            found["error"] = error

    thread = threading.Thread(target=lookup, name="input-dns", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        raise _timed_out(field, settings)
    if "error" in found:
        raise InputFetchFailed(
            f"cannot resolve {host}", field=field, accepted="a resolvable host"
        ) from None
    return found["infos"]


# Addresses is_global calls global (depending on the Python version) that reach a cloud host's
# own services: 192.0.0.0/24 holds Oracle Cloud's legacy metadata address (192.0.0.192), and
# 168.63.129.16 is Azure's WireServer.
_HOST_SERVICES = (ipaddress.ip_network("192.0.0.0/24"), ipaddress.ip_network("168.63.129.16/32"))


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # is_global says True for the deprecated IPv6 site-local range (fec0::/10), which may
    # still route to a private network
    site_local = ip.version == 6 and ip.is_site_local
    host_service = any(ip in network for network in _HOST_SERVICES)
    return ip.is_global and not ip.is_multicast and not site_local and not host_service


# IPv6 prefixes whose last 32 bits are an IPv4 address a gateway may route to: NAT64 (RFC 6052,
# RFC 8215), IPv4-compatible (deprecated) and IPv4-translated (RFC 2765) forms.
_EMBEDDING_IPV4 = tuple(
    ipaddress.ip_network(prefix)
    for prefix in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)


def _with_embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list:
    """`ip`, and every IPv4 address that an IPv6 `ip` carries (mapped, 6to4, Teredo, NAT64,
    compatible, translated): each must be public."""
    if ip.version == 4:
        return [ip]
    embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
    if any(ip in network for network in _EMBEDDING_IPV4):
        embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return [ip, *(a for a in embedded if a is not None)]


class _DeadlineConnection(http.client.HTTPConnection):
    """HTTP to an already-checked address, cut off at an absolute deadline.

    A socket timeout restarts with every byte, so a server trickling its headers could hold a
    job for minutes: a timer shuts the socket down at the deadline instead (shutdown, unlike
    close, wakes a thread blocked reading it).
    """

    def __init__(self, host: str, address: str, port: int, deadline: float) -> None:
        super().__init__(host, port)
        self._address = address
        self._deadline = deadline
        self._timer: threading.Timer | None = None
        self._cutter: socket.socket | None = None
        self.expired = False

    def _open_socket(self) -> socket.socket:
        left = self._deadline - time.monotonic()
        if left <= 0:
            self.expired = True
            raise TimeoutError
        sock = socket.create_connection((self._address, self.port), left)
        self._cutter = sock.dup()  # the same connection, still open once TLS takes `sock` over
        self._timer = threading.Timer(self._deadline - time.monotonic(), self._cut)
        self._timer.daemon = True
        self._timer.start()
        return sock

    def _cut(self) -> None:
        self.expired = True
        try:
            self._cutter.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the server

    def connect(self) -> None:
        self.sock = self._open_socket()

    def disarm(self) -> None:
        """Stop the timer (not in close(): http.client closes the connection of a response
        that will close, before its body is read)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()  # so it never shuts down a closed (maybe reused) descriptor
            self._cutter.close()
            self._timer = self._cutter = None


class _DeadlineHTTPSConnection(_DeadlineConnection):
    """HTTPS to an already-checked address, with SNI and certificate checks for the hostname."""

    default_port = 443

    def connect(self) -> None:
        context = ssl.create_default_context()
        self.sock = context.wrap_socket(self._open_socket(), server_hostname=self.host)


def _get(
    parts, address: str, field: str, settings: Settings, deadline: float
) -> tuple[int, str | None, bytes]:
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    cls = _DeadlineHTTPSConnection if https else _DeadlineConnection
    connection = cls(parts.hostname, address, port, deadline)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    path = quote(path, safe=URL_PATH_KEPT)  # a browser sends `café` as `caf%C3%A9`
    response = None
    try:
        connection.request("GET", path, headers={"User-Agent": "sd-serverless-worker"})
        response = connection.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > settings.max_input_bytes:
            raise InvalidInput(
                f"the image is {declared} bytes, over the input cap",
                field=field,
                accepted=f"images up to {settings.max_input_bytes} bytes",
            )
        data = _read_capped(response.read1, "the image", field, settings)
        received = len(data)
        if connection.expired:
            raise _timed_out(field, settings)  # cut off: what arrived may look complete
        if declared and declared.isdigit() and received < int(declared):
            raise InputFetchFailed(
                f"the connection closed after {received} of {declared} bytes",
                field=field,
                accepted="a URL that serves the whole image",
            )
        return 200, None, data
    except (OSError, http.client.HTTPException) as error:
        if connection.expired or isinstance(error, TimeoutError):
            raise _timed_out(field, settings) from None
        raise InputFetchFailed(
            f"fetching the URL failed ({type(error).__name__})",
            field=field,
            accepted="a reachable https URL",
        ) from None
    finally:
        if response is not None:
            response.close()
        connection.close()
        connection.disarm()


def _timed_out(
    field: str, settings: Settings, accepted: str = "a URL that serves the image promptly"
) -> InputFetchFailed:
    return InputFetchFailed(
        f"the image did not arrive within INPUT_TIMEOUT_S ({settings.input_timeout_s:g} s)",
        field=field,
        accepted=accepted,
    )


def fit_image(
    image: Image.Image, width: int, height: int, mode: str, resample=Image.LANCZOS
) -> Image.Image:
    """Fit an image to width x height as A1111 does: just_resize (stretch), crop (scale to cover,
    centre crop) or fill (scale to fit, then stretch the edge rows/columns into the borders)."""
    if image.size == (width, height):
        return image
    if mode == "just_resize":
        return image.resize((width, height), resample=resample)
    ratio = width / height
    src_ratio = image.width / image.height
    cover = (mode == "crop") == (ratio > src_ratio)
    scaled_w = width if cover else round(height * src_ratio)
    scaled_h = round(width / src_ratio) if cover else height
    if mode == "crop":
        # Only the part that stays is resampled: scaled whole, a 4 x 1,000,000 image cropped
        # to 64 x 64 would first become 64 x 16,000,000 pixels (4 GB).
        scale_x, scale_y = scaled_w / image.width, scaled_h / image.height
        left, top = (scaled_w - width) // 2, (scaled_h - height) // 2
        box = (left / scale_x, top / scale_y, (left + width) / scale_x, (top + height) / scale_y)
        return image.resize((width, height), resample=resample, box=box)
    scaled = image.resize((max(1, scaled_w), max(1, scaled_h)), resample=resample)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - scaled.width) // 2, (height - scaled.height) // 2
    canvas.paste(scaled, (left, top))
    if mode == "fill":
        # stretch the first and last columns (rows) into the side (top, bottom) borders;
        # a border may be on one side only (an odd one-pixel difference)
        right = width - left - scaled.width
        bottom = height - top - scaled.height
        if left > 0:
            canvas.paste(
                scaled.crop((0, 0, 1, scaled.height)).resize((left, scaled.height)), (0, top)
            )
        if right > 0:
            edge = scaled.crop((scaled.width - 1, 0, scaled.width, scaled.height))
            canvas.paste(edge.resize((right, scaled.height)), (left + scaled.width, top))
        if top > 0:
            canvas.paste(
                scaled.crop((0, 0, scaled.width, 1)).resize((scaled.width, top)), (left, 0)
            )
        if bottom > 0:
            edge = scaled.crop((0, scaled.height - 1, scaled.width, scaled.height))
            canvas.paste(edge.resize((scaled.width, bottom)), (left, top + scaled.height))
    return canvas
