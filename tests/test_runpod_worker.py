"""The RunPod worker, through the SDK's own local modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_worker(args: list[str], demo_volume: Path, **env) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "MODELS_DIR": str(demo_volume),
        "DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "handler", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_test_input_runs_a_job_and_shows_its_seed(demo_volume):
    job = {"input": {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "seed": 7}}
    out = run_worker(["--test_input", json.dumps(job)], demo_volume)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "completed successfully" in out.stdout
    assert "'seed': 7" in out.stdout
    assert "used 'demo-sd15'" in out.stdout  # no DEFAULT_CHECKPOINT: the first one, with a warning
    assert "a red cube" not in out.stderr  # the job log line never carries the prompt


def test_test_input_with_a_bad_payload_fails_with_a_code(demo_volume):
    job = {"input": {"prompt": "x", "steps": 0}}
    out = run_worker(["--test_input", json.dumps(job)], demo_volume, DEFAULT_CHECKPOINT="demo-sd15")
    assert out.returncode == 1
    assert "invalid_input: steps:" in out.stdout


# -- the handler in-process (what the SDK calls), with the session engine ----------------------

import asyncio  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from handler import runpod_worker  # noqa: E402

JOB = {
    "prompt": "a cube",
    "width": 64,
    "height": 64,
    "steps": 2,
    "seed": 5,
    "checkpoint": "demo-sd15",
}


@pytest.fixture()
def worker(engine, monkeypatch):
    """runpod_worker using the session engine, with progress updates recorded."""
    monkeypatch.setattr(runpod_worker, "_engine", engine)
    sent = []
    monkeypatch.setattr(
        runpod_worker, "send_progress", lambda job, update: sent.append((time.monotonic(), update))
    )
    return sent


def test_non_object_input_is_invalid(worker):
    reply = runpod_worker.run_job({"id": "x", "input": "test"}, threading.Event())
    assert reply["error"].startswith("invalid_input: input: the job input must be a JSON object")


def test_an_action_with_other_fields_names_them_cut(worker):
    key = "a secret prompt about someone, far longer than forty characters"
    reply = runpod_worker.run_job(
        {"id": "x", "input": {"action": "list_models", key: 1}}, threading.Event()
    )
    assert reply["error"].startswith("invalid_input: input: list_models takes no other fields")
    assert key not in reply["error"] and key[:40] in reply["error"]


def test_progress_updates_are_phased_and_throttled(worker):
    reply = asyncio.run(runpod_worker.handle({"id": "p", "input": {**JOB, "steps": 12}}))
    assert "images" in reply
    phases = [update["phase"] for _, update in worker]
    assert phases[0] == "loading" and "denoising" in phases and phases[-1] == "uploading"
    denoising = [(t, u) for t, u in worker if u["phase"] == "denoising"]
    assert all(u["total"] == 12 and 1 <= u["step"] <= 12 for _, u in denoising)
    gaps = [b[0] - a[0] for a, b in zip(denoising, denoising[1:], strict=False)]
    assert all(gap >= runpod_worker.PROGRESS_INTERVAL_S - 0.01 for gap in gaps)


def test_cancel_stops_the_job_between_steps_and_leaves_no_state(worker, engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    scheduler_before = loaded.pipeline.scheduler
    clean = runpod_worker.run_job({"id": "a", "input": JOB}, threading.Event())
    steps_seen = []

    async def scenario():
        original = engine.run

        def run_recording(job, progress=None, cancelled=None, inline_limit=None, job_id="x"):
            def record(p):
                steps_seen.append(p.step) if p.phase == "denoising" else None
                progress(p)

            return original(job, record, cancelled, inline_limit, job_id)

        engine.run = run_recording
        try:
            task = asyncio.create_task(
                runpod_worker.handle({"id": "c", "input": {**JOB, "steps": 40}})
            )
            while len(steps_seen) < 2:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            engine.run = original

    asyncio.run(scenario())
    with engine._lock:  # the engine thread has let go: it stopped at its next step
        stopped_at = len(steps_seen)
    time.sleep(0.3)
    assert stopped_at < 40 and len(steps_seen) == stopped_at
    assert loaded.pipeline.scheduler is scheduler_before
    again = runpod_worker.run_job({"id": "b", "input": JOB}, threading.Event())
    assert _pixels(again["images"][0]) == _pixels(clean["images"][0])


def _pixels(image: dict) -> bytes:
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image["image"].split(",", 1)[1]))).tobytes()


def run_with_unet_fault(engine, fault, job_id: str) -> dict:
    """Run JOB through the handler with `fault(module, args)` called before each UNet forward."""
    loaded, _ = engine.checkpoint("demo-sd15")
    hook = loaded.pipeline.unet.register_forward_pre_hook(fault)
    try:
        return runpod_worker.run_job({"id": job_id, "input": JOB}, threading.Event())
    finally:
        hook.remove()


def test_persistent_oom_asks_for_a_fresh_worker(worker, engine):
    calls = []

    def out_of_memory(module, args):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    reply = run_with_unet_fault(engine, out_of_memory, "o")
    assert reply["error"].startswith("out_of_memory:") and reply["refresh_worker"] is True
    assert len(calls) == 2  # tried, emptied the cache, retried once
    assert "images" in runpod_worker.run_job({"id": "o2", "input": JOB}, threading.Event())


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        (torch.OutOfMemoryError("CUDA out of memory (injected)"), "out_of_memory:"),
        (RuntimeError("CUDA error: an illegal memory access (injected)"), "internal_error:"),
    ],
)
def test_a_gpu_failure_while_loading_models_asks_for_a_fresh_worker(
    worker, engine, monkeypatch, fault, code
):
    def load(*args, **kwargs):
        raise fault

    monkeypatch.setattr(engine, "checkpoint", load)  # as a checkpoint moving to the GPU would
    reply = runpod_worker.run_job({"id": "l", "input": JOB}, threading.Event())
    assert reply["error"].startswith(code) and reply["refresh_worker"] is True


def test_a_single_oom_is_retried_and_succeeds(worker, engine):
    calls = []

    def first_call_fails(module, args):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    reply = run_with_unet_fault(engine, first_call_fails, "o")
    assert "images" in reply and "refresh_worker" not in reply


def test_unexpected_errors_fail_with_a_code_and_the_worker_goes_on(worker, engine, caplog):
    def broken(module, args):
        raise ValueError("something internal broke")

    reply = run_with_unet_fault(engine, broken, "u")
    assert reply["error"].startswith("internal_error:") and "Traceback" not in reply["error"]
    assert "something internal broke" not in reply["error"]
    assert "something internal broke" in caplog.text  # the details went to the log
    assert "images" in runpod_worker.run_job({"id": "u2", "input": JOB}, threading.Event())


def test_output_over_the_reply_cap_fails_with_output_too_large(engine):
    from handler.errors import OutputTooLarge
    from handler.schema import parse_job

    with pytest.raises(OutputTooLarge) as info:
        engine.run(parse_job({**JOB, "num_images": 2}), inline_limit=1000)
    assert "BUCKET_ENDPOINT_URL" in info.value.accepted


def test_fitness_checks(monkeypatch, tmp_path, settings, engine):
    from dataclasses import replace

    from handler.engine import Engine

    checks = {c.__name__: c for c in runpod_worker.fitness_checks()}
    missing = Engine(replace(settings, models_dir=str(tmp_path / "missing")))
    monkeypatch.setattr(runpod_worker, "_engine", missing)
    with pytest.raises(RuntimeError, match="no readable model root"):
        checks["model_root_is_readable"]()
    monkeypatch.setattr(runpod_worker, "_engine", engine)  # the demo volume
    checks["model_root_is_readable"]()


def test_fitness_warns_of_an_empty_volume(monkeypatch, tmp_path, settings, caplog):
    from dataclasses import replace

    from handler.engine import Engine
    from handler.errors import ModelNotFound
    from handler.schema import parse_job

    empty = tmp_path / "volume"
    (empty / "checkpoints").mkdir(parents=True)
    bare = Engine(replace(settings, models_dir=str(empty)))
    monkeypatch.setattr(runpod_worker, "_engine", bare)
    checks = {c.__name__: c for c in runpod_worker.fitness_checks()}
    with caplog.at_level("WARNING"):
        checks["volume_has_a_checkpoint"]()  # the bare image: list_models still answers
    assert "no checkpoint on the model roots" in caplog.text
    with pytest.raises(ModelNotFound) as info:  # and a job says where it looked
        bare.run(parse_job({"prompt": "x"}))
    assert str(empty) in info.value.message


def test_a_worker_told_to_check_images_without_a_checker_does_not_start(tmp_path, settings):
    from dataclasses import replace

    from handler.engine import Engine

    (tmp_path / "checkpoints").mkdir()
    engine = Engine(replace(settings, models_dir=str(tmp_path), safety_checker=True))
    with pytest.raises(Exception, match="safety_checker"):
        engine.setup()  # what get_engine() runs before the worker takes jobs


def test_device_side_assert_asks_for_a_fresh_worker(worker, engine):
    def device_assert(module, args):
        raise RuntimeError("CUDA error: device-side assert triggered (injected)")

    reply = run_with_unet_fault(engine, device_assert, "d")
    assert reply["error"].startswith("internal_error:") and reply["refresh_worker"] is True


def test_worker_with_a_bad_default_checkpoint_refuses_to_start(demo_volume):
    out = run_worker([], demo_volume, DEFAULT_CHECKPOINT="does-not-exist")
    assert out.returncode == 1
    assert "worker cannot start: model_not_found: DEFAULT_CHECKPOINT" in out.stderr + out.stdout


def test_a_worker_with_a_malformed_setting_says_which_and_stops(demo_volume):
    out = run_worker([], demo_volume, GPU_CHECKPOINTS="two")
    assert out.returncode == 1
    log = out.stderr + out.stdout
    assert "worker cannot start: invalid_input: GPU_CHECKPOINTS: 'two' is not a number" in log
    assert "Traceback" not in log


def test_the_sdk_is_imported_without_py_cpuinfo_starting_a_process():
    # In a fresh interpreter: record every process started while the SDK is imported.
    code = """
import json, subprocess
started = []
class Recording(subprocess.Popen):
    def __init__(self, args, *rest, **kwargs):
        started.append([str(a) for a in args])
        super().__init__(args, *rest, **kwargs)
subprocess.Popen = Recording
from handler.runpod_worker import cpu_model_name, import_runpod
import cpuinfo
original = cpuinfo.get_cpu_info
import_runpod()
from runpod.serverless.utils import rp_debugger
print(json.dumps({"started": started, "processor": rp_debugger.PROCESSOR,
                  "from_proc": cpu_model_name(), "restored": cpuinfo.get_cpu_info is original}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [args for args in report["started"] if "cpuinfo" in " ".join(args)]
    assert report["processor"] == report["from_proc"] and report["processor"] != "unknown CPU"
    assert report["restored"]  # py-cpuinfo is left as it was for anyone else


def test_the_sdk_log_level_is_held_at_info_and_says_so(capsys):
    from runpod.serverless.modules.rp_logger import RunPodLogger

    runpod_worker.keep_sdk_log_at_info()
    logger = RunPodLogger()
    for asked in ("DEBUG", "trace", 2):  # 2: DEBUG by its index
        logger.set_level(asked)
        assert logger.level == "INFO"
    logger.set_level("ERROR")
    assert logger.level == "ERROR"
    logger.set_level("INFO")
    printed = capsys.readouterr().out
    assert "Log level set to INFO" in printed and "DEBUG" not in printed


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"cfg_scale": 50}, "cfg_scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"enable_hr": True, "hr_scale": 9}, "hr_scale"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 20}}, "override_settings."),
        ({"init_images": [""]}, "init_images[0]"),
        ({"rescale_cfg": 2}, "rescale_cfg"),
        ({"enable_hr": True, "width": 1536, "height": 1536}, "enable_hr"),  # A1111's hr_scale 2
        # the engine's own refusal (steps x strength), after parsing: the name sent, still
        ({"init_images": ["data:image/png;base64,{png}"], "denoising_strength": 0.1}, "denoising"),
    ],
)
def test_errors_name_the_field_as_the_client_sent_it(worker, payload, field):
    import base64
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    encoded = base64.b64encode(png.getvalue()).decode()
    if "init_images" in payload and payload["init_images"][0]:
        payload = {**payload, "init_images": [payload["init_images"][0].format(png=encoded)]}
    job = {"prompt": "x", "width": 64, "height": 64, "steps": 4, "checkpoint": "demo-sd15"}
    if "num_inference_steps" in payload:
        del job["steps"]
    reply = runpod_worker.run_job({"id": "alias", "input": {**job, **payload}}, threading.Event())
    assert reply["error"].startswith(f"invalid_input: {field}"), reply
