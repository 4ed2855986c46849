"""FP8=1: the UNet's large linear layers multiply in fp8 (float8 e4m3) on GPUs with fp8 tensor
cores (compute capability 8.9 and up: Ada, Hopper, Blackwell).

An fp8 matrix product runs at about twice the fp16 rate, and on SDXL most of a step's work is
the transformer blocks' linear layers. Each converted layer keeps its fp16 weight (LoRAs are
merged into it) and gets an fp8 copy with one scale per output channel; each call quantizes its
input with one scale per row (token) and calls `torch._scaled_mm`. This changes the pixels a
little (README gives the PSNR against fp16), so it is opt-in.

The fp8 copy is rewritten in place whenever the fp16 weight changes (`requantize`), so CUDA
graphs that read it stay valid across LoRA swaps. Layers whose shapes fp8 kernels do not take
(a dimension not a multiple of 16) and calls with such a row count run in fp16 as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # the largest float8_e4m3fn value
# Small layers gain nothing: the time embedding works on one row per image.
SKIPPED = ("time_emb", "time_embedding", "add_embedding")


def supported(device: torch.device) -> bool:
    """Whether `device` has fp8 tensor cores and this torch can use them."""
    if device.type != "cuda" or FP8 is None or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`matrix` (rows, columns) as float8 with one float32 scale per row: q * scale ~ matrix."""
    amax = matrix.detach().abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    quantized = (matrix.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, scale


def convert(module: torch.nn.Module) -> int:
    """Give every eligible nn.Linear under `module` an fp8 forward; returns how many."""
    count = 0
    for name, linear in module.named_modules():
        if type(linear) is not torch.nn.Linear or any(s in name for s in SKIPPED):
            continue
        if linear.in_features % 16 or linear.out_features % 16 or _fp8_forward(linear):
            continue
        linear.forward = Fp8Forward(linear)
        count += 1
    return count


def revert(module: torch.nn.Module) -> None:
    """Undo `convert`: fp16 forwards, fp8 copies freed."""
    for linear in module.modules():
        if _fp8_forward(linear) is not None:
            del linear.forward


def requantize(linears: list[torch.nn.Module]) -> None:
    """Rewrite the fp8 copies of `linears` whose weights changed in place, in place."""
    for linear in linears:
        forward = _fp8_forward(linear)
        if forward is not None:
            forward.quantize_weight()


def _fp8_forward(module: torch.nn.Module) -> Fp8Forward | None:
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, Fp8Forward) else None


class Fp8Forward:
    """An nn.Linear's forward through fp8: rows of the input quantized as they come."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.linear = linear
        quantized, scale = quantize_rows(linear.weight)
        self.weight = quantized  # (out, in) row-major: its transpose is what _scaled_mm takes
        self.scale = scale.reshape(1, -1).contiguous()  # (1, out)

    def quantize_weight(self) -> None:
        with torch.no_grad():
            quantized, scale = quantize_rows(self.linear.weight)
            self.weight.copy_(quantized)
            self.scale.copy_(scale.reshape(1, -1))

    def __call__(self, x: torch.Tensor) -> Any:
        linear = self.linear
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] % 16 or x.device != self.weight.device:
            return torch.nn.functional.linear(x, linear.weight, linear.bias)
        quantized, scale = quantize_rows(rows)
        # Row-wise scaled fp8 products write bf16 (the fp16 variant is not in every torch).
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.scale, out_dtype=torch.bfloat16
        )
        out = out.to(x.dtype)
        if linear.bias is not None:
            out = out + linear.bias
        return out.reshape(*x.shape[:-1], linear.out_features)
