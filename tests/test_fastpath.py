"""The GPU fast path: CUDA graphs of the UNet, the compile cache folder, the fp16-first VAE decode.

The CUDA tests are marked `gpu` and skip without CUDA; run them on the GPU machine with
`pytest -m gpu tests/test_fastpath.py` before a benchmark.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from handler.fastpath import (
    LAST_USED,
    CompiledForward,
    LayoutCache,
    UNetGraphs,
    compile_cache_dir,
    compile_vae_decoder,
    compiled_vae_decoder,
    config_fingerprint,
    precompiled_forward,
    prune_compile_caches,
    use_compile_cache,
)
from handler.pipelines import LatentDecoder
from handler.schema import parse_job

CACHE_VARIABLES = (
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
    "TORCHINDUCTOR_FX_GRAPH_CACHE",
    "TORCHINDUCTOR_AUTOGRAD_CACHE",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
JOB = {"prompt": "a red cube", "width": 64, "height": 64, "steps": 3, "seed": 5}


def pixels(result) -> np.ndarray:
    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        norm_num_groups=4,
        attention_head_dim=2,
    ).eval()


def test_installed_graphs_leave_cpu_calls_to_the_eager_unet():
    unet = tiny_unet()
    sample, states = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 12)
    with torch.inference_mode():
        expected = unet(sample, torch.tensor(10), encoder_hidden_states=states).sample
        graphs = UNetGraphs(unet).install()
        got = unet(sample, torch.tensor(10), encoder_hidden_states=states).sample
        as_tuple = unet(sample, 10, states, return_dict=False)[0]
    assert torch.equal(got, expected) and torch.equal(as_tuple, expected)
    assert len(graphs) == 0 and graphs.captures == 0
    graphs.uninstall()
    assert "forward" not in unet.__dict__


def test_engine_on_cpu_installs_no_graphs(engine):
    loaded, _ = engine.checkpoint("demo-sd15")
    assert loaded.graphs is None


def test_compile_cache_is_keyed_by_gpu_and_torch_version(tmp_path):
    folder = compile_cache_dir(None, [tmp_path])
    assert folder.parent == tmp_path / ".sd-worker-cache" / "torch-compile"
    assert torch.__version__ in folder.name
    assert compile_cache_dir(str(tmp_path / "elsewhere"), []).parent == tmp_path / "elsewhere"
    assert compile_cache_dir(None, [tmp_path / "missing"]) is None


def test_the_worker_cache_goes_to_a_mounted_volume_before_the_images_own_disk(
    tmp_path, monkeypatch
):
    from handler import fastpath

    baked, volume = tmp_path / "models", tmp_path / "runpod-volume"
    (volume / "models").mkdir(parents=True)
    baked.mkdir()
    roots = [baked, volume / "models", volume]  # the image's search order
    assert fastpath.worker_cache_dir(roots) == baked / ".sd-worker-cache"  # no mount: the first
    monkeypatch.setattr(fastpath.os.path, "ismount", lambda p: str(p) in (str(volume), "/"))
    assert fastpath.worker_cache_dir(roots) == volume / "models" / ".sd-worker-cache"
    # a read-only volume: back to the image's disk
    monkeypatch.setattr(fastpath.os, "access", lambda p, mode: volume not in [p, *p.parents])
    assert fastpath.worker_cache_dir(roots) == baked / ".sd-worker-cache"


def test_compile_caches_of_versions_unused_for_the_keep_days_are_pruned(
    tmp_path, monkeypatch, caplog
):
    for name in CACHE_VARIABLES:  # use_compile_cache sets them: restored after the test
        monkeypatch.delenv(name, raising=False)
    current = tmp_path / "NVIDIA-H200-torch2.13.0"
    use_compile_cache(current)
    month_ago = time.time() - 30 * 86400
    for name, stamp in [("NVIDIA-H200-torch2.11.0", month_ago), ("NVIDIA-H100-torch2.13.0", None)]:
        (tmp_path / name / "precompiled").mkdir(parents=True)
        (tmp_path / name / LAST_USED).touch()
        if stamp:
            os.utime(tmp_path / name / LAST_USED, (stamp, stamp))
    (tmp_path / "someone-elses").mkdir()  # no marker: never the worker's to delete
    os.utime(tmp_path / "someone-elses", (month_ago, month_ago))
    os.utime(current / LAST_USED, (month_ago, month_ago))  # the current one is always kept

    assert prune_compile_caches(current, keep_days=0) == []  # 0: never prune
    with caplog.at_level("INFO", logger="handler.fastpath"):
        assert prune_compile_caches(current, keep_days=14) == ["NVIDIA-H200-torch2.11.0"]
    assert "removed the compile cache NVIDIA-H200-torch2.11.0: unused for 14 days" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "NVIDIA-H100-torch2.13.0",
        "NVIDIA-H200-torch2.13.0",
        "someone-elses",
    ]
    use_compile_cache(current)  # a start refreshes the marker
    assert (current / LAST_USED).stat().st_mtime > month_ago


def test_layout_choices_survive_a_restart_and_bad_files_mean_timing_again(tmp_path):
    path = tmp_path / ".sd-worker-cache" / "unet-layouts.json"
    LayoutCache(path).put(
        "H100|sdxl|128x128", "contiguous", {"contiguous": 43.4, "channels_last": 45.9}
    )
    LayoutCache(path).put("H100|sd15|64x64", "channels_last", {"channels_last": 10.6})
    later = LayoutCache(path)  # another worker, reading the volume
    assert later.get("H100|sdxl|128x128") == {
        "best": "contiguous",
        "ms_per_call": {"contiguous": 43.4, "channels_last": 45.9},
    }
    assert later.get("H100|sd15|64x64")["best"] == "channels_last"
    assert later.get("H200|sdxl|128x128") is None
    assert not list(path.parent.glob("*.tmp"))  # written whole, then renamed

    path.write_text("{not json")
    assert LayoutCache(path).get("H100|sdxl|128x128") is None
    path.write_text('{"k": {"best": "sideways"}}')
    assert LayoutCache(path).get("k") is None
    assert LayoutCache(None).get("k") is None
    LayoutCache(None).put("k", "contiguous", {})  # no volume: nothing to keep, no error


FINGERPRINT_IN_A_NEW_PROCESS = """
from diffusers import UNet2DConditionModel
from handler.fastpath import config_fingerprint
unet = UNet2DConditionModel.from_config({
    "block_out_channels": [32, 64], "layers_per_block": 1, "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 4,
})
print(config_fingerprint(unet))
"""


def test_every_worker_process_computes_the_same_config_fingerprint():
    # diffusers keeps a set-ordered `_use_default_values` list in the config: hashing it made
    # each worker look up a different layout key, so none reused an earlier worker's choice.
    fingerprints = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
        run = subprocess.run(
            [sys.executable, "-c", FINGERPRINT_IN_A_NEW_PROCESS],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        fingerprints.add(run.stdout.strip().splitlines()[-1])
    assert len(fingerprints) == 1
    assert len(fingerprints.pop()) == 16


def test_the_config_fingerprint_tells_architectures_apart():
    from diffusers import UNet2DConditionModel

    def tiny(cross_attention_dim):
        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=cross_attention_dim,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=4,
        )

    assert config_fingerprint(tiny(32)) == config_fingerprint(tiny(32))
    assert config_fingerprint(tiny(32)) != config_fingerprint(tiny(48))


def test_an_unwritable_layout_cache_is_only_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    LayoutCache(blocker / "unet-layouts.json").put("k", "contiguous", {"contiguous": 1.0})
    assert "could not save the UNet layout choice" in caplog.text


def test_a_compile_failure_falls_back_to_eager_for_good(monkeypatch, caplog):
    calls = []

    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise RuntimeError("inductor: no C++ compiler")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    layer = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    expected = layer(x)
    layer.forward = CompiledForward(layer, "test layer")
    with caplog.at_level("WARNING", logger="handler.fastpath"):
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x), expected)
    assert layer.forward.failed and len(calls) == 1
    assert "compiled test layer failed (RuntimeError" in caplog.text


def test_running_out_of_memory_in_a_compiled_call_is_not_a_compile_failure(monkeypatch):
    def out_of_memory(fn, **kwargs):
        def compiled(*args, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory")

        return compiled

    monkeypatch.setattr(torch, "compile", out_of_memory)
    layer = torch.nn.Linear(4, 4)
    layer.forward = CompiledForward(layer, "test layer")
    with pytest.raises(torch.OutOfMemoryError):
        layer(torch.randn(2, 4))
    assert not layer.forward.failed  # the engine's OOM retry runs it compiled again


def unet_call():
    torch.manual_seed(1)
    args = (torch.randn(2, 4, 8, 8), torch.tensor(10.0), torch.randn(2, 7, 12))
    return args, {"added_cond_kwargs": None, "return_dict": False}


# Run in a fresh process: load what the test saved, as a later worker would.
LOAD_IN_A_NEW_PROCESS = """
import json, sys
import torch
from torch._dynamo.utils import counters
from handler.fastpath import precompiled_forward
from tests.test_fastpath import tiny_unet, unet_call
unet, (args, kwargs) = tiny_unet(), unet_call()
with torch.inference_mode():
    forward, from_file = precompiled_forward(unet, __import__("pathlib").Path(sys.argv[1]), args, kwargs)
    loaded = forward(*args, **kwargs)[0]
    eager = unet(*args, **kwargs)[0]
    unet.conv_in.weight.add_(0.1)  # in place, as a LoRA merge
    changed, changed_eager = forward(*args, **kwargs)[0], unet(*args, **kwargs)[0]
print(json.dumps({
    "from_file": from_file,
    "traced_graphs": counters["stats"]["unique_graphs"],
    "max_diff": float((loaded - eager).abs().max()),
    "max_diff_after_change": float((changed - changed_eager).abs().max()),
    "change_moved_output": float((changed_eager - eager).abs().max()),
}))
"""


def test_a_precompiled_unet_is_saved_then_loaded_by_a_new_process_without_tracing(
    tmp_path, monkeypatch, caplog
):
    import json

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    unet, (args, kwargs) = tiny_unet(), unet_call()
    path = tmp_path / "precompiled" / "unet.bin"
    renames = []  # the file appears whole: written beside it, then renamed into place
    rename = os.replace

    def recording_rename(source, target):
        if Path(target) == path:
            renames.append((Path(source).name, path.exists(), Path(source).stat().st_size))
        rename(source, target)

    monkeypatch.setattr(os, "replace", recording_rename)
    with torch.inference_mode(), caplog.at_level("INFO", logger="handler.fastpath"):
        forward, loaded = precompiled_forward(unet, path, args, kwargs)
        assert not loaded and path.is_file()
        assert "compiled UNet2DConditionModel ahead of time" in caplog.text
        expected = unet(*args, **kwargs)[0]
        assert torch.allclose(forward(*args, **kwargs)[0], expected, atol=1e-5)
    ((partial, existed, size),) = renames
    assert partial == f"unet.bin.{os.getpid()}.tmp" and not existed
    assert size == path.stat().st_size and not list(path.parent.glob("*.tmp"))

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", LOAD_IN_A_NEW_PROCESS, str(path)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["from_file"] and result["traced_graphs"] == 0  # loaded, not traced again
    assert result["max_diff"] < 1e-5
    assert result["change_moved_output"] > 1e-3
    assert result["max_diff_after_change"] < 1e-5  # reads the weights where they are


def with_lora_layers(unet):
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]), adapter_name="lora")
    unet.disable_adapters()  # as the worker keeps loaded LoRAs between jobs
    return unet


def test_a_precompiled_unet_refuses_a_unet_whose_structure_changed(tmp_path, monkeypatch):
    # The saved guards leave the module's structure out (the file name pins the architecture);
    # a structure that changed anyway, such as a LoRA's peft layers, must still fail them.
    import inspect

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = tmp_path / "unet.bin"
    args, kwargs = unet_call()
    with torch.inference_mode():
        precompiled_forward(tiny_unet(), path, args, kwargs)
    unet = with_lora_layers(tiny_unet())
    external = {"module": unet, "undecorated_forward": inspect.unwrap(type(unet).forward)}
    with path.open("rb") as file:
        compiled = torch.compiler.load_compiled_function(file, external_data=external)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="GuardManager check failed"):
        compiled(unet, *args, **kwargs)


def test_a_unet_holding_lora_layers_is_neither_precompiled_nor_loaded(tmp_path, caplog):
    path = tmp_path / "unet.bin"
    args, kwargs = unet_call()
    with torch.inference_mode(), caplog.at_level("INFO", logger="handler.fastpath"):
        assert precompiled_forward(with_lora_layers(tiny_unet()), path, args, kwargs) is None
    assert "holds LoRA layers: compiled the usual way, not saved" in caplog.text
    assert not list(tmp_path.iterdir())  # no file, no failure marker


def test_an_unreadable_precompiled_file_is_compiled_again_and_replaced(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    path = tmp_path / "unet.bin"
    path.write_bytes(b"not a compiled function")
    unet, (args, kwargs) = tiny_unet(), unet_call()
    with torch.inference_mode(), caplog.at_level("INFO", logger="handler.fastpath"):
        forward, loaded = precompiled_forward(unet, path, args, kwargs)
        assert torch.allclose(forward(*args, **kwargs)[0], unet(*args, **kwargs)[0], atol=1e-5)
    assert not loaded and path.read_bytes() != b"not a compiled function"
    assert "could not load the precompiled UNet2DConditionModel" in caplog.text
    assert "compiled UNet2DConditionModel ahead of time" in caplog.text


def test_a_compiled_unet_that_cannot_be_saved_is_still_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    blocker = tmp_path / "read-only"
    blocker.write_text("a file where the folder should be")
    unet, (args, kwargs) = tiny_unet(), unet_call()
    with torch.inference_mode(), caplog.at_level("WARNING", logger="handler.fastpath"):
        forward, loaded = precompiled_forward(unet, blocker / "unet.bin", args, kwargs)
        assert torch.allclose(forward(*args, **kwargs)[0], unet(*args, **kwargs)[0], atol=1e-5)
    assert not loaded
    assert "could not save the compiled UNet2DConditionModel" in caplog.text


def test_a_torch_without_ahead_of_time_compile_means_compiling_the_usual_way(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # no .aot_compile
    path = tmp_path / "unet.bin"
    args, kwargs = unet_call()
    with torch.inference_mode(), caplog.at_level("WARNING", logger="handler.fastpath"):
        assert precompiled_forward(tiny_unet(), path, args, kwargs) is None
    assert not path.exists()
    assert "could not compile UNet2DConditionModel ahead of time (AttributeError" in caplog.text
    # Later workers go straight to the usual compile instead of failing again first.
    assert "AttributeError" in (tmp_path / "unet.bin.failed").read_text()

    def must_not_compile(fn, **kwargs):
        raise AssertionError("compiled ahead of time again")

    monkeypatch.setattr(torch, "compile", must_not_compile)
    caplog.clear()
    with torch.inference_mode(), caplog.at_level("INFO", logger="handler.fastpath"):
        assert precompiled_forward(tiny_unet(), path, args, kwargs) is None
    assert "an earlier worker could not save it" in caplog.text


def test_the_compiled_vae_decoder_is_saved_for_later_workers_per_shape(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = tmp_path / "precompiled"
    latents = torch.randn(1, 4, 8, 8)

    def decode_in_a_worker(*inputs):
        vae = tiny_vae()
        with torch.inference_mode():
            expected = [vae.decode(x).sample for x in inputs]
            compile_vae_decoder(vae, folder)
            for x, want in zip(inputs, expected, strict=True):
                torch.testing.assert_close(vae.decode(x).sample, want)
        return compiled_vae_decoder(SimpleNamespace(vae=vae))

    with caplog.at_level("INFO", logger="handler.fastpath"):
        first = decode_in_a_worker(latents)
        assert first.precompiled_from_volume == 0 and first.first_calls_ms > 0
        assert len(list(folder.glob("vae-decoder-*.bin"))) == 1
        later = decode_in_a_worker(latents, torch.randn(1, 4, 4, 4))
    assert later.precompiled_from_volume == 1  # the 8x8 latents; the 4x4 ones were new
    assert len(list(folder.glob("vae-decoder-*.bin"))) == 2
    assert "compiled Decoder loaded from vae-decoder-" in caplog.text
    assert not later.failed and "failed" not in caplog.text
    assert not list(folder.glob("*.failed"))


def test_a_precompiled_vae_decoder_whose_guards_fail_is_compiled_the_usual_way(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    folder = tmp_path / "precompiled"
    latents = torch.randn(1, 4, 8, 8)
    vae = tiny_vae()
    with torch.no_grad():
        compile_vae_decoder(vae, folder)
        vae.decode(latents)  # saved with gradients off
    later = tiny_vae()
    compile_vae_decoder(later, folder)
    with caplog.at_level("WARNING", logger="handler.fastpath"):
        got = later.decode(latents).sample  # gradients on: the saved code's guard fails
    decoder = compiled_vae_decoder(SimpleNamespace(vae=later))
    assert "precompiled VAE decoder failed (RuntimeError" in caplog.text
    assert decoder.precompiled_from_volume == 1 and not decoder.failed  # compiled, not eager
    with torch.no_grad():
        torch.testing.assert_close(got, later.decode(latents).sample)


def tiny_vae(**config):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=4,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        **config,
    ).eval()


def test_compiled_vae_decoder_is_channels_last_and_installed_once(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    vae = tiny_vae()
    latents = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():
        expected = vae.decode(latents).sample
        compile_vae_decoder(vae)
        forward = vae.decoder.forward
        compile_vae_decoder(vae)
        got = vae.decode(latents).sample
    assert isinstance(forward, CompiledForward) and vae.decoder.forward is forward
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert vae.encoder.conv_in.weight.is_contiguous()  # only the decoder changes layout
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
)
def test_fp16_vae_decodes_again_in_fp32_only_when_it_overflows(device):
    from diffusers.image_processor import VaeImageProcessor

    vae = tiny_vae(force_upcast=True)

    class Pipeline:
        image_processor = VaeImageProcessor()

    Pipeline.vae = vae.to(device, torch.float16)
    latents = torch.randn(1, 4, 8, 8, device=device)
    with torch.inference_mode(), LatentDecoder(Pipeline) as decoder:
        decoder.decode(latents)
        assert not decoder.upcast  # finite in fp16: no fp32 pass
        # Non-finite latents (an extreme prompt weight) are no overflow of the VAE's: not
        # decoded again, and nothing is remembered for later jobs
        decoder.decode(torch.full_like(latents, float("nan")))
        assert not decoder.upcast and not decoder.last_was_finite
    assert not getattr(vae, "_sd_worker_overflows", False)
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(6e4)  # now fp16 activations overflow
    weights = {name: tensor.clone() for name, tensor in vae.state_dict().items()}
    with torch.inference_mode(), LatentDecoder(Pipeline) as decoder:
        if device == "cpu":
            decoder.wide_dtype = torch.bfloat16  # as on a GPU: a lossy round trip for fp16
        image = decoder.decode(latents)
        assert decoder.upcast and vae.dtype == torch.bfloat16
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()
    # back in fp16 with its exact weights (its encoder serves img2img), not rounded via bf16
    assert vae.dtype == torch.float16
    assert all(torch.equal(weights[n], t) for n, t in vae.state_dict().items())
    with LatentDecoder(Pipeline) as decoder:  # remembered: straight to the wide dtype
        assert decoder.upcast


def runs_out_of_memory_above(vae, side: int) -> list:
    """Make `vae.decode` fail as a GPU too small for latents wider than `side` would."""
    original, sides = vae.decode, []

    def decode(latents, **kwargs):
        sides.append(latents.shape[-1])
        if latents.shape[-1] > side:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(latents, **kwargs)

    vae.decode = decode
    return sides


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
)
def test_a_decode_that_runs_out_of_memory_is_done_in_tiles(device):
    from diffusers.image_processor import VaeImageProcessor

    vae = tiny_vae().to(device)  # a latent is a pixel; its config's tile is 32

    class Pipeline:
        image_processor = VaeImageProcessor()

    Pipeline.vae = vae
    latents = torch.randn(1, 4, 48, 48, device=device)
    with torch.inference_mode(), LatentDecoder(Pipeline) as decoder:
        whole_first_tile = np.asarray(decoder.decode(latents[:, :, :32, :32]))

    def compiled_forward(*args, **kwargs):
        raise AssertionError("tiles must use eager kernels: their shapes are new")

    vae.decoder.forward = compiled_forward
    sides = runs_out_of_memory_above(vae, 32)
    with torch.inference_mode(), LatentDecoder(Pipeline) as decoder:
        tiled = np.asarray(decoder.decode(latents))
        assert decoder.tiled and sides == [48]
        decoder.decode(latents)  # the next image goes straight to tiles
        assert sides == [48]
    assert tiled.shape == (48, 48, 3)
    # The first tile's part before its overlap is that tile decoded alone, bit for bit.
    assert (tiled[:24, :24] == whole_first_tile[:24, :24]).all()
    assert np.abs(tiled.astype(int) - 128).max() > 0  # an image, not a blank
    assert (vae.tile_latent_min_size, vae.tile_sample_min_size) == (32, 32)
    assert vae.decoder.forward is compiled_forward  # put back for whole images
    del vae.decoder.forward
    with torch.inference_mode(), LatentDecoder(Pipeline) as decoder:
        assert not decoder.tiled  # a new job tries the whole image again
        decoder.decode(latents[:, :, :32, :32])
    assert sides == [48, 32]


def test_a_job_whose_decode_runs_out_of_memory_is_delivered_with_a_warning(settings):
    from handler.engine import Engine

    engine = Engine(settings)
    loaded, _ = engine.checkpoint("demo-sd15")
    plain = engine.run(parse_job({**JOB, "checkpoint": "demo-sd15", "num_images": 2}))
    runs_out_of_memory_above(loaded.pipeline.vae, 8)  # its tiles are 8 latents: 64 pixels
    job = {**JOB, "checkpoint": "demo-sd15", "width": 128, "height": 96, "num_images": 2}
    result = engine.run(parse_job(job))
    assert [(i.width, i.height) for i in result.images] == [(128, 96), (128, 96)]
    tiled = [w for w in result.warnings if "tiles" in w]
    assert tiled == [
        "image 0 (seed 5) and any after it: the VAE ran out of GPU memory and decoded in "
        "512-pixel tiles (blended at their overlaps)"
    ]
    assert pixels(result).std() > 0
    small = engine.run(parse_job({**JOB, "checkpoint": "demo-sd15", "num_images": 2}))
    assert not [w for w in small.warnings if "tiles" in w]
    assert (pixels(small) == pixels(plain)).all()


# -- on CUDA ----------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("checkpoint", ["demo-sd15", "demo-sdxl"])
def test_graphed_unet_matches_eager_and_captures_once(cuda_engines, checkpoint):
    graphed, eager = cuda_engines
    job = parse_job({**JOB, "checkpoint": checkpoint})
    first, second = graphed.run(job), graphed.run(job)
    loaded, _ = graphed.checkpoint(checkpoint)
    # one capture, plus one for the other weight layout, plus one if that was slower
    assert loaded.graphs.captures <= 3 and len(loaded.graphs) == 1
    assert loaded.graphs.replays >= 2 * job.steps
    assert (pixels(first) == pixels(second)).all()
    assert np.abs(pixels(first) - pixels(eager.run(job))).max() <= 4


def _test_image_uri(size: int = 64) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    pixels = (np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["hires", "img2img", "inpaint", "refiner"])
def test_hires_img2img_inpainting_and_the_refiner_run_graphed_as_eager(cuda_engines, mode):
    graphed, eager = cuda_engines
    image = _test_image_uri()
    extra = {
        "hires": {"hires": {"scale": 1.5, "steps": 3, "strength": 0.5}},
        "img2img": {"image": image, "strength": 0.6},
        "inpaint": {"image": image, "mask": image, "strength": 0.8},
        "refiner": {
            "checkpoint": "demo-sdxl",
            "refiner_checkpoint": "demo-sdxl-refiner",
            "high_noise_frac": 0.6,
            # encoded for the refiner too, the embedding through its clip_g part
            "prompt": "a (red:1.3) cube BREAK studio light, demo-sdxl-embedding",
        },
    }[mode]
    job = parse_job({**JOB, "checkpoint": "demo-sd15", **extra})
    devices = []
    denoise = graphed._denoise

    def spy(plan, *args):  # where the job's UNets are while it denoises
        devices.append({m.pipeline.unet.device.type for m in (plan.loaded, plan.refiner) if m})
        return denoise(plan, *args)

    graphed._denoise = spy
    try:
        first, again = graphed.run(job), graphed.run(job)
    finally:
        del graphed._denoise
    assert devices == [{"cuda"}, {"cuda"}]  # a refiner never pushes its base off the GPU
    assert (pixels(first) == pixels(again)).all()
    assert np.abs(pixels(first) - pixels(eager.run(job))).max() <= 4


@pytest.mark.gpu
@needs_cuda
def test_brownian_noise_follows_the_seed_on_the_gpu(cuda_engines):
    # DPM++ SDE's Brownian tree draws its noise on the device, seeded from each image's seed
    graphed, _ = cuda_engines
    job = {**JOB, "checkpoint": "demo-sd15", "scheduler": "DPM++ SDE Karras"}
    first = graphed.run(parse_job({**job, "seed": 11}))
    again = graphed.run(parse_job({**job, "seed": 11}))
    other = graphed.run(parse_job({**job, "seed": 12}))
    assert (pixels(first) == pixels(again)).all()
    assert np.abs(pixels(first) - pixels(other)).max() > 0


@pytest.mark.gpu
@needs_cuda
def test_first_capture_times_both_weight_layouts_and_keeps_the_faster(cuda_engines):
    graphed, eager = cuda_engines
    job = parse_job({**JOB, "checkpoint": "demo-sd15"})
    graphed.run(job)
    loaded, _ = graphed.checkpoint("demo-sd15")
    timings = loaded.graphs.layout_ms
    assert set(timings) == {"channels_last", "contiguous"}
    kept = "channels_last" if loaded.pipeline.unet.conv_in.weight.stride()[1] == 1 else "contiguous"
    assert timings[kept] == min(timings.values())
    assert np.abs(pixels(graphed.run(job)) - pixels(eager.run(job))).max() <= 4


@pytest.mark.gpu
@needs_cuda
def test_a_later_worker_takes_the_layout_choice_without_timing(cuda_engines, settings):
    from handler.engine import Engine

    graphed, eager = cuda_engines
    job = parse_job({**JOB, "checkpoint": "demo-sdxl"})
    graphed.run(job)
    first, _ = graphed.checkpoint("demo-sdxl")
    later = Engine(replace(settings, device="cuda"))  # same volume, fresh process state
    result = later.run(job)
    loaded, _ = later.checkpoint("demo-sdxl")
    assert loaded.graphs.captures == 1  # no second capture for the other layout
    # (`first` may have taken it from the volume too: GPU test modules share the volume)
    assert loaded.graphs.layout_from_volume
    assert loaded.graphs.layout_ms == {k: round(v, 3) for k, v in first.graphs.layout_ms.items()}
    weight = loaded.pipeline.unet.conv_in.weight
    assert weight.stride() == first.pipeline.unet.conv_in.weight.stride()
    assert np.abs(pixels(result) - pixels(eager.run(job))).max() <= 4


@pytest.mark.gpu
@needs_cuda
def test_a_later_compiled_worker_loads_the_precompiled_unet(cuda_engines, settings, tmp_path):
    from handler.engine import Engine

    _, eager = cuda_engines
    compiled = replace(settings, device="cuda", compile=True, compile_cache_dir=str(tmp_path))
    job = parse_job({**JOB, "checkpoint": "demo-sd15"})
    wide = parse_job({**JOB, "checkpoint": "demo-sd15", "width": 96})  # a second shape
    first = Engine(compiled)
    first_image = first.run(job)
    first_wide = first.run(wide)
    first_loaded, _ = first.checkpoint("demo-sd15")
    assert first_loaded.graphs.compiled and first_loaded.graphs.precompiled_from_volume == 0
    assert len(list(tmp_path.glob("*/precompiled/unet-*.bin"))) == 2
    assert len(list(tmp_path.glob("*/precompiled/vae-decoder-*.bin"))) == 2
    assert not list(tmp_path.glob("*/precompiled/*.failed"))
    later = Engine(compiled)  # same volume, fresh engine: loads instead of tracing
    later_image = later.run(job)
    assert np.abs(pixels(later.run(wide)) - pixels(first_wide)).max() <= 1
    loaded, _ = later.checkpoint("demo-sd15")
    assert loaded.graphs.compiled and loaded.graphs.precompiled_from_volume == 2
    decoder = compiled_vae_decoder(loaded.pipeline)
    assert decoder.precompiled_from_volume == 2 and not decoder.failed
    assert np.abs(pixels(later_image) - pixels(first_image)).max() <= 1
    assert np.abs(pixels(later_image) - pixels(eager.run(job))).max() <= 4
    lora = later.run(
        parse_job(
            {**JOB, "checkpoint": "demo-sd15", "loras": [{"name": "demo_sd15_kohya", "scale": 1}]}
        )
    )
    assert np.abs(pixels(lora) - pixels(later_image)).max() > 0  # merged weights are read
    assert (pixels(later.run(job)) == pixels(later_image)).all()
    # A new shape while the LoRA stays resident: its layers are kept outside the UNet, so the
    # UNet is compiled ahead and saved like any shape, and so is the decoder.
    tall = parse_job({**JOB, "checkpoint": "demo-sd15", "height": 96})
    tall_image = later.run(tall)
    assert len(list(tmp_path.glob("*/precompiled/unet-*.bin"))) == 3
    assert len(list(tmp_path.glob("*/precompiled/vae-decoder-*.bin"))) == 3
    assert not list(tmp_path.glob("*/precompiled/*.failed"))
    assert np.abs(pixels(tall_image) - pixels(eager.run(tall))).max() <= 4


@pytest.mark.gpu
@needs_cuda
def test_lora_swap_keeps_the_graph_and_leaves_no_trace(cuda_engines):
    graphed, _ = cuda_engines
    job = {**JOB, "checkpoint": "demo-sd15"}
    before = graphed.run(parse_job(job))
    loaded, _ = graphed.checkpoint("demo-sd15")
    captures = loaded.graphs.captures
    with_a = graphed.run(parse_job({**job, "loras": [{"name": "demo_sd15_kohya", "scale": 1}]}))
    # The demo's kohya and peft files hold the same LoRA: a different scale makes them differ.
    with_b = graphed.run(parse_job({**job, "loras": [{"name": "demo_sd15_peft", "scale": 0.5}]}))
    after = graphed.run(parse_job(job))
    assert loaded.graphs.captures == captures  # no recapture for a LoRA swap
    assert np.abs(pixels(with_a) - pixels(before)).max() > 0
    assert np.abs(pixels(with_b) - pixels(with_a)).max() > 0
    assert (pixels(after) == pixels(before)).all()


@pytest.mark.gpu
@needs_cuda
def test_offloaded_checkpoint_is_pinned_drops_its_graphs_and_recaptures(cuda_engines):
    graphed, _ = cuda_engines
    job = {**JOB, "checkpoint": "demo-sd15"}
    lora_job = {**job, "loras": [{"name": "demo_sd15_kohya", "scale": 0.7}]}
    with_lora = graphed.run(parse_job(lora_job))
    before = graphed.run(parse_job(job))
    graphed.run(parse_job({**job, "checkpoint": "demo-sdxl"}))  # pushes SD 1.5 to CPU RAM
    # (an earlier test's refiner may be offloaded beside it)
    offloaded = {
        e.name: e for k, e in graphed.cache._entries.items() if not graphed.cache.on_device(k)
    }
    assert "demo-sd15" in offloaded and "demo-sdxl" not in offloaded
    weights = list(offloaded["demo-sd15"].pipeline.unet.parameters())
    # its resident LoRA's weights, kept outside the UNet, went along
    weights += [w for m in offloaded["demo-sd15"].adapters.weight_modules() for w in m.parameters()]
    assert all(w.device.type == "cpu" and w.is_pinned() for w in weights)  # page-locked
    loaded, _ = graphed.checkpoint("demo-sd15")
    assert len(loaded.graphs) == 0
    again = graphed.run(parse_job(job))
    assert len(loaded.graphs) == 1
    assert (pixels(again) == pixels(before)).all()
    assert (pixels(graphed.run(parse_job(lora_job))) == pixels(with_lora)).all()


@pytest.mark.gpu
@needs_cuda
def test_switching_back_and_forth_reuses_the_page_locked_chunks(cuda_engines):
    graphed, _ = cuda_engines
    jobs = [parse_job({**JOB, "checkpoint": name}) for name in ("demo-sd15", "demo-sdxl")]
    first = [pixels(graphed.run(job)) for job in jobs]  # each job offloads the other checkpoint
    graphed.run(jobs[0])
    created = graphed.cache.host.created
    assert created >= 1
    for _ in range(2):
        again = [pixels(graphed.run(job)) for job in jobs]
    assert graphed.cache.host.created == created  # no new page-locked memory per switch
    assert all((a == b).all() for a, b in zip(again, first, strict=True))
    # The chunks were page-locked by threads (`page_lock_with_threads`), and are page-locked.
    assert graphed.cache.host.locking_threads >= 1
    assert graphed.cache.host.free and all(c.is_pinned() for c in graphed.cache.host.free)


def _host_syncs(engine, job: dict) -> int:
    """How many synchronizing CUDA calls one run of `job` makes (after a first, capturing run)."""
    import warnings

    engine.run(parse_job(job))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.run(parse_job(job))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "scheduler",
    [
        "Euler",
        "DPM++ 2M Karras",
        "DDIM",
        "PNDM",
        pytest.param(
            "UniPC",
            marks=pytest.mark.xfail(
                strict=True, reason="diffusers' UniPC syncs about 7 times a step (measured)"
            ),
        ),
    ],
)
def test_denoising_steps_do_not_wait_for_the_gpu(cuda_engines, scheduler):
    graphed, _ = cuda_engines
    job = {**JOB, "checkpoint": "demo-sd15", "scheduler": scheduler}
    # Four more steps must not add a sync each; syncs outside the loop (decoding) don't count.
    extra = _host_syncs(graphed, {**job, "steps": 8}) - _host_syncs(graphed, {**job, "steps": 4})
    assert extra < 4
