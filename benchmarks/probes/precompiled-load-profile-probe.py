"""Probe: where does loading a precompiled UNet go? (The compiled cold start's warm-up.)

Run after `scripts/benchmark.py`, in a fresh process, on the files its first compiled worker
saved (`<workdir>/compile-cache/<GPU>-torch<version>/precompiled/`). It builds the SDXL UNet
and VAE (random weights, bundled configs), then loads the largest saved UNet file and every
VAE decoder file under cProfile, each twice, to tell one-time costs (inductor's imports and
start-up) from per-file ones. Prints and writes JSON with the top functions by cumulative time.

    python benchmarks/probes/precompiled-load-profile-probe.py OUT_DIR [/tmp/bench]
"""
import cProfile, io, json, os, pstats, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())


def profiled(fn):
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    result = fn()
    profile.disable()
    elapsed = time.perf_counter() - started
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    stats.sort_stats("cumulative").print_stats(30)
    rows = [line for line in stream.getvalue().splitlines() if line.strip()][-31:]
    return result, round(elapsed, 2), rows


def main():
    started = time.perf_counter()
    out_dir = Path(sys.argv[1])
    workdir = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/bench")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from handler import fastpath
    from scripts import build_configs as bc
    folder = fastpath.compile_cache_dir(str(workdir / "compile-cache"), [])
    fastpath.use_compile_cache(folder)
    torch._dynamo.config.enable_aot_compile = True
    imported = time.perf_counter() - started
    files = sorted((folder / "precompiled").glob("*.bin"), key=lambda p: p.stat().st_size)
    data = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "imports_s": round(imported, 1),
            "files": {p.name: round(p.stat().st_size / 1e6, 1) for p in files}, "loads": []}
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(bc.CONFIG_ROOT / "sdxl" / "unet"))).half().eval()
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(bc.CONFIG_ROOT / "sdxl" / "vae"))).half().eval()
    unet_files = [p for p in files if p.name.startswith("unet-")][-1:]
    decoder_files = [p for p in files if p.name.startswith("vae-decoder-")]
    import inspect
    for module, paths in ((unet, unet_files), (vae.decoder, decoder_files)):
        external = {"module": module, "undecorated_forward": inspect.unwrap(type(module).forward)}
        for path in paths:
            for attempt in (1, 2):
                def load():
                    with path.open("rb") as file:
                        return torch.compiler.load_compiled_function(file, external_data=external)
                try:
                    _, seconds, rows = profiled(load)
                    entry = {"file": path.name, "attempt": attempt, "load_s": seconds, "top_cumulative": rows}
                except Exception as error:
                    entry = {"file": path.name, "attempt": attempt, "error": f"{type(error).__name__}: {str(error)[:500]}"}
                data["loads"].append(entry)
                print(json.dumps({k: v for k, v in entry.items() if k != "top_cumulative"}), flush=True)
    data["process_s"] = round(time.perf_counter() - started, 1)
    name = f"precompiled-load-profile-{data['gpu'].replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(data, indent=1))
    for entry in data["loads"][:2]:
        print("\n".join(entry.get("top_cumulative", [])[:25]))


if __name__ == "__main__":
    main()
