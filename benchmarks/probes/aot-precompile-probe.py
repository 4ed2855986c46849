"""Probe: can a worker skip dynamo's re-trace at start by saving torch.compile's work ahead of time
(`torch.compile(..., fullgraph=True).aot_compile(...)`, `save_compiled_function`, and
`torch.compiler.load_compiled_function` in a later process)?

Process "save" compiles the full-size SDXL UNet (1024², CFG batch 2) and VAE decoder that way
and writes both to a folder; process "load", a fresh one, loads them, checks them against eager,
captures the UNet in a CUDA graph as the worker does, times a replay, and checks that an in-place
weight change (a LoRA merge) reaches the loaded function. Guards that cannot be saved (object
identity, function defaults) are left out, as the worker would."""
import json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())

UNSAVED_GUARDS = {"ID_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE", "DICT_VERSION"}


def saveable_guards(entries):
    from torch._dynamo.guards import CheckFunctionManager
    unsupported = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES) | UNSAVED_GUARDS
    return [not (g.is_global or g.guard_type in unsupported or unsupported & set(g.derived_guard_types)
                 or "__defaults__" in g.orig_guard.name or "__kwdefaults__" in g.orig_guard.name)
            for g in entries]


def run(step: str, folder: Path) -> dict:
    t_start = time.perf_counter()
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from handler.fastpath import UNetGraphs
    from scripts import build_configs as bc
    r = {"step": step, "torch": torch.__version__, "import_s": round(time.perf_counter() - t_start, 1)}
    if hasattr(torch._dynamo.config, "enable_aot_compile"):  # off by default on torch 2.11, on in 2.13
        torch._dynamo.config.enable_aot_compile = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(bc.CONFIG_ROOT / "sdxl" / "unet"))).half().eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(bc.CONFIG_ROOT / "sdxl" / "vae"))).half().eval()
    gen = torch.Generator("cuda").manual_seed(1)
    sample = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16, generator=gen)
    kw = {"encoder_hidden_states": torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16, generator=gen),
          "added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=gen),
                                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda")},
          "return_dict": False}
    timestep = torch.tensor(500.0)
    latents = torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16, generator=gen)
    unet_eager = type(unet).forward.__get__(unet)
    decoder = vae.decoder
    decoder_eager = type(decoder).forward.__get__(decoder)
    unet_external = {"unet": unet, "unet_forward": getattr(type(unet).forward, "__wrapped__", type(unet).forward)}
    decoder_external = {"decoder": decoder}
    with torch.inference_mode():
        ref_unet = unet_eager(sample, timestep, **kw)[0]
        ref_dec = decoder_eager(latents)
        t = time.perf_counter()
        if step == "save":
            opts = {"guard_filter_fn": saveable_guards}
            u = torch.compile(unet_eager, fullgraph=True, dynamic=False, options=opts).aot_compile(((sample, timestep), kw))
            r["unet_compile_s"] = round(time.perf_counter() - t, 1); t = time.perf_counter()
            u.save_compiled_function(str(folder / "unet.bin"), external_data=unet_external)
            try:
                d = torch.compile(decoder_eager, fullgraph=True, dynamic=False, options=opts).aot_compile(((latents,), {}))
                r["decoder_compile_s"] = round(time.perf_counter() - t, 1)
                d.save_compiled_function(str(folder / "decoder.bin"), external_data=decoder_external)
            except Exception as error:
                r["decoder_error"] = f"{type(error).__name__}: {str(error)[:1500]}"
                d = None
            r["sizes_mb"] = {p.name: round(p.stat().st_size / 1e6, 1) for p in folder.iterdir()}
        else:
            with open(folder / "unet.bin", "rb") as f:
                u = torch.compiler.load_compiled_function(f, external_data=unet_external)
            r["unet_load_s"] = round(time.perf_counter() - t, 2); t = time.perf_counter()
            d = None
            if (folder / "decoder.bin").exists():
                with open(folder / "decoder.bin", "rb") as f:
                    d = torch.compiler.load_compiled_function(f, external_data=decoder_external)
                r["decoder_load_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        out = u(unet, sample, timestep, **kw)[0]
        dec = d(decoder, latents) if d is not None else None
        torch.cuda.synchronize()
        r["first_calls_s"] = round(time.perf_counter() - t, 2)
        r["unet_max_abs_diff_vs_eager"] = float((out.float() - ref_unet.float()).abs().max())
        if dec is not None:
            r["decoder_max_abs_diff_vs_eager"] = float((dec.float() - ref_dec.float()).abs().max())
        if step == "load":
            # the worker's path: the loaded function captured in a CUDA graph
            g = UNetGraphs(unet)
            g._forward = lambda *a, **k: u(unet, *a, **k)
            g.compiled = True
            t = time.perf_counter()
            g(sample, timestep, **kw)
            torch.cuda.synchronize()
            r["graph_capture_s"] = round(time.perf_counter() - t, 2)
            g(sample, timestep, **kw); torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(20):
                g(sample, timestep, **kw)
            torch.cuda.synchronize()
            r["graphed_ms_per_call"] = round((time.perf_counter() - t) / 20 * 1000, 2)
            layer = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
            layer.weight.add_(0.05)  # as a LoRA merge does, in place
            changed = u(unet, sample, timestep, **kw)[0]
            eager_changed = unet_eager(sample, timestep, **kw)[0]
            r["after_inplace_change_max_abs_diff_vs_eager"] = float((changed.float() - eager_changed.float()).abs().max())
            r["inplace_change_moved_output"] = float((eager_changed.float() - ref_unet.float()).abs().max())
    r["process_s"] = round(time.perf_counter() - t_start, 1)
    return r


def main():
    if len(sys.argv) > 3:
        print("RESULT " + json.dumps(run(sys.argv[2], Path(sys.argv[3]))), flush=True)
        return
    import torch
    out_dir = Path(sys.argv[1])
    folder = Path("/tmp/aot-precompile"); folder.mkdir(exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    data = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": []}
    for step in ("save", "load"):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "-", step, str(folder)], capture_output=True, text=True, timeout=400)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        r = json.loads(lines[-1][7:]) if lines else {"step": step, "rc": p.returncode, "error": p.stderr[-4000:]}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        data["results"].append(r)
        print(json.dumps(r), flush=True)
        if "error" in r:
            break
    name = f"aot-precompile-{data['gpu'].replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
