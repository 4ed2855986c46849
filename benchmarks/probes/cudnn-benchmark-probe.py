"""Probe: does cuDNN's autotuner (torch.backends.cudnn.benchmark) speed up the graphed UNet and the
eager VAE decode, and what does the tuning cost at the first call? One fresh process per setting,
since the flag decides algorithms at a convolution's first call."""
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())


def measure(arch: str, tuned: bool) -> dict:
    import torch
    torch.backends.cudnn.benchmark = tuned
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from handler.fastpath import UNetGraphs
    from scripts import build_configs as bc
    size, ctx, added = {"sd15": (64, 768, False), "sdxl": (128, 2048, True)}[arch]
    cfg = UNet2DConditionModel.load_config(str(bc.CONFIG_ROOT / arch / "unet"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(cfg).half().eval()
    gen = torch.Generator("cuda").manual_seed(1)
    args = (torch.randn(2, 4, size, size, device="cuda", dtype=torch.float16, generator=gen), torch.tensor(500.0))
    kw = {"encoder_hidden_states": torch.randn(2, 77, ctx, device="cuda", dtype=torch.float16, generator=gen), "return_dict": False}
    if added:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=gen),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda")}

    def per_call(fn, calls=30):
        with torch.inference_mode():
            fn(); fn(); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        return round((time.perf_counter() - t) / calls * 1000, 3)

    r = {"arch": arch, "cudnn_benchmark": tuned}
    outs = {}
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        unet.to(memory_format=fmt)
        g = UNetGraphs(unet)
        g.layout_ms = {}  # no layout choice: this layout only
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.inference_mode():
            outs[layout] = g(*args, **kw)[0].float()
        torch.cuda.synchronize()
        r[f"unet_{layout}_first_call_ms"] = round((time.perf_counter() - t) * 1000, 1)
        r[f"unet_{layout}_graphed_ms"] = per_call(lambda: g(*args, **kw))
        r[f"unet_{layout}_out_mean_abs"] = round(float(outs[layout].abs().mean()), 6)
        g.clear()
    del unet, g
    torch.cuda.empty_cache()
    vcfg = AutoencoderKL.load_config(str(bc.CONFIG_ROOT / arch / "vae"))
    with torch.device("cuda"):
        vae = AutoencoderKL.from_config(vcfg).half().eval()
    latents = torch.randn(1, 4, size, size, device="cuda", dtype=torch.float16, generator=gen)
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        vae.to(memory_format=fmt)
        lat = latents.contiguous(memory_format=fmt)
        torch.cuda.synchronize(); t = time.perf_counter()
        with torch.inference_mode():
            vae.decode(lat, return_dict=False)
        torch.cuda.synchronize()
        r[f"vae_{layout}_first_call_ms"] = round((time.perf_counter() - t) * 1000, 1)
        r[f"vae_{layout}_decode_ms"] = per_call(lambda: vae.decode(lat, return_dict=False), calls=10)
    r["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return r


def main():
    if len(sys.argv) > 2:
        print("RESULT " + json.dumps(measure(sys.argv[1], sys.argv[2] == "1")), flush=True)
        return
    import torch
    out_dir = Path(sys.argv[1])
    results = []
    for rep in range(2):
        for arch in ("sd15", "sdxl"):
            for tuned in ("0", "1"):
                t = time.perf_counter()
                p = subprocess.run([sys.executable, __file__, arch, tuned], capture_output=True, text=True, timeout=240)
                lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                r = json.loads(lines[-1][7:]) if lines else {"arch": arch, "cudnn_benchmark": tuned == "1", "error": p.stderr[-3000:]}
                r["rep"] = rep
                r["process_s"] = round(time.perf_counter() - t, 1)
                results.append(r)
                print(json.dumps(r), flush=True)
    data = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "results": results}
    name = f"cudnn-benchmark-{data['gpu'].replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(data, indent=1))
    print(json.dumps(data))


if __name__ == "__main__":
    main()
