"""What `mloc` prints for people, against a real orchestrator: in a terminal under NO_COLOR and in a
pipe no ANSI escape at all, times in the local zone with its offset, and whole counts as integers."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.cli import in_a_pty, mloc

ESCAPE = "\x1b"
# 5 h 45 min east of UTC, as a POSIX rule: no tz database needed, and no local zone has it by chance.
KATHMANDU = "XST-5:45"
KATHMANDU_OFFSET = timezone(timedelta(hours=5, minutes=45))
# Seconds as people read them: two decimals, or two significant digits below a tenth.
ROUNDED = r"(\d+\.\d\d|0\.0\d{0,10}[1-9]\d?)"


def in_a_terminal(*args: str, env: dict[str, str], timeout: float = 60) -> str:
    """What ``mloc ARGS`` writes to a terminal (a pseudo-terminal 200 columns wide), stdout and stderr."""
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    status, text = in_a_pty(*args, env={**base, "TERM": "xterm-256color", **env}, timeout=timeout)
    assert status is not None, text
    return text


def test_no_color_and_pipes_print_no_escapes_and_times_and_counts_read_as_people_expect(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    task_id = client.submit({"taskType": "echo"})["task_id"]
    record = client.wait(task_id, timeout=60)
    assert record["state"] == "succeeded", record
    bad = tmp_path / "bad.yaml"
    bad.write_text("taskType: echoo\n")

    # Times in the local zone, with its offset.
    zoned = {**env, "TZ": KATHMANDU}
    fields = dict(line.split(None, 1) for line in mloc("show", task_id, env=zoned).stdout.splitlines())
    created = datetime.fromtimestamp(record["created_at"], KATHMANDU_OFFSET)
    assert fields["created"].startswith(f"{created:%Y-%m-%d %H:%M:%S}+05:45 ("), fields
    assert fields["finished"].startswith(
        f"{datetime.fromtimestamp(record['finished_at'], KATHMANDU_OFFSET):%Y-%m-%d %H:%M:%S}+05:45"
    )
    logged = mloc("logs", task_id, env=zoned).stdout.splitlines()
    assert logged and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+05:45 ", line) for line in logged), logged
    # A time as printed, given back to --since: the lines from then on, whatever zone reads it.
    last = logged[-1].split(" INFO")[0]
    assert (
        mloc("logs", task_id, "--since", last, env={**env, "TZ": "UTC0"})
        .stdout.splitlines()[-1]
        .endswith(logged[-1].split(None, 2)[-1])
    )

    # Whole counts as integers, seconds rounded; JSON as the API answers.
    usage = fields["usage"]
    assert "num_requests=1," in usage and "gpu_seconds=0," in usage, usage
    assert re.search(rf"\bwall_sec={ROUNDED}(,|$)", usage), usage
    totals = {
        row[0]: row[1]
        for row in (line.split() for line in mloc("stats", env=env).stdout.splitlines())
        if len(row) == 2 and row[0] in ("tasks", "tasks.echo.succeeded", "wall_sec", "gpu_seconds")
    }
    assert totals["tasks"] == totals["tasks.echo.succeeded"] == "1" and totals["gpu_seconds"] == "0", totals
    assert re.fullmatch(ROUNDED, totals["wall_sec"]), totals
    as_json = json.loads(mloc("stats", "--json", env=env).stdout)
    assert as_json["users"][0]["totals"] == client.stats()["users"][0]["totals"]

    # No escape in a terminal under NO_COLOR, nor in a pipe, even one FORCE_COLOR asks to style.
    commands = [
        ("show", task_id),
        ("tasks",),
        ("logs", task_id),
        ("stats",),
        ("workers",),
        ("validate", "templates/echo.yaml", str(bad)),
        ("validate", "--bogus"),  # Typer's own usage error
        ("validate", "--help"),
        ("submit", "templates/echo.yaml", "--wait"),  # what it says while it waits: a line per change
    ]
    # The control: a terminal gets bold, dim and colour, so the checks below can see escapes.
    assert ESCAPE in in_a_terminal("show", task_id, env=env)
    for args in commands:
        shown = in_a_terminal(*args, env={**env, "NO_COLOR": "1"})
        assert ESCAPE not in shown and len(shown) > 40, (args, shown)
        piped = mloc(*args, env={**env, "FORCE_COLOR": "1"})
        assert ESCAPE not in piped.stdout + piped.stderr, (args, piped.stdout, piped.stderr)
