"""Probe: is the cold-start import floor on the GPU host a bytecode artifact?

The device installs diffusers with `pip --no-compile` into /tmp/site, while a
Docker image built with pip gets .pyc files at install time. This probe times
fresh-process imports before and after `compileall`, and records
`-X importtime` for the worst modules. Run on the GPU host:

    python3 benchmarks/probes/import-bytecode-probe.py $OUT/import-bytecode.json
"""

import json
import os
import subprocess
import sys
import time

IMPORT_ALL = (
    "import torch, torch.cuda; torch.cuda.is_available() and torch.cuda.init(); "
    "import handler.engine; "
    "from diffusers import StableDiffusionXLPipeline; "
    "from diffusers.loaders import single_file_utils"
)


def timed(code: str, env_extra: dict | None = None) -> float:
    env = {**os.environ, **(env_extra or {})}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    return round(time.perf_counter() - started, 3)


def pyc_count(root: str) -> int:
    return sum(1 for _, _, files in os.walk(root) for f in files if f.endswith(".pyc"))


def importtime_top(code: str, top: int = 40) -> list[tuple[int, int, str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    )
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_part, cumulative_us, name = line.removeprefix("import time:").split("|")
        rows.append((int(cumulative_us), int(self_part), name.rstrip()))
    rows.sort(reverse=True)
    return [(c, s, n) for c, s, n in rows[:top]]


def main() -> None:
    site = os.environ.get("PYTHONPATH", "/tmp/site").split(":")[0]
    report: dict = {
        "python": sys.version,
        "dont_write_bytecode": sys.flags.dont_write_bytecode,
        "env": {k: v for k, v in os.environ.items() if k.startswith("PYTHON")},
        "site": site,
        "site_writable": os.access(site, os.W_OK),
        "pyc_in_site_before": pyc_count(site),
    }
    report["torch_only_s"] = [timed("import torch") for _ in range(3)]
    report["all_before_compileall_s"] = [timed(IMPORT_ALL) for _ in range(3)]
    report["pyc_in_site_after_imports"] = pyc_count(site)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", site], check=False)
    report["compileall_s"] = round(time.perf_counter() - started, 2)
    report["pyc_in_site_after_compileall"] = pyc_count(site)
    report["all_after_compileall_s"] = [timed(IMPORT_ALL) for _ in range(3)]
    report["importtime_top_cumulative_us"] = importtime_top(IMPORT_ALL)
    out = sys.argv[1] if len(sys.argv) > 1 else "import-bytecode.json"
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    summary = {k: v for k, v in report.items() if k != "importtime_top_cumulative_us"}
    print(json.dumps(summary, indent=1))
    for cumulative, self_us, name in report["importtime_top_cumulative_us"][:25]:
        print(f"{cumulative / 1e6:7.3f} {self_us / 1e6:7.3f} {name}")


if __name__ == "__main__":
    main()
