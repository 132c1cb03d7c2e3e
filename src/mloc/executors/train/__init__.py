"""Training executors on TRL and PEFT: ``sft``, ``dpo``, ``grpo`` and ``ppo``.

Importing this package imports no heavy library: torch, transformers, TRL and PEFT are imported when a
task runs, so a worker can list these task types (and an orchestrator validate them) without them.
"""

from mloc.executors.train.dpo import DPOExecutor
from mloc.executors.train.grpo import GRPOExecutor
from mloc.executors.train.ppo import PPOExecutor
from mloc.executors.train.sft import SFTExecutor

__all__ = ["DPOExecutor", "GRPOExecutor", "PPOExecutor", "SFTExecutor"]
