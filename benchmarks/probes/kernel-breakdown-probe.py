"""Probe: where a UNet step's GPU time goes, by kernel kind, for the worker's two paths (graphed
eager kernels, and COMPILE=1's inductor kernels), SD 1.5 at 512² and SDXL at 1024², CFG batch 2.

For each: the graphed wall time per call; the GPU time per call of attention, matrix
multiplications, convolutions, norms, inductor's fused kernels, layout copies and the rest (from
torch.profiler's kernel records of eager calls: the same kernels a graph replays); the FLOPs of
each kind (torch's FlopCounterMode) and the rate they ran at. Then the attention kernels alone,
per backend, at the UNets' shapes. One process per (arch, path), so a compile starts clean."""
import json, os, subprocess, sys, tempfile, time
from collections import defaultdict
from pathlib import Path
sys.path.insert(0, os.getcwd())

SHAPES = {"sd15": (64, 768, False), "sdxl": (128, 2048, True)}


def kind_of(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if n.startswith("triton_tem") or "_mm_" in n and n.startswith("triton"):
        return "matmul"
    if n.startswith("triton"):
        return "inductor_fused"
    if any(s in n for s in ("fprop", "conv", "implicit_convolve", "winograd", "dgrad")):
        return "convolution"
    if any(s in n for s in ("gemm", "nvjet", "cublas", "sm90_xmma", "cutlass", "gemv")):
        return "matmul"
    if "norm" in n:
        return "norm"
    if any(s in n for s in ("nchwtonhwc", "nhwctonchw", "transpose", "copy", "permute")):
        return "layout_copy"
    return "elementwise_other"


FLOP_KIND = {"mm": "matmul", "addmm": "matmul", "bmm": "matmul", "baddbmm": "matmul",
             "convolution": "convolution", "_convolution": "convolution"}


def unet_inputs(arch, torch):
    size, ctx, added = SHAPES[arch]
    gen = torch.Generator("cuda").manual_seed(1)
    args = (torch.randn(2, 4, size, size, device="cuda", dtype=torch.float16, generator=gen), torch.tensor(500.0))
    kw = {"encoder_hidden_states": torch.randn(2, 77, ctx, device="cuda", dtype=torch.float16, generator=gen),
          "return_dict": False}
    if added:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=gen),
                                   "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda")}
    return args, kw


def measure(arch: str, path: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode
    from diffusers import UNet2DConditionModel
    from handler.fastpath import UNetGraphs
    from scripts import build_configs as bc
    cfg = UNet2DConditionModel.load_config(str(bc.CONFIG_ROOT / arch / "unet"))
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(cfg).half().eval()
    args, kw = unet_inputs(arch, torch)
    r = {"arch": arch, "path": path}
    t = time.perf_counter()
    g = UNetGraphs(unet, compile_unet=path == "compiled").install()
    with torch.inference_mode():
        g(*args, **kw)
    torch.cuda.synchronize()
    r["first_call_s"] = round(time.perf_counter() - t, 1)
    r["compiled"] = g.compiled
    r["layout"] = "channels_last" if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    r["layout_ms"] = g.layout_ms
    calls = 30
    with torch.inference_mode():
        g(*args, **kw); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(calls):
            g(*args, **kw)
        torch.cuda.synchronize()
    r["graphed_ms_per_call"] = round((time.perf_counter() - t) / calls * 1000, 3)

    forward = g._forward  # the same eager or compiled forward the graph captured, not graphed
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet_out = forward(*args, **kw) if path == "eager" else None
    flops = defaultdict(float)
    if path == "eager":
        for op, n in counter.get_flop_counts().get("Global", {}).items():
            name = str(op).removeprefix("aten.").split(".")[0]
            kind = "attention" if "attention" in name else FLOP_KIND.get(name, name)
            flops[kind] += n
    r["flops_per_call_g"] = {k: round(v / 1e9, 1) for k, v in flops.items()}
    del unet_out

    profiled = 5
    with torch.inference_mode():
        forward(*args, **kw); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                forward(*args, **kw)
            torch.cuda.synchronize()
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    by_kind, count, by_name = defaultdict(float), defaultdict(int), defaultdict(float)
    for e in events:
        if e.get("cat") != "kernel":
            continue
        kind = kind_of(e["name"])
        by_kind[kind] += e["dur"] / 1000 / profiled
        count[kind] += 1
        by_name[e["name"][:90]] += e["dur"] / 1000 / profiled
    r["kernel_ms_per_call"] = {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    r["kernels_per_call"] = {k: v // profiled for k, v in count.items()}
    r["kernel_ms_total"] = round(sum(by_kind.values()), 3)
    r["top_kernels_ms"] = {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:20]}
    return r


def attention_kernels(torch) -> list:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    # (name, heads, query tokens, key tokens, head dim): each UNet's self and cross attention
    shapes = [("sdxl self 64²", 10, 4096, 4096, 64), ("sdxl self 32²", 20, 1024, 1024, 64),
              ("sdxl cross 64²", 10, 4096, 77, 64), ("sdxl cross 32²", 20, 1024, 77, 64),
              ("sd15 self 64²", 8, 4096, 4096, 40), ("sd15 self 32²", 8, 1024, 1024, 80),
              ("sd15 self 16²", 8, 256, 256, 160), ("sd15 self 8²", 8, 64, 64, 160),
              ("sd15 cross 64²", 8, 4096, 77, 40), ("sd15 cross 32²", 8, 1024, 77, 80)]
    out = []
    for name, heads, nq, nk, d in shapes:
        # diffusers' layout: (batch, tokens, heads, dim) transposed to (batch, heads, tokens, dim)
        q = torch.randn(2, nq, heads, d, device="cuda", dtype=torch.float16).transpose(1, 2)
        k = torch.randn(2, nk, heads, d, device="cuda", dtype=torch.float16).transpose(1, 2)
        v = torch.randn(2, nk, heads, d, device="cuda", dtype=torch.float16).transpose(1, 2)
        row = {"shape": name, "flops_g": round(4 * 2 * heads * nq * nk * d / 1e9, 2)}
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", None):
            label = backend.lower() if backend else "auto"
            try:
                ctx = sdpa_kernel(getattr(SDPBackend, backend)) if backend else torch.no_grad()
                with ctx, torch.no_grad():
                    for _ in range(3):
                        F.scaled_dot_product_attention(q, k, v)
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(50):
                        F.scaled_dot_product_attention(q, k, v)
                    end.record(); torch.cuda.synchronize()
                ms = start.elapsed_time(end) / 50
                row[f"{label}_ms"] = round(ms, 4)
                row[f"{label}_tflops"] = round(row["flops_g"] / ms, 1)
            except Exception as error:
                row[f"{label}_error"] = f"{type(error).__name__}: {str(error)[:120]}"
        out.append(row)
    return out


def main():
    if len(sys.argv) > 2:
        print("RESULT " + json.dumps(measure(sys.argv[1], sys.argv[2])), flush=True)
        return
    import torch
    out_dir = Path(sys.argv[1])
    deadline = time.monotonic() + float(os.environ.get("PROBE_DEADLINE_S", "480"))
    data = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(), "results": []}
    data["attention_kernels"] = attention_kernels(torch)
    print(json.dumps(data["attention_kernels"]), flush=True)
    for arch, path in (("sd15", "eager"), ("sdxl", "eager"), ("sd15", "compiled"), ("sdxl", "compiled")):
        left = deadline - time.monotonic()
        if left < 60:
            data["results"].append({"arch": arch, "path": path, "skipped": "deadline"})
            continue
        t = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, __file__, arch, path], capture_output=True, text=True, timeout=left)
            lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
            r = json.loads(lines[-1][7:]) if lines else {"arch": arch, "path": path, "error": p.stderr[-3000:]}
        except subprocess.TimeoutExpired:
            r = {"arch": arch, "path": path, "error": "timed out"}
        r["process_s"] = round(time.perf_counter() - t, 1)
        data["results"].append(r)
        print(json.dumps(r), flush=True)
    name = f"kernel-breakdown-{data['gpu'].replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
