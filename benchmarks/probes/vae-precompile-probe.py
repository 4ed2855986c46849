"""Probe: can the compiled VAE decoder be saved ahead of time, as the worker saves the UNet
(`handler.fastpath.precompiled_forward`), and what does each compiled worker pay for it today?

An earlier probe (aot-precompile-*) failed to save the SDXL decoder on torch 2.11 with
"ID_MATCH guard cannot be serialized", although the worker's guard filter drops ID_MATCH guards.
Process "save" compiles the full-size SDXL decoder (1024², channels_last, fp16, as COMPILE=1
runs it) the usual way, then ahead of time with the worker's filter, and records which guards
the filter saw and which ones the serializer refused. Process "load", a fresh one, times the
usual compile with inductor's cache filled (what every compiled worker pays at start today)
against loading the saved function, and checks both against eager.

    python benchmarks/probes/vae-precompile-probe.py OUT_DIR [cuda|cpu]
"""
import json, os, subprocess, sys, time, traceback
from pathlib import Path
sys.path.insert(0, os.getcwd())


def run(step: str, folder: Path, device: str) -> dict:
    t_start = time.perf_counter()
    import torch
    from diffusers import AutoencoderKL
    from handler.fastpath import _saveable_guards
    from scripts import build_configs as bc
    from torch._dynamo.guards import CheckFunctionManager
    r = {"step": step, "torch": torch.__version__, "import_s": round(time.perf_counter() - t_start, 1)}
    if hasattr(torch._dynamo.config, "enable_aot_compile"):
        torch._dynamo.config.enable_aot_compile = True
    dtype = torch.float16 if device == "cuda" else torch.float32
    size = 128 if device == "cuda" else 16
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(bc.CONFIG_ROOT / "sdxl" / "vae"))).to(dtype).eval()
    decoder = vae.decoder.to(memory_format=torch.channels_last)
    eager = type(decoder).forward.__get__(decoder)
    latents = torch.randn(1, 4, size, size, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))
    external = {"module": decoder}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    seen, refused = [], []

    def recording_filter(entries):
        keep = _saveable_guards(entries)
        seen.extend({"type": e.guard_type, "derived": list(e.derived_guard_types or ()), "name": e.orig_guard.name[:160],
                     "global": e.is_global, "kept": k} for e, k in zip(entries, keep))
        return keep

    original = CheckFunctionManager.serialize_guards

    def recording_serialize(self, builder, sorted_guards, *rest, **kw):
        unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
        for g in sorted_guards:
            types = {g.create_fn_name(), *(g.guard_types or ())}
            if types & unsupported:
                refused.append({"name": g.name[:160], "types": sorted(types),
                                "stack": "".join(traceback.format_list(g.user_stack[-3:]))[-600:] if g.user_stack else None})
        return original(self, builder, sorted_guards, *rest, **kw)

    CheckFunctionManager.serialize_guards = recording_serialize
    with torch.inference_mode():
        ref = eager(latents)
        sync()
        t = time.perf_counter()
        usual = torch.compile(eager, dynamic=False)
        out = usual(latents)
        sync()
        r["usual_compile_first_call_s"] = round(time.perf_counter() - t, 2)
        r["usual_max_abs_diff_vs_eager"] = float((out.float() - ref.float()).abs().max())
        t = time.perf_counter()
        if step == "save":
            try:
                compiled = torch.compile(eager, fullgraph=True, dynamic=False,
                                         options={"guard_filter_fn": recording_filter}).aot_compile(((latents,), {}))
                r["aot_compile_s"] = round(time.perf_counter() - t, 2)
                compiled.save_compiled_function(str(folder / "decoder.bin"), external_data=external)
                r["saved_mb"] = round((folder / "decoder.bin").stat().st_size / 1e6, 1)
            except Exception as error:
                r["aot_error"] = f"{type(error).__name__}: {str(error)[:1000]}"
                r["aot_error_where"] = traceback.format_exc()[-2500:]
                compiled = None
            r["guards_seen"] = len(seen)
            r["guards_dropped"] = [g for g in seen if not g["kept"]][:40]
            r["guard_types_kept"] = sorted({g["type"] for g in seen if g["kept"]})
            r["guards_refused_by_serializer"] = refused[:20]
        else:
            compiled = None
            if (folder / "decoder.bin").exists():
                with open(folder / "decoder.bin", "rb") as f:
                    compiled = torch.compiler.load_compiled_function(f, external_data=external)
                r["load_s"] = round(time.perf_counter() - t, 2)
        if compiled is not None:
            t = time.perf_counter()
            out = compiled(decoder, latents)
            sync()
            r["aot_first_call_s"] = round(time.perf_counter() - t, 2)
            r["aot_max_abs_diff_vs_eager"] = float((out.float() - ref.float()).abs().max())
            t = time.perf_counter()
            for _ in range(5):
                compiled(decoder, latents)
            sync()
            r["aot_ms_per_call"] = round((time.perf_counter() - t) / 5 * 1000, 2)
    r["process_s"] = round(time.perf_counter() - t_start, 1)
    return r


def main():
    if sys.argv[1] == "-":
        print("RESULT " + json.dumps(run(sys.argv[2], Path(sys.argv[3]), sys.argv[4])), flush=True)
        return
    import torch
    out_dir = Path(sys.argv[1])
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    folder = Path("/tmp/vae-precompile"); folder.mkdir(exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    data = {"gpu": gpu, "torch": torch.__version__, "results": []}
    for step in ("save", "load"):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "-", step, str(folder), device], capture_output=True, text=True, timeout=400)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        r = json.loads(lines[-1][7:]) if lines else {"step": step, "rc": p.returncode, "error": p.stderr[-4000:]}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        data["results"].append(r)
        print(json.dumps(r), flush=True)
        if "error" in r:
            break
    name = f"vae-precompile-{gpu.replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
