"""The error hierarchy. Each carries the HTTP status the API answers with, so the mapping lives here."""

from __future__ import annotations

from typing import Any


class MlocError(Exception):
    """Base of every error MLOC raises on purpose; its message is meant for a person."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class SpecError(MlocError):
    """A task file or body that is not a valid mloc/v1 task."""

    status_code = 422
    code = "invalid_task"


class BadRequest(MlocError):
    status_code = 400
    code = "bad_request"


class PayloadTooLarge(MlocError):
    status_code = 413
    code = "payload_too_large"


class Unauthorized(MlocError):
    status_code = 401
    code = "unauthorized"


class Forbidden(MlocError):
    status_code = 403
    code = "forbidden"


class NotFound(MlocError):
    status_code = 404
    code = "not_found"


class Conflict(MlocError):
    """The resource exists but is in a state that forbids the request (e.g. cancelling a finished task)."""

    status_code = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class ExecutionError(MlocError):
    """Raised by an executor to fail its task with a message a person can act on."""

    code = "execution_failed"


class TaskCancelled(MlocError):
    """Raised inside an executor when the task's cancel signal is set."""

    code = "cancelled"


class ConfigError(MlocError):
    """Bad configuration found at start-up (an unreachable Redis, a malformed setting)."""

    code = "config_error"
