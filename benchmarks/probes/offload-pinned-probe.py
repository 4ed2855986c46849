"""Probe: why offloading a checkpoint to the RAM tier takes seconds (switch-phases probe).

Builds SDXL- and SD 1.5-shaped weights on the GPU (uninitialised fp16, the real shapes), then
switches between them as the cache does: offload one with `handler.pipelines.move_to_host`,
bring the other back. Records per offload the pinned allocator's new blocks and time in CUDA
allocation calls (`torch.cuda.host_memory_stats`), and the copy floor: the same copies into
page-locked chunks allocated beforehand.

    python benchmarks/probes/offload-pinned-probe.py OUT_DIR
"""

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from handler.pipelines import HOST_CHUNK_BYTES, move_to_host  # noqa: E402
from scripts import build_configs as bc  # noqa: E402
from scripts.make_demo_volume import build_components  # noqa: E402


def weights(arch: str) -> list[torch.nn.Module]:
    with torch.device("meta"):
        components = build_components(bc.ARCHITECTURES[arch])
    return [m.to_empty(device="cuda").half() for m in components.values()]


def nbytes(modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules for t in m.parameters())


def stats() -> dict:
    s = torch.cuda.host_memory_stats()
    return {"allocs": s.get("num_host_alloc", 0), "alloc_us": s.get("host_alloc_time.total", 0),
            "cached_bytes": s.get("allocated_bytes.current", 0)}


def timed(fn) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1000, 1)


def back(modules) -> None:
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            t.data = t.data.to("cuda", non_blocking=True)


def main(out: Path) -> None:
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "chunk_mb": HOST_CHUNK_BYTES >> 20}
    models = {"sdxl": weights("sdxl"), "sd15": weights("sd15")}
    report["gb"] = {k: round(nbytes(v) / 1e9, 2) for k, v in models.items()}
    report["tensors"] = {k: sum(1 for m in v for _ in m.parameters()) for k, v in models.items()}
    cycles = []
    report["first_offload_sd15_ms"] = timed(lambda: move_to_host(models["sd15"], pin_memory=True))
    for cycle in range(4):
        for out_name, in_name in (("sdxl", "sd15"), ("sd15", "sdxl")):
            before = stats()
            off = timed(lambda n=out_name: move_to_host(models[n], pin_memory=True))
            after = stats()
            on = timed(lambda n=in_name: back(models[n]))
            cycles.append({"cycle": cycle, "offload": out_name, "offload_ms": off,
                           "new_pinned_blocks": after["allocs"] - before["allocs"],
                           "cuda_host_alloc_ms": round((after["alloc_us"] - before["alloc_us"]) / 1000, 1),
                           "pinned_cached_gb": round(after["cached_bytes"] / 1e9, 2),
                           "bring_back": in_name, "bring_back_ms": on})
            print(json.dumps(cycles[-1]), flush=True)
    report["cycles"] = cycles
    # the copy floor: SDXL's weights into chunks that already exist
    tensors = [t for m in models["sdxl"] for t in m.parameters()]
    chunk = torch.empty(nbytes(models["sdxl"]) + 2**24, dtype=torch.uint8, pin_memory=True)

    def copies():
        used = 0
        for t in tensors:
            size = t.numel() * t.element_size()
            chunk[used:used + size].view(t.dtype).view(t.shape).copy_(t, non_blocking=True) \
                if t.is_contiguous() else None
            used += -(-size // 512) * 512

    report["sdxl_copy_floor_ms"] = [timed(copies) for _ in range(3)]
    single = torch.empty(HOST_CHUNK_BYTES, dtype=torch.uint8, device="cpu")
    report["one_fresh_pinned_chunk_ms"] = timed(
        lambda: torch.empty(HOST_CHUNK_BYTES, dtype=torch.uint8).pin_memory())
    del single
    (out / "offload-pinned.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "cycles"}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
