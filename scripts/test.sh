#!/usr/bin/env bash
# Set up (idempotent) and run MLOC's whole test suite. Extra arguments go to pytest.
#
# After this full set-up nothing may be skipped: MLOC_STRICT_SKIPS=1 turns a skip into a failure.
# A whole run (no arguments, or just -q as CI gives) ends with scripts/test_dates.sh.
# Against the newest releases instead of constraints/main.txt:
#   MLOC_UNPINNED=1 MLOC_VENV=.venv-latest bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLOC_VENV:-.venv}
bash scripts/setup.sh
PYTHON="$VENV/bin/python" bash scripts/install_deploy_tools.sh
bash scripts/setup_ppo_env.sh
PYTHON="$VENV/bin/python" bash scripts/install_browser.sh
export MLOC_STRICT_SKIPS="${MLOC_STRICT_SKIPS:-1}"
"$VENV/bin/python" -m pytest "$@"
# A whole run also runs the tests whose figures hang on the date under two far-apart faked clocks
# (scripts/test_dates.sh); MLOC_DATE_TESTS=0 leaves them out.
if [[ $# -eq 0 || ( $# -eq 1 && "$1" == "-q" ) ]] && [[ "${MLOC_DATE_TESTS:-1}" == "1" ]]; then
  MLOC_VENV="$VENV" bash scripts/test_dates.sh -q
fi
