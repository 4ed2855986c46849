"""Input images: decoding, and URL fetching that cannot reach private addresses."""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/img.png")
                self.end_headers()
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


def test_fetches_from_a_local_server_when_allowed(image_server, local_fetch):
    assert load_image(f"{image_server}/img.png", "image", local_fetch).size == (16, 8)
    assert load_image(f"{image_server}/redirect", "image", local_fetch).size == (16, 8)


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
    ):
        with pytest.raises(InvalidInput):
            load_image(url, "image", settings)


def test_http_needs_a_setting(image_server, settings):
    with pytest.raises(InvalidInput) as info:
        load_image(f"{image_server}/img.png", "image", settings)
    assert "ALLOW_HTTP_INPUTS" in str(info.value)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x.png", "gopher://x"])
def test_other_schemes_are_refused(settings, url):
    with pytest.raises(InvalidInput):
        load_image(url, "image", settings)


def test_fetch_failures(image_server, local_fetch):
    with pytest.raises(InputFetchFailed, match="HTTP 404"):
        load_image(f"{image_server}/missing", "image", local_fetch)
    with pytest.raises(InputFetchFailed, match="redirects"):
        load_image(f"{image_server}/loop", "image", local_fetch)


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
