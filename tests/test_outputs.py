"""Delivery to a real S3 endpoint (moto's server on 127.0.0.1, reached by boto3 over HTTP),
through a fault-injecting proxy; encoding and infotext."""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import logging
import os
import threading
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
import requests
from PIL import Image

from handler.engine import Engine
from handler.errors import InvalidInput, OutputTooLarge, UploadFailed
from handler.outputs import Storage, a1111_exif, deliver, encode_image, read_infotext
from handler.schema import parse_job
from handler.settings import Settings
from tests.servers import Server, free_port

ACCESS_KEY, SECRET_KEY, BUCKET = "AKIATESTKEY", "test-secret-key-do-not-log", "images-bucket"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    port = free_port()
    server = Server(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        env={},
        log_path=tmp_path_factory.mktemp("moto") / "moto.log",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, timeout=60)
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        yield url, client
    finally:
        server.stop()


class FaultProxy:
    """Forwards HTTP to moto; can answer 500 or drop the connection for the next N PUTs, and
    can answer a wrong ETag for PUTs whose path holds `wrong_etag_for` (moto stores the bytes),
    or 500 for those whose path holds `lose_reply_for` (moto stores them: the reply was lost)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fail_puts = 0
        self.drop_puts = 0
        self.wrong_etag_for = ""
        self.lose_reply_for = ""
        self.fail_deletes = False
        self.puts_seen = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "DELETE" and proxy.fail_deletes:
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.command == "PUT":
                    proxy.puts_seen += 1
                    if proxy.drop_puts > 0:
                        proxy.drop_puts -= 1
                        self.close_connection = True
                        self.connection.close()
                        return
                    if proxy.fail_puts > 0:
                        proxy.fail_puts -= 1
                        payload = (
                            b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                        )
                        self.send_response(500)
                        self.send_header("Content-Length", str(len(payload)))
                        self.end_headers()
                        self.wfile.write(payload)
                        return
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if (
                    self.command == "PUT"
                    and proxy.lose_reply_for
                    and proxy.lose_reply_for in self.path
                ):
                    data = b"<Error><Code>InternalError</Code><Message>lost</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    connection.close()
                    return
                self.send_response(response.status)
                lie = (
                    self.command == "PUT"
                    and proxy.wrong_etag_for
                    and proxy.wrong_etag_for in self.path
                )
                for key, value in response.getheaders():
                    if lie and key.lower() == "etag":
                        value = '"' + "0" * 32 + '"'
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def proxy(moto):
    fault_proxy = FaultProxy(moto[0])
    yield fault_proxy
    fault_proxy.close()


def bucket_settings(settings, endpoint: str, **extra):
    return replace(
        settings,
        bucket_endpoint_url=endpoint,
        bucket_access_key_id=ACCESS_KEY,
        bucket_secret_access_key=SECRET_KEY,
        bucket_name=BUCKET,
        bucket_path_style=True,
        bucket_prefix="renders",
        **extra,
    )


def encoded_batch(count=3, fmt="png"):
    return [
        encode_image(Image.new("RGB", (32, 24), (i * 40, 100, 200)), i, 1000 + i, fmt, 90, "x")
        for i in range(count)
    ]


def test_uploads_with_content_type_key_layout_and_presigned_urls(moto, settings):
    _, client = moto
    storage = Storage(bucket_settings(settings, moto[0]))
    images = encoded_batch(2) + [encode_image(Image.new("RGB", (8, 8)), 2, 1002, "webp", 80, None)]
    results, warnings = deliver(
        images, destination="s3", job_id="job-123", storage=storage, inline_limit=None
    )
    assert warnings == []
    assert [r.key for r in results] == [
        "renders/job-123/0-1000.png",
        "renders/job-123/1-1001.png",
        "renders/job-123/2-1002.webp",
    ]
    for result, image in zip(results, images, strict=True):
        head = client.head_object(Bucket=BUCKET, Key=result.key)
        assert head["ContentType"] == image.mime_type and head["ContentLength"] == image_bytes(
            image
        )
        assert result.bucket == BUCKET and result.image is None and result.bytes == len(image.data)
        with urllib.request.urlopen(result.url, timeout=10) as response:  # a plain HTTP client
            assert response.read() == image.data
        assert "X-Amz-Signature" in result.url


def image_bytes(image) -> int:
    return len(image.data)


def test_public_base_url(moto, settings):
    storage = Storage(
        bucket_settings(settings, moto[0], bucket_public_url="https://cdn.example.com/")
    )
    results, _ = deliver(
        encoded_batch(1), destination="s3", job_id="j", storage=storage, inline_limit=None
    )
    assert results[0].url == "https://cdn.example.com/renders/j/0-1000.png"


def test_a_public_url_fetches_its_key_whatever_the_prefix_holds(moto, settings):
    """BUCKET_PUBLIC_URL pointed at the endpoint itself (a public bucket): a prefix with a
    space, # and ? is percent-encoded in the URL, which then fetches the delivered object."""
    public = f"{moto[0]}/{BUCKET}/"
    configured = bucket_settings(settings, moto[0], bucket_public_url=public)
    storage = Storage(replace(configured, bucket_prefix="team a/out#1?x"))
    results, _ = deliver(
        encoded_batch(1), destination="s3", job_id="j", storage=storage, inline_limit=None
    )
    assert results[0].key == "team a/out#1?x/j/0-1000.png"
    assert results[0].url == f"{public}team%20a/out%231%3Fx/j/0-1000.png"
    moto[1].put_object_acl(Bucket=BUCKET, Key=results[0].key, ACL="public-read")
    fetched = requests.get(results[0].url, timeout=10)
    assert fetched.status_code == 200 and fetched.content == encoded_batch(1)[0].data


def test_retries_injected_500s_and_dropped_connections(proxy, moto, settings):
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.fail_puts, proxy.drop_puts = 2, 1
    results, warnings = deliver(
        encoded_batch(2), destination="s3", job_id="retry", storage=storage, inline_limit=None
    )
    assert warnings == [] and len(results) == 2
    assert proxy.puts_seen == 2 + 3  # two images, plus three failed attempts retried
    for result in results:
        assert moto[1].get_object(Bucket=BUCKET, Key=result.key)["Body"].read()


def test_upload_failed_when_retries_run_out(proxy, settings):
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.fail_puts = 100
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(2), destination="s3", job_id="fail", storage=storage, inline_limit=None
        )
    assert info.value.code == "upload_failed" and "after 4 attempts" in info.value.message


def test_auto_falls_back_to_base64_and_says_so(proxy, settings):
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.fail_puts = 100
    results, warnings = deliver(
        encoded_batch(2), destination="auto", job_id="fb", storage=storage, inline_limit=10_000_000
    )
    assert all(
        r.image and r.image.startswith("data:image/png;base64,") and r.url is None for r in results
    )
    assert warnings and "inline base64" in warnings[0]


def test_a_failed_batch_deletes_the_images_it_uploaded(moto, settings, monkeypatch):
    from botocore.exceptions import ClientError

    storage = Storage(bucket_settings(settings, moto[0]))
    put = storage.put

    def refuse_image_1(key, data, content_type):
        if "/1-" in key:
            denied = {"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"RetryAttempts": 0}}
            raise ClientError(denied, "PutObject")
        put(key, data, content_type)

    monkeypatch.setattr(storage, "put", refuse_image_1)
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(3), destination="s3", job_id="part", storage=storage, inline_limit=None
        )
    assert info.value.message == "image 1 could not be uploaded (ClientError: AccessDenied)"
    listed = moto[1].list_objects_v2(Bucket=BUCKET, Prefix="renders/part/")
    assert listed.get("KeyCount", 0) == 0  # images 0 and 2 were uploaded, then deleted


def test_uploads_keep_their_retries_after_an_outage(settings, monkeypatch):
    """An endpoint that answers 500 to every PUT: each of 40 uploads is tried 4 times. (With
    botocore's "standard" retries, the 12th and later were tried once: its budget ran out.)"""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import botocore.endpoint

    from handler.errors import UploadFailed

    puts = []

    class Failing(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers boto3's "Expect: 100-continue" at once

        def do_PUT(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            puts.append(self.path)
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(botocore.endpoint.time, "sleep", lambda seconds: None)  # the backoff
    try:
        storage = Storage(bucket_settings(settings, f"http://127.0.0.1:{server.server_port}"))
        for _ in range(40):
            with pytest.raises(UploadFailed):
                deliver(
                    encoded_batch(1),
                    destination="s3",
                    job_id="outage",
                    storage=storage,
                    inline_limit=None,
                )
    finally:
        server.shutdown()
        server.server_close()
    assert len(puts) == 40 * 4


@pytest.mark.parametrize("during", [".png", "job.json"])
def test_a_job_cancelled_while_uploading_fails_as_cancelled_and_leaves_no_images(
    moto, settings, during
):
    """The cancel arrives while an image uploads, or while the sidecar does (the images are
    all in the bucket by then)."""
    from handler.errors import Cancelled

    storage = Storage(bucket_settings(settings, moto[0]))
    put, cancel = storage.put, threading.Event()

    def cancelled_during_the_upload(key, data, content_type):
        put(key, data, content_type)
        if key.endswith(during):
            cancel.set()  # the platform's cancel arrives while this object uploads

    storage.put = cancelled_during_the_upload
    with pytest.raises(Cancelled):
        deliver(
            encoded_batch(3),
            destination="auto",
            job_id="cancelled",
            storage=storage,
            inline_limit=None,
            sidecar={"job_id": "cancelled"},
            cancelled=cancel.is_set,
        )
    listed = moto[1].list_objects_v2(Bucket=BUCKET, Prefix="renders/cancelled/")
    assert listed.get("KeyCount", 0) == 0  # no image, and no job.json


def test_a_job_cancelled_after_its_last_step_uploads_nothing(moto, settings):
    from handler.errors import Cancelled

    engine = Engine(bucket_settings(settings, moto[0]))
    job = parse_job({"prompt": "x", "width": 64, "height": 64, "steps": 2, "num_images": 2})
    steps = []

    def progress(update):
        steps.append(update.phase)

    # the cancel arrives once both steps are done, when no step is left to check it
    with pytest.raises(Cancelled):
        engine.run(
            job,
            progress=progress,
            cancelled=lambda: steps.count("denoising") == 2,
            job_id="late-cancel",
        )
    listed = moto[1].list_objects_v2(Bucket=BUCKET, Prefix="renders/late-cancel/")
    assert listed.get("KeyCount", 0) == 0


def test_an_image_the_bucket_stored_wrongly_is_deleted_with_the_batch(proxy, moto, settings):
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.wrong_etag_for = "/1-"
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(3), destination="s3", job_id="etag", storage=storage, inline_limit=None
        )
    assert "the bucket stored different bytes for renders/etag/1-1001.png" in info.value.message
    listed = moto[1].list_objects_v2(Bucket=BUCKET, Prefix="renders/etag/")
    assert [o["Key"] for o in listed.get("Contents", [])] == []  # image 1 too, not only 0 and 2


def test_an_image_stored_whose_reply_was_lost_is_deleted_with_the_batch(proxy, moto, settings):
    """S3 stored image 1, but every reply to its PUT was lost: the job fails, reporting no
    image, and the bucket keeps none of the batch, image 1 included."""
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.lose_reply_for = "/1-"
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(3), destination="s3", job_id="lost", storage=storage, inline_limit=None
        )
    assert "image 1 could not be uploaded" in info.value.message
    listed = moto[1].list_objects_v2(Bucket=BUCKET, Prefix="renders/lost/")
    assert listed.get("KeyCount", 0) == 0


def test_an_upload_whose_connection_drops_each_time_says_it_was_retried(
    proxy, moto, settings, monkeypatch
):
    import botocore.endpoint

    monkeypatch.setattr(botocore.endpoint.time, "sleep", lambda seconds: None)  # the backoff
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.drop_puts = 100
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(1), destination="s3", job_id="drop", storage=storage, inline_limit=None
        )
    assert info.value.message == (
        "image 0 could not be uploaded (ConnectionClosedError, after 4 attempts)"
    )
    assert proxy.puts_seen == 4


def test_a_batch_that_cannot_be_deleted_says_so(proxy, moto, settings, monkeypatch):
    """Image 1's reply is lost and the bucket refuses every delete: the error says that the
    batch's keys may still be there (the cleanup is best effort)."""
    import botocore.endpoint

    monkeypatch.setattr(botocore.endpoint.time, "sleep", lambda seconds: None)  # the backoff
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.lose_reply_for, proxy.fail_deletes = "/1-", True
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(3), destination="s3", job_id="kept", storage=storage, inline_limit=None
        )
    assert info.value.message.endswith("; 3 of the batch's 3 keys could not be deleted")


def test_s3_on_a_worker_without_a_bucket_is_refused_before_the_job_runs(engine):
    """Refused as the job starts, not after it has denoised and decoded."""
    steps = []
    with pytest.raises(InvalidInput) as info:
        engine.run(
            parse_job({"prompt": "x", "width": 64, "height": 64, "steps": 2, "destination": "s3"}),
            progress=lambda update: steps.append(update.phase),
        )
    assert info.value.field == "destination" and "denoising" not in steps


def test_auto_fallback_over_the_reply_limit_is_an_upload_failure(proxy, settings):
    storage = Storage(bucket_settings(settings, proxy.url))
    proxy.fail_puts = 100
    with pytest.raises(UploadFailed) as info:
        deliver(
            encoded_batch(3), destination="auto", job_id="big", storage=storage, inline_limit=10
        )
    assert (
        info.value.field == "destination" and "over the 10-byte reply limit" in info.value.message
    )
    assert "could not be uploaded" in info.value.message


def test_inline_over_the_limit_says_what_would_work(moto, settings):
    storage = Storage(bucket_settings(settings, moto[0]))
    with pytest.raises(OutputTooLarge) as info:
        deliver(
            encoded_batch(2), destination="base64", job_id="x", storage=storage, inline_limit=10
        )
    assert (
        "destination s3 or auto" in info.value.accepted and "BUCKET_NAME" not in info.value.accepted
    )
    with pytest.raises(OutputTooLarge) as info:
        deliver(encoded_batch(2), destination="auto", job_id="x", storage=None, inline_limit=10)
    assert "BUCKET_NAME" in info.value.accepted and info.value.field == "num_images"
    with pytest.raises(OutputTooLarge) as info:  # one image: its size, not the count
        deliver(encoded_batch(1), destination="auto", job_id="x", storage=None, inline_limit=10)
    assert info.value.message.startswith("the image is ")
    assert info.value.accepted.startswith("a smaller image, jpeg/webp output")


def test_a_batch_of_exactly_the_reply_limit_is_returned_inline():
    batch = encoded_batch(2)
    size = sum(len(image.data_uri()) for image in batch)  # what the reply carries
    send = functools.partial(deliver, batch, destination="base64", job_id="x", storage=None)
    results, _ = send(inline_limit=size)
    assert sum(len(result.image) for result in results) == size
    with pytest.raises(OutputTooLarge, match=f"{size} bytes as base64, over the {size - 1}-byte"):
        send(inline_limit=size - 1)


def test_a_sidecar_that_is_not_written_is_a_warning(moto, settings, monkeypatch):
    send = functools.partial(deliver, job_id="s", inline_limit=None, sidecar={"job_id": "s"})
    results, warnings = send(encoded_batch(1), destination="base64", storage=None)
    assert results[0].image and warnings == [
        "sidecar not written: job.json goes beside images in the bucket, and these are inline"
    ]
    storage = Storage(bucket_settings(settings, moto[0]))
    put = storage.put

    def refuse_sidecar(key, data, content_type):
        if key.endswith("job.json"):
            raise ConnectionError("bucket went away")
        put(key, data, content_type)

    monkeypatch.setattr(storage, "put", refuse_sidecar)
    results, warnings = send(encoded_batch(2), destination="s3", storage=storage)
    assert all(r.url for r in results)  # the images are delivered all the same
    assert warnings == ["sidecar not written: its upload failed (ConnectionError)"]


def test_s3_without_a_bucket_is_invalid_input():
    with pytest.raises(InvalidInput) as info:
        deliver(encoded_batch(1), destination="s3", job_id="x", storage=None, inline_limit=None)
    assert info.value.field == "destination"


def test_engine_job_delivers_to_s3_with_infotext_and_sidecar(moto, settings, caplog):
    _, client = moto
    engine = Engine(bucket_settings(settings, moto[0]))
    job = parse_job(
        {
            "prompt": "a cube of glass",
            "negative_prompt": "fog",
            "width": 64,
            "height": 64,
            "steps": 2,
            "seed": 99,
            "checkpoint": "demo-sd15",
            "num_images": 2,
            "guidance_scale": 6.5,
            "sidecar": True,
            "scheduler": "DPM++ 2M Karras",
        }
    )
    loaded, _ = engine.checkpoint("demo-sd15")
    engine.registry.compute_hash(loaded.model)
    with caplog.at_level(logging.DEBUG):
        result = engine.run(job, job_id="job-e2e")
    assert [image.key for image in result.images] == [
        "renders/job-e2e/0-99.png",
        "renders/job-e2e/1-100.png",
    ]
    data = client.get_object(Bucket=BUCKET, Key=result.images[1].key)["Body"].read()
    infotext = read_infotext(data)
    assert infotext.splitlines()[0] == "a cube of glass"
    assert "Negative prompt: fog" in infotext
    for part in (
        "Steps: 2",
        "Sampler: DPM++ 2M",
        "Schedule type: Karras",
        "CFG scale: 6.5",
        "Seed: 100",
        "Size: 64x64",
        "Model: demo-sd15",
        f"Model hash: {engine.registry.cached_hash(loaded.model)}",
    ):
        assert part in infotext, part
    sidecar = json.loads(
        client.get_object(Bucket=BUCKET, Key="renders/job-e2e/job.json")["Body"].read()
    )
    assert sidecar["seeds"] == [99, 100] and sidecar["inputs"]["prompt"] == "a cube of glass"
    assert "timings_ms" in sidecar and SECRET_KEY not in json.dumps(sidecar)
    # credentials and presigned URLs stay out of the logs
    assert SECRET_KEY not in caplog.text and "X-Amz-Signature" not in caplog.text


def test_strip_metadata_writes_no_parameters(settings, monkeypatch):
    from handler.engine import Engine

    own = Engine(settings)  # its LoRA stays resident: not in the engine other tests share
    hashed = []  # a LoRA's hash, which may read its whole file, is for the infotext alone
    monkeypatch.setattr(own.registry, "lora_hash", lambda model: hashed.append(model))
    result = own.run(
        parse_job(
            {
                "prompt": "secret",
                "width": 64,
                "height": 64,
                "steps": 1,
                "checkpoint": "demo-sd15",
                "loras": [{"name": "demo_sd15_kohya"}],
                "strip_metadata": True,
            }
        )
    )
    assert hashed == []
    import base64

    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    assert read_infotext(data) is None and b"secret" not in data


def user_comment_as_piexif_reads_it(exif: bytes) -> tuple[int, bytes]:
    """(type, bytes) of the Exif IFD's UserComment, found the way piexif (A1111's reader) does."""
    import struct

    tiff = exif.removeprefix(b"Exif\0\0")
    order = ">" if tiff[:2] == b"MM" else "<"

    def entries(offset: int) -> dict[int, tuple[int, int, int]]:
        (count,) = struct.unpack_from(order + "H", tiff, offset)
        found = {}
        for i in range(count):
            tag, kind, length, value = struct.unpack_from(order + "HHII", tiff, offset + 2 + 12 * i)
            found[tag] = (kind, length, value)
        return found

    (ifd0,) = struct.unpack_from(order + "I", tiff, 4)
    exif_ifd = entries(ifd0)[0x8769][2]
    kind, length, offset = entries(exif_ifd)[0x9286]
    return kind, tiff[offset : offset + length]


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_infotext_in_exif_is_typed_as_a1111_writes_it(fmt):
    """piexif, which A1111's PNG Info reads with, gets a tuple of ints from a UserComment typed
    BYTE (Pillow's choice) and fails; A1111 writes it UNDEFINED (7)."""
    text = "a café, 猫\nSteps: 20, Sampler: Euler"
    encoded = encode_image(Image.new("RGB", (16, 16)), 0, 1, fmt, 90, text)
    kind, comment = user_comment_as_piexif_reads_it(
        Image.open(io.BytesIO(encoded.data)).info["exif"]
    )
    assert kind == 7 and comment == b"UNICODE\0" + text.encode("utf-16-be")
    assert read_infotext(encoded.data) == text


@pytest.mark.parametrize(
    ("prompt", "negative"),
    # 33,000 characters in all (each prompt within its 20,000); 16,500 emoji take 4 UTF-16
    # bytes each
    [("red, " * 3300, "blue, " * 2750), ("🐱" * 16500, "")],
)
def test_an_infotext_too_long_for_a_jpegs_exif_is_refused_before_generating(
    engine, prompt, negative
):
    """A jpeg's EXIF segment holds 64 KiB: Pillow failed the save, after the whole job ran."""
    job = {"prompt": prompt, "negative_prompt": negative, "steps": 1, "width": 64, "height": 64}
    job["checkpoint"] = "demo-sd15"
    steps = []
    with pytest.raises(InvalidInput) as info:
        engine.run(parse_job({**job, "output_format": "jpeg"}), progress=steps.append)
    assert info.value.field == "output_format" and "png or webp" in info.value.accepted
    assert not any(p.phase == "denoising" for p in steps)
    with pytest.raises(ValueError, match="EXIF data is too long"):  # what happened instead
        exif = a1111_exif(f"{prompt}\nNegative prompt: {negative}")
        Image.new("RGB", (8, 8)).save(io.BytesIO(), "JPEG", exif=exif)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_infotext_in_jpeg_and_webp_exif(engine, fmt):
    import base64

    result = engine.run(
        parse_job(
            {
                "prompt": "a red cube",
                "width": 64,
                "height": 64,
                "steps": 1,
                "seed": 4,
                "checkpoint": "demo-sd15",
                "output_format": fmt,
            }
        )
    )
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    assert read_infotext(data).startswith("a red cube\n") and "Seed: 4" in read_infotext(data)
    assert Image.open(io.BytesIO(data)).format == fmt.upper()


def test_runpod_api_job_delivers_presigned_urls(moto, demo_volume, tmp_path):
    """Through the SDK's local API: the reply carries URLs whose bytes are the images."""
    import requests

    from tests.servers import start_runpod_api

    url, server = start_runpod_api(
        demo_volume,
        tmp_path / "worker.log",
        DEFAULT_CHECKPOINT="demo-sd15",
        BUCKET_ENDPOINT_URL=moto[0],
        BUCKET_NAME=BUCKET,
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
        BUCKET_SECRET_ACCESS_KEY=SECRET_KEY,
        BUCKET_PATH_STYLE="1",
    )
    try:
        reply = requests.post(
            f"{url}/runsync",
            json={"input": {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 5}},
            timeout=300,
        ).json()
        assert reply["status"] == "COMPLETED", reply
        image = reply["output"]["images"][0]
        assert "image" not in image and image["key"].endswith("/0-5.png")
        with urllib.request.urlopen(image["url"], timeout=10) as response:
            data = response.read()
        assert len(data) == image["bytes"] and Image.open(io.BytesIO(data)).size == (64, 64)
        log = server.log()
        assert SECRET_KEY not in log and "X-Amz-Signature" not in log
    finally:
        server.stop()


AWS_KEYS = {"BUCKET_ACCESS_KEY_ID": ACCESS_KEY, "BUCKET_SECRET_ACCESS_KEY": SECRET_KEY}


def settings_from_env(monkeypatch, **env: str) -> Settings:
    for name in [name for name in os.environ if name.startswith("BUCKET_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def presigned(configured: Settings) -> tuple[str, str, str]:
    """(host, path, signing region) of a presigned GET, built offline: AWS is never contacted."""
    url = urlsplit(Storage(configured).url("images/j/0-1.png"))
    credential = parse_qs(url.query)["X-Amz-Credential"][0]  # key/date/region/s3/aws4_request
    return url.netloc, url.path, credential.split("/")[2]


@pytest.mark.parametrize(
    ("endpoint", "bucket", "host", "region"),
    [
        (
            "https://my-bucket.s3.eu-west-1.amazonaws.com",
            "my-bucket",
            "s3.eu-west-1.amazonaws.com",
            "eu-west-1",
        ),
        (
            "https://my-bucket.s3-eu-west-1.amazonaws.com/",
            "my-bucket",
            "s3.eu-west-1.amazonaws.com",
            "eu-west-1",
        ),
        ("https://my-bucket.s3.amazonaws.com", "my-bucket", "s3.amazonaws.com", "us-east-1"),
        (
            "https://my.bucket.s3.dualstack.ap-southeast-2.amazonaws.com",
            "my.bucket",
            "s3.dualstack.ap-southeast-2.amazonaws.com",
            "ap-southeast-2",
        ),
        (
            "https://my-bucket.s3.cn-north-1.amazonaws.com.cn",
            "my-bucket",
            "s3.cn-north-1.amazonaws.com.cn",
            "cn-north-1",
        ),
    ],
)
@pytest.mark.parametrize("bucket_name_set", [False, True])
def test_runpod_style_endpoint_names_the_bucket_in_its_host(
    monkeypatch, endpoint, bucket, host, region, bucket_name_set
):
    """RunPod's documented setup: a virtual-hosted BUCKET_ENDPOINT_URL, no BUCKET_NAME. The
    bucket appears once in the URL, and the signature is for the host's region."""
    env = {"BUCKET_ENDPOINT_URL": endpoint, **AWS_KEYS}
    if bucket_name_set:
        env["BUCKET_NAME"] = bucket
    configured = settings_from_env(monkeypatch, **env)
    assert configured.bucket_configured and configured.bucket_name == bucket
    assert presigned(configured) == (host, f"/{bucket}/images/j/0-1.png", region)


def test_a_bucket_name_the_endpoint_host_contradicts_stops_the_worker(monkeypatch):
    with pytest.raises(InvalidInput) as info:
        settings_from_env(
            monkeypatch,
            BUCKET_ENDPOINT_URL="https://my-bucket.s3.eu-west-1.amazonaws.com",
            BUCKET_NAME="other-bucket",
            **AWS_KEYS,
        )
    assert info.value.field == "BUCKET_NAME"
    assert "'other-bucket'" in info.value.message and "'my-bucket'" in info.value.message


def test_the_region_comes_from_an_aws_endpoint_host(monkeypatch):
    regional = {
        "BUCKET_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com",
        "BUCKET_NAME": "my-bucket",
        **AWS_KEYS,
    }
    assert presigned(settings_from_env(monkeypatch, **regional)) == (
        "s3.eu-west-1.amazonaws.com",
        "/my-bucket/images/j/0-1.png",
        "eu-west-1",
    )
    legacy = {**regional, "BUCKET_ENDPOINT_URL": "https://s3-us-west-2.amazonaws.com"}
    assert presigned(settings_from_env(monkeypatch, **legacy))[2] == "us-west-2"
    explicit = {**regional, "BUCKET_REGION": "eu-central-1"}  # BUCKET_REGION wins
    assert presigned(settings_from_env(monkeypatch, **explicit))[2] == "eu-central-1"


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:9000",
        "https://s3.us-west-004.backblazeb2.com",
        "https://my-bucket.s3.eu-west-1.amazonaws.com.example.org",
    ],
)
def test_other_endpoints_are_used_as_given(monkeypatch, endpoint):
    configured = settings_from_env(
        monkeypatch, BUCKET_ENDPOINT_URL=endpoint, BUCKET_NAME="my-bucket", **AWS_KEYS
    )
    assert configured.bucket_endpoint_url == endpoint and configured.bucket_name == "my-bucket"
    assert configured.bucket_region == "us-east-1"


@pytest.mark.parametrize("bucket_name_set", [False, True])
@pytest.mark.parametrize(
    ("endpoint", "host", "region"),
    [
        (
            "https://0123abcd.r2.cloudflarestorage.com/my-bucket",
            "0123abcd.r2.cloudflarestorage.com",
            "us-east-1",
        ),
        (
            "https://s3.eu-west-1.amazonaws.com/my-bucket/",
            "s3.eu-west-1.amazonaws.com",
            "eu-west-1",
        ),
    ],
)
def test_a_bucket_in_the_endpoints_path_is_the_bucket(
    monkeypatch, endpoint, host, region, bucket_name_set
):
    """R2's "S3 API" URL and AWS's path-style URL show the bucket in the path: it is taken as
    the bucket, not put before every key."""
    env = {"BUCKET_ENDPOINT_URL": endpoint, **AWS_KEYS}
    if bucket_name_set:
        env["BUCKET_NAME"] = "my-bucket"
    configured = settings_from_env(monkeypatch, **env)
    assert configured.bucket_configured and configured.bucket_name == "my-bucket"
    assert configured.bucket_endpoint_url == f"https://{host}"
    assert presigned(configured) == (host, "/my-bucket/images/j/0-1.png", region)


@pytest.mark.parametrize(
    "endpoint",
    [
        "127.0.0.1:9000",  # no scheme: botocore would fail every job
        "ftp://minio.example.com",
        "https://minio.example.com/my-bucket/images",
        "https://minio.example.com/other-bucket",
    ],
)
def test_a_malformed_endpoint_stops_the_worker(monkeypatch, endpoint):
    with pytest.raises(InvalidInput) as info:
        settings_from_env(
            monkeypatch, BUCKET_ENDPOINT_URL=endpoint, BUCKET_NAME="my-bucket", **AWS_KEYS
        )
    assert info.value.field == "BUCKET_ENDPOINT_URL" and endpoint not in str(info.value)


def test_an_endpoint_without_a_bucket_warns_once_that_images_stay_inline(monkeypatch, caplog):
    env = {"BUCKET_ENDPOINT_URL": "https://minio.example.com:9000/?X-Amz-Signature=SIG", **AWS_KEYS}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # the worker reads its settings several times as it starts
            assert not settings_from_env(monkeypatch, **env).bucket_configured
    warnings = [r.getMessage() for r in caplog.records if "BUCKET_NAME" in r.getMessage()]
    assert len(warnings) == 1 and "minio.example.com" in warnings[0]
    assert "inline" in warnings[0]
    assert SECRET_KEY not in caplog.text and ACCESS_KEY not in caplog.text
    assert "SIG" not in caplog.text


def test_runpod_worker_without_bucket_name_says_so_once_and_replies_inline(
    moto, demo_volume, tmp_path
):
    """A non-AWS endpoint and credentials without BUCKET_NAME: one warning at start, not silence."""
    import requests

    from tests.servers import start_runpod_api

    url, server = start_runpod_api(
        demo_volume,
        tmp_path / "worker.log",
        DEFAULT_CHECKPOINT="demo-sd15",
        BUCKET_ENDPOINT_URL=moto[0],
        BUCKET_ACCESS_KEY_ID=ACCESS_KEY,
        BUCKET_SECRET_ACCESS_KEY=SECRET_KEY,
    )
    try:
        reply = requests.post(
            f"{url}/runsync",
            json={"input": {"prompt": "x", "width": 64, "height": 64, "steps": 2}},
            timeout=300,
        ).json()
        assert reply["status"] == "COMPLETED", reply
        assert reply["output"]["images"][0]["image"].startswith("data:image/png;base64,")
        log = server.log()
        warnings = [line for line in log.splitlines() if "until BUCKET_NAME is set" in line]
        assert len(warnings) == 1, log[-3000:]
        assert SECRET_KEY not in log
    finally:
        server.stop()


def test_s3_inputs_read_with_the_worker_credentials(moto, settings):
    from handler.errors import InputFetchFailed
    from handler.inputs import load_image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buffer, format="PNG")
    moto[1].put_object(Bucket=BUCKET, Key="inputs/photo.png", Body=buffer.getvalue())
    configured = bucket_settings(settings, moto[0])
    assert load_image(f"s3://{BUCKET}/inputs/photo.png", "image", configured).size == (20, 10)
    with pytest.raises(InputFetchFailed) as info:
        load_image(f"s3://{BUCKET}/inputs/missing.png", "image", configured)
    assert info.value.field == "image"
    with pytest.raises(InvalidInput):
        load_image(f"s3://{BUCKET}/inputs/photo.png", "image", settings)  # no credentials


def test_s3_inputs_read_only_the_worker_buckets(moto, settings):
    from handler.inputs import load_image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (1, 2, 3)).save(buffer, format="PNG")
    moto[1].create_bucket(Bucket="other-team")
    moto[1].put_object(Bucket="other-team", Key="private.png", Body=buffer.getvalue())
    configured = bucket_settings(settings, moto[0])  # the credentials reach both buckets
    with pytest.raises(InvalidInput) as info:
        load_image("s3://other-team/private.png", "image", configured)
    assert "worker's own buckets" in info.value.message and BUCKET in info.value.accepted
    allowed = replace(configured, input_buckets=("other-team",))
    assert load_image("s3://other-team/private.png", "image", allowed).size == (20, 10)


def _jpeg_with_private_metadata(color) -> bytes:
    """A 64x64 JPEG carrying an ICC profile and a comment that must never reach an output."""
    from PIL import ImageCms

    buffer = io.BytesIO()
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (64, 64), color).save(
        buffer, "JPEG", icc_profile=profile, comment=b"PRIVATE-COMMENT"
    )
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_strip_metadata_also_drops_the_init_images_metadata(engine, fmt):
    import base64

    init = base64.b64encode(_jpeg_with_private_metadata((200, 40, 40))).decode()
    mask = io.BytesIO()
    Image.new("L", (64, 64), 255).save(mask, "PNG")
    result = engine.run(
        parse_job(
            {
                "prompt": "secret",
                "steps": 2,
                "checkpoint": "demo-sd15",
                "image": init,
                "mask": base64.b64encode(mask.getvalue()).decode(),
                "strip_metadata": True,
                "output_format": fmt,
            }
        )
    )
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    written = Image.open(io.BytesIO(data))
    assert "icc_profile" not in written.info and "comment" not in written.info
    assert b"PRIVATE-COMMENT" not in data and b"secret" not in data


def test_sidecar_holds_no_image_data_and_no_url_signatures(moto, settings):
    import base64

    _, client = moto
    engine = Engine(bucket_settings(settings, moto[0]))
    init = base64.b64encode(_jpeg_with_private_metadata((10, 200, 10))).decode()
    mask_png = io.BytesIO()
    Image.new("L", (64, 64), 255).save(mask_png, "PNG")
    client.put_object(Bucket=BUCKET, Key="inputs/mask.png", Body=mask_png.getvalue())
    mask_url = client.generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": "inputs/mask.png"}
    )
    assert "Signature=" in mask_url
    job = parse_job(
        {
            "prompt": "x",
            "steps": 2,
            "checkpoint": "demo-sd15",
            "image": init,
            "mask": "s3://" + BUCKET + "/inputs/mask.png",
            "sidecar": True,
        }
    )
    engine.run(job, job_id="job-sidecar")
    body = client.get_object(Bucket=BUCKET, Key="renders/job-sidecar/job.json")["Body"].read()
    sidecar = json.loads(body)
    assert sidecar["inputs"]["image"] == f"<inline image, {len(init)} characters>"
    assert sidecar["inputs"]["mask"] == f"s3://{BUCKET}/inputs/mask.png"
    assert init[:40].encode() not in body and SECRET_KEY.encode() not in body
    # a presigned URL loses its signature
    signed = parse_job({"prompt": "x", "image": init, "mask": mask_url})
    from handler.outputs import public_inputs

    assert public_inputs(signed)["mask"] == mask_url.split("?", 1)[0]


def test_sidecar_inputs_keep_an_uppercase_scheme_url_without_its_signature():
    from handler.outputs import public_inputs
    from handler.schema import parse_job

    job = parse_job({"prompt": "x", "image": "HTTPS://img.example.com/a.png?X-Amz-Signature=S"})
    assert public_inputs(job)["image"] == "https://img.example.com/a.png"


def test_sidecar_inputs_keep_no_url_credentials_signatures_or_image_data():
    from handler.outputs import public_inputs
    from handler.schema import parse_job

    job = parse_job(
        {
            "prompt": "x",
            "image": "https://user:PASSWORD@img.example.com:8443/a.png?X-Amz-Signature=SIG",
            "mask": "data:image/png;base64,AAAA",
        }
    )
    inputs = public_inputs(job)
    assert inputs["image"] == "https://img.example.com:8443/a.png"
    assert inputs["mask"] == "<inline image, 26 characters>"


def test_infotext_is_read_back_whole_by_a1111s_parser():
    """Values with commas or colons are quoted as A1111 quotes them; LoRAs are named by file
    name, as A1111 finds them; a plain schedule says Uniform, else A1111 reads Automatic
    (Karras for DPM++ 2M); embeddings get A1111's TI hashes."""
    from handler.outputs import a1111_infotext
    from tests.test_modes import parse_parameters

    text = a1111_infotext(
        prompt="a cube",
        negative_prompt="",
        steps=20,
        sampler="DPM++ 2M",
        cfg_scale=7,
        seed=1,
        width=64,
        height=64,
        model="RealVision, v5.1 (fp16)",
        model_hash="0123456789",
        loras=[("styles/My Style, v2", 0.5, "abcdefabcdef")],
        embeddings=[("easy:neg", "fedcbafedcba")],
        extra={"VAE": "vae-ft-mse, fixed", "Mask mode": "Inpaint not masked"},
    )
    prompt_line, parameters = text.splitlines()
    assert prompt_line == "a cube <lora:My Style, v2:0.5>"
    fields = parse_parameters(parameters)
    assert fields["Model"] == "RealVision, v5.1 (fp16)" and fields["VAE"] == "vae-ft-mse, fixed"
    assert fields["Sampler"] == "DPM++ 2M" and fields["Schedule type"] == "Uniform"
    assert fields["Lora hashes"] == "My Style v2: abcdefabcdef"
    assert fields["TI hashes"] == "easyneg: fedcbafedcba"
    assert fields["Mask mode"] == "Inpaint not masked" and fields["Seed"] == "1"
    euler = a1111_infotext(
        prompt="x",
        negative_prompt="",
        steps=2,
        sampler="Euler",
        cfg_scale=7,
        seed=1,
        width=64,
        height=64,
        model="m",
        model_hash=None,
    )
    assert "Schedule type" not in parse_parameters(euler.splitlines()[-1])  # Automatic: Normal


def test_embeddings_and_an_inverted_mask_reach_the_infotext(engine):
    import hashlib

    from tests.test_modes import infotext_fields

    job = {"prompt": "a cube, demo-sd15-embedding", "width": 64, "height": 64, "steps": 2}
    fields = infotext_fields(engine.run(parse_job({**job, "checkpoint": "demo-sd15"})))
    path = engine.registry.resolve("embedding", "demo-sd15-embedding", "prompt").path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert fields["TI hashes"] == f"demo-sd15-embedding: {digest}"
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(png, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    inpaint = {**job, "prompt": "a cube", "image": image, "mask": image, "invert_mask": True}
    fields = infotext_fields(engine.run(parse_job({**inpaint, "checkpoint": "demo-sd15"})))
    assert fields["Mask mode"] == "Inpaint not masked"
