"""The RunPod worker over real HTTP: the SDK's local API (`--rp_serve_api`) on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import shutil

import pytest
import requests
from PIL import Image

from tests.servers import start_runpod_api

SECRET_PROMPT = "zebra-7f3a9c tangerine lighthouse"


@pytest.fixture(scope="module")
def api(demo_volume, tmp_path_factory):
    log = tmp_path_factory.mktemp("runpod") / "worker.log"
    # Asking the SDK for DEBUG logs (which print whole jobs and outputs) must not leak them.
    url, server = start_runpod_api(
        demo_volume, log, DEFAULT_CHECKPOINT="demo-sdxl", RUNPOD_LOG_LEVEL="DEBUG"
    )
    try:
        yield url, server
    finally:
        server.stop()


def runsync(api, job_input, timeout=300) -> dict:
    url, _ = api
    response = requests.post(f"{url}/runsync", json={"input": job_input}, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def decode(image: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image["image"].split(",", 1)[1])))


def test_native_payload(api):
    reply = runsync(
        api,
        {
            "prompt": SECRET_PROMPT,
            "checkpoint": "demo-sd15",
            "width": 64,
            "height": 64,
            "steps": 2,
            "seed": 7,
            "num_images": 2,
        },
    )
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert [image["seed"] for image in output["images"]] == [7, 8]
    assert decode(output["images"][0]).size == (64, 64)
    assert set(output["timings_ms"]) >= {"load", "denoise", "decode", "encode", "total"}


def test_lora_job_reports_its_merge_time(api):
    job = {"prompt": "a cube", "checkpoint": "demo-sd15", "width": 64, "height": 64, "steps": 2}
    reply = runsync(api, {**job, "loras": [{"name": "demo_sd15_kohya", "scale": 0.5}]})
    assert reply["status"] == "COMPLETED", reply
    timings = reply["output"]["timings_ms"]
    assert 0 <= timings["loras"] <= timings["total"]


def test_worker_sdxl_payload(api):
    reply = runsync(
        api,
        {
            "prompt": "a lighthouse",
            "negative_prompt": "blurry",
            "height": 64,
            "width": 64,
            "num_inference_steps": 3,
            "guidance_scale": 7.5,
            "scheduler": "K_EULER_ANCESTRAL",
            "num_images": 1,
            "seed": None,
            "refiner_inference_steps": 5,
            "high_noise_frac": 0.8,
        },
    )
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert output["scheduler"] == "Euler a" and output["steps"] == 3
    assert output["architecture"] == "sdxl" and isinstance(output["seed"], int)
    assert any("refiner" in warning for warning in output["warnings"])


def test_worker_sdxl_image_url_runs_img2img(api):
    first = runsync(
        api, {"prompt": "a cube", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
    )
    init = first["output"]["images"][0]["image"]
    reply = runsync(
        api,
        {
            "prompt": "a cube",
            "image_url": init,
            "strength": 0.5,
            "num_inference_steps": 4,
            "seed": 1,
        },
    )
    assert reply["status"] == "COMPLETED", reply
    assert (reply["output"]["width"], reply["output"]["height"]) == (64, 64)


def test_a1111_payload(api):
    reply = runsync(
        api,
        {
            "prompt": "a cube",
            "negative_prompt": "",
            "steps": 2,
            "cfg_scale": 6,
            "sampler_name": "DPM++ 2M",
            "scheduler": "Karras",
            "batch_size": 2,
            "n_iter": 1,
            "seed": -1,
            "width": 64,
            "height": 64,
            "override_settings": {"sd_model_checkpoint": "demo-sd15.safetensors [0123456789]"},
            "restore_faces": False,
            "send_images": True,
            "save_images": False,
        },
    )
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert output["checkpoint"] == "demo-sd15" and output["scheduler"] == "DPM++ 2M Karras"
    assert len(output["images"]) == 2 and output["images"][1]["seed"] == output["seed"] + 1


def test_run_then_status(api):
    url, _ = api
    queued = requests.post(
        f"{url}/run",
        json={"input": {"prompt": "x", "width": 64, "height": 64, "steps": 2, "seed": 3}},
        timeout=30,
    ).json()
    assert queued["status"] in ("IN_QUEUE", "IN_PROGRESS") and queued["id"]
    status = requests.post(f"{url}/status/{queued['id']}", timeout=300).json()
    assert status["status"] == "COMPLETED", status
    assert status["output"]["images"][0]["seed"] == 3


def test_list_models_action(api):
    reply = runsync(api, {"action": "list_models"})
    assert reply["status"] == "COMPLETED", reply
    checkpoints = {c["name"]: c["architecture"] for c in reply["output"]["checkpoints"]}
    assert checkpoints["demo-sdxl"] == "sdxl" and checkpoints["demo-sd15"] == "sd15"
    assert {lora["name"]: lora["base"] for lora in reply["output"]["loras"]}[
        "demo_sdxl_kohya"
    ] == "sdxl"


@pytest.mark.parametrize(
    ("job_input", "prefix"),
    [
        ({"steps": 3}, "invalid_input: prompt: is required"),
        ({"prompt": "x", "steps": 500}, "invalid_input: steps:"),
        ({"prompt": "x", "width": 100}, "invalid_input: width:"),
        ({"prompt": "x", "guidance_scale": -1}, "invalid_input: guidance_scale:"),
        ({"prompt": "x", "checkpoint": "../../etc/passwd"}, "invalid_input: checkpoint:"),
        ({"prompt": "x", "checkpoint": "/etc/passwd"}, "invalid_input: checkpoint:"),
        ({"prompt": "x", "checkpoint": "demo-sd1.5"}, "model_not_found: checkpoint:"),
        ({"prompt": "x", "stepz": 3}, "invalid_input: stepz:"),
        (
            {"prompt": "x", "steps": 2, "num_inference_steps": 3},
            "invalid_input: num_inference_steps:",
        ),
        ({"prompt": "x", "scheduler": "warp drive"}, "invalid_input: scheduler:"),
        (
            {"prompt": "x", "steps": 2, "guidance_scale": 1, "rescale_cfg": 0.7},
            "invalid_input: rescale_cfg:",  # named as sent
        ),
        ({"prompt": "x", "guidance_rescale": 2}, "invalid_input: guidance_rescale:"),
        ({"action": "reboot"}, "invalid_input: action:"),
        ({"prompt": "x", "image_url": "file:///etc/passwd"}, "invalid_input: image_url:"),
        ({"prompt": "x", "image_url": "https://127.0.0.1/x.png"}, "invalid_input: image_url:"),
    ],
)
def test_bad_payloads_fail_with_a_code_and_the_field(api, job_input, prefix):
    reply = runsync(api, job_input)
    assert reply["status"] == "FAILED", reply
    assert reply["error"].startswith(prefix), reply["error"]
    assert "Traceback" not in reply["error"]


def test_non_object_input(api):
    """The SDK's local API refuses it itself (422); on RunPod the handler answers invalid_input."""
    url, _ = api
    response = requests.post(f"{url}/runsync", json={"input": "test"}, timeout=30)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "input"]


def test_model_not_found_lists_the_available_names(api):
    reply = runsync(api, {"prompt": "x", "checkpoint": "demo-sdx"})
    assert reply["status"] == "FAILED", reply
    assert (
        reply["error"].startswith("model_not_found: checkpoint: ") and "demo-sdxl" in reply["error"]
    )


def test_logs_carry_no_prompts_no_base64_and_one_line_per_job(api):
    _, server = api
    before = server.log()
    runsync(api, {"prompt": SECRET_PROMPT, "width": 64, "height": 64, "steps": 2, "seed": 11})
    log = server.log()
    assert log.startswith(before)
    assert SECRET_PROMPT not in log
    assert "base64," not in log and "iVBOR" not in log
    assert "DEBUG" not in log  # RUNPOD_LOG_LEVEL=DEBUG was held at INFO
    done = [line for line in log[len(before) :].splitlines() if " done: model=" in line]
    assert len(done) == 1, done
    assert "size=64x64" in done[0] and "steps=2" in done[0] and "timings_ms=" in done[0]


def test_a1111_inpainting_payload(api):
    import numpy as np

    init = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))
    mask = np.zeros((64, 64), dtype="uint8")
    mask[16:48, 16:48] = 255

    def b64(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    reply = runsync(
        api,
        {
            "prompt": "a cube",
            "init_images": [b64(init)],
            "mask": b64(Image.fromarray(mask)),
            "mask_blur": 0,
            "denoising_strength": 0.8,
            "steps": 4,
            "seed": 2,
            "override_settings": {"sd_model_checkpoint": "demo-sd15"},
        },
    )
    assert reply["status"] == "COMPLETED", reply
    out = np.asarray(decode(reply["output"]["images"][0]).convert("RGB"))
    keep = mask == 0
    assert (out[keep] == np.asarray(init)[keep]).all()


def test_a1111_hires_fix_payload(api):
    reply = runsync(
        api,
        {
            "prompt": "a cube",
            "width": 64,
            "height": 64,
            "steps": 3,
            "seed": 4,
            "enable_hr": True,
            "hr_scale": 2,
            "hr_upscaler": "Latent",
            "hr_second_pass_steps": 2,
            "denoising_strength": 0.6,
            "override_settings": {"sd_model_checkpoint": "demo-sd15"},
        },
    )
    assert reply["status"] == "COMPLETED", reply
    assert (reply["output"]["width"], reply["output"]["height"]) == (128, 128)
    assert decode(reply["output"]["images"][0]).size == (128, 128)


def test_worker_sdxl_refiner_payload_with_a_refiner(api):
    reply = runsync(
        api,
        {
            "prompt": "a lighthouse",
            "width": 64,
            "height": 64,
            "num_inference_steps": 4,
            "seed": 5,
            "high_noise_frac": 0.75,
            "refiner_checkpoint": "demo-sdxl-refiner",
        },
    )
    assert reply["status"] == "COMPLETED", reply
    assert not any("refiner" in w for w in reply["output"]["warnings"])


def test_weighted_long_prompt_with_the_safety_checker_is_deterministic(api):
    """A1111 weights, BREAK, a prompt past 75 tokens and the safety checker, over HTTP."""
    words = ", ".join(f"detail{i}" for i in range(50))
    job = {
        "prompt": f"a (lighthouse:1.3) at [dusk] BREAK {words}",
        "checkpoint": "demo-sd15",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 17,
        "num_images": 2,
        "safety_checker": True,
    }
    first, second = runsync(api, job), runsync(api, job)
    assert first["status"] == second["status"] == "COMPLETED", first
    images = first["output"]["images"]
    assert [image["nsfw"] for image in images] == [True, True]  # the demo checker flags all
    assert len(images) == 2 and all("image" in image for image in images)  # blurred, not dropped
    assert decode(images[0]).tobytes() == decode(second["output"]["images"][0]).tobytes()
    assert not any("truncat" in w for w in first["output"]["warnings"])


def test_cfg_rescale_by_forges_name_and_a_vae_on_a_checkpoint_without_one(api, demo_volume):
    from safetensors.torch import load_file, save_file

    job = {"prompt": "a cube", "checkpoint": "demo-sd15", "width": 64, "height": 64}
    job.update(steps=3, seed=4)
    plain = runsync(api, job)["output"]["images"][0]
    rescaled = runsync(api, {**job, "rescale_cfg": 0.7})["output"]["images"][0]
    assert "Rescale CFG: 0.7" in decode(rescaled).info["parameters"]
    assert decode(rescaled).tobytes() != decode(plain).tobytes()

    # the demo SD 1.5 checkpoint saved without its VAE, and that VAE under vae/
    checkpoints = demo_volume / "checkpoints"
    state = load_file(str(checkpoints / "demo-sd15.safetensors"))
    vae = {k: v for k, v in state.items() if k.startswith("first_stage_model.")}
    save_file(
        {k: v for k, v in state.items() if k not in vae},
        str(checkpoints / "api-no-vae.safetensors"),
    )
    shutil.copytree(checkpoints / "demo-sd15.config", checkpoints / "api-no-vae.config")
    (demo_volume / "vae").mkdir(exist_ok=True)
    save_file(
        {k.removeprefix("first_stage_model."): v for k, v in vae.items()},
        str(demo_volume / "vae" / "api-sd15-vae.safetensors"),
    )
    try:
        listed = runsync(api, {"action": "list_models"})["output"]["checkpoints"]
        assert {e["name"]: e for e in listed}["api-no-vae"]["needs_vae"] is True
        refused = runsync(api, {**job, "checkpoint": "api-no-vae"})
        assert refused["status"] == "FAILED"
        assert refused["error"].startswith("invalid_input: vae:"), refused["error"]
        with_vae = runsync(api, {**job, "checkpoint": "api-no-vae", "vae": "api-sd15-vae"})
        image = with_vae["output"]["images"][0]
        assert decode(image).tobytes() == decode(plain).tobytes()  # the same weights
    finally:
        (checkpoints / "api-no-vae.safetensors").unlink()
        shutil.rmtree(checkpoints / "api-no-vae.config")
        (demo_volume / "vae" / "api-sd15-vae.safetensors").unlink()
