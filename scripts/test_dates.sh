#!/usr/bin/env bash
# Run the tests whose figures hang on the date or the time of day (usage days and reports, stats,
# metrics of "today", retention, retry backoff) on faked clocks, each test file starting seconds
# before a UTC midnight that ends a month and a (non-leap) February, or a year past 2038 (32-bit
# time_t), with the local time zone a day away from UTC. Extra arguments go to every pytest run.
#
# The clock is faked with libfaketime for pytest and every process it starts (orchestrator, workers)
# by one shared offset, so they agree with each other. redis-server keeps the real clock
# (tests/conftest.py: libfaketime hangs it at start); MLOC must not need the two to agree.
#
#   bash scripts/test_dates.sh                      # the dates below
#   MLOC_FAKE_TIMES="2033-06-30 23:59:45|UTC" bash scripts/test_dates.sh -x
#
# libfaketime comes from `apt-get install faketime`, run here when it is missing and apt-get can be
# used as root; otherwise this script fails, saying so: it never passes without faking the clock.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MLOC_VENV:-.venv}
PYTHON="$VENV/bin/python"
# Each item is "UTC time each pytest run starts at|local time zone", separated by commas.
FAKE_TIMES=${MLOC_FAKE_TIMES:-"2031-02-28 23:59:40|Pacific/Kiritimati,2039-12-31 23:59:40|Pacific/Pago_Pago"}
TESTS=(
  tests/test_usage_reports.py
  tests/test_store.py
  tests/test_api.py::test_stats_as_seed_two_shows
  tests/test_cli.py::test_submit_wait_tasks_show_workers_stats_cancel
  tests/test_metrics.py
  tests/test_backoff.py
  tests/test_retention.py
)

find_libfaketime() {
  local candidate
  for candidate in /usr/lib/*/faketime/libfaketime.so.1 /usr/lib/faketime/libfaketime.so.1 \
    /usr/local/lib/faketime/libfaketime.so.1 /usr/lib64/faketime/libfaketime.so.1; do
    if [ -f "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

if ! LIB=$(find_libfaketime); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "libfaketime is missing; installing it (apt-get install faketime)" >&2
    apt-get install -y faketime >/dev/null || { apt-get update >/dev/null && apt-get install -y faketime >/dev/null; }
  fi
  LIB=$(find_libfaketime) || {
    echo "error: libfaketime not found, so the clock cannot be faked; install it (apt-get install faketime)" >&2
    exit 1
  }
fi
[ -x "$PYTHON" ] || { echo "error: $PYTHON not found; run scripts/setup.sh first (or set MLOC_VENV)" >&2; exit 1; }

# The monotonic clock stays real (timeouts and the event loop run on it). libfaketime 0.9.10 then
# breaks Python >= 3.11's time.sleep (clock_nanosleep with an absolute monotonic deadline fails with
# EINVAL: wolfcw/libfaketime#426); where it does, every Python process started from here on sleeps
# through select() instead, by a sitecustomize on PYTHONPATH.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
if ! env LD_PRELOAD="$LIB" FAKETIME="+0" FAKETIME_DONT_FAKE_MONOTONIC=1 "$PYTHON" -c 'import time; time.sleep(0.01)' 2>/dev/null; then
  cat >"$SHIM/sitecustomize.py" <<'EOF'
"""time.sleep through select(): libfaketime 0.9.10 fails Python's own (wolfcw/libfaketime#426)."""
import select
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
EOF
fi

IFS=',' read -r -a RUNS <<<"$FAKE_TIMES"
for run in "${RUNS[@]}"; do
  when=${run%%|*}
  zone=${run#*|}
  [ "$zone" != "$run" ] || zone=UTC
  target=$(date -u -d "$when" +%s) || { echo "error: cannot read the time '$when'" >&2; exit 1; }
  for test in "${TESTS[@]}"; do
    # A relative offset, worked out just before each run: every process started from here on sees
    # the same faked time, whenever it starts.
    offset=$((target - $(date -u +%s)))
    fake=(env LD_PRELOAD="$LIB" FAKETIME="+$offset" FAKETIME_DONT_FAKE_MONOTONIC=1 TZ="$zone"
      PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}")
    seen=$("${fake[@]}" "$PYTHON" -c 'import time; time.sleep(0.01); print(int(time.time()))')
    if [ $((seen - target)) -lt -5 ] || [ $((seen - target)) -gt 30 ]; then
      echo "error: libfaketime ($LIB) did not fake the clock: Python saw $seen, not about $target" >&2
      exit 1
    fi
    echo "=== $test from $when UTC, TZ=$zone" >&2
    "${fake[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider "$test" "$@"
  done
done
echo "all date tests passed at: $FAKE_TIMES" >&2
