"""GPU probe (not a benchmark): UNet ms/call for fp16 vs fp8, eager-graph vs compiled, VAE decode."""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from handler import fp8  # noqa: E402
from handler.fastpath import UNetGraphs  # noqa: E402

OUT = Path(os.environ.get("OUT", "/tmp/out"))
DEADLINE = time.monotonic() + float(os.environ.get("PROBE_S", "400"))
results: dict = {}


def save():
    (OUT / "probe.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results), flush=True)


def per_call(fn, calls=10):
    with torch.inference_mode():
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            out = fn()
        torch.cuda.synchronize()
    return round((time.perf_counter() - t) / calls * 1000, 2), out


def rel(a, b):
    a, b = a.float(), b.float()
    return round(float((a - b).norm() / b.norm()), 4)


def unet_for(arch):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(Path("handler/configs") / arch / "unet"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(config).half()
    return unet.to(memory_format=torch.contiguous_format).eval()


def inputs(arch):
    d, h = torch.device("cuda"), torch.float16
    if arch == "sdxl":
        args = (torch.randn(2, 4, 128, 128, device=d, dtype=h), torch.tensor(500.0))
        kw = {
            "encoder_hidden_states": torch.randn(2, 77, 2048, device=d, dtype=h),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, 1280, device=d, dtype=h),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=d),
            },
            "return_dict": False,
        }
    else:
        args = (torch.randn(2, 4, 64, 64, device=d, dtype=h), torch.tensor(500.0))
        kw = {"encoder_hidden_states": torch.randn(2, 77, 768, device=d, dtype=h), "return_dict": False}
    return args, kw


def graph_ms(unet, args, kw, compile_unet=False):
    g = UNetGraphs(unet, compile_unet=compile_unet)
    g.layout_ms = {}
    t = time.perf_counter()
    with torch.inference_mode():
        g(*args, **kw)
    first = time.perf_counter() - t
    ms, out = per_call(lambda: g(*args, **kw)[0].clone())
    g.clear()
    return ms, out, round(first, 1), g.compiled


def probe_unet(arch, compile_both):
    r = results.setdefault(arch, {})
    unet = unet_for(arch)
    args, kw = inputs(arch)
    eager = type(unet).forward.__get__(unet)
    r["fp16_eager_ms"], ref = per_call(lambda: eager(*args, **kw)[0].clone())
    r["fp16_graph_ms"], out, _, _ = graph_ms(unet, args, kw)
    r["fp16_graph_rel"] = rel(out, ref)
    n = fp8.convert(unet)
    r["fp8_layers"] = n
    r["fp8_eager_ms"], out8 = per_call(lambda: eager(*args, **kw)[0].clone())
    r["fp8_eager_rel"] = rel(out8, ref)
    r["fp8_graph_ms"], out, _, _ = graph_ms(unet, args, kw)
    r["fp8_graph_rel"] = rel(out, ref)
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    fp8.requantize(linears)
    torch.cuda.synchronize()
    r["requantize_all_ms"] = round((time.perf_counter() - t) * 1000, 1)
    r["vram_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    save()
    if time.monotonic() > DEADLINE - 150:
        return
    try:
        ms, out, first, compiled = graph_ms(unet, args, kw, compile_unet=True)
        r.update(fp8_compiled_ms=ms, fp8_compiled_rel=rel(out, ref), fp8_compile_s=first, fp8_compiled=compiled)
    except Exception as e:
        r["fp8_compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    save()
    if not compile_both or time.monotonic() > DEADLINE - 150:
        return
    fp8.revert(unet)
    torch._dynamo.reset()
    ms, out, first, compiled = graph_ms(unet, args, kw, compile_unet=True)
    r.update(fp16_compiled_ms=ms, fp16_compiled_rel=rel(out, ref), fp16_compile_s=first)
    save()


def probe_vae():
    from diffusers import AutoencoderKL

    r = results.setdefault("vae_sdxl", {})
    config = AutoencoderKL.load_config(str(Path("handler/configs") / "sdxl" / "vae"))
    with torch.device("cuda"):
        vae = AutoencoderKL.from_config(config).half().eval()
    z = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16)
    r["eager_ms"], ref = per_call(lambda: vae.decode(z).sample, calls=5)
    vae.to(memory_format=torch.channels_last)
    dec = torch.compile(vae.decoder, dynamic=False)
    post = vae.post_quant_conv
    t = time.perf_counter()
    with torch.inference_mode():
        dec(post(z))
    r["compile_s"] = round(time.perf_counter() - t, 1)
    r["compiled_cl_ms"], out = per_call(lambda: dec(post(z)), calls=5)
    r["compiled_rel"] = rel(out, ref)
    save()


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    results["gpu"] = torch.cuda.get_device_name(0)
    results["torch"] = torch.__version__
    probe_unet("sd15", compile_both=False)
    probe_unet("sdxl", compile_both=True)
    if time.monotonic() < DEADLINE - 60:
        probe_vae()
    save()
