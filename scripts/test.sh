#!/usr/bin/env bash
# Set up (idempotent) and run MLOC's whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_deploy_tools.sh
bash scripts/setup_ppo_env.sh
bash scripts/install_browser.sh
exec .venv/bin/python -m pytest "$@"
