"""GPU benchmark: plain diffusers against our engine through the RunPod handler, in one run.

    python scripts/benchmark.py [--workdir /tmp/bench] [--out benchmarks]
    python scripts/benchmark.py --chart benchmarks/RUN.json      # draws RUN.png beside it

Full-size SD 1.5 and SDXL architectures with random fp16 weights are written as single-file
LDM checkpoints on local disk, so the real loading path runs (bundled configs, diffusers'
single-file conversion). For each config it times the plain diffusers pipeline (txt2img to PIL)
and our handler (job in, PNG images out as base64), warm, in the same process, and measures
cold start (worker process start to first image, in a fresh process), checkpoint switch from
the RAM tier, LoRA swap and peak VRAM. Prints JSON and writes benchmarks/<gpu>-<time>.json.
Random weights make noise images; timings do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "sd15-512-50": {"arch": "sd15", "size": 512, "steps": 50},
    "sdxl-1024-30": {"arch": "sdxl", "size": 1024, "steps": 30},
}
REPEATS = 3


def write_checkpoints(models: Path) -> dict[str, Path]:
    """Random full-size checkpoints (and an SDXL LoRA) in the LDM layout, as civitai ships them."""
    import torch
    from safetensors.torch import save_file

    from scripts import build_configs as bc
    from scripts.make_demo_volume import build_components, to_ldm, write_loras

    paths = {}
    for arch in ("sd15", "sdxl"):
        path = models / "checkpoints" / f"bench-{arch}.safetensors"
        folder = bc.ARCHITECTURES[arch]
        torch.manual_seed(0)
        with torch.device("cuda"):
            components = build_components(folder)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.cpu() for k, v in to_ldm(arch, folder, components).items()}
            save_file(state, str(path))
        if arch == "sdxl" and not (models / "loras" / "demo_sdxl_kohya.safetensors").exists():
            write_loras(models, "sdxl", components, folder, seed=1)
        paths[arch] = path
        del components
        torch.cuda.empty_cache()
    return paths


def timed(fn, repeats=REPEATS):
    """Mean seconds of `repeats` calls after one warm-up call, and the last result."""
    import torch

    result = fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sum(times) / len(times), result


def baseline(arch: str, path: Path, size: int, steps: int):
    """Plain diffusers: from_single_file with the bundled config, fp16, SDPA, default scheduler."""
    import diffusers
    import torch

    from handler.pipelines import PIPELINE_CLASSES, _tokenizers
    from handler.registry import CONFIG_ROOT

    cls = getattr(diffusers, PIPELINE_CLASSES[arch])
    extra = {"safety_checker": None} if arch == "sd15" else {}
    pipe = cls.from_single_file(
        str(path),
        config=str(CONFIG_ROOT / arch),
        torch_dtype=torch.float16,
        local_files_only=True,
        **_tokenizers(arch),
        **extra,
    ).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def run():
        generator = torch.Generator("cpu").manual_seed(7)
        return pipe(
            "a red cube",
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=7.0,
            generator=generator,
        ).images[0]

    return timed(run)  # the pipeline is freed with this frame


def ours(job_input: dict):
    """Our engine through the RunPod handler: job dict in, base64 PNG out."""
    from handler.runpod_worker import run_job

    def run():
        reply = run_job({"id": "bench", "input": job_input}, threading.Event())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    return timed(run)


def psnr(a, b) -> float | None:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    mse = float(((x - y) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def decode_png(reply: dict):
    import base64
    import io

    from PIL import Image

    return Image.open(
        io.BytesIO(base64.b64decode(reply["images"][0]["image"].split(",", 1)[1]))
    ).convert("RGB")


def cold_start(models: Path, checkpoint: str, job_input: dict) -> float:
    """Seconds from starting a fresh worker process to its first image (DEFAULT_CHECKPOINT preloaded)."""
    code = (
        "import threading; from handler.runpod_worker import get_engine, run_job; get_engine();"
        f"r = run_job({{'id': 'cold', 'input': {job_input!r}}}, threading.Event());"
        "assert 'images' in r, r"
    )
    env = {**os.environ, "MODELS_DIR": str(models), "DEFAULT_CHECKPOINT": checkpoint}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return time.perf_counter() - started


def drop_page_cache() -> bool:
    """Drop the OS page cache so a cold start reads the checkpoint from disk (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_benchmark(workdir: Path, out: Path) -> dict:
    import diffusers
    import torch
    import transformers

    models = workdir / "models"
    started = time.perf_counter()
    write_checkpoints(models)
    setup_s = time.perf_counter() - started
    os.environ.update({"MODELS_DIR": str(models), "GPU_CHECKPOINTS": "1", "CPU_CHECKPOINTS": "2"})

    results = []
    for name, config in CONFIGS.items():
        arch, size, steps = config["arch"], config["size"], config["steps"]
        path = models / "checkpoints" / f"bench-{arch}.safetensors"
        baseline_s, baseline_image = baseline(arch, path, size, steps)
        torch.cuda.empty_cache()
        job = {
            "prompt": "a red cube",
            "checkpoint": f"bench-{arch}",
            "width": size,
            "height": size,
            "steps": steps,
            "seed": 7,
            "guidance_scale": 7.0,
            "scheduler": "Euler" if arch == "sdxl" else "PNDM",
        }
        torch.cuda.reset_peak_memory_stats()
        ours_s, reply = ours(job)
        entry = {
            "config": name,
            "baseline_s": round(baseline_s, 3),
            "ours_s": round(ours_s, 3),
            "speedup": round(baseline_s / ours_s, 2),
            "baseline_it_s": round(steps / baseline_s, 1),
            "ours_it_s": round(steps / (reply["timings_ms"]["denoise"] / 1000), 1),
            "ours_timings_ms": reply["timings_ms"],
            "peak_vram_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "psnr_vs_baseline_db": psnr(decode_png(reply), baseline_image),
        }
        if arch == "sdxl":
            # First use loads the LoRA from disk into the pipeline; later jobs find it resident
            # and only switch it on (the swap users pay between jobs).
            from handler.runpod_worker import run_job

            lora_job = {**job, "loras": [{"name": "demo_sdxl_kohya", "scale": 0.8}]}
            started = time.perf_counter()
            run_job({"id": "lora-first", "input": lora_job}, threading.Event())
            entry["lora_first_use_ms"] = round((time.perf_counter() - started - ours_s) * 1000, 1)
            lora_s, _ = ours(lora_job)
            entry["lora_swap_ms"] = round((lora_s - ours_s) * 1000, 1)
            # Switch to SD 1.5 (SDXL moves to the RAM tier), then back: the second load is the
            # switch from RAM that users pay when alternating checkpoints.
            small = {**job, "steps": 1, "width": 512, "height": 512}
            run_job(
                {"id": "switch-1", "input": {**small, "checkpoint": "bench-sd15"}},
                threading.Event(),
            )
            switch = run_job({"id": "switch-2", "input": small}, threading.Event())
            entry["checkpoint_switch_s"] = round(switch["timings_ms"]["load"] / 1000, 3)
            dropped = drop_page_cache()
            entry["cold_start_s"] = round(cold_start(models, "bench-sdxl", {**job}), 2)
            entry["cold_start_page_cache_dropped"] = dropped
            entry["cold_start_compiled_s"] = None
        results.append(entry)

    report = {
        "gpu": torch.cuda.get_device_name(0),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checkpoint_write_s": round(setup_s, 1),
        "notes": [
            "ours = handler path (run_job): job validation, scheduler swap, denoise, per-image "
            "decode, PNG encode, base64; baseline = diffusers pipeline call to PIL.",
            "cold_start_compiled_s is null: the compiled path is not implemented yet.",
        ],
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{report['gpu'].replace(' ', '-')}-{report['time'].replace(':', '')}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def draw_chart(report_path: Path) -> Path:
    """A bar chart (PNG) of baseline vs ours per config, drawn with Pillow."""
    from PIL import Image, ImageDraw

    report = json.loads(report_path.read_text())
    rows = report["results"]
    width, height, margin = 720, 120 + 90 * len(rows), 150
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), f"Warm latency, {report['gpu']} (lower is better)", fill="black")
    top = max(max(r["baseline_s"], r["ours_s"]) for r in rows)
    scale = (width - margin - 80) / top
    for i, row in enumerate(rows):
        y = 50 + 90 * i
        draw.text((10, y + 12), row["config"], fill="black")
        for j, (label, value, color) in enumerate(
            (
                ("diffusers", row["baseline_s"], (160, 160, 160)),
                ("ours", row["ours_s"], (40, 110, 200)),
            )
        ):
            y0 = y + j * 32
            draw.rectangle([margin, y0, margin + value * scale, y0 + 24], fill=color)
            draw.text((margin + value * scale + 6, y0 + 6), f"{label} {value:.2f} s", fill="black")
    target = report_path.with_suffix(".png")
    image.save(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--chart", type=Path, help="draw the chart of an existing report")
    args = parser.parse_args()
    if args.chart:
        print(draw_chart(args.chart))
        return
    run_benchmark(args.workdir, args.out)


if __name__ == "__main__":
    main()
