"""Probe: do the GPU host's installed packages (torch, transformers, ...) ship .pyc files?

The host runs with PYTHONDONTWRITEBYTECODE=1. If its site-packages hold no
bytecode, every fresh worker compiles torch and transformers from source, which
a Docker image built with pip never does (pip compiles at install). This probe
counts .py and .pyc files per package, then compiles everything importable into
a separate PYTHONPYCACHEPREFIX (site-packages are left untouched) and times
fresh-process imports with and without that prefix. Run on the GPU host:

    python3 benchmarks/probes/pycache-prefix-probe.py $OUT/pycache-prefix.json /tmp/pycache
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

PACKAGES = ["torch", "transformers", "sympy", "diffusers", "safetensors", "PIL", "numpy", "scipy",
            "sklearn", "huggingface_hub", "accelerate", "peft", "pydantic", "triton", "networkx"]
IMPORT_ALL = (
    "import torch, torch.cuda; torch.cuda.is_available() and torch.cuda.init(); "
    "import handler.engine; "
    "from diffusers import StableDiffusionXLPipeline; "
    "from diffusers.loaders import single_file_utils"
)


def package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def census(root: str) -> dict:
    py = pyc = 0
    for _, _, files in os.walk(root):
        py += sum(f.endswith(".py") for f in files)
        pyc += sum(f.endswith(".pyc") for f in files)
    return {"dir": root, "py": py, "pyc": pyc, "writable": os.access(root, os.W_OK)}


def timed(code: str, env_extra: dict | None = None) -> float:
    env = {**os.environ, **(env_extra or {})}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return round(time.perf_counter() - started, 3)


def main() -> None:
    out = sys.argv[1]
    prefix = sys.argv[2] if len(sys.argv) > 2 else "/tmp/pycache"
    report: dict = {
        "python": sys.version,
        "dont_write_bytecode": sys.flags.dont_write_bytecode,
        "env": {k: v for k, v in os.environ.items() if k.startswith("PYTHON")},
        "census": {},
    }
    dirs = []
    for name in PACKAGES:
        found = package_dir(name)
        if found:
            report["census"][name] = census(found)
            dirs.append(found)
    print(json.dumps(report, indent=1), flush=True)
    report["torch_only_s"] = [timed("import torch") for _ in range(2)]
    report["all_s"] = [timed(IMPORT_ALL) for _ in range(2)]
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs, "handler"],
        check=False, env={**os.environ, "PYTHONPYCACHEPREFIX": prefix}, capture_output=True,
    )
    report["compileall_s"] = round(time.perf_counter() - started, 2)
    report["prefix_census"] = census(prefix)
    with_prefix = {"PYTHONPYCACHEPREFIX": prefix}
    report["torch_only_prefix_s"] = [timed("import torch", with_prefix) for _ in range(2)]
    report["all_prefix_s"] = [timed(IMPORT_ALL, with_prefix) for _ in range(2)]
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("census", "env")}, indent=1))


if __name__ == "__main__":
    main()
