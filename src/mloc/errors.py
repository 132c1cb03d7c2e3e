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


class DoesNotFit(SpecError):
    """A task whose memory estimate no registered GPU could hold (MLOC_MEMFIT=refuse); the message has the numbers."""

    code = "does_not_fit"


class BadRequest(MlocError):
    """The request is malformed: an id in the path that is not one, a body that asks for nothing."""

    status_code = 400
    code = "bad_request"


class InvalidParameters(MlocError):
    """A query, path or body parameter is missing, of the wrong type or out of range; `details` names each."""

    status_code = 422
    code = "bad_request"


class PayloadTooLarge(MlocError):
    """The request body is over MLOC_MAX_BODY_BYTES (16 times that for a bulk submit)."""

    status_code = 413
    code = "payload_too_large"


class Unauthorized(MlocError):
    """Auth is on (ORCHESTRATOR_TOKEN is set) and the bearer token is missing or unknown."""

    status_code = 401
    code = "unauthorized"


class Forbidden(MlocError):
    """The token may not do this: an endpoint for the admin, or another user's data."""

    status_code = 403
    code = "forbidden"


class NotFound(MlocError):
    """The task, worker, user or file is not there, or belongs to another user."""

    status_code = 404
    code = "not_found"


class Conflict(MlocError):
    """The resource exists but is in a state that forbids the request (e.g. cancelling a finished task)."""

    status_code = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class SubmitInProgress(Conflict):
    """A submit with this Idempotency-Key is still being stored; the same request answers once it is."""

    code = "idempotency_in_progress"


class IdempotencyKeyReused(MlocError):
    """The Idempotency-Key was given before with another request body; each distinct submit needs its own key."""

    status_code = 422
    code = "idempotency_key_reused"


class Unavailable(MlocError):
    """Redis or the artifact store did not answer; the same request may succeed later."""

    status_code = 503
    code = "unavailable"


class ExecutionError(MlocError):
    """Raised by an executor to fail its task with a message a person can act on."""

    code = "execution_failed"


class NoExecutor(ExecutionError):
    """The worker has no executor for the task's type, or lacks the packages it needs."""

    code = "no_executor"


class TaskCancelled(MlocError):
    """Raised inside an executor when the task's cancel signal is set."""

    code = "cancelled"


class ConfigError(MlocError):
    """Bad configuration found at start-up (an unreachable Redis, a malformed setting)."""

    code = "config_error"
