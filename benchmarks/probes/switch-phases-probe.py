"""Probe: where a checkpoint switch from the RAM tier spends its time (SDXL <-> SD 1.5).

Runs small jobs (512x512, 1 step) alternating two full-size random checkpoints through the
RunPod handler, with one GPU slot and one RAM slot, so every job after the first two is a
switch. Times each phase (synchronized): offloading the other checkpoint (`move_to_host`),
`pipeline.to(cuda)`, and the rest of the job's `load` timing. Then repeats with the weights
brought back by non-blocking copies (one synchronize at the end) instead of diffusers'
`pipeline.to`, and checks that the images are identical.

    python benchmarks/probes/switch-phases-probe.py OUT_DIR
"""

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
MODELS = Path("/tmp/bench/models")
os.environ.update(MODELS_DIR=str(MODELS), DEFAULT_CHECKPOINT="bench-sdxl")
os.environ.update(GPU_CHECKPOINTS="1", CPU_CHECKPOINTS="1")

import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

import handler.pipelines  # noqa: E402
from scripts.benchmark import run_handler, write_checkpoints  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)


def timed_wrap(owner, attr: str, label: str) -> None:
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            PHASES[label] += (time.perf_counter() - started) * 1000

    setattr(owner, attr, wrapper)


def to_device_nonblocking(pipeline, device) -> None:
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.to(device, non_blocking=True)
    torch.cuda.synchronize()


def pinned_stats() -> dict:
    """The page-locked allocator: blocks in use, bytes held (in use + cached), new blocks."""
    s = torch.cuda.host_memory_stats()
    return {"active_gb": round(s.get("active_bytes.current", 0) / 1e9, 2),
            "held_gb": round(s.get("allocated_bytes.current", 0) / 1e9, 2),
            "blocks_created": s.get("num_host_alloc", 0)}


def chunks_created():
    from handler.runpod_worker import get_engine

    host = getattr(get_engine().cache, "host", None)
    return None if host is None else host.created


def pinned_census() -> dict:
    """Page-locked CPU tensors still referenced, and who holds a few of them."""
    import gc

    gc.collect()
    found = [o for o in gc.get_objects()
             if isinstance(o, torch.Tensor) and o.device.type == "cpu" and o.is_pinned()]
    holders = []
    for tensor in found[:6]:
        for ref in gc.get_referrers(tensor):
            if ref is found:
                continue
            owner = ref
            if isinstance(ref, dict):
                key = next((k for k, v in ref.items() if v is tensor), None)
                owners = [o for o in gc.get_referrers(ref) if o is not found]
                owner = f"dict[{key!r}] of " + ",".join(type(o).__name__ for o in owners[:3])
            else:
                owner = type(ref).__name__
            holders.append({"shape": list(tensor.shape), "type": type(tensor).__name__,
                            "held_by": owner})
    return {"count": len(found), "gb": round(sum(t.numel() * t.element_size() for t in found) / 1e9, 2),
            "types": sorted({type(t).__name__ for t in found}), "holders": holders[:12]}


def rounds(label: str, count: int = 3) -> tuple[list[dict], list[str]]:
    jobs, images = [], []
    for index in range(2 * count):
        arch = ("sdxl", "sd15")[index % 2]
        job = {"prompt": "a red cube", "checkpoint": f"bench-{arch}", "width": 512,
               "height": 512, "steps": 1, "seed": 7}
        PHASES.clear()
        started = time.perf_counter()
        reply = run_handler(job)
        total = (time.perf_counter() - started) * 1000
        jobs.append({"variant": label, "checkpoint": arch, "job_ms": round(total, 1),
                     "pinned": pinned_stats(), "host_chunks_created": chunks_created(),
                     "timings_ms": reply["timings_ms"],
                     "phases_ms": {k: round(v, 1) for k, v in PHASES.items()}})
        images.append(reply["images"][0]["image"])
        print(json.dumps(jobs[-1]), flush=True)
    return jobs, images


def main(out: Path) -> None:
    started = time.perf_counter()
    write_checkpoints(MODELS)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "checkpoints_written_s": round(time.perf_counter() - started, 1)}
    timed_wrap(handler.pipelines, "move_to_host", "offload_other (move_to_host)")
    timed_wrap(DiffusionPipeline, "to", "bring_back (pipeline.to)")
    if hasattr(handler.pipelines, "move_to_device"):  # the worker's own pool (HostChunks)
        timed_wrap(handler.pipelines, "move_to_device", "bring_back (move_to_device)")
    from handler.engine import Engine
    from handler.registry import Registry

    for owner, attr in ((Engine, "checkpoint"), (Engine, "_additions_for"), (Engine, "_vae_for"),
                        (Registry, "detect"), (Registry, "resolve")):
        timed_wrap(owner, attr, f"{owner.__name__}.{attr}")
    from handler.runpod_worker import get_engine

    get_engine()
    run_handler({"prompt": "x", "checkpoint": "bench-sd15", "width": 512, "height": 512,
                 "steps": 1})  # both checkpoints read from disk once
    report["switches"], images_a = rounds("current code", count=4)
    report["pinned_tensors_alive"] = pinned_census()
    report["elapsed_s"] = round(time.perf_counter() - started, 1)
    (out / "switch-phases.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
