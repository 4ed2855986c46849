"""Errors a job can end with. Each has a stable code, the offending field and what is accepted.

WorkerError              root; callers catch this
├── InvalidInput         invalid_input       a field is missing, malformed or out of range
├── ModelNotFound        model_not_found     a named model is not on any model root
├── UnsupportedModel     unsupported_model   a file is not an SD 1.x / 2.x / XL checkpoint
├── LoraIncompatible     lora_incompatible   a LoRA was made for another architecture
├── InputFetchFailed     input_fetch_failed  an input URL could not be fetched
├── OutputTooLarge       output_too_large    inline images exceed the reply size cap
├── UploadFailed         upload_failed       an image could not be delivered to storage
├── OutOfMemory          out_of_memory       the GPU ran out of memory
├── Cancelled            cancelled           the job was cancelled
└── InternalError        internal_error      anything unexpected (details go to the log)
"""

from __future__ import annotations

import re
from typing import Any


class WorkerError(Exception):
    """Root of every error a job can end with."""

    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        accepted: Any = None,
        refresh_worker: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.accepted = accepted
        # True when the CUDA context may be poisoned: the platform should replace the worker.
        self.refresh_worker = refresh_worker

    def __str__(self) -> str:
        text = f"{self.code}: "
        if self.field:
            text += f"{self.field}: "
        text += self.message
        if self.accepted is not None:
            accepted = self.accepted
            if isinstance(accepted, (list, tuple)):
                accepted = ", ".join(str(a) for a in accepted)
            text += f" (accepted: {accepted})"
        return text


class InvalidInput(WorkerError):
    """A field is missing, malformed or out of range."""

    code = "invalid_input"


class ModelNotFound(WorkerError):
    """A named checkpoint, LoRA, embedding or VAE is not on any model root."""

    code = "model_not_found"


class UnsupportedModel(WorkerError):
    """A file is not a Stable Diffusion 1.x, 2.x or XL checkpoint."""

    code = "unsupported_model"


class LoraIncompatible(WorkerError):
    """A LoRA was trained for a different architecture than the checkpoint."""

    code = "lora_incompatible"


class InputFetchFailed(WorkerError):
    """An input image URL could not be fetched."""

    code = "input_fetch_failed"


class OutputTooLarge(WorkerError):
    """Inline base64 images would exceed the platform's reply size cap."""

    code = "output_too_large"


class UploadFailed(WorkerError):
    """An image could not be delivered to the bucket after retries."""

    code = "upload_failed"


class OutOfMemory(WorkerError):
    """The GPU ran out of memory, even after emptying the cache and retrying once."""

    code = "out_of_memory"


class ContentWithheld(WorkerError):
    """Under Cog, whose output is files alone: the safety checker withheld every image."""

    code = "content_withheld"


class Cancelled(WorkerError):
    """The job was cancelled before it finished."""

    code = "cancelled"


class InternalError(WorkerError):
    """Anything unexpected; the stack trace is in the worker log, not in the reply."""

    code = "internal_error"


SHOWN_CHARACTERS = 40


def shown(value: Any) -> str:
    """A value the client sent, as an error may quote it: short, since the same field may hold
    a prompt or image data. Numbers, booleans and short strings as they are; a long string cut;
    anything else by its type and size only."""
    if value is None or isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        if len(value) <= SHOWN_CHARACTERS:
            return repr(value)
        return f"{value[:SHOWN_CHARACTERS]!r}... ({len(value)} characters)"
    size = f" of {len(value)}" if hasattr(value, "__len__") else ""
    return f"a {type(value).__name__}{size}"


# A key that reads as a field name; any other key (a prompt pasted as a JSON key) is not quoted
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,39}")


def as_field(key: Any, parent: str | None = None) -> str | None:
    """A key the client sent, as an error's field: itself (under `parent`) when it reads as a
    field name, else `parent`: an error's field is shown whole, and the key may be any text."""
    if isinstance(key, str) and FIELD_NAME.fullmatch(key):
        return f"{parent}.{key}" if parent else key
    return parent


def shown_key(key: Any) -> str:
    """A key the client sent, as an error's message may quote it (cut like a value)."""
    return key if isinstance(key, str) and FIELD_NAME.fullmatch(key) else shown(key)
