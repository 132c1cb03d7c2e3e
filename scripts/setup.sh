#!/usr/bin/env bash
# Create .venv with MLOC and everything its workers use (idempotent: a re-run with an unchanged
# pyproject.toml does nothing). Usage: scripts/setup.sh [--orchestrator-only]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${MLOC_VENV:-.venv}
EXTRAS="embedded,inference,vllm,train,qlora,rag,agent,s3,dev"
if [[ "${1:-}" == "--orchestrator-only" ]]; then
  EXTRAS="embedded,dev"
fi

stamp="$VENV/.mloc-setup-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/-}"
if [[ -f "$stamp" ]]; then
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null

if [[ "$EXTRAS" == *inference* ]]; then
  # Exactly this version: pip finds the CPU build on this machine's disk (a plain `torch`
  # would pull a multi-GB CUDA build). On a GPU host install the CUDA build of 2.13.0 instead.
  echo "installing torch 2.13.0..."
  "${PIP[@]}" install "torch==2.13.0"
fi
echo "installing MLOC with extras [$EXTRAS] (a few minutes the first time)..."
"${PIP[@]}" install -e ".[$EXTRAS]"
if [[ "$EXTRAS" == *vllm* ]]; then
  # PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch and break
  # `from vllm import LLM`; MLOC needs none of them.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
rm -f "$VENV"/.mloc-setup-*
touch "$stamp"
echo "MLOC is installed in $VENV"
