"""txt2img through the engine: determinism, seeds, schedulers, timings, cancellation."""

from __future__ import annotations

import base64
import io
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from handler.errors import Cancelled, InvalidInput, WorkerError
from handler.schedulers import SCHEDULER_NAMES
from handler.schema import parse_job

BASE = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "checkpoint": "demo-sd15"}


def pixels(image_result) -> np.ndarray:
    data = base64.b64decode(image_result.image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl", "demo-sd2-768-v"])
def test_same_seed_same_image(engine, checkpoint):
    job = parse_job({**BASE, "checkpoint": checkpoint, "seed": 1234})
    first, second = engine.run(job), engine.run(job)
    assert (pixels(first.images[0]) == pixels(second.images[0])).all()
    assert first.images[0].seed == 1234 and first.seed == 1234


def test_different_seeds_differ(engine):
    a = engine.run(parse_job({**BASE, "seed": 1}))
    b = engine.run(parse_job({**BASE, "seed": 2}))
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() > 0


def test_seed_zero_is_a_seed(engine):
    result = engine.run(parse_job({**BASE, "seed": 0}))
    assert result.seed == 0 and result.images[0].seed == 0


def test_random_seed_is_returned_and_reproduces(engine):
    first = engine.run(parse_job(BASE))
    again = engine.run(parse_job({**BASE, "seed": first.seed}))
    assert (pixels(first.images[0]) == pixels(again.images[0])).all()


def test_batch_image_i_has_seed_plus_i_and_reproduces_alone(engine):
    batch = engine.run(parse_job({**BASE, "seed": 41, "num_images": 3, "scheduler": "Euler a"}))
    assert [image.seed for image in batch.images] == [41, 42, 43]
    alone = engine.run(parse_job({**BASE, "seed": 43, "scheduler": "Euler a"}))
    # Batched matmuls may round differently from single ones; the noise itself is identical.
    assert np.abs(pixels(batch.images[2]) - pixels(alone.images[0])).max() <= 2


@pytest.mark.parametrize("scheduler", ["DPM++ SDE", "DPM++ SDE Karras"])
def test_brownian_noise_samplers_follow_the_seed(engine, scheduler):
    # DPM++ SDE draws noise from a Brownian tree, which diffusers seeds randomly by default.
    job = {**BASE, "scheduler": scheduler}
    first = engine.run(parse_job({**job, "seed": 7}))
    again = engine.run(parse_job({**job, "seed": 7}))
    assert (pixels(first.images[0]) == pixels(again.images[0])).all()
    batch = engine.run(parse_job({**job, "seed": 5, "num_images": 3}))
    assert np.abs(pixels(batch.images[2]) - pixels(first.images[0])).max() <= 2
    assert np.abs(pixels(batch.images[0]) - pixels(first.images[0])).max() > 2


def test_largest_seed_wraps(engine):
    result = engine.run(parse_job({**BASE, "seed": 2**64 - 1, "num_images": 2}))
    assert [image.seed for image in result.images] == [2**64 - 1, 0]


def test_native_size_is_the_default(engine):
    job = parse_job({"prompt": "x", "steps": 1, "checkpoint": "demo-sdxl", "width": 64})
    result = engine.run(job)
    assert (result.width, result.height) == (64, 1024)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_runs_and_is_restored(engine, scheduler):
    loaded, _ = engine.checkpoint("demo-sd15")
    before = loaded.pipeline.scheduler
    result = engine.run(parse_job({**BASE, "seed": 3, "scheduler": scheduler}))
    assert result.scheduler == scheduler and len(result.images) == 1
    assert loaded.pipeline.scheduler is before


@pytest.mark.parametrize("schedule", ["Exponential", "Beta", "SGM Uniform"])
def test_a1111_schedule_types_run_and_reach_the_infotext(engine, schedule):
    from handler.outputs import read_infotext

    job = {**BASE, "seed": 3, "steps": 4}
    plain = engine.run(parse_job({**job, "scheduler": "DPM++ 2M"}))
    result = engine.run(parse_job({**job, "sampler_name": "DPM++ 2M", "scheduler": schedule}))
    assert result.scheduler == f"DPM++ 2M {schedule}"
    assert np.abs(pixels(result.images[0]) - pixels(plain.images[0])).max() > 0
    infotext = read_infotext(base64.b64decode(result.images[0].image.split(",", 1)[1]))
    assert f"Sampler: DPM++ 2M, Schedule type: {schedule}," in infotext


def test_result_carries_timings(engine):
    result = engine.run(parse_job({**BASE, "seed": 3}))
    assert set(result.timings_ms) == {"load", "denoise", "decode", "encode", "upload", "total"}
    assert all(value >= 0 for value in result.timings_ms.values())
    assert result.timings_ms["total"] >= result.timings_ms["denoise"]


def test_progress_reports_every_step(engine):
    seen = []
    engine.run(parse_job({**BASE, "steps": 3, "seed": 1}), progress=seen.append)
    denoising = [p.step for p in seen if p.phase == "denoising"]
    assert denoising == [1, 2, 3] and seen[0].phase == "loading" and seen[-1].phase == "uploading"


def test_cancel_stops_between_steps_and_leaves_scheduler(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    before = loaded.pipeline.scheduler
    steps = []
    with pytest.raises(Cancelled):
        engine.run(
            parse_job({**BASE, "steps": 5, "seed": 1, "scheduler": "Euler"}),
            progress=lambda p: steps.append(p.step) if p.phase == "denoising" else None,
            cancelled=lambda: len(steps) >= 2,
        )
    assert len(steps) == 2 and loaded.pipeline.scheduler is before


def test_inpainting_checkpoint_refuses_txt2img(engine):
    with pytest.raises(InvalidInput) as info:
        engine.run(parse_job({**BASE, "checkpoint": "demo-sd15-inpaint"}))
    assert info.value.field == "checkpoint"


def test_a_refused_job_loads_nothing_and_pushes_nothing_out(settings):
    """Jobs refused for what they ask, not for what their checkpoint holds, are refused before
    their checkpoint loads: the warm checkpoint stays where it was, the next job finds it."""
    from dataclasses import replace

    from handler.engine import Engine

    engine = Engine(replace(settings, gpu_checkpoints=1, cpu_checkpoints=0, max_pixels=512 * 512))
    job = {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 1}
    engine.run(parse_job({**job, "checkpoint": "demo-sd15"}))
    warm = list(engine.cache._entries)
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode()
    refused = [
        ({"guidance_rescale": 0.7, "guidance_scale": 1}, "guidance_rescale"),
        ({"image": "bm90IGFuIGltYWdl"}, "image"),
        ({"image": image, "mask": "bm90IGFuIGltYWdl"}, "mask"),
        ({"mask": image}, "mask"),
        ({"image": image, "strength": 0.1}, "strength"),
        ({"checkpoint": "demo-sdxl-inpaint"}, "checkpoint"),
        ({"checkpoint": "demo-sdxl-refiner"}, "checkpoint"),
        ({"refiner_checkpoint": "demo-sd15", "high_noise_frac": 0.5}, "refiner_checkpoint"),
        ({"destination": "s3"}, "destination"),  # no bucket on this worker
        # what the checkpoint's architecture decides, read from its header
        ({"width": 1024, "height": 1024}, "width"),
        ({"width": 512, "height": 512, "hires": {"scale": 2}}, "hires.scale"),
        ({"image": image, "mask": image, "hires": {"scale": 2}}, "hires"),
        ({"loras": [{"name": "nope"}]}, "loras[0].name"),
        ({"loras": [{"name": "demo_sd15_peft"}]}, "loras[0].name"),
        ({"prompt": "x <lora:nope:1>"}, "prompt"),
        ({"vae": "nope"}, "vae"),
    ]
    for extra, field in refused:
        with pytest.raises(WorkerError) as info:
            engine.run(parse_job({**job, "checkpoint": "demo-sdxl", **extra}))
        assert info.value.field == field, (extra, info.value)
        assert list(engine.cache._entries) == warm and engine.cache.on_device(warm[0]), extra


def test_too_few_steps_for_the_strength_says_how_many_would_do(engine):
    """worker-sdxl's image_url runs at its default strength 0.3, which its client never sent:
    the error also gives the steps that would work at that strength."""
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode()
    payload = {"prompt": "x", "image_url": image, "num_inference_steps": 2}
    with pytest.raises(InvalidInput) as info:
        engine.run(parse_job({**payload, "checkpoint": "demo-sd15"}))
    assert info.value.message == "steps x strength = 2 x 0.3 leaves no denoising step"
    assert info.value.accepted.endswith(", or at least 4 steps at strength 0.3")


def test_a_default_size_over_the_pixel_cap_says_it_is_the_checkpoints(settings):
    from dataclasses import replace

    from handler.engine import Engine

    small = Engine(replace(settings, max_pixels=512 * 512))
    with pytest.raises(InvalidInput) as info:
        small.run(parse_job({"prompt": "x", "steps": 1, "checkpoint": "demo-sdxl"}))
    assert info.value.message.startswith("1024x1024 (the size demo-sdxl draws at) is 1048576")


def test_a_refiner_that_is_no_checkpoint_is_the_refiners_error(settings, demo_volume, tmp_path):
    """A LoRA file named as the refiner fails the file's checks: the error names
    `refiner_checkpoint`, not the job's good base checkpoint."""
    from dataclasses import replace

    from handler.engine import Engine

    (tmp_path / "checkpoints").mkdir()
    lora = demo_volume / "loras" / "demo_sdxl_kohya.safetensors"
    shutil.copy(lora, tmp_path / "checkpoints" / "not-a-refiner.safetensors")
    engine = Engine(replace(settings, extra_roots=(str(tmp_path),)))
    job = {**BASE, "checkpoint": "demo-sdxl", "high_noise_frac": 0.5}
    with pytest.raises(WorkerError) as info:
        engine.run(parse_job({**job, "refiner_checkpoint": "not-a-refiner"}))
    assert info.value.code == "unsupported_model"
    assert info.value.field == "refiner_checkpoint", info.value


def test_an_sd2_file_without_its_prediction_type_says_what_was_assumed(settings, tmp_path):
    """SD 2.x files rarely record v-prediction or epsilon; the assumption reaches the user, in
    each job's warnings and in list_models, with what to add to the volume to change it."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from handler.engine import Engine

    (tmp_path / "checkpoints").mkdir()
    source = pathlib.Path(settings.models_dir) / "checkpoints" / "demo-sd2-768-v.safetensors"
    save_file(load_file(source), str(tmp_path / "checkpoints" / "sd2-plain.safetensors"))
    # the tiny model's sizes (its sidecar config folder), without its recorded prediction type
    shutil.copytree(source.with_suffix(".config"), tmp_path / "checkpoints" / "sd2-plain.config")
    engine = Engine(replace(settings, models_dir=str(tmp_path)))
    (entry,) = engine.list_models()["checkpoints"]
    assert entry["architecture"] == "sd2-768-v"
    assert any("NAME.yaml" in note for note in entry["notes"])
    result = engine.run(parse_job({**BASE, "checkpoint": "sd2-plain"}))
    assert any("assumed v-prediction" in warning for warning in result.warnings)


def test_ddims_eta_adds_its_noise_reproducibly_and_reaches_the_infotext(engine):
    """A1111's "Eta for DDIM" (webuiapi sends eta 1 with every request): diffusers' DDIM eta,
    its noise drawn from the job's generators, so the same seed gives the same image."""
    from handler.outputs import read_infotext

    job = {**BASE, "scheduler": "DDIM", "steps": 4, "seed": 8}
    plain = engine.run(parse_job(job))
    noisy, again = (
        engine.run(parse_job({**job, "sampler_name": "DDIM", "eta": 1.0})) for _ in "ab"
    )
    assert np.abs(pixels(noisy.images[0]) - pixels(plain.images[0])).max() > 0
    assert (pixels(noisy.images[0]) == pixels(again.images[0])).all()
    data = base64.b64decode(noisy.images[0].image.split(",", 1)[1])
    assert read_infotext(data).endswith("Model: demo-sd15, Eta DDIM: 1")
    with pytest.raises(InvalidInput) as info:
        parse_job({**job, "scheduler": "Euler a", "eta": 0.5})  # A1111 would change the noise
    assert info.value.field == "eta"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_formats(engine, fmt):
    result = engine.run(parse_job({**BASE, "seed": 1, "output_format": fmt}))
    image = result.images[0]
    assert image.image.startswith(f"data:image/{fmt};base64,")
    decoded = base64.b64decode(image.image.split(",", 1)[1])
    assert len(decoded) == image.bytes
    assert Image.open(io.BytesIO(decoded)).format == fmt.upper()


@pytest.mark.parametrize(
    ("checkpoint", "scheduler"), [("demo-sd15", "PNDM"), ("demo-sdxl", "Euler DDIM")]
)
def test_same_image_as_plain_diffusers(engine, checkpoint, scheduler):
    """The handler path (per-image decode, our scheduler objects) draws what diffusers draws
    (SDXL's default Euler runs on the config's "leading" spacing, A1111's DDIM schedule type)."""
    import torch

    loaded, _ = engine.checkpoint(checkpoint)
    ours = engine.run(
        parse_job(
            {
                "prompt": "a cube",
                "width": 64,
                "height": 64,
                "steps": 3,
                "seed": 5,
                "checkpoint": checkpoint,
                "scheduler": scheduler,
            }
        )
    )
    plain = loaded.pipeline(
        "a cube",
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=7.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    reference = np.asarray(plain.convert("RGB"), dtype=np.int16)
    assert np.abs(pixels(ours.images[0]) - reference).max() <= 1


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [("ATTENTION_BACKEND", "fastest", "cudnn"), ("SAFETY_POLICY", "Delete", "withhold")],
)
def test_an_unknown_choice_stops_the_worker_at_start(monkeypatch, name, value, accepted):
    from handler.settings import Settings

    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInput) as info:
        Settings.from_env()
    assert info.value.field == name and accepted in info.value.accepted
    monkeypatch.setenv("ATTENTION_BACKEND", " cuDNN ")
    monkeypatch.setenv("SAFETY_POLICY", "Withhold")
    settings = Settings.from_env()  # read case-insensitively
    assert (settings.attention, settings.safety_policy) == ("cudnn", "withhold")


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("COMPILE", "maybe", "1, true, yes, on, 0, false, no, off"),
        ("GPU_CHECKPOINTS", "abc", "int from 1 up"),
        ("GPU_CHECKPOINTS", "0", "int from 1 up"),
        ("CPU_CHECKPOINTS", "-5", "int from 0 up"),
        ("LORA_CACHE_MB", "-1", "int from 0 up"),
        ("COMPILE_CACHE_KEEP_DAYS", "-3", "float from 0.0 to 36500"),
        ("COMPILE_CACHE_KEEP_DAYS", "nan", "float from 0.0 to 36500"),  # pruned every cache
        ("INPUT_TIMEOUT_S", "abc", "float from 0.1 to 3600"),
        ("INPUT_TIMEOUT_S", "inf", "float from 0.1 to 3600"),  # failed every URL job
        ("INPUT_TIMEOUT_S", "1e10", "float from 0.1 to 3600"),
        ("BUCKET_PRESIGN_TTL", "864000", "int from 1 to 604800"),  # SigV4's limit is 7 days
    ],
)
def test_a_malformed_setting_stops_the_worker_naming_it(monkeypatch, name, value, accepted):
    from handler.settings import Settings

    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInput) as info:
        Settings.from_env()
    assert info.value.field == name and info.value.accepted == accepted


@pytest.mark.parametrize(
    ("variables", "field"),
    [
        ({"BUCKET_ACCESS_KEY_ID": "a"}, "BUCKET_SECRET_ACCESS_KEY"),
        ({"BUCKET_SECRET_ACCESS_KEY": "s"}, "BUCKET_ACCESS_KEY_ID"),
        ({"BUCKET_PUBLIC_URL": "cdn.example.com"}, "BUCKET_PUBLIC_URL"),
    ],
)
def test_bucket_settings_that_would_fail_every_upload_stop_the_worker(
    monkeypatch, variables, field
):
    """Half a key pair started the worker, and every job then failed (internal_error, even
    inline ones: the client is built per job); a public URL without a scheme made URLs that
    are none."""
    from handler.settings import Settings

    monkeypatch.setenv("BUCKET_NAME", "images")
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "http://127.0.0.1:9")
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidInput) as info:
        Settings.from_env()
    assert info.value.field == field


def test_names_and_devices_in_variables_forgive_spaces_and_case(monkeypatch):
    from handler.settings import Settings

    monkeypatch.setenv("DEFAULT_CHECKPOINT", " demo-sd15 ")
    monkeypatch.setenv("DEVICE", "CPU")
    settings = Settings.from_env()
    assert (settings.default_checkpoint, settings.device) == ("demo-sd15", "cpu")


def test_require_gpu_stops_an_engine_without_cuda(settings, monkeypatch):
    """Checked by the engine, so Cog's setup fails too: only the RunPod worker checked it."""
    from dataclasses import replace

    from handler.engine import Engine

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(InvalidInput) as info:
        Engine(replace(settings, require_gpu=True, device=None))
    assert info.value.field == "REQUIRE_GPU"


def test_a_configured_checkpoints_errors_name_its_variable(settings, demo_volume, tmp_path):
    from dataclasses import replace

    from handler.engine import Engine
    from handler.errors import UnsupportedModel

    root = tmp_path / "root"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "broken.safetensors").write_bytes(b"7 bytes")
    engine = Engine(replace(settings, models_dir=str(root), default_checkpoint="broken"))
    with pytest.raises(UnsupportedModel) as info:
        engine.setup()
    assert info.value.field == "DEFAULT_CHECKPOINT"


def test_an_unreadable_model_root_is_skipped_with_a_warning(settings, monkeypatch, caplog):
    """Workers often run as root, for whom every file is readable: the check is os.access."""
    import os

    from handler.registry import Registry

    real_access = os.access
    demo = settings.models_dir
    monkeypatch.setattr(
        "os.access", lambda path, mode, **kw: str(path) != demo and real_access(path, mode, **kw)
    )
    assert str(demo) not in [str(r) for r in Registry(settings).roots]
    assert "not readable" in caplog.text


def test_an_unreadable_model_file_is_a_clean_refusal(tmp_path, monkeypatch):
    from pathlib import Path

    from handler.errors import UnsupportedModel
    from handler.registry import read_safetensors_header

    path = tmp_path / "locked.safetensors"
    path.write_bytes(b"x" * 64)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(UnsupportedModel) as info:
        read_safetensors_header(Path(path), "loras")
    assert "cannot be read (Permission denied)" in info.value.message


@pytest.mark.parametrize("device", ["foo", "cuda:99", "meta"])
def test_an_unusable_device_stops_the_worker_naming_it(device):
    from handler.engine import pick_device

    with pytest.raises(InvalidInput) as info:
        pick_device(device)
    assert info.value.field == "DEVICE" and "cpu, cuda or cuda:N" in info.value.accepted
    assert pick_device(" cpu ").type == "cpu"


def test_flags_read_yes_and_no_in_any_spelling(monkeypatch):
    from handler.settings import Settings

    for value, expected in (("TRUE", True), (" on ", True), ("No", False), ("0", False)):
        monkeypatch.setenv("COMPILE", value)
        assert Settings.from_env().compile is expected
    monkeypatch.setenv("COMPILE", "")
    assert Settings.from_env().compile is False  # empty is unset: the default


def test_a_models_dir_that_is_not_a_folder_is_named_in_a_warning(monkeypatch, tmp_path, caplog):
    from handler.settings import Settings

    monkeypatch.setenv("MODELS_DIR", str(tmp_path / "mistyped"))
    with caplog.at_level("WARNING", logger="handler.settings"):
        Settings.from_env()
    assert any(f"MODELS_DIR {tmp_path / 'mistyped'} is not a folder" in m for m in caplog.messages)


def test_jobs_leave_no_library_chatter_on_stderr(demo_volume):
    """What a Replicate user sees in prediction logs: no progress bars or library deprecation
    warnings from loading LoRAs (two adapters) and an img2img view, in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    script = f"""
import base64, io
from PIL import Image
from handler.engine import Engine
from handler.schema import parse_job
from handler.settings import Settings

engine = Engine(Settings(models_dir={str(demo_volume)!r}, extra_roots=(), device="cpu"))
buffer = io.BytesIO()
Image.new("RGB", (64, 64)).save(buffer, "PNG")
image = base64.b64encode(buffer.getvalue()).decode()
job = {{"checkpoint": "demo-sd15", "width": 64, "height": 64, "steps": 2}}
engine.run(parse_job({{**job, "prompt": "x <lora:demo_sd15_kohya:0.5>", "loras": [{{"name": "demo_sd15_peft"}}]}}))
engine.run(parse_job({{**job, "prompt": "x", "image": image, "strength": 0.5, "steps": 4}}))
"""
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for noise in ("Loading weights", "Warning", "it/s]"):
        assert noise not in done.stderr, done.stderr[-2000:]


def test_a_default_checkpoint_that_cannot_run_plain_jobs_is_said_at_start(settings, caplog):
    """An inpainting DEFAULT_CHECKPOINT, or a MAX_IMAGE_PIXELS below its native size, started
    a worker whose plain jobs all failed, with nothing in its log."""
    from dataclasses import replace

    from handler.engine import Engine

    assert Engine(settings)._preloadable("demo-sd15-inpaint", "DEFAULT_CHECKPOINT", refiner=False)
    small = Engine(replace(settings, max_pixels=256 * 256))
    small._preloadable("demo-sd15", "DEFAULT_CHECKPOINT", refiner=False)
    assert "demo-sd15-inpaint is an inpainting checkpoint" in caplog.text
    assert "demo-sd15 draws 512x512 by default, over MAX_IMAGE_PIXELS" in caplog.text


def test_log_prompts_puts_the_prompt_in_the_jobs_log_line(engine, monkeypatch, caplog):
    from dataclasses import replace

    job = parse_job({**BASE, "prompt": "a logged cube"})
    with caplog.at_level("INFO", logger="handler.engine"):
        engine.run(job)
        monkeypatch.setattr(engine, "settings", replace(engine.settings, log_prompts=True))
        engine.run(job)
    done = [message for message in caplog.messages if " done: model=" in message]
    assert len(done) == 2 and "a logged cube" not in done[0]
    assert done[1].endswith(" prompt='a logged cube'")
