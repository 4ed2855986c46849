"""Probe: how much of loading a precompiled SDXL UNet is its guards, and what would leaving the
module-structure guards out save?

Loading a precompiled UNet takes 5–6 s of a compiled worker's warm-up (benchmark runs 09:42 and
09:51); a cProfile run put much of it in rebuilding about 13,000 saved guards. Process "save"
compiles the full-size SDXL UNet (1024², CFG batch 2, fp16, contiguous) ahead of time twice:
with the worker's guard filter (`handler.fastpath._saveable_guards`), and with a trimmed one
that also drops the guards on the module's own structure (submodule types, list lengths, dict
keys, attribute presence, hooks, parameter metadata), counting the guards by type. Process
"load", a fresh one, loads each file twice, timing the guard phases (`load_guards_state`,
`load_guard_manager`) apart from the whole load, and checks both against eager.

    python benchmarks/probes/guard-trim-probe.py OUT_DIR
"""
import collections, json, os, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, os.getcwd())

STRUCTURE = {"TYPE_MATCH", "SEQUENCE_LENGTH", "DICT_KEYS_MATCH", "HASATTR", "NOT_PRESENT_IN_GENERIC_DICT",
             "EMPTY_NN_MODULE_HOOKS_DICT", "TENSOR_MATCH", "ID_MATCH", "DICT_CONTAINS"}


def run(step: str, folder: Path) -> dict:
    t_start = time.perf_counter()
    import inspect
    import torch
    from diffusers import UNet2DConditionModel
    from handler.fastpath import _saveable_guards
    from scripts import build_configs as bc
    r = {"step": step, "torch": torch.__version__, "import_s": round(time.perf_counter() - t_start, 1)}
    torch._dynamo.config.enable_aot_compile = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(bc.CONFIG_ROOT / "sdxl" / "unet"))).half().eval()
    gen = torch.Generator("cuda").manual_seed(1)
    args = (torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16, generator=gen), torch.tensor(500.0, device="cuda"),
            torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16, generator=gen))
    kwargs = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16, generator=gen),
                                    "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=torch.float16)},
              "return_dict": False}
    eager = type(unet).forward
    external = {"module": unet, "undecorated_forward": inspect.unwrap(eager)}
    counts = {}

    def counting(name, trim):
        def guard_filter(entries):
            keep = _saveable_guards(entries)
            if trim:
                keep = [k and not (e.orig_guard.name.startswith("L['self']") and e.guard_type in STRUCTURE)
                        for e, k in zip(entries, keep)]
            c = collections.Counter()
            for e, k in zip(entries, keep):
                root = "module" if e.orig_guard.name.startswith("L['self']") else "other"
                c[f"{'kept' if k else 'dropped'} {root} {e.guard_type}"] += 1
            counts[name] = dict(sorted(c.items(), key=lambda kv: -kv[1]))
            return keep
        return guard_filter

    with torch.inference_mode():
        ref = unet(*args, **kwargs)[0]
        if step == "save":
            for name, trim in (("full", False), ("trimmed", True)):
                t = time.perf_counter()
                compiled = torch.compile(eager.__get__(unet), fullgraph=True, dynamic=False,
                                         options={"guard_filter_fn": counting(name, trim)}).aot_compile((args, kwargs))
                r[f"{name}_compile_s"] = round(time.perf_counter() - t, 1)
                compiled.save_compiled_function(str(folder / f"{name}.bin"), external_data=external)
                r[f"{name}_mb"] = round((folder / f"{name}.bin").stat().st_size / 1e6, 1)
                out = compiled(unet, *args, **kwargs)[0]
                r[f"{name}_max_abs_diff_vs_eager"] = float((out.float() - ref.float()).abs().max())
            r["guard_counts"] = counts
        else:
            from torch._dynamo import aot_compile as aot, package
            phases = collections.defaultdict(float)

            def timed(module, attr):
                original = getattr(module, attr)

                def wrapper(*a, **k):
                    t = time.perf_counter()
                    try:
                        return original(*a, **k)
                    finally:
                        phases[attr] += time.perf_counter() - t
                setattr(module, attr, wrapper)
            for attr in ("load_guards_state", "load_guard_manager"):
                timed(package, attr)
            r["loads"] = []
            for name in ("full", "trimmed", "full", "trimmed"):
                phases.clear()
                t = time.perf_counter()
                with open(folder / f"{name}.bin", "rb") as f:
                    compiled = torch.compiler.load_compiled_function(f, external_data=external)
                load_s = time.perf_counter() - t
                t = time.perf_counter()
                out = compiled(unet, *args, **kwargs)[0]
                torch.cuda.synchronize()
                r["loads"].append({"file": name, "load_s": round(load_s, 2), "first_call_s": round(time.perf_counter() - t, 2),
                                   **{f"{k}_s": round(v, 2) for k, v in phases.items()},
                                   "max_abs_diff_vs_eager": float((out.float() - ref.float()).abs().max())})
                print(json.dumps(r["loads"][-1]), flush=True)
    r["process_s"] = round(time.perf_counter() - t_start, 1)
    return r


def main():
    if sys.argv[1] == "-":
        print("RESULT " + json.dumps(run(sys.argv[2], Path(sys.argv[3]))), flush=True)
        return
    import torch
    out_dir = Path(sys.argv[1])
    folder = Path("/tmp/guard-trim"); folder.mkdir(exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    data = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": []}
    for step in ("save", "load"):
        t = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "-", step, str(folder)], capture_output=True, text=True, timeout=420)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        r = json.loads(lines[-1][7:]) if lines else {"step": step, "rc": p.returncode, "error": p.stderr[-4000:]}
        r["wall_s"] = round(time.perf_counter() - t, 1)
        data["results"].append(r)
        print(json.dumps(r), flush=True)
        if "error" in r:
            break
    name = f"guard-trim-{data['gpu'].replace(' ', '-')}-{time.strftime('%Y-%m-%d')}.json"
    (out_dir / name).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
