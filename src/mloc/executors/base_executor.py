"""The first seed's import path for the executor base class, kept so its executors import unchanged.

Seed 1 writes ``from worker.executors.base_executor import Executor, ExecutionError``. In MLOC the
worker package holds no executor code (executors import neither the worker nor the orchestrator), so
that path lives here, under ``mloc.executors``, and names the very same classes as ``mloc.executors``.
"""

from mloc.errors import ExecutionError
from mloc.executors.base import Executor

__all__ = ["ExecutionError", "Executor"]
