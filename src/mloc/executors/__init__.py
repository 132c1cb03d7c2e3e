"""Executors run one task type each; built-in and third-party ones are found by entry point."""

from mloc.errors import ExecutionError, TaskCancelled
from mloc.executors.base import Executor, Isolation, RunContext

__all__ = ["ExecutionError", "Executor", "Isolation", "RunContext", "TaskCancelled"]
