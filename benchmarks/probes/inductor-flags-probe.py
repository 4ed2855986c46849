"""Probe: do inductor's tuning flags speed up the COMPILE=1 UNet?

diffusers' SDXL speed-up guide sets `conv_1x1_as_mm`, `coordinate_descent_tuning`,
`coordinate_descent_check_all_directions` and turns `epilogue_fusion` off. This probe times
the handler's own graphed, compiled UNet (`handler.fastpath.UNetGraphs`) per call, batch 2
(CFG), full-size random fp16 weights, for each flag set and layout, with the compile time and
the relative error against the eager call. Run on the GPU host:

    python3 benchmarks/probes/inductor-flags-probe.py $OUT/inductor-flags.json [deadline_s]
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from handler import fastpath  # noqa: E402

TUNED = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "coordinate_descent_check_all_directions": True,
    "epilogue_fusion": False,
}
VARIANTS = [  # (architecture, name, layout, inductor flags)
    ("sdxl", "compiled, channels_last (handler today)", "channels_last", {}),
    ("sdxl", "compiled, channels_last, tuned flags", "channels_last", TUNED),
    ("sdxl", "compiled, contiguous", "contiguous", {}),
    ("sd15", "compiled, channels_last (handler today)", "channels_last", {}),
    ("sd15", "compiled, channels_last, tuned flags", "channels_last", TUNED),
]
SHAPES = {  # latent size, text tokens x width, SDXL's extra conditioning
    "sdxl": (128, 2048, True),
    "sd15": (64, 768, False),
}


def build_unet(arch: str):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(REPO / "handler" / "configs" / arch / "unet")
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(config).to(torch.float16).eval()
    unet.requires_grad_(False)
    return unet


def inputs_for(arch: str):
    latent, width, extra = SHAPES[arch]
    generator = torch.Generator("cuda").manual_seed(1)
    kwargs = {
        "sample": torch.randn(2, 4, latent, latent, device="cuda", generator=generator).half(),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(
            2, 77, width, device="cuda", generator=generator
        ).half(),
    }
    if extra:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device="cuda", generator=generator).half(),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda").half(),
        }
    return kwargs


def per_call_ms(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) / calls * 1000, 2)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "inductor-flags.json")
    deadline = time.monotonic() + (float(sys.argv[2]) if len(sys.argv) > 2 else 540)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": []}
    unets = {}
    for arch, name, layout, flags in VARIANTS:
        if time.monotonic() > deadline - 150:
            report["results"].append({"arch": arch, "variant": name, "skipped": "deadline"})
            continue
        if arch not in unets:
            unets.clear()
            torch.cuda.empty_cache()
            unet = build_unet(arch)
            kwargs = inputs_for(arch)
            with torch.inference_mode():
                reference = unet(**kwargs, return_dict=False)[0].float()
                eager_ms = per_call_ms(lambda: unet(**kwargs, return_dict=False))
            report["results"].append({"arch": arch, "variant": "eager", "ms": eager_ms})
            unets[arch] = (unet, kwargs, reference)
        unet, kwargs, reference = unets[arch]
        unet.to(memory_format=getattr(torch, layout, torch.contiguous_format))
        torch._dynamo.reset()
        entry = {"arch": arch, "variant": name, "flags": flags}
        with tempfile.TemporaryDirectory() as cache, torch._inductor.config.patch(flags):
            torch._inductor.config.fx_graph_cache = False
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            graphs = fastpath.UNetGraphs(unet, compile_unet=True)
            graphs.layout_ms = {}  # keep the layout set here: no layout timing
            started = time.perf_counter()
            with torch.inference_mode():
                output = graphs(**kwargs, return_dict=False)[0].float()
            torch.cuda.synchronize()
            entry["compile_and_capture_s"] = round(time.perf_counter() - started, 1)
            entry["compiled"] = graphs.compiled
            entry["ms"] = per_call_ms(lambda: graphs(**kwargs, return_dict=False))
            entry["rel_err"] = round(float((output - reference).norm() / reference.norm()), 5)
        report["results"].append(entry)
        print(json.dumps(entry), flush=True)
        out.write_text(json.dumps(report, indent=1))
    out.write_text(json.dumps(report, indent=1))
    for row in report["results"]:
        print(row["arch"], row["variant"], row.get("ms"), row.get("compile_and_capture_s"))


if __name__ == "__main__":
    main()
