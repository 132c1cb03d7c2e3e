#!/usr/bin/env bash
# Create .venv with MLOC and everything its workers use (idempotent: a re-run with unchanged
# pyproject.toml and constraints does nothing).
#
# Usage: scripts/setup.sh [--orchestrator-only]
#
# Every package version comes from constraints/main.txt, so a fresh clone installs what the tests
# last passed with, on any day. MLOC_UNPINNED=1 ignores it and takes the newest releases (use another
# MLOC_VENV, e.g. `MLOC_UNPINNED=1 MLOC_VENV=.venv-latest scripts/test.sh`); scripts/lock.sh
# refreshes the file on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${MLOC_VENV:-.venv}
EXTRAS="embedded,inference,vllm,train,qlora,rag,agent,eval,s3,dev"
if [[ "${1:-}" == "--orchestrator-only" ]]; then
  EXTRAS="embedded,dev"
fi
CONSTRAINTS="$PWD/constraints/main.txt"
if [[ "${MLOC_UNPINNED:-0}" == "1" ]]; then
  CONSTRAINTS=""
fi

inputs=$(cat pyproject.toml ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -c1-16)
stamp="$VENV/.mloc-setup-$inputs-${EXTRAS//,/-}${CONSTRAINTS:+-pinned}"
# The stamp alone is not enough: another tool (`uv sync`, `pip uninstall`) may have changed the venv since.
probe=(mloc)
if [[ "$EXTRAS" == *inference* ]]; then
  probe+=(torch transformers trl vllm langchain)
fi
if [[ -f "$stamp" ]] && "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' "${probe[@]}" 2>/dev/null; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  # A venv made by `uv venv` / `uv sync` (as the seeds show) has no pip of its own.
  "$VENV/bin/python" -m ensurepip --upgrade >/dev/null
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [[ -n "$CONSTRAINTS" ]]; then
  # Applies to every install below (pip itself included), and to the packages' own dependencies.
  export PIP_CONSTRAINT="$CONSTRAINTS"
fi
"${PIP[@]}" install --upgrade pip >/dev/null

if [[ "$EXTRAS" == *inference* ]]; then
  # Exactly this version: pip finds the CPU build on this machine's disk (a plain `torch`
  # would pull a multi-GB CUDA build). On a GPU host install the CUDA build of 2.13.0 instead.
  echo "installing torch 2.13.0..."
  "${PIP[@]}" install "torch==2.13.0"
fi
echo "installing MLOC with extras [$EXTRAS] (a few minutes the first time)..."
"${PIP[@]}" install -e ".[$EXTRAS]"
"${PIP[@]}" install -e tests/plugins/mloc-example-plugins
if [[ "$EXTRAS" == *vllm* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch and break
  # `from vllm import LLM`; MLOC needs none of them.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
rm -f "$VENV"/.mloc-setup-*
touch "$stamp"
echo "MLOC is installed in $VENV"
