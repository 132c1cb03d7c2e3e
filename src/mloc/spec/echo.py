"""``echo``: a diagnostic task that returns its payload; it checks a fleet end to end without a model."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from mloc.spec.base import SpecBase, Strict


class EchoOptions(Strict):
    sleep_sec: float = Field(0.0, ge=0, le=86_400, description="Seconds to wait before answering.")
    steps: int = Field(1, ge=1, le=100_000, description="Progress steps reported while sleeping.")
    fail_message: str | None = Field(None, description="Fail the task with this message.")
    isolate: bool = Field(False, description="Run in an executor process instead of the worker's own.")
    crash: bool = Field(False, description="Kill the executor process (needs isolate: true).")
    ignore_cancel: bool = Field(
        False, description="Sleep without checking for cancellation, like a hung executor (needs isolate: true)."
    )

    @model_validator(mode="after")
    def _faults_need_isolation(self) -> EchoOptions:
        if self.crash and not self.isolate:
            raise ValueError("crash: true needs isolate: true (a crash inside the worker would stop it)")
        if self.ignore_cancel and not self.isolate:
            raise ValueError("ignore_cancel: true needs isolate: true (only an executor process can be killed)")
        return self


class EchoSpec(SpecBase):
    kind: ClassVar[str] = "EchoTask"
    task_type: Literal["echo"] = Field(..., alias="taskType")
    payload: Any = None
    hyperparameters: EchoOptions = Field(default_factory=EchoOptions)
