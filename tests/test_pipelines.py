"""Single-file loading: the weights that land in the pipeline are the ones written to disk."""

from __future__ import annotations

import pytest
import torch

from scripts.make_demo_volume import build_components, tiny_folders


def _assert_same_weights(module: torch.nn.Module, expected: torch.nn.Module, label: str) -> None:
    # Resident LoRA adapters (disabled) from earlier tests wrap layers; compare the base weights.
    got = {
        k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k
    }
    want = expected.state_dict()
    assert set(got) == set(want), label
    for key, value in want.items():
        # The file stores fp16 (as civitai files do); the CPU pipeline runs in fp32.
        assert torch.equal(got[key], value.to(torch.float16).to(got[key].dtype)), f"{label}: {key}"


def test_single_file_round_trip_sd15(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    torch.manual_seed(0)  # the seed make_demo_volume used for demo-sd15
    expected = build_components(tiny_folders()["sd15"])
    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(loaded.pipeline, name), expected[name], name)


def test_single_file_round_trip_sdxl(engine):
    loaded, _ = engine.checkpoint("demo-sdxl")
    torch.manual_seed(1)
    expected = build_components(tiny_folders()["sdxl"])
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        _assert_same_weights(getattr(loaded.pipeline, name), expected[name], name)


def test_loaded_pipeline_uses_bundled_tokenizers(engine):
    loaded, _ = engine.checkpoint("demo-sdxl")
    assert loaded.pipeline.tokenizer("a photo of a cat").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
    ]
    assert loaded.pipeline.tokenizer_2.pad_token == "!"
    # each pipeline has its own: embeddings add tokens to it for the length of a job
    other, _ = engine.checkpoint("demo-sd15")
    assert other.pipeline.tokenizer is not loaded.pipeline.tokenizer


def test_sd2_v_prediction_reaches_the_scheduler(engine):
    loaded, _ = engine.checkpoint("demo-sd2-768-v")
    assert loaded.pipeline.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"


def test_loading_needs_no_network(demo_volume, tmp_path):
    """A fresh process with the hub forced offline and no proxy to reach loads and generates."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json; from handler.engine import Engine; from handler.schema import parse_job;"
        "r = Engine().run(parse_job({'prompt': 'x', 'width': 64, 'height': 64, 'steps': 1, 'seed': 3,"
        " 'checkpoint': 'demo-sdxl'})); print(json.dumps({'seed': r.seed}))"
    )
    env = {
        **os.environ,
        "MODELS_DIR": str(demo_volume),
        "HF_HUB_OFFLINE": "1",
        "DEVICE": "cpu",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"seed": 3}
    assert not (tmp_path / "empty-hf-home").exists() or not any(
        (tmp_path / "empty-hf-home").rglob("*.json")
    )


def test_diffusers_folder_loads_and_matches_single_file(engine, demo_volume):
    from handler.schema import parse_job

    loaded, _ = engine.checkpoint("demo-sd15")
    folder = demo_volume / "checkpoints" / "demo-sd15-diffusers"
    if not folder.exists():
        loaded.pipeline.save_pretrained(folder)
    job = {"prompt": "a cube", "width": 64, "height": 64, "steps": 2, "seed": 5}
    from_file = engine.run(parse_job({**job, "checkpoint": "demo-sd15"}))
    from_folder = engine.run(parse_job({**job, "checkpoint": "demo-sd15-diffusers"}))
    assert from_folder.architecture == "sd15"
    # Same pixels; the files differ only in infotext (a folder has no AutoV2 hash).
    assert _pixels(from_folder.images[0]) == _pixels(from_file.images[0])


@pytest.mark.parametrize("renamed", ["all", "unet only"])
def test_a_diffusers_folder_saved_as_the_fp16_variant_loads(engine, demo_volume, renamed):
    """`save_pretrained(variant="fp16")` (and an SDXL repo's fp16 files alone) name the weights
    `*.fp16.safetensors`: the folder was listed as sd15, and every job on it failed."""
    import shutil

    from handler.schema import parse_job

    loaded, _ = engine.checkpoint("demo-sd15")
    folder = demo_volume / "checkpoints" / f"demo-sd15-fp16-{renamed.replace(' ', '-')}"
    loaded.pipeline.save_pretrained(folder, variant="fp16")
    if renamed == "unet only":  # the other parts as plain files: diffusers falls back to them
        for part in folder.iterdir():
            for weights in part.glob("*.fp16.safetensors") if part.name != "unet" else []:
                weights.rename(weights.with_name(weights.name.replace(".fp16", "")))
    try:
        job = {"prompt": "a cube", "width": 64, "height": 64, "steps": 2, "seed": 5}
        from_file = engine.run(parse_job({**job, "checkpoint": "demo-sd15"}))
        from_folder = engine.run(parse_job({**job, "checkpoint": folder.name}))
        assert _pixels(from_folder.images[0]) == _pixels(from_file.images[0])
    finally:
        shutil.rmtree(folder)


def _pixels(image_result) -> bytes:
    import base64
    import io

    from PIL import Image

    data = base64.b64decode(image_result.image.split(",", 1)[1])
    return Image.open(io.BytesIO(data)).tobytes()


@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_img2img_and_inpaint_views_share_the_fp16_weights(settings, checkpoint):
    """from_pipe must neither copy the weights nor cast the shared modules to fp32."""
    from handler.engine import Engine
    from handler.pipelines import pipeline_for

    engine = Engine(settings)
    engine.dtype = torch.float16  # as on a GPU
    loaded, _ = engine.checkpoint(checkpoint)
    unet_weight = loaded.pipeline.unet.conv_in.weight
    pointer = unet_weight.data_ptr()
    for mode in ("img2img", "inpaint"):
        view = pipeline_for(loaded, mode)
        assert view.unet is loaded.pipeline.unet and view.vae is loaded.pipeline.vae
    assert loaded.pipeline.unet.dtype == torch.float16
    assert loaded.pipeline.text_encoder.dtype == torch.float16
    assert loaded.pipeline.unet.conv_in.weight.data_ptr() == pointer


def test_offloaded_weights_are_packed_into_shared_chunks_keeping_their_layout():
    from handler.pipelines import HostChunks, pack_into_chunks

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3).half().to(memory_format=torch.channels_last)
    linear = torch.nn.Linear(16, 16)
    big = torch.nn.Parameter(torch.randn(64, 64))  # 16 KiB: more than a chunk
    ids = torch.arange(7)
    overflow = torch.randn(512)  # 2 KiB: no longer fits in the first chunk
    tensors = [conv.weight, conv.bias, linear.weight, ids, big, overflow]
    before = [(t.clone(), t.stride(), t.dtype, id(t)) for t in tensors]
    host, chunks = HostChunks(4096, pin_memory=False), []
    pack_into_chunks(tensors, host, chunks)
    for tensor, (value, stride, dtype, identity) in zip(tensors, before, strict=True):
        assert torch.equal(tensor, value) and tensor.stride() == stride
        assert tensor.dtype == dtype and id(tensor) == identity
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(linear.weight, torch.nn.Parameter)
    chunks = [t.untyped_storage().data_ptr() for t in tensors]
    # 576 + 16 + 1024 + 56 bytes, each at a 512-byte boundary: 3 KiB of the first chunk
    assert len(set(chunks[:4])) == 1
    assert chunks[4] not in chunks[:4] and chunks[5] not in chunks[:5]
    assert host.created == 3  # the shared chunk, the big tensor's own, the overflow's


def _offload_and_bring_back(modules, host):
    """What the cache does on CPU terms: pack into the pool's chunks, then give the weights
    new memory (as the copy back to the GPU does) and the chunks back to the pool."""
    from handler.pipelines import pack_into_chunks

    chunks = []
    tensors = [t for m in modules for t in m.parameters()]
    pack_into_chunks(tensors, host, chunks)
    for tensor in tensors:
        tensor.data = tensor.data.clone()
    return chunks


def test_host_chunks_are_reused_by_the_next_offload_and_the_weights_survive():
    from handler.pipelines import HostChunks

    torch.manual_seed(0)
    first, second = torch.nn.Linear(32, 32), torch.nn.Conv2d(8, 8, 3)
    values = [t.clone() for m in (first, second) for t in m.parameters()]
    host = HostChunks(4096, pin_memory=False)
    host.give_back(_offload_and_bring_back([first], host))
    made = host.created
    assert made >= 1 and len(host.free) == made
    # the other checkpoint's offload takes the same chunks: nothing new is allocated
    host.give_back(_offload_and_bring_back([second], host))
    host.give_back(_offload_and_bring_back([first], host))
    assert host.created == made
    after = [t for m in (first, second) for t in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, values, strict=True))


def test_an_evicted_checkpoints_chunks_wait_until_its_modules_are_gone():
    import gc

    from handler.pipelines import HostChunks, pack_into_chunks

    module = torch.nn.Linear(32, 32)
    host = HostChunks(8192, pin_memory=False)
    chunks = []
    pack_into_chunks(list(module.parameters()), host, chunks)
    host.retire(chunks, [module])
    held = module.weight.clone()
    pack_into_chunks([torch.randn(16)], host, [])  # needs a chunk: the retired one is in use
    assert host.created == 2 and torch.equal(module.weight, held)
    del module
    gc.collect()
    pack_into_chunks([torch.randn(16)], host, [])
    assert host.created == 2  # the evicted checkpoint's chunk, reused


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA grants page-locked memory")
def test_offloading_falls_back_to_ordinary_ram_when_page_locking_is_refused(caplog):
    from handler.pipelines import HostChunks, move_to_host

    torch.manual_seed(0)
    module = torch.nn.Linear(8, 8)
    before = module.weight.clone()
    # Without CUDA, PyTorch refuses every page-locked allocation.
    with caplog.at_level("WARNING", logger="handler.pipelines"):
        chunks = move_to_host([module], HostChunks(pin_memory=True))
    assert "no page-locked host memory" in caplog.text
    assert module.weight.device.type == "cpu" and torch.equal(module.weight, before)
    assert not any(c.is_pinned() for c in chunks)


@pytest.fixture
def allocator_settings():
    """Reads PyTorch's allocator settings, and restores them after a test that changes them."""
    if not hasattr(torch._C, "_accelerator_getAllocatorSettings"):
        pytest.skip("this PyTorch cannot read its allocator settings back (2.11 cannot)")
    yield torch._C._accelerator_getAllocatorSettings
    torch._C._accelerator_setAllocatorSettings("pinned_use_cuda_host_register:False")


def test_page_locking_uses_threads_and_keeps_the_users_allocator_options(
    monkeypatch, allocator_settings
):
    from handler.pipelines import page_lock_with_threads

    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert page_lock_with_threads(threads=8) == 4
    # The user's options first (setting replaces them), then ours: 6 cores -> 4 threads,
    # PyTorch takes powers of two only.
    assert allocator_settings() == (
        "max_split_size_mb:512,pinned_use_cuda_host_register:True,pinned_num_register_threads:4"
    )


def test_a_users_own_page_locking_setting_wins(monkeypatch, allocator_settings):
    from handler.pipelines import page_lock_with_threads

    before = allocator_settings()
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "pinned_use_cuda_host_register:False")
    assert page_lock_with_threads() == 0
    assert allocator_settings() == before
