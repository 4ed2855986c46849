"""Probe 2: fused QKV (graphed UNet), layout-choice cost, prefetch strategies on a cold page cache."""
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())
WORK = Path("/tmp/probe2")
T0 = time.time()


def unet_probe():
    import torch
    from diffusers import UNet2DConditionModel
    from handler.fastpath import UNetGraphs
    from scripts import build_configs as bc
    res = {}
    for arch, size, ctx, added in (("sd15", 64, 768, False), ("sdxl", 128, 2048, True)):
        cfg = UNet2DConditionModel.load_config(str(bc.CONFIG_ROOT / arch / "unet"))
        with torch.device("cuda"):
            unet = UNet2DConditionModel.from_config(cfg).half().eval()
        unet.to(memory_format=torch.channels_last)
        args = (torch.randn(2, 4, size, size, device="cuda", dtype=torch.float16), torch.tensor(500.0))
        kw = {"encoder_hidden_states": torch.randn(2, 77, ctx, device="cuda", dtype=torch.float16), "return_dict": False}
        if added:
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
                                       "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda")}
        def per_call(fn, calls=20):
            with torch.inference_mode():
                fn(); fn(); torch.cuda.synchronize(); t = time.perf_counter()
                for _ in range(calls): fn()
                torch.cuda.synchronize()
            return round((time.perf_counter() - t) / calls * 1000, 3)
        r = {}
        for rep in range(2):
            g = UNetGraphs(unet); g.layout_ms = {}
            with torch.inference_mode():
                ref = g(*args, **kw)[0].float()
            r[f"plain_{rep}"] = per_call(lambda: g(*args, **kw)); g.clear()
            # layout choice cost, as the engine's first capture does it
            g = UNetGraphs(unet); t = time.perf_counter()
            with torch.inference_mode():
                g(*args, **kw)
            torch.cuda.synchronize(); r[f"first_capture_with_layout_choice_ms_{rep}"] = round((time.perf_counter() - t) * 1000, 1)
            r[f"layout_ms_{rep}"] = g.layout_ms; g.clear()
            unet.to(memory_format=torch.channels_last)
            g = UNetGraphs(unet); g.layout_ms = {}; t = time.perf_counter()
            with torch.inference_mode():
                g(*args, **kw)
            torch.cuda.synchronize(); r[f"first_capture_no_layout_choice_ms_{rep}"] = round((time.perf_counter() - t) * 1000, 1)
            g.clear()
            with torch.inference_mode(False):
                unet.fuse_qkv_projections()
            g = UNetGraphs(unet); g.layout_ms = {}
            with torch.inference_mode():
                out = g(*args, **kw)[0].float()
            r[f"fused_{rep}"] = per_call(lambda: g(*args, **kw)); g.clear()
            r[f"fused_max_abs_diff_{rep}"] = float((out - ref).abs().max())
            unet.unfuse_qkv_projections()
        res[arch] = r
        print(arch, r, flush=True)
        del unet; torch.cuda.empty_cache()
    return res


def drop():
    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("3\n")


def child(phase):
    env = {**os.environ, "MODELS_DIR": str(WORK / "models"), "PROBE_T0": str(time.time()), "DEFAULT_CHECKPOINT": "bench-sdxl"}
    out = subprocess.run([sys.executable, __file__, phase], env=env, capture_output=True, text=True, timeout=200)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else {"error": out.stderr[-2000:]}


def run_phase(phase):
    spawned = float(os.environ["PROBE_T0"])
    r = {}
    path = WORK / "models/checkpoints/bench-sdxl.safetensors"
    done = {}
    import threading
    def reader(block):
        buf = bytearray(block)
        with open(path, "rb", buffering=0) as fh:
            while fh.readinto(buf): pass
        done["at"] = time.time()
    def start(block):
        threading.Thread(target=reader, args=(block,), daemon=True).start()
    if phase == "prefetch16m":
        start(16 << 20)
    elif phase == "prefetch1m":
        start(1 << 20)
    elif phase == "fadvise":
        fd = os.open(path, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED); os.close(fd)
        r["fadvise_call_s"] = round(time.time() - spawned, 3)
    t = time.time()
    import torch
    r["torch_s"] = round(time.time() - t, 3)
    if phase == "after_torch":
        start(16 << 20)
    import handler.runpod_worker
    import diffusers, transformers
    diffusers.StableDiffusionXLPipeline; transformers.CLIPTextModel
    r["imports_s"] = round(time.time() - spawned, 3)
    if phase in ("none", "fadvise"):
        start(16 << 20)  # now read what the prefetch did not
    while "at" not in done: time.sleep(0.01)
    r["file_read_done_s"] = round(done["at"] - spawned, 3)
    return r


if __name__ == "__main__" and len(sys.argv) > 1:
    print("RESULT " + json.dumps(run_phase(sys.argv[1])), flush=True); sys.exit(0)

if __name__ == "__main__":
    out = Path(os.environ.get("OUT", "/tmp")); results = {}
    results["unet"] = unet_probe()
    p = WORK / "models/checkpoints/bench-sdxl.safetensors"; p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as fh:
        block = os.urandom(64 << 20)
        for _ in range(104): fh.write(block)  # 6.98 GB, like the SDXL checkpoint
    child("none")  # warm the .pyc files
    for rep in range(2):
        for phase in ("none", "prefetch16m", "prefetch1m", "after_torch", "fadvise"):
            drop(); results.setdefault(phase, []).append(child(phase)); print(phase, results[phase][-1], flush=True)
    results["elapsed_s"] = round(time.time() - T0, 1)
    (out / "probe2.json").write_text(json.dumps(results, indent=1))
