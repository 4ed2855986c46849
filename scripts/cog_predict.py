"""`cog predict` without Docker or the cog CLI: run the predictor under Cog's own HTTP server.

    python scripts/cog_predict.py -i prompt="a red cube" -i num_inference_steps=20 [-i image=@photo.png]

Starts coglet (`python -m cog.server.http`) on a free port on 127.0.0.1 with the predictor from
cog.yaml, waits for setup, sends one prediction, writes the output files to cog-output/, prints
the prediction JSON (outputs shortened) and stops the server. Values are read by the input's
type in `.cog/openapi_schema.json`, as the cog CLI reads them; `@path` sends a file as a data URL.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / ".cog" / "openapi_schema.json"


def input_types() -> dict[str, str]:
    """Each form input's JSON type, from the committed OpenAPI schema (choices are strings)."""
    properties = json.loads(SCHEMA.read_text())["components"]["schemas"]["Input"]["properties"]
    return {name: spec.get("type", "string") for name, spec in properties.items()}


def parse_inputs(pairs: list[str], types: dict[str, str]) -> dict:
    """`name=value` pairs as the cog CLI reads them: by the input's type (`prompt=1984` is
    text), `@path` as a file, and an input the form lacks as JSON if it parses (coglet drops
    it, with a line in its log)."""
    inputs = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        kind = types.get(name)
        if value.startswith("@"):
            path = Path(value[1:])
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            inputs[name] = f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
        elif kind == "string":
            inputs[name] = value
        elif kind in ("integer", "number", "boolean"):
            inputs[name] = _typed(name, value, kind)
        else:
            try:
                inputs[name] = json.loads(value)
            except json.JSONDecodeError:
                inputs[name] = value
    return inputs


def _typed(name: str, value: str, kind: str) -> int | float | bool:
    try:
        if kind == "integer":
            return int(value)
        if kind == "number":
            return float(value)
        return {"true": True, "1": True, "false": False, "0": False}[value.lower()]
    except (ValueError, KeyError):
        article = "an" if kind == "integer" else "a"
        raise SystemExit(f"-i {name}: {value!r} is not {article} {kind}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", action="append", default=[], help="name=value")
    parser.add_argument("--out", type=Path, default=Path("cog-output"))
    args = parser.parse_args()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inputs = parse_inputs(args.input, input_types())
    models = os.environ.get("MODELS_DIR", "").strip()  # blank is unset, as the worker reads it
    env = {
        **os.environ,
        # the server runs in the repository: a relative MODELS_DIR is the caller's
        **({"MODELS_DIR": os.path.abspath(models)} if models else {}),
        "COG_PREDICT_TYPE_STUB": "handler/cog_predictor.py:Predictor",
        "PORT": str(port),
        # coglet starts its worker with `python` from PATH: make it this interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                health = requests.get(f"{url}/health-check", timeout=2).json()
                if health["status"] == "READY":
                    break
                if health.get("setup", {}).get("status") == "failed":
                    raise SystemExit(f"setup failed:\n{health['setup'].get('logs', '')}")
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the Cog server did not become ready")
            time.sleep(0.5)
        body = requests.post(f"{url}/predictions", json={"input": inputs}, timeout=3600).json()
    finally:
        server.terminate()
        server.wait(timeout=30)

    outputs = body.get("output") or []
    args.out.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(outputs):
        header, data = item.split(",", 1)
        extension = header.split("/")[1].split(";")[0]
        path = args.out / f"output.{index}.{extension}"
        path.write_bytes(base64.b64decode(data))
        outputs[index] = f"{header},... (written to {path})"
    print(json.dumps(body, indent=2))
    raise SystemExit(0 if body.get("status") == "succeeded" else 1)


if __name__ == "__main__":
    main()
