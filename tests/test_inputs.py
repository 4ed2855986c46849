"""Input images: decoding, and URL fetching that cannot reach private addresses."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from handler.errors import InputFetchFailed, InvalidInput
from handler.inputs import load_image


def png_bytes(size=(16, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def image_server():
    """A local HTTP server: /img.png, /redirect (to /img.png), /loop, /missing."""
    body = png_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/img.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/caf%C3%A9.png?name=caf%C3%A9":  # as a browser sends it
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
            elif self.path.startswith("/hop/"):  # /hop/N: N redirects, then the image
                left = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", f"/hop/{left - 1}" if left else "/img.png")
                self.end_headers()
            elif self.path == "/to-metadata":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                self.end_headers()
            elif self.path == "/to-private":
                self.send_response(301)
                self.send_header("Location", "http://10.0.0.1/x.png")
                self.end_headers()
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
            elif self.path == "/trickle":  # one byte every 0.3 s: never finishes in time
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.3)
                except OSError:
                    pass  # the worker gave up, as it should
            elif self.path == "/truncated":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
            elif self.path == "/loop":
                self.send_response(302)
                self.send_header("Location", "/loop")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def local_fetch(settings):
    """Settings that allow http and private addresses: for these local-server tests only."""
    return replace(settings, allow_http_inputs=True, allow_private_inputs=True)


def test_data_uri_and_raw_base64(settings):
    encoded = base64.b64encode(png_bytes()).decode()
    assert load_image(f"data:image/png;base64,{encoded}", "image", settings).size == (16, 8)
    assert load_image(encoded, "image", settings).size == (16, 8)


def test_base64_with_line_breaks_as_mime_writes_it(settings):
    wrapped = base64.encodebytes(png_bytes() * 8).decode()  # a newline every 76 characters
    assert "\n" in wrapped.strip()
    assert load_image(wrapped, "image", settings).size == (16, 8)
    assert load_image("data:image/png;base64," + wrapped, "image", settings).size == (16, 8)


def test_fetches_from_a_local_server_when_allowed(image_server, local_fetch):
    assert load_image(f"{image_server}/img.png", "image", local_fetch).size == (16, 8)
    assert load_image(f"{image_server}/redirect", "image", local_fetch).size == (16, 8)
    assert load_image(f"{image_server}/café.png?name=café", "image", local_fetch).size == (16, 8)


def test_private_addresses_are_refused(image_server, settings):
    allow_http = replace(settings, allow_http_inputs=True)
    with pytest.raises(InvalidInput) as info:
        load_image(f"{image_server}/img.png", "image", allow_http)
    assert "non-public address" in info.value.message and info.value.field == "image"
    for url in (
        "https://127.0.0.1/x.png",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/x",
        "https://10.0.0.1/x",
        "https://192.168.1.1/x",
        "https://localhost/x",
        "https://192.0.0.192/opc/v1/instance/",  # Oracle Cloud's legacy metadata address
        "https://168.63.129.16/machine",  # Azure's WireServer
    ):
        with pytest.raises(InvalidInput):
            load_image(url, "image", settings)


@pytest.mark.parametrize(
    "address",
    [
        "::127.0.0.1",  # IPv4-compatible
        "::ffff:0:127.0.0.1",  # IPv4-translated
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
    ],
)
def test_ipv6_forms_that_carry_a_private_ipv4_address_are_refused(settings, address):
    with pytest.raises(InvalidInput) as info:
        load_image(f"https://[{address}]/x.png", "image", settings)
    assert "non-public address" in info.value.message


def test_http_needs_a_setting(image_server, settings):
    with pytest.raises(InvalidInput) as info:
        load_image(f"{image_server}/img.png", "image", settings)
    assert "ALLOW_HTTP_INPUTS" in str(info.value)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://x"])
def test_other_schemes_are_refused(settings, url):
    with pytest.raises(InvalidInput):
        load_image(url, "image", settings)


def test_a_refused_scheme_is_quoted_short(settings):
    """What comes before :// is the client's text (it may hold a token): cut, as errors cut
    every value they quote."""
    with pytest.raises(InvalidInput) as info:
        load_image("gopher" + "A" * 300 + "://x", "image", settings)
    assert "A" * 41 not in info.value.message and "characters" in info.value.message


def test_cropping_an_extreme_aspect_ratio_resamples_only_what_stays(monkeypatch):
    """Scaled whole to cover 64 x 64 first, a 4 x 1,048,576 strip became 64 x 16,777,216
    pixels (6 GB of peak memory in the audit); now only the crop is resampled."""
    from handler.inputs import fit_image

    sizes, resize = [], Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    strip = Image.new("RGB", (4, 1_048_576), (10, 200, 30))
    cropped = fit_image(strip, 64, 64, "crop")
    assert sizes == [(64, 64)] and cropped.size == (64, 64)
    assert cropped.getpixel((32, 32)) == (10, 200, 30)


def test_fetch_failures(image_server, local_fetch):
    with pytest.raises(InputFetchFailed, match="HTTP 404") as info:
        load_image(f"{image_server}/missing", "image", local_fetch)
    assert str(info.value).startswith("input_fetch_failed: image: ")  # the stable code
    with pytest.raises(InputFetchFailed, match="redirects"):
        load_image(f"{image_server}/loop", "image", local_fetch)


def test_three_redirects_are_followed_and_a_fourth_is_not(image_server, local_fetch):
    assert load_image(f"{image_server}/hop/2", "image", local_fetch).size == (16, 8)  # 3
    with pytest.raises(InputFetchFailed, match="more than 3 redirects"):
        load_image(f"{image_server}/hop/3", "image", local_fetch)


def test_a_redirect_to_a_private_address_is_refused(image_server, settings, monkeypatch):
    """Every hop's address is checked: the first server is public (here the local test server,
    counted as public), the address it redirects to is not."""
    import ipaddress

    from handler import inputs

    local = ipaddress.ip_address("127.0.0.1")
    is_public = inputs._is_public
    monkeypatch.setattr(inputs, "_is_public", lambda ip: ip == local or is_public(ip))
    allow_http = replace(settings, allow_http_inputs=True)
    assert load_image(f"{image_server}/redirect", "image", allow_http).size == (16, 8)
    for path, address in (("/to-metadata", "169.254.169.254"), ("/to-private", "10.0.0.1")):
        with pytest.raises(InvalidInput, match="non-public address") as info:
            load_image(f"{image_server}{path}", "image", allow_http)
        assert address in info.value.message and info.value.field == "image"


def test_caps(image_server, local_fetch):
    with pytest.raises(InvalidInput, match="size cap|bytes"):
        load_image(f"{image_server}/img.png", "image", replace(local_fetch, max_input_bytes=10))
    with pytest.raises(InvalidInput, match="pixels"):
        load_image(f"{image_server}/img.png", "image", replace(local_fetch, max_input_pixels=100))


def test_garbage_is_invalid(settings):
    with pytest.raises(InvalidInput):
        load_image("not base64 at all!", "image", settings)
    with pytest.raises(InvalidInput):
        load_image(base64.b64encode(b"hello").decode(), "image", settings)


def test_the_timeout_bounds_the_whole_fetch(image_server, local_fetch):
    settings = replace(local_fetch, input_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(InputFetchFailed, match="INPUT_TIMEOUT_S") as info:
        load_image(f"{image_server}/trickle", "image", settings)
    assert time.monotonic() - started < 2.5 and info.value.field == "image"


def test_a_truncated_download_is_a_fetch_failure(image_server, local_fetch):
    with pytest.raises(InputFetchFailed, match="closed after"):
        load_image(f"{image_server}/truncated", "mask", local_fetch)


def test_hostnames_resolving_to_private_addresses_are_refused(settings, monkeypatch):
    import socket

    from handler import inputs

    monkeypatch.setattr(inputs, "_get", lambda *args: pytest.fail("a connection was made"))
    public = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))
    for address in ("10.1.2.3", "169.254.169.254", "127.0.0.1", "fd00::1"):
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        # a private address anywhere in the answer, not only first
        answer = [public, (family, socket.SOCK_STREAM, 6, "", (address, 443))]
        monkeypatch.setattr(socket, "getaddrinfo", lambda *args, a=answer, **kwargs: a)
        with pytest.raises(InvalidInput, match="non-public address") as info:
            load_image("https://images.example.com/cat.png", "image", settings)
        assert info.value.field == "image"


def test_fill_covers_a_one_pixel_border_on_one_side():
    from handler.inputs import fit_image

    source = Image.new("RGB", (64, 63), (200, 30, 30))
    filled = np.asarray(fit_image(source, 64, 64, "fill"))
    assert (filled == (200, 30, 30)).all()  # the last row is stretched, not left black
    wide = np.asarray(fit_image(Image.new("RGB", (65, 64), (9, 9, 9)), 64, 64, "fill"))
    assert (wide == 9).all()


def _encoded(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_mask_drawn_on_a_transparent_layer_is_read_from_its_alpha(settings):
    drawn = Image.new("RGBA", (16, 16), (255, 255, 255, 0))  # white, clear everywhere
    drawn.paste((255, 255, 255, 255), (4, 4, 12, 12))  # the area to repaint, opaque
    mask = np.asarray(load_image(_encoded(drawn), "mask", settings, as_mask=True))
    assert mask[8, 8] == 255 and mask[0, 0] == 0 and (mask > 0).sum() == 64
    opaque = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (0, 0, 8, 16))
    mask = np.asarray(load_image(_encoded(opaque), "mask", settings, as_mask=True))
    assert (mask[:, :8] == 255).all() and (mask[:, 8:] == 0).all()  # opaque: by brightness


def test_a_half_transparent_mask_stroke_is_rounded_as_a1111s_mask_round_does(settings):
    drawn = Image.new("RGBA", (16, 16), (255, 255, 255, 0))
    drawn.paste((255, 255, 255, 100), (0, 0, 8, 16))  # a faint stroke: kept, as in A1111
    drawn.paste((255, 255, 255, 200), (8, 0, 16, 16))  # a firm one: repainted
    mask = np.asarray(load_image(_encoded(drawn), "mask", settings, as_mask=True))
    assert (mask[:, :8] == 0).all() and (mask[:, 8:] == 255).all()
    grey = Image.new("L", (16, 16), 100)  # an opaque grey mask keeps its level, as in A1111
    assert (np.asarray(load_image(_encoded(grey), "mask", settings, as_mask=True)) == 100).all()


def test_images_are_turned_upright_by_their_exif_orientation(settings):
    photo = Image.new("RGB", (96, 64), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    upright = load_image(_encoded(photo, "JPEG", exif=exif), "image", settings)
    assert upright.size == (64, 96)


@pytest.fixture()
def trickle_server():
    """A local TCP server that answers every connection with `payload`, one byte every 0.2 s
    (each byte arrives well within any socket timeout); yields a function that starts it."""
    stop = threading.Event()
    listeners = []

    def serve(listener, payload: bytes) -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                for byte in payload:
                    if stop.wait(0.2):
                        return
                    try:
                        connection.sendall(bytes([byte]))
                    except OSError:
                        break  # the worker gave up, as it should

    def start(payload: bytes) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)
        threading.Thread(target=serve, args=(listener, payload), daemon=True).start()
        return listener.getsockname()[1]

    yield start
    stop.set()
    for listener in listeners:
        listener.close()


def test_trickled_headers_cannot_hold_the_job_past_the_timeout(trickle_server, local_fetch):
    port = trickle_server(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n")
    settings = replace(local_fetch, input_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(InputFetchFailed, match="INPUT_TIMEOUT_S") as info:
        load_image(f"http://127.0.0.1:{port}/img.png", "image", settings)
    assert time.monotonic() - started < 3 and info.value.field == "image"


def test_a_hung_dns_lookup_cannot_hold_the_job_past_the_timeout(monkeypatch, settings):
    """getaddrinfo cannot be interrupted; the fetch gives up on it at the deadline."""
    release, asked = threading.Event(), []

    def hung_getaddrinfo(host, *args, **kwargs):
        asked.append(host)
        release.wait(30)  # a resolver that does not answer (nothing is ever sent)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hung_getaddrinfo)
    try:
        with pytest.raises(InputFetchFailed, match="INPUT_TIMEOUT_S") as info:
            load_image(
                "https://images.example/a.png", "mask", replace(settings, input_timeout_s=0.5)
            )
        assert info.value.field == "mask" and asked == ["images.example"]
        assert not release.is_set()  # it gave up while the lookup still hung
    finally:
        release.set()


def test_an_unresolvable_host_is_a_fetch_failure(monkeypatch, settings):
    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(InputFetchFailed, match="cannot resolve images.example") as info:
        load_image("https://images.example/a.png", "image", settings)
    assert info.value.field == "image" and info.value.accepted == "a resolvable host"


@pytest.mark.parametrize(
    "url", ["https://example.com:99999/a.png?sig=SECRET", "https://[::1/a.png?sig=SECRET"]
)
def test_a_malformed_url_is_invalid_input_without_quoting_it(settings, url):
    with pytest.raises(InvalidInput, match="malformed") as info:
        load_image(url, "image", settings)
    assert info.value.field == "image" and "SECRET" not in str(info.value)


def test_a_host_name_dns_cannot_encode_is_a_fetch_failure(settings):
    # a label over 63 characters: getaddrinfo raises UnicodeError (IDNA), not gaierror
    with pytest.raises(InputFetchFailed, match="cannot resolve") as info:
        load_image("https://" + "a" * 64 + ".example/a.png", "image", settings)
    assert info.value.field == "image"


def test_a_trickled_tls_handshake_cannot_hold_the_job_past_the_timeout(trickle_server, local_fetch):
    # a TLS record header announcing 16 KB of handshake, then its bytes, slowly
    port = trickle_server(b"\x16\x03\x03\x40\x00" + b"\x00" * 200)
    settings = replace(local_fetch, input_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(InputFetchFailed, match="INPUT_TIMEOUT_S") as info:
        load_image(f"https://127.0.0.1:{port}/img.png", "mask", settings)
    assert time.monotonic() - started < 3 and info.value.field == "mask"


@pytest.mark.parametrize(
    ("fmt", "mode", "dtype"),
    [
        ("PNG", "I;16", "<u2"),
        ("TIFF", "I;16", "<u2"),
        ("TIFF", "I;16B", ">u2"),
        ("TIFF", "I", "<i4"),
    ],
)
def test_16_bit_greyscale_is_scaled_to_8_bits(settings, fmt, mode, dtype):
    ramp = np.linspace(0, 65535, 64).round()[None, :].repeat(8, 0)  # black to white
    image = Image.frombytes(mode, (64, 8), ramp.astype(dtype).tobytes())
    assert Image.open(io.BytesIO(base64.b64decode(_encoded(image, fmt)))).mode == mode
    for as_mask in (False, True):
        decoded = np.asarray(load_image(_encoded(image, fmt), "mask", settings, as_mask=as_mask))
        row = decoded[0] if as_mask else decoded[0, :, 0]
        assert row[0] == 0 and row[-1] == 255 and abs(int(row[32]) - 130) <= 2, row[32]


def test_transparent_images_are_flattened_onto_white_as_a1111_does(settings):
    half_clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # black behind the transparency
    half_clear.paste((200, 30, 30, 255), (0, 0, 8, 16))
    grey = Image.new("LA", (16, 16), (0, 0))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30])
    palette.paste(1, (0, 0, 8, 16))
    for image, save in ((half_clear, {}), (grey, {}), (palette, {"transparency": 0})):
        decoded = np.asarray(load_image(_encoded(image, **save), "image", settings))
        assert (decoded[:, 8:] == 255).all(), image.mode  # white, not the hidden black
    assert (
        np.asarray(load_image(_encoded(half_clear), "image", settings))[:, :8] == (200, 30, 30)
    ).all()
    half_opaque = np.asarray(
        load_image(_encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), "image", settings)
    )
    assert (abs(half_opaque.astype(int) - 127) <= 1).all()  # blended with the white


def test_float_greyscale_is_read_from_0_to_1_and_dark_16_bit_stays_dark(settings):
    ramp = np.linspace(0, 1, 64)[None, :].repeat(8, 0)  # black to white
    floats = Image.frombytes("F", (64, 8), ramp.astype("<f4").tobytes())
    row = np.asarray(load_image(_encoded(floats, "TIFF"), "image", settings))[0, :, 0]
    assert row[0] == 0 and row[-1] == 255 and abs(int(row[32]) - 130) <= 2, row
    with_nan = ramp.astype("<f4")
    with_nan[0, 0] = np.nan
    image = Image.frombytes("F", (64, 8), with_nan.tobytes())
    assert np.asarray(load_image(_encoded(image, "TIFF"), "image", settings))[0, -1, 0] == 255
    # Pillow opens a 16-bit PGM as I: a dark one (0-200 of 65535) is near black, not a ramp
    dark = Image.frombytes("I", (64, 8), (ramp * 200).round().astype("<i4").tobytes())
    assert np.asarray(load_image(_encoded(dark, "TIFF"), "image", settings)).max() <= 1


def _rgb_profile(description: str, red_green_blue: list[tuple[float, float, float]]) -> bytes:
    """A minimal ICC v2 display profile: the given colorants (XYZ, D50), a 2.2 gamma."""

    def number(value: float) -> bytes:  # s15Fixed16
        return struct.pack(">i", round(value * 65536))

    def xyz(values: tuple[float, float, float]) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(number(v) for v in values)

    text = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 70
    gamma = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    d50 = (0.9642, 1.0, 0.8249)
    red, green, blue = red_green_blue
    tags = [(b"desc", desc), (b"wtpt", xyz(d50)), (b"rXYZ", xyz(red)), (b"gXYZ", xyz(green))]
    tags += [(b"bXYZ", xyz(blue)), (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma)]
    tags = [(name, body + b"\0" * (-len(body) % 4)) for name, body in tags]
    offset, table, data = 128 + 4 + 12 * len(tags), struct.pack(">I", len(tags)), b""
    for name, body in tags:
        table += name + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (
        struct.pack(">I", offset + len(data))
        + b"none"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 24
        + b"\0" * 4  # rendering intent
        + b"".join(number(v) for v in d50)
        + b"\0" * 48
    )
    assert len(header) == 128
    return header + table + data


SRGB_COLORANTS = [(0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)]


def test_an_image_with_a_colour_profile_is_converted_to_srgb_as_a_browser_shows_it(settings):
    """A phone's Display P3 photo or an Adobe RGB scan: the pixels mean other colours than
    sRGB's. Here a profile whose first channel is green makes the point plainly."""
    swapped = _rgb_profile("swapped", [SRGB_COLORANTS[1], SRGB_COLORANTS[0], SRGB_COLORANTS[2]])
    red_in_the_file = Image.new("RGB", (8, 8), (200, 0, 0))
    for fmt in ("PNG", "JPEG"):
        shown = load_image(_encoded(red_in_the_file, fmt, icc_profile=swapped), "image", settings)
        red, green, blue = np.asarray(shown)[4, 4].astype(int)
        assert green > 150 and red < 40 and blue < 40, (fmt, red, green, blue)
        assert "icc_profile" not in shown.info  # never carried into an output
    clear = Image.new("RGBA", (8, 8), (200, 0, 0, 0))
    clear.paste((200, 0, 0, 255), (0, 0, 4, 8))
    shown = np.asarray(load_image(_encoded(clear, icc_profile=swapped), "image", settings))
    assert shown[4, 1, 1] > 150 and (shown[:, 4:] == 255).all()  # converted, then on white
    # a mask is data, not colour: its profile does not change which pixels repaint
    mask = Image.new("RGB", (8, 8), (255, 0, 0))
    read = load_image(_encoded(mask, icc_profile=swapped), "mask", settings, as_mask=True)
    assert (np.asarray(read) == np.asarray(mask.convert("L"))).all()


def test_srgb_and_unreadable_profiles_leave_the_pixels_as_they_are(settings):
    from PIL import ImageCms

    noise = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in (srgb, b"not a profile", _rgb_profile("swapped", SRGB_COLORANTS)[:100]):
        read = load_image(_encoded(image, icc_profile=profile), "image", settings)
        assert (np.asarray(read) == noise).all()


def test_a_profile_is_judged_by_its_colours_not_its_name(settings):
    """Elle Stone's wide-gamut profiles are named `...-srgbtrc` (an sRGB tone curve)."""
    swapped = [SRGB_COLORANTS[1], SRGB_COLORANTS[0], SRGB_COLORANTS[2]]
    named = _rgb_profile("ClayRGB-elle-V4-srgbtrc.icc", swapped)
    image = Image.new("RGB", (8, 8), (200, 0, 0))
    red, green, _ = load_image(_encoded(image, icc_profile=named), "image", settings).getpixel(
        (0, 0)
    )
    assert green > 150 and red < 40


def test_a_clear_colour_survives_the_profiles_conversion(settings):
    """An RGB PNG's transparent colour (tRNS) is flattened onto white, with a profile too."""
    swapped = _rgb_profile("swapped", [SRGB_COLORANTS[1], SRGB_COLORANTS[0], SRGB_COLORANTS[2]])
    image = Image.new("RGB", (8, 8), (12, 3, 24))
    image.paste((200, 0, 0), (0, 0, 4, 8))
    encoded = _encoded(image, icc_profile=swapped, transparency=(12, 3, 24))
    shown = np.asarray(load_image(encoded, "image", settings))
    assert (shown[:, 4:] == 255).all() and shown[0, 0, 1] > 150


def test_an_opaque_mask_with_a_few_soft_edge_pixels_is_read_by_its_brightness(settings):
    """A1111 reads any mask with one pixel below full opacity by its alpha: an editor's
    anti-aliased edge would make an opaque black-and-white mask repaint everything."""
    drawn = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    drawn.paste((255, 255, 255, 255), (0, 0, 8, 16))
    drawn.putpixel((7, 7), (255, 255, 255, 254))
    mask = np.asarray(load_image(_encoded(drawn), "mask", settings, as_mask=True))
    assert (mask[:, :8] == 255).all() and (mask[:, 8:] == 0).all()


def test_base64_in_the_url_safe_alphabet_or_without_padding_is_read(settings):
    data = png_bytes((5, 3))
    for text in (
        base64.urlsafe_b64encode(data).decode(),
        base64.b64encode(data).decode().rstrip("="),
        "data:image/png;base64," + base64.urlsafe_b64encode(data).decode().rstrip("="),
    ):
        assert load_image(text, "image", settings).size == (5, 3)
    with pytest.raises(InvalidInput, match="not a readable image"):  # b"\xfb\xff", read
        load_image("-_8=", "image", settings)
    with pytest.raises(InvalidInput, match="neither a URL nor valid base64"):  # two alphabets
        load_image("+_8=", "image", settings)
    for empty in ("", "  ", "data:image/png;base64,"):
        with pytest.raises(InvalidInput, match="empty") as info:
            load_image(empty, "image", settings)
        assert info.value.field == "image" and "base64" in info.value.accepted


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost none: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def test_the_worker_pixel_cap_decides_not_pillows_bomb_limit(settings, monkeypatch):
    bomb = base64.b64encode(_png_header(20000, 20000)).decode()  # over Pillow's own limit too
    with pytest.raises(InvalidInput, match="input cap") as info:
        load_image(bomb, "image", settings)
    assert f"up to {settings.max_input_pixels} pixels" in info.value.accepted
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as if MAX_INPUT_PIXELS were above it
    square = _encoded(Image.new("RGB", (64, 64)))  # 4096 pixels: within MAX_INPUT_PIXELS
    assert load_image(square, "image", settings).size == (64, 64)
    with pytest.raises(InvalidInput, match="input cap"):
        load_image(square, "image", replace(settings, max_input_pixels=1000))


def test_a_camera_jpeg_over_the_cap_is_decoded_smaller_other_images_are_refused(settings):
    """A 24-100 MP photo is a phone's or a camera's, not a bomb: a JPEG over MAX_INPUT_PIXELS,
    up to 8 times it, is decoded at 1/2, 1/4 or 1/8 of its size, the largest that fits."""
    capped = replace(settings, max_input_pixels=100 * 75)
    photo = Image.radial_gradient("L").resize((280, 210)).convert("RGB")  # 7.8 times the cap
    assert load_image(_encoded(photo, "JPEG"), "image", capped).size == (70, 53)  # a quarter
    four_times = photo.resize((200, 150))
    assert load_image(_encoded(four_times, "JPEG"), "image", capped).size == (100, 75)  # a half
    with pytest.raises(InvalidInput, match="input cap"):  # any other format is refused
        load_image(_encoded(four_times), "image", capped)
    with pytest.raises(InvalidInput, match="input cap"):  # over 8 times the cap
        load_image(_encoded(photo.resize((400, 300)), "JPEG"), "image", capped)


@pytest.fixture()
def silent_server():
    """A local TCP server that accepts connections and never answers; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    accepted = []

    def serve() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for connection in accepted:
        connection.close()


def test_s3_inputs_are_bounded_by_the_input_timeout(silent_server, settings):
    bucket = replace(
        settings,
        bucket_endpoint_url=f"http://127.0.0.1:{silent_server}",
        bucket_access_key_id="test-key",
        bucket_secret_access_key="test-secret",
        bucket_name="inputs",
        input_timeout_s=1.0,
    )
    started = time.monotonic()
    with pytest.raises(InputFetchFailed, match="INPUT_TIMEOUT_S") as info:
        load_image("s3://inputs/photo.png", "mask", bucket)
    assert time.monotonic() - started < 3 and info.value.field == "mask"


def test_url_schemes_are_case_insensitive(image_server, local_fetch, settings):
    port = image_server.rsplit(":", 1)[1]
    assert load_image(f"HTTP://127.0.0.1:{port}/img.png", "image", local_fetch).size == (16, 8)
    for url in ("HTTPS://127.0.0.1/x.png", "Https://[::1]/x.png", "hTTps://10.0.0.1/x"):
        with pytest.raises(InvalidInput, match="non-public address"):  # checked all the same
            load_image(url, "image", settings)
    with pytest.raises(InvalidInput, match="ALLOW_HTTP_INPUTS"):
        load_image(f"HTTP://127.0.0.1:{port}/img.png", "image", settings)
    encoded = base64.b64encode(png_bytes()).decode()
    assert load_image(f"DATA:image/png;BASE64,{encoded}", "image", settings).size == (16, 8)
    with pytest.raises(InvalidInput, match="bucket credentials"):
        load_image("S3://bucket/photo.png", "image", settings)


def test_deprecated_ipv6_site_local_addresses_are_refused(settings, monkeypatch):
    with pytest.raises(InvalidInput, match="non-public address"):
        load_image("https://[fec0::1]/x.png", "image", settings)
    answer = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fed0::5", 443, 0, 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answer)
    with pytest.raises(InvalidInput, match="non-public address"):
        load_image("https://images.example.com/cat.png", "image", settings)
