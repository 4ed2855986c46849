"""Run one job through the RunPod handler, write its images, and print the result JSON.

    MODELS_DIR=demo-volume python scripts/run_demo_job.py ['{"prompt": ...}'] [--out DIR]

Inline images are written to --out (default demo-output/) and shortened in the printed JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from pathlib import Path

from handler.runpod_worker import handle

DEFAULT_INPUT = {
    "prompt": "a red cube on a table",
    "width": 256,
    "height": 256,
    "steps": 12,
    "seed": 7,
    "num_images": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", nargs="?", help="job input as JSON (default: a 256x256 demo job)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args()
    job_input = json.loads(args.input) if args.input else DEFAULT_INPUT

    result = asyncio.run(handle({"id": "demo", "input": job_input}))
    if "error" in result:
        print(json.dumps(result, indent=2))
        raise SystemExit(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for image in result["images"]:
        if "image" not in image:
            continue
        header, encoded = image["image"].split(",", 1)
        path = args.out / f"{image['index']}-{image['seed']}.{image['format']}"
        path.write_bytes(base64.b64decode(encoded))
        image["image"] = f"{header},... ({len(encoded)} base64 chars, written to {path})"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
