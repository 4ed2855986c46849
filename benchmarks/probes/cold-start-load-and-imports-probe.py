"""Cold-start probe: where an SDXL worker start spends its time, and faster load variants."""
import json, os, struct, subprocess, sys, time
from pathlib import Path

WORK = Path("/tmp/probe")
CKPT = WORK / "models/checkpoints/bench-sdxl.safetensors"
T0 = time.time()


def drop():
    os.sync(); Path("/proc/sys/vm/drop_caches").write_text("3\n")


def child(phase):
    env = {**os.environ, "MODELS_DIR": str(WORK / "models"), "PROBE_T0": str(time.time())}
    out = subprocess.run([sys.executable, __file__, phase], env=env, capture_output=True, text=True, timeout=300)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        return {"error": out.stderr[-3000:]}
    return json.loads(lines[-1][7:])


DTYPES = None


def staged_read(path, device, chunk=64 << 20):
    """safetensors file -> per-tensor device tensors through two pinned staging buffers."""
    import torch
    dt = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16, "I64": torch.int64,
          "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool, "F64": torch.float64}
    with open(path, "rb", buffering=0) as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        base = 8 + n
        items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        out, spans = {}, []
        for name, info in items:
            t = torch.empty(info["shape"], dtype=dt[info["dtype"]], device=device)
            out[name] = t
            a, b = info["data_offsets"]
            if b > a:
                spans.append((a, b, t.view(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)))
        total = spans[-1][1] if spans else 0
        cuda = torch.device(device).type == "cuda"
        bufs = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        events = [None, None]
        import contextlib
        stream = torch.cuda.Stream() if cuda else None
        i = 0; pos = 0; k = 0
        f.seek(base)
        while pos < total:
            buf = bufs[k % 2]
            if events[k % 2] is not None:
                events[k % 2].synchronize()
            size = min(chunk, total - pos)
            mv = memoryview(buf.numpy())[:size]
            got = 0
            while got < size:
                r = f.readinto(mv[got:])
                if not r: raise EOFError
                got += r
            with (torch.cuda.stream(stream) if cuda else contextlib.nullcontext()):
                j = i
                while j < len(spans) and spans[j][0] < pos + size:
                    a, b, dst = spans[j]
                    lo, hi = max(a, pos), min(b, pos + size)
                    dst[lo - a:hi - a].copy_(buf[lo - pos:hi - pos], non_blocking=True)
                    if b <= pos + size:
                        i = j + 1
                    j += 1
                if cuda:
                    ev = torch.cuda.Event(); ev.record(stream); events[k % 2] = ev
            pos += size; k += 1
        if cuda:
            stream.synchronize()
    return out


def run_phase(phase):
    spawned = float(os.environ["PROBE_T0"])
    r = {}
    def mark(key, since):
        r[key] = round(time.time() - since, 3)
        return time.time()
    if phase.startswith("imports"):
        prefetch_threads = []
        if "prefetch" in phase:
            sys.path.insert(0, os.getcwd())
            from handler.registry import prefetch_default_checkpoint
            os.environ["DEFAULT_CHECKPOINT"] = "bench-sdxl"
            prefetch_threads.append(prefetch_default_checkpoint())
        if "libs" in phase:
            import importlib.util, threading
            roots = [Path(importlib.util.find_spec("torch").origin).parent / "lib"]
            nv = importlib.util.find_spec("nvidia")
            if nv and nv.submodule_search_locations:
                roots += [Path(p) for p in nv.submodule_search_locations]
            files = sorted((p for root in roots for p in root.rglob("*.so*")), key=lambda p: -p.stat().st_size)
            r["lib_bytes_gb"] = round(sum(p.stat().st_size for p in files) / 1e9, 2)
            def reader(paths):
                buf = bytearray(8 << 20)
                for p in paths:
                    with open(p, "rb", buffering=0) as fh:
                        while fh.readinto(buf): pass
            for n in range(4):
                t = threading.Thread(target=reader, args=(files[n::4],), daemon=True); t.start()
        t = time.time(); r["spawn_to_main_s"] = round(t - spawned, 3)
        import torch; t = mark("torch_s", t)
        sys.path.insert(0, os.getcwd())
        import handler.runpod_worker; t = mark("handler_s", t)
        if "cudathread" in phase:
            import threading
            def init():
                t1 = time.time(); torch.empty(1, device="cuda"); r["cuda_init_in_thread_s"] = round(time.time() - t1, 3)
            ct = threading.Thread(target=init); ct.start()
        else:
            torch.empty(1, device="cuda"); t = mark("cuda_init_s", t)
        import diffusers, transformers
        diffusers.StableDiffusionXLPipeline; transformers.CLIPTextModel; t = mark("diffusers_s", t)
        from diffusers.loaders import single_file; t = mark("single_file_s", t)
        if "cudathread" in phase:
            ct.join(); t = mark("cuda_join_s", t)
        r["total_s"] = round(time.time() - spawned, 3)
        for th in prefetch_threads:
            if th is not None:
                th.join(); r["prefetch_done_s"] = round(th.finished_at - spawned, 3)
        return r
    if phase == "disk":
        t = time.time()
        with open(CKPT, "rb", buffering=0) as fh:
            buf = bytearray(16 << 20)
            while fh.readinto(buf): pass
        r["read_s"] = round(time.time() - t, 3); r["gb"] = round(CKPT.stat().st_size / 1e9, 2)
        return r
    # load variants (warm page cache)
    import torch
    sys.path.insert(0, os.getcwd())
    from handler.settings import Settings
    from handler.registry import Registry
    from handler import pipelines
    import diffusers
    diffusers.StableDiffusionXLPipeline
    torch.empty(1, device="cuda"); torch.cuda.synchronize()
    reg = Registry(Settings.from_env())
    m = reg.resolve("checkpoint", "bench-sdxl", "c"); d = reg.detect(m); cfg = reg.config_folder(m, d)
    dev = torch.device("cuda")
    if phase == "load_current":
        import cProfile, pstats, io
        pr = cProfile.Profile(); pr.enable()
        t = time.time()
        orig_to = diffusers.DiffusionPipeline.to
        times = {}
        def timed_to(self, *a, **k):
            t1 = time.time(); res = orig_to(self, *a, **k); torch.cuda.synchronize(); times["to_cuda_s"] = round(time.time() - t1, 3); return res
        diffusers.DiffusionPipeline.to = timed_to
        loaded = pipelines.load_checkpoint(m, d, cfg, dev, torch.float16)
        torch.cuda.synchronize(); t = mark("load_s", t)
        pr.disable(); s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        r.update(times); r["profile"] = s.getvalue()[-6000:]
        sd = loaded.pipeline.unet.state_dict()
        r["unet_checksum"] = float(sum(v.float().sum().item() for k, v in list(sd.items())[:50]))
        r["te2_checksum"] = float(sum(v.float().sum().item() for k, v in list(loaded.pipeline.text_encoder_2.state_dict().items())[:50]))
        r["mem_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        return r
    if phase in ("load_direct_safetensors", "load_direct_staged"):
        import diffusers.loaders.single_file as sfl
        t = time.time()
        if phase.endswith("safetensors"):
            from safetensors.torch import load_file
            state = load_file(str(m.path), device="cuda")
        else:
            state = staged_read(m.path, dev)
        torch.cuda.synchronize(); t = mark("read_to_gpu_s", t)
        orig = sfl.load_single_file_checkpoint
        sfl.load_single_file_checkpoint = lambda *a, **k: state
        try:
            cls = diffusers.StableDiffusionXLPipeline
            kw = {"torch_dtype": torch.float16, "local_files_only": True, "device": dev}
            kw.update(pipelines._tokenizers(d.architecture))
            with pipelines._no_weight_init():
                pipe = cls.from_single_file(str(m.path), config=str(cfg), **kw)
        finally:
            sfl.load_single_file_checkpoint = orig
        torch.cuda.synchronize(); t = mark("from_single_file_s", t)
        r["devices"] = {n: str(next(getattr(pipe, n).parameters()).device) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
        pipe.to(dev); torch.cuda.synchronize(); t = mark("to_cuda_s", t)
        del state
        sd = pipe.unet.state_dict()
        r["unet_checksum"] = float(sum(v.float().sum().item() for k, v in list(sd.items())[:50]))
        r["te2_checksum"] = float(sum(v.float().sum().item() for k, v in list(pipe.text_encoder_2.state_dict().items())[:50]))
        torch.cuda.empty_cache()
        r["mem_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        r["load_s"] = round(r["read_to_gpu_s"] + r["from_single_file_s"] + r["to_cuda_s"], 3)
        return r


if __name__ == "__main__" and len(sys.argv) > 1:
    print("RESULT " + json.dumps(run_phase(sys.argv[1])), flush=True)
    sys.exit(0)

if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    out = Path(os.environ.get("OUT", "/tmp")); results = {}
    if not CKPT.exists():
        t = time.time()
        from scripts.benchmark import write_checkpoints
        write_checkpoints(WORK / "models"); results["write_s"] = round(time.time() - t, 1)
        import torch; torch.cuda.empty_cache()
    for phase in ["load_current", "load_direct_safetensors", "load_direct_staged", "load_current", "load_direct_staged"]:
        results.setdefault(phase, []).append(child(phase)); print(phase, json.dumps(results[phase][-1])[:600], flush=True)
    for phase in ["imports", "imports_cudathread"]:
        results.setdefault(phase + "_warm", []).append(child(phase)); print(phase, results[phase + "_warm"][-1], flush=True)
    for phase in ["disk", "imports", "imports_prefetch", "imports_prefetch_libs", "imports_prefetch_cudathread", "imports_libs"]:
        drop(); results.setdefault(phase + "_dropped", []).append(child(phase)); print(phase, results[phase + "_dropped"][-1], flush=True)
    results["elapsed_s"] = round(time.time() - T0, 1)
    (out / "coldstart-probe.json").write_text(json.dumps(results, indent=1))
