"""RunPod adapter: job dict -> schema -> engine -> dict. No model work happens here."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from handler.engine import Engine
from handler.errors import InternalError, WorkerError
from handler.schema import parse_job

log = logging.getLogger("handler.runpod")

_engine: Engine | None = None


def get_engine() -> Engine:
    """The worker's one engine, created (and its default checkpoint preloaded) on first use."""
    global _engine
    if _engine is None:
        _engine = Engine()
        _engine.setup()
    return _engine


def handle(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler: run one job, or return {"error": "<code>: <field>: ..."}."""
    job_id = job.get("id", "local")
    started = time.perf_counter()
    try:
        parsed = parse_job(job.get("input"))
        result = get_engine().run(parsed)
    except WorkerError as error:
        log.info(
            "job %s failed: %s (%.0f ms)",
            job_id,
            error.code,
            (time.perf_counter() - started) * 1000,
        )
        return {"error": str(error)}
    except Exception:
        log.exception("job %s: unexpected error", job_id)
        return {"error": str(InternalError("unexpected error; the worker log has the details"))}
    log.info(
        "job %s done: model=%s size=%dx%d steps=%d images=%d timings_ms=%s",
        job_id,
        result.checkpoint,
        result.width,
        result.height,
        result.steps,
        len(result.images),
        result.timings_ms,
    )
    return result.model_dump(exclude_none=True)


def main() -> None:
    """Set up the engine, then hand control to the RunPod SDK (which reads its own flags)."""
    # The SDK logs handler outputs (base64 images) at DEBUG: never run it below INFO.
    os.environ["RUNPOD_DEBUG_LEVEL"] = "INFO"
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import runpod

    get_engine()
    runpod.serverless.start({"handler": handle})
