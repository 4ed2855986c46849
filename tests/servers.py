"""Helpers that start real servers on 127.0.0.1 (free ports) and stop them afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A subprocess whose output goes to a log file; stopped (and its group killed) on close."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            args,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_until(self, ready: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()[-3000:]}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()
        self._log.close()


def python() -> str:
    return sys.executable


def start_runpod_api(demo_volume: Path, log_path: Path, **env: str) -> tuple[str, Server]:
    """`python -m handler --rp_serve_api` on a free port of 127.0.0.1, ready; returns (url, server)."""
    import requests

    port = free_port()
    server = Server(
        [
            python(),
            "-m",
            "handler",
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        env={
            "MODELS_DIR": str(demo_volume),
            "DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **env,
        },
        log_path=log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_until(lambda: requests.get(f"{url}/docs", timeout=2).status_code == 200)
    except BaseException:
        server.stop()
        raise
    return url, server
