"""Probe: where a fresh worker's imports spend their time on the GPU host, by package.

The cold start's phases put 15-16 s in imports with the page cache dropped and about 9 s with
it warm (benchmark run of 30 Nov 12:15). This probe imports what `python -m handler` imports
before its first load, step by step, in fresh processes under `python -X importtime`, with the
libraries' bytecode compiled into a prefix as the worker image has it. It reports each step's
wall time and, per package, the summed self time of its modules: once with the page cache
dropped (root only), then twice warm. Run on the GPU host from the repository root:

    python3 benchmarks/probes/import-profile-probe.py $OUT/import-profile.json /tmp/probe
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from scripts.benchmark import compile_bytecode_like_the_image, drop_page_cache  # noqa: E402

# What python -m handler imports before its first checkpoint load, in order.
STEPS = [
    ("torch", "import torch"),
    ("runpod_sdk", "from handler.runpod_worker import import_runpod; import_runpod()"),
    ("handler_engine", "import handler.engine"),
    ("diffusers_and_transformers", "from handler.engine import _quiet_libraries; _quiet_libraries()"),
    ("sdxl_pipeline", "import diffusers; diffusers.StableDiffusionXLPipeline"),
    ("single_file_loader", "import diffusers.loaders.single_file_utils"),
]
CHILD = """
import json, sys, time
times = {}
for name, code in json.loads(sys.argv[1]):
    started = time.perf_counter()
    exec(code)
    times[name] = round(time.perf_counter() - started, 3)
print("STEPS" + json.dumps(times))
"""
ROW = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def package_of(module: str) -> str:
    """torch's parts by subpackage (torch._dynamo, torch._inductor...), others by top level."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "torch" and len(parts) > 1 else parts[0]


def one_run() -> dict:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", CHILD, json.dumps(STEPS)],
        capture_output=True,
        text=True,
        check=True,
    )
    steps = json.loads(done.stdout.split("STEPS", 1)[1])
    self_us: dict[str, int] = {}
    modules = 0
    for line in done.stderr.splitlines():
        match = ROW.match(line)
        if match:
            modules += 1
            package = package_of(match.group(4))
            self_us[package] = self_us.get(package, 0) + int(match.group(1))
    top = sorted(self_us.items(), key=lambda item: -item[1])[:25]
    return {
        "steps_s": steps,
        "total_s": round(sum(steps.values()), 2),
        "modules": modules,
        "self_s_by_package": {name: round(us / 1e6, 3) for name, us in top},
        "self_s_all_packages": round(sum(self_us.values()) / 1e6, 2),
    }


def main() -> None:
    out = Path(sys.argv[1])
    workdir = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/probe")
    report: dict = {"python": sys.version.split()[0]}
    report["bytecode_compile_s"] = compile_bytecode_like_the_image(workdir)
    report["pycache_prefix"] = os.environ.get("PYTHONPYCACHEPREFIX")
    report["page_cache_dropped"] = drop_page_cache()
    report["dropped"] = one_run()
    report["warm"] = [one_run() for _ in range(2)]
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"probe took {time.perf_counter() - started:.1f} s", file=sys.stderr)
