"""Serverless Stable Diffusion worker: one engine, with RunPod and Cog adapters."""

from handler.errors import WorkerError
from handler.schema import Job, Result, parse_job
from handler.settings import Settings

__version__ = "0.1.0"
__all__ = ["Job", "Result", "Settings", "WorkerError", "parse_job", "__version__"]
