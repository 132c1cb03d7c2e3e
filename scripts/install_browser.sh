#!/usr/bin/env bash
# Install what the dashboard's browser tests drive (idempotent): Debian's Chromium and the Playwright
# Python package. Playwright's own browser download (`playwright install`) is not used: the tests
# launch /usr/bin/chromium, so no browser is fetched from outside the package registries.
# Usage: scripts/install_browser.sh   (PYTHON=/path/to/python to pick the interpreter; default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}

if ! command -v chromium >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    echo "chromium is missing and this user cannot install it; run: apt-get install -y chromium" >&2
    exit 1
  fi
  echo "installing chromium..."
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium >/dev/null
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "installing playwright..."
  "$PYTHON" -m pip --disable-pip-version-check -q install "playwright>=1.45"
fi
