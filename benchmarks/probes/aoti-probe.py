"""Probe: AOTInductor packages for the SDXL UNet and VAE decoder instead of torch.compile.

With torch.compile, every worker start re-traces the UNet with dynamo even when inductor's cache
is filled (warm-up 20 s instead of 2 s). An AOTInductor package is loaded as a shared library:
no tracing. Built without its weights (`package_constants_in_so=False`) and given the module's
own parameters (`load_constants(..., user_managed=True)`), it reads the weights where they are,
so in-place LoRA merges still apply. This measures: export + compile time, and in a fresh
process the load, first call, CUDA-graph capture and per-call time, against eager graphs.

    python benchmarks/probes/aoti-probe.py OUT_DIR
"""

import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = Path("/tmp/aoti-probe")
CONFIG = REPO / "handler/configs/sdxl"
TINY = os.environ.get("PROBE_TINY") == "1"  # a small SDXL-like UNet: checks the steps quickly
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=8, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=256 * 6 + 1280,
)
TINY_VAE = dict(block_out_channels=(32, 64), norm_num_groups=32, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def progress(*what):
    print(f"[{time.strftime('%H:%M:%S')}]", *what, file=sys.stderr, flush=True)


def unet_inputs(torch):
    g = torch.Generator("cuda").manual_seed(1)
    return (
        torch.randn(2, 4, 128, 128, generator=g, device="cuda", dtype=torch.float16),
        torch.tensor(500.0, device="cuda"),
        torch.randn(2, 77, 2048, generator=g, device="cuda", dtype=torch.float16),
        torch.randn(2, 1280, generator=g, device="cuda", dtype=torch.float16),
        torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=torch.float16),
    )


def wrappers(torch):
    class UNetCall(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, ehs, text_embeds, time_ids):
            added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(sample, timestep, ehs, added_cond_kwargs=added, return_dict=False)[0]

    class DecoderCall(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, z):
            return self.decoder(z)

    return UNetCall, DecoderCall


def build(torch, seed=0):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device("cuda"):
        if TINY:
            unet, vae = UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE)
        else:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG / "vae"))
    unet = unet.half().eval().to(memory_format=torch.channels_last)
    return unet, vae.half().eval()


def per_call(torch, fn, calls=20):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / calls * 1000, 2)


def graphed(torch, fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def parent(out: Path) -> None:
    started = time.perf_counter()
    import torch
    from safetensors.torch import save_file

    WORK.mkdir(parents=True, exist_ok=True)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}

    def save():
        (out / ("aoti-probe-tiny.json" if TINY else "aoti-probe.json")).write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2), flush=True)

    unet, vae = build(torch)
    state = {"unet." + k: v.contiguous() for k, v in unet.state_dict().items()}
    state.update({"vae." + k: v.contiguous() for k, v in vae.state_dict().items()})
    save_file(state, str(WORK / "weights.safetensors"))
    UNetCall, DecoderCall = wrappers(torch)
    configs = {"aot_inductor.package_constants_in_so": False}
    jobs = [
        ("unet", UNetCall(unet), unet_inputs(torch)),
        ("vae_decoder", DecoderCall(vae.decoder),
         (torch.randn(1, 4, 128, 128, device="cuda", dtype=torch.float16),)),
    ]
    for name, module, inputs in jobs:
        if time.perf_counter() - started > 300:
            report[name] = {"error": "skipped: out of time"}
            continue
        with torch.no_grad():
            torch.save([t.cpu() for t in inputs], WORK / f"{name}-inputs.pt")
            torch.save(module(*inputs).cpu(), WORK / f"{name}-eager.pt")
            try:
                t0 = time.perf_counter()
                program = torch.export.export(module, inputs, strict=False)
                t1 = time.perf_counter()
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(WORK / f"{name}.pt2"), inductor_configs=configs
                )
                t2 = time.perf_counter()
                report[name] = {"export_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}
            except Exception as error:
                report[name] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        save()
    del unet, vae, jobs
    torch.cuda.empty_cache()
    for managed in os.environ.get("PROBE_USER_MANAGED", "1").split(","):
        budget = max(30, 560 - (time.perf_counter() - started))
        child = subprocess.run(
            [sys.executable, __file__, "--child"], capture_output=True, text=True, timeout=budget,
            env={**os.environ, "PROBE_USER_MANAGED": managed},
        )
        key = "fresh_process" if managed == "1" else "fresh_process_copied_constants"
        try:
            report[key] = json.loads(child.stdout.strip().splitlines()[-1])
        except Exception:
            report[key] = {"rc": child.returncode, "stderr": child.stderr[-3000:]}
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    save()


def child() -> None:
    faulthandler.enable()
    t = {}
    t0 = time.perf_counter()
    import torch

    t["import_torch_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

    t["import_diffusers_models_s"] = round(time.perf_counter() - t1, 2)
    from safetensors.torch import load_file

    unet, vae = build(torch, seed=123)  # other weights, replaced by the saved ones below
    state = load_file(str(WORK / "weights.safetensors"), device="cuda")
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    vae.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vae.")})
    unet.to(memory_format=torch.channels_last)
    del state
    UNetCall, DecoderCall = wrappers(torch)
    for name, module in (("unet", UNetCall(unet)), ("vae_decoder", DecoderCall(vae.decoder))):
        package = WORK / f"{name}.pt2"
        if not package.exists():
            continue
        r = t[name] = {}
        try:
            inputs = [x.cuda() for x in torch.load(WORK / f"{name}-inputs.pt")]
            expected = torch.load(WORK / f"{name}-eager.pt").cuda().float()
            torch.cuda.synchronize()
            a = time.perf_counter()
            progress(name, "loading package")
            runner = torch._inductor.aoti_load_package(str(package))
            progress(name, "loaded; constants", len(runner.get_constant_fqns()))
            b = time.perf_counter()
            params = dict(module.named_parameters())
            params.update(module.named_buffers())
            fqns = runner.get_constant_fqns()
            managed = os.environ.get("PROBE_USER_MANAGED", "1") == "1"
            runner.load_constants({k: params[k] for k in fqns}, check_full_update=True,
                                  user_managed=managed)
            c = time.perf_counter()
            progress(name, "constants loaded")
            with torch.no_grad():
                runner(*inputs)
                torch.cuda.synchronize()
                d = time.perf_counter()
                r.update(load_package_s=round(b - a, 3), load_constants_s=round(c - b, 3),
                         first_call_s=round(d - c, 3), constants=len(fqns))
                progress(name, "first call done")
                r["aoti_ms"] = per_call(torch, lambda: runner(*inputs))
                progress(name, "timed; capturing")
                d = time.perf_counter()
                graph, gout = graphed(torch, lambda: runner(*inputs))
                torch.cuda.synchronize()
                r["warm_and_capture_s"] = round(time.perf_counter() - d, 3)
                progress(name, "captured")
                r["aoti_graphed_ms"] = per_call(torch, graph.replay)
                eg, _ = graphed(torch, lambda: module(*inputs))
                r["eager_graphed_ms"] = per_call(torch, eg.replay)
                graph.replay()
                torch.cuda.synchronize()
                err = (gout.float() - expected).abs()
                r["max_abs_diff_vs_eager"] = float(err.max())
                r["mean_abs_diff_vs_eager"] = float(err.mean())
                # an in-place weight change (how LoRAs are merged) reaches the package's kernels
                first = next(iter(module.parameters()))
                first.add_(0.01)
                changed = module(*inputs).float()
                graph.replay()
                torch.cuda.synchronize()
                r["in_place_update_max_diff"] = float((gout.float() - changed).abs().max())
                r["in_place_update_moved_output"] = float((changed - expected).abs().max())
                first.sub_(0.01)
                r["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        except Exception as error:
            r["error"] = f"{type(error).__name__}: {str(error)[:400]}"
    t["total_s"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(t), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        parent(Path(sys.argv[1]))
