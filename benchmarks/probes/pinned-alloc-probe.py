"""Probe: how fast can the RAM tier's page-locked chunks be allocated, and can they be allocated in
a background thread while the GPU works?

Modes (one fresh process each, since the allocator settings are read once):
- default: cudaHostAlloc, PyTorch's default;
- register-N: PYTORCH_CUDA_ALLOC_CONF pinned_use_cuda_host_register with N threads (malloc, then
  the pages touched by N threads and registered with cudaHostRegister).
For each: the time per 256 MB chunk allocated alone, then the GPU work's step times and a pure
Python loop's progress on the main thread while another thread allocates."""
import json, os, statistics, subprocess, sys, threading, time
from pathlib import Path

CHUNK = 256 * 2**20
N = 16  # 4 GB per phase


def measure(mode: str) -> dict:
    import torch
    torch.cuda.init()
    r = {"mode": mode}
    chunks = []
    times = []
    for _ in range(N):
        t = time.perf_counter()
        chunks.append(torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True))
        times.append(time.perf_counter() - t)
    r["alloc_ms_per_chunk"] = [round(x * 1000, 1) for x in times]
    r["alloc_gb_s"] = round(N * CHUNK / sum(times) / 1e9, 2)
    src = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize(); t = time.perf_counter()
    for c in chunks:
        c.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    r["d2h_gb_s_into_new_chunks"] = round(N * CHUNK / (time.perf_counter() - t) / 1e9, 2)

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(3):
            y = a @ a
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for _ in range(4):
            y = a @ a

    def gpu_steps(seconds):
        out = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter(); g.replay(); torch.cuda.synchronize(); out.append(time.perf_counter() - t)
        return out

    def python_loop(seconds):
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    gpu_steps(0.5)
    quiet_steps = gpu_steps(1.5)
    quiet_loop = python_loop(1.0)
    more = []
    def allocate():
        for _ in range(N):
            more.append(torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True))
    th = threading.Thread(target=allocate); t0 = time.perf_counter(); th.start()
    busy_steps = gpu_steps(1.5)
    busy_loop = python_loop(1.0)
    th.join(); r["background_alloc_s"] = round(time.perf_counter() - t0, 2)
    q = lambda xs: {"median_ms": round(statistics.median(xs) * 1000, 2), "max_ms": round(max(xs) * 1000, 2), "n": len(xs)}
    r["gpu_step_quiet"] = q(quiet_steps)
    r["gpu_step_while_allocating"] = q(busy_steps)
    r["python_loop_per_s_quiet"] = quiet_loop
    r["python_loop_per_s_while_allocating"] = busy_loop
    r["background_alloc_done_within_measure"] = r["background_alloc_s"] <= 2.6
    return r


def main():
    if len(sys.argv) > 2:
        print("RESULT " + json.dumps(measure(sys.argv[2])), flush=True)
        return
    out_dir = Path(sys.argv[1])
    results = []
    for mode in ("default", "register-4", "register-8", "default", "register-8"):
        env = dict(os.environ)
        if mode.startswith("register"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{mode.split('-')[1]}"
        p = subprocess.run([sys.executable, __file__, "-", mode], env=env, capture_output=True, text=True, timeout=120)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        r = json.loads(lines[-1][7:]) if lines else {"mode": mode, "error": p.stderr[-3000:]}
        results.append(r)
        print(json.dumps(r), flush=True)
    import torch
    data = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cpus": os.cpu_count(), "results": results}
    (out_dir / f"pinned-alloc-{data['gpu'].replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
