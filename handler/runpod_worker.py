"""RunPod adapter: job dict -> schema -> engine -> dict. No model work happens here."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

from handler.engine import Engine, Progress
from handler.errors import InternalError, InvalidInput, WorkerError, as_field, shown, shown_key
from handler.schema import field_as_sent, parse_job
from handler.settings import Settings

log = logging.getLogger("handler.runpod")

ACTIONS = ("list_models",)
PROGRESS_INTERVAL_S = 0.5  # at most about 2 progress updates a second

_engine: Engine | None = None


def get_engine() -> Engine:
    """The worker's one engine, created (and its default checkpoint preloaded) on first use."""
    global _engine
    if _engine is None:
        started = time.perf_counter()
        engine = Engine()
        engine.startup_ms["engine_init"] = (time.perf_counter() - started) * 1000
        engine.setup()
        _engine = engine
    return _engine


def send_progress(job: dict[str, Any], update: dict[str, Any]) -> None:
    """Forward a progress update to RunPod (replaced by a recorder in tests).

    Outside RunPod (--test_input, --rp_serve_api) there is no endpoint to send it to, and the
    SDK would only log a failed POST, so nothing is sent.
    """
    if not os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):
        return
    import runpod

    runpod.serverless.progress_update(job, update)


class ProgressThrottle:
    """Passes phase changes and at most one update per interval to `send_progress`."""

    def __init__(self, job: dict[str, Any], interval: float = PROGRESS_INTERVAL_S) -> None:
        self.job = job
        self.interval = interval
        self._last_sent = 0.0
        self._last_phase: str | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if progress.phase == self._last_phase and now - self._last_sent < self.interval:
            return
        self._last_sent, self._last_phase = now, progress.phase
        send_progress(
            self.job, {"phase": progress.phase, "step": progress.step, "total": progress.total}
        )


def run_job(job: dict[str, Any], cancel: threading.Event) -> dict[str, Any]:
    """Run one job synchronously; every failure becomes {"error": "<code>: ..."}."""
    job_id = job.get("id", "local")
    job_input = job.get("input")
    engine = get_engine()
    parsed = None
    try:
        if isinstance(job_input, dict) and "action" in job_input:
            return _run_action(engine, job_input)
        parsed = parse_job(job_input)
        result = engine.run(
            parsed,
            progress=ProgressThrottle(job),
            cancelled=cancel.is_set,
            inline_limit=engine.settings.max_inline_bytes,
            job_id=str(job_id),
        )
    except WorkerError as error:
        if isinstance(job_input, dict):  # the engine names native fields: say the client's
            error.field = field_as_sent(error.field, job_input)
        if parsed is None:  # refused before it reached the engine, which logs the others
            log.info("job %s failed: %s", job_id, error.code)
        reply: dict[str, Any] = {"error": str(error)}
        if error.refresh_worker:
            reply["refresh_worker"] = True
        return reply
    except Exception:
        log.exception("job %s: unexpected error", job_id)
        return {"error": str(InternalError("unexpected error; the worker log has the details"))}
    return result.model_dump(exclude_none=True)


def _run_action(engine: Engine, job_input: dict[str, Any]) -> dict[str, Any]:
    """Run an action job ({"action": "list_models"}), logged like any other job."""
    started = time.perf_counter()
    result = _action_result(engine, job_input)
    log.info(
        "action %s done (%.0f ms)", job_input["action"], (time.perf_counter() - started) * 1000
    )
    return result


def _action_result(engine: Engine, job_input: dict[str, Any]) -> dict[str, Any]:
    action = job_input.get("action")
    extra = sorted(set(job_input) - {"action"})
    if action not in ACTIONS:
        raise InvalidInput(
            f"unknown action {shown(action)}", field="action", accepted=", ".join(ACTIONS)
        )
    if extra:
        raise InvalidInput(
            f"{action} takes no other fields (got {', '.join(shown_key(key) for key in extra)})",
            field=as_field(extra[0]) or "input",
            accepted='{"action": "list_models"}',
        )
    return engine.list_models()


async def handle(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler. The engine runs in a thread; a RunPod cancel stops it between steps."""
    cancel = threading.Event()
    try:
        return await asyncio.to_thread(run_job, job, cancel)
    except asyncio.CancelledError:
        cancel.set()  # the engine raises Cancelled at its next step and restores its state
        log.info("job %s cancelled", job.get("id", "local"))
        raise


def fitness_checks() -> list:
    """Start-up checks that keep a broken worker from taking jobs. `main` has already built the
    engine, which checks the settings, DEFAULT_CHECKPOINT and the safety checker."""

    def model_root_is_readable() -> None:
        registry = get_engine().registry
        if not registry.roots:
            searched = [str(r) for r in registry.settings.model_roots]
            raise RuntimeError(f"no readable model root among {searched}")

    def volume_has_a_checkpoint() -> None:
        engine = get_engine()
        if not engine.has_a_checkpoint():
            # Not fatal: list_models still answers (the RunPod Hub's test runs the bare image),
            # and each job fails with model_not_found, naming the roots searched.
            log.warning(
                "no checkpoint on the model roots %s and no DEFAULT_CHECKPOINT: generation jobs "
                "will fail until one is there (is the network volume attached?)",
                [str(r) for r in engine.settings.model_roots],
            )

    return [model_root_is_readable, volume_has_a_checkpoint]


def import_runpod():
    """Import the RunPod SDK without its one slow step. At import, its debugger names the CPU
    through py-cpuinfo, which runs a second Python process and a few system tools: 1.1 s of
    every cold start on the CI machine, for a name only shown in debug output. During that
    import the name comes from /proc/cpuinfo instead, then py-cpuinfo is left as it was."""
    try:
        import cpuinfo
    except ImportError:  # an SDK version that no longer uses it
        cpuinfo = None
    if cpuinfo is None or "runpod" in sys.modules:
        import runpod

        return runpod
    original = cpuinfo.get_cpu_info
    cpuinfo.get_cpu_info = lambda: {"brand_raw": cpu_model_name()}
    try:
        import runpod
    finally:
        cpuinfo.get_cpu_info = original
    return runpod


def cpu_model_name() -> str:
    """The CPU's name as /proc/cpuinfo gives it (py-cpuinfo's `brand_raw` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def keep_sdk_log_at_info() -> None:
    """The SDK logs whole jobs and handler outputs (prompts, base64 images, presigned URLs) at
    DEBUG. Whatever RUNPOD_LOG_LEVEL, RUNPOD_DEBUG_LEVEL or --rp_log_level say, its logger never
    goes below INFO."""
    from runpod.serverless.modules.rp_logger import LOG_LEVELS, RunPodLogger, _validate_log_level

    set_level = RunPodLogger.set_level
    if getattr(set_level, "clamped", False):
        return

    def at_least_info(self, new_level) -> None:
        # clamped before the SDK's own "Log level set to ..." line, which would otherwise
        # announce a DEBUG level that never applies
        level = _validate_log_level(new_level)
        if LOG_LEVELS.index(level) < LOG_LEVELS.index("INFO"):
            level = "INFO"
        set_level(self, level)

    at_least_info.clamped = True  # type: ignore[attr-defined]
    RunPodLogger.set_level = at_least_info
    logger = RunPodLogger()
    if LOG_LEVELS.index(logger.level) < LOG_LEVELS.index("INFO"):
        logger.level = "INFO"


def main() -> None:
    """Set up the engine, register fitness checks, then hand over to the RunPod SDK."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        Settings.from_env()  # a malformed variable stops the worker before any import
    except WorkerError as error:  # a malformed variable: say which, without a traceback
        log.error("worker cannot start: %s", error)
        raise SystemExit(1) from None
    runpod = import_runpod()
    keep_sdk_log_at_info()
    for check in fitness_checks():
        runpod.serverless.register_fitness_check(check)
    started = time.perf_counter()
    try:
        get_engine()
    except WorkerError as error:
        log.error("worker cannot start: %s", error)
        raise SystemExit(1) from None
    log.info(
        "engine ready in %.1f s (%s)",
        time.perf_counter() - started,
        ", ".join(f"{k} {v:.0f} ms" for k, v in get_engine().startup_ms.items()) or "no preload",
    )
    runpod.serverless.start({"handler": handle})
