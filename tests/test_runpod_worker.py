"""The RunPod worker, through the SDK's own local modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_worker(args: list[str], demo_volume: Path, **env) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "MODELS_DIR": str(demo_volume),
        "DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "handler", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_test_input_runs_a_job_and_shows_its_seed(demo_volume):
    job = {"input": {"prompt": "a red cube", "width": 64, "height": 64, "steps": 2, "seed": 7}}
    out = run_worker(["--test_input", json.dumps(job)], demo_volume)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "completed successfully" in out.stdout
    assert "'seed': 7" in out.stdout
    assert "used 'demo-sd15'" in out.stdout  # no DEFAULT_CHECKPOINT: the first one, with a warning
    assert "a red cube" not in out.stderr  # the job log line never carries the prompt


def test_test_input_with_a_bad_payload_fails_with_a_code(demo_volume):
    job = {"input": {"prompt": "x", "steps": 0}}
    out = run_worker(["--test_input", json.dumps(job)], demo_volume, DEFAULT_CHECKPOINT="demo-sd15")
    assert out.returncode == 1
    assert "invalid_input: steps:" in out.stdout
