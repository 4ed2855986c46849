"""FP8=1's linear layers: the math (on the CPU, where torch also has row-scaled fp8 products),
conversion and its undoing, and LoRA merges reaching the fp8 copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handler import fp8
from handler.schema import parse_job

pytestmark = pytest.mark.skipif(fp8.FP8 is None, reason="this torch has no float8")

SDXL = {
    "prompt": "a cube",
    "width": 64,
    "height": 64,
    "steps": 2,
    "seed": 5,
    "checkpoint": "demo-sdxl",
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(64, 96)
        self.odd = torch.nn.Linear(64, 40)  # 40 is not a multiple of 16
        self.time_emb_proj = torch.nn.Linear(64, 64)


def test_row_quantization_keeps_each_row_within_fp8_precision():
    matrix = torch.randn(48, 256) * torch.logspace(-3, 3, 48).unsqueeze(1)
    quantized, scale = fp8.quantize_rows(matrix)
    assert quantized.dtype == fp8.FP8 and scale.shape == (48, 1)
    restored = quantized.float() * scale
    for row, original in zip(restored, matrix, strict=True):
        # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value
        assert relative_error(row, original) < 1 / 16


def test_convert_skips_small_and_odd_layers_and_stays_close_to_fp32():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(2, 16, 64)
    expected = block.proj(x)
    assert fp8.convert(block) == 1
    assert fp8.convert(block) == 0  # idempotent
    assert isinstance(block.proj.forward, fp8.Fp8Forward)
    got = block.proj(x)
    assert got.shape == expected.shape
    assert 0 < relative_error(got, expected) < 0.06
    # rows not a multiple of 16 take the exact path
    odd_rows = torch.randn(3, 64)
    assert torch.equal(block.proj(odd_rows), torch.nn.functional.linear(odd_rows, *_wb(block)))
    fp8.revert(block)
    assert "forward" not in block.proj.__dict__
    assert torch.equal(block.proj(x), expected)


def _wb(block: Block):
    return block.proj.weight, block.proj.bias


def test_requantize_rewrites_the_fp8_copy_in_place():
    torch.manual_seed(1)
    block = Block()
    fp8.convert(block)
    forward = block.proj.forward
    pointers = forward.weight.data_ptr(), forward.scale.data_ptr()
    x = torch.randn(32, 64)
    with torch.no_grad():
        block.proj.weight.mul_(3)
    stale = block.proj(x)
    fp8.requantize([block.proj, block.odd])  # block.odd has no fp8 copy: ignored
    fresh = block.proj(x)
    exact = torch.nn.functional.linear(x, *_wb(block))
    assert relative_error(fresh, exact) < 0.06 < relative_error(stale, exact)
    # the same memory: CUDA graphs that read it stay valid
    assert (forward.weight.data_ptr(), forward.scale.data_ptr()) == pointers


def test_lora_jobs_merge_into_and_restore_the_fp8_copies(engine):
    loaded, _ = engine.checkpoint(SDXL["checkpoint"])
    unet = loaded.pipeline.unet
    try:
        assert fp8.convert(unet) > 0
        copies = {forward: forward.weight.clone() for forward in _fp8_forwards(unet)}
        plain = engine.run(parse_job(SDXL))
        lora = {**SDXL, "loras": [{"name": "demo_sdxl_peft", "scale": 1.0}]}
        with_lora = engine.run(parse_job(lora))
        after = engine.run(parse_job(SDXL))
        assert np.abs(_pixels(with_lora) - _pixels(plain)).max() > 16, "the LoRA missed fp8"
        # CPU matrix products may round differently with the buffers' alignment: off by one
        assert np.abs(_pixels(after) - _pixels(plain)).max() <= 1
        assert set(_fp8_forwards(unet)) == set(copies)
        for forward, copy in copies.items():
            assert torch.equal(forward.weight.view(torch.uint8), copy.view(torch.uint8))
    finally:
        fp8.revert(unet)


def _fp8_forwards(module: torch.nn.Module) -> list[fp8.Fp8Forward]:
    forwards = [m.__dict__.get("forward") for m in module.modules()]
    return [f for f in forwards if isinstance(f, fp8.Fp8Forward)]


def _pixels(result) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    data = base64.b64decode(result.images[0].image.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def test_fp8_is_not_offered_on_the_cpu():
    assert not fp8.supported(torch.device("cpu"))


def test_fp8_images_differ_little_from_fp16(engine):
    """The same job with the UNet's linear layers in fp8: close to, not equal to, the plain image."""
    loaded, _ = engine.checkpoint(SDXL["checkpoint"])
    plain = engine.run(parse_job(SDXL))
    try:
        fp8.convert(loaded.pipeline.unet)
        quantized = engine.run(parse_job(SDXL))
    finally:
        fp8.revert(loaded.pipeline.unet)
    mse = np.mean((_pixels(plain) - _pixels(quantized)) ** 2)
    assert 0 < mse, "fp8 did not run"
    assert 10 * np.log10(255**2 / mse) > 20  # PSNR in dB
