"""`mloc` for scripts: JSON on every read command, ids only with -q, short id prefixes everywhere a task
id is taken (an ambiguous one lists the candidates), and no line wrapped when the output is piped."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from mloc import keys
from mloc.client import TERMINAL, Client
from mloc.localcluster import LocalCluster
from tests.support.api import wait_until
from tests.support.cli import REPO, in_a_pty, mloc


def wait_all(client: Client, ids: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(client.task(task_id)["state"] not in TERMINAL for task_id in ids):
        assert time.monotonic() < deadline, [client.task(task_id)["state"] for task_id in ids]
        time.sleep(0.2)


def table_rows(text: str, first: str) -> list[list[str]]:
    """The rows of a printed table whose first cell matches ``first`` (a regex), split into words."""
    return [line.split() for line in text.splitlines() if re.match(rf"^\s*{first}\s", line)]


def piped_in(stdin: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``mloc ARGS`` with ``stdin`` piped to it, as `make-tasks | mloc submit -` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "mloc.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **env},
    )


def in_a_terminal(*args: str, columns: int, env: dict[str, str], timeout: float = 60) -> list[str]:
    """The lines ``mloc ARGS`` writes to a terminal ``columns`` wide (a pseudo-terminal, COLUMNS set too)."""
    full = {**os.environ, "TERM": "xterm-256color", "NO_COLOR": "1", **env, "COLUMNS": str(columns)}
    status, text = in_a_pty(*args, env=full, columns=columns, timeout=timeout)
    assert status == 0, text
    return text.replace("\r\n", "\n").splitlines()


ENVELOPE = {"ok", "count", "tasks"}


def one_shape(answer: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The tasks of a `submit --json` answer, once its shape is checked: ok, count and the tasks' list,
    and one task's own fields at the top as well, but for its result (--wait), which only `tasks` holds."""
    assert set(answer) >= ENVELOPE, answer
    assert answer["count"] == count == len(answer["tasks"]), answer
    if count == 1:
        assert {k: v for k, v in answer.items() if k not in ENVELOPE} == {
            k: v for k, v in answer["tasks"][0].items() if k not in {"ok", "result"}
        }, answer
    else:
        assert set(answer) - {"valid"} == ENVELOPE, answer
    return list(answer["tasks"])


def test_read_commands_print_json_lists_print_ids_and_every_command_takes_short_ids(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path, sync_redis: redis.Redis
) -> None:
    results = tmp_path / "results"
    cluster = make_cluster(1, env={"RESULTS_DIR": str(results)})
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)

    # 17 tasks from two files (one holding 16 documents) in one request; -q prints their ids.
    many = tmp_path / "many.yaml"
    many.write_text("---\n".join(f"taskType: echo\npayload: {{n: {n}}}\n" for n in range(16)))
    one = tmp_path / "one.yaml"
    long_reason = "a reason longer than any terminal: " + "word " * 80
    one.write_text(json.dumps({"taskType": "echo", "retries": 0, "hyperparameters": {"fail_message": long_reason}}))
    submitted = mloc("submit", str(many), str(one), "-q", env=env)
    assert submitted.returncode == 0, submitted.stderr
    ids = submitted.stdout.split()
    assert len(ids) == 17 and all(re.fullmatch(r"[0-9a-f-]{36}", task_id) for task_id in ids)
    wait_all(client, ids)
    failed_id = ids[-1]

    # tasks: JSON (two spellings), ids only, and a table whose short ids the other commands take.
    as_json = json.loads(mloc("tasks", "--json", "--page-size", "50", env=env).stdout)
    assert as_json["total"] == 17 and {t["task_id"] for t in as_json["items"]} == set(ids)
    assert json.loads(mloc("tasks", "-o", "json", "--page-size", "50", env=env).stdout)["total"] == 17
    assert set(mloc("tasks", "-q", "--page-size", "50", env=env).stdout.split()) == set(ids)
    table = mloc("tasks", "--page-size", "50", env=env).stdout
    shown = [row[0] for row in table_rows(table, "[0-9a-f]{8}")]
    assert len(shown) == 17
    assert all(len(s) >= 8 and sum(task_id.startswith(s) for task_id in ids) == 1 for s in shown), shown
    short_failed = next(s for s in shown if failed_id.startswith(s))
    past = mloc("tasks", "--page-size", "10", "--page", "3", env=env)
    assert past.returncode == 0 and "page 3 is past the last: 17 task(s) fill 2 page(s)" in past.stderr, past.stderr

    # show: a short id from the table; --json is the raw record; the long reason stays on one line.
    summary = mloc("show", short_failed, env=env).stdout
    assert re.search(rf"^task\s+{failed_id}$", summary, re.M)
    reason_lines = [line for line in summary.splitlines() if line.startswith("reason")]
    assert len(reason_lines) == 1 and long_reason.strip() in reason_lines[0]
    record = json.loads(mloc("show", short_failed, "--json", env=env).stdout)
    assert record["task_id"] == failed_id and record["reason"].startswith(long_reason.strip())
    assert record["ok"] is True  # as every --json answer starts
    wide = [
        line for line in mloc("tasks", "--wide", "--page-size", "50", env=env).stdout.splitlines() if failed_id in line
    ]
    assert len(wide) == 1 and long_reason.strip() in wide[0]

    # result, logs, artifacts, metrics and cancel take a prefix, and print JSON for scripts.
    good = ids[3]
    prefix = good[:6]
    assert json.loads(mloc("result", prefix, env=env).stdout)["payload"] == {"n": 3}
    assert json.loads(mloc("result", prefix, "--json", env=env).stdout)["payload"] == {"n": 3}
    line = {"ts": str(time.time()), "level": "INFO", "source": "executor", "text": "x" * 500}
    sync_redis.xadd(keys.task_logs(good), line)
    logged = mloc("logs", prefix, "--tail", "1", env=env).stdout.splitlines()
    assert len(logged) == 1 and logged[0].endswith(" " + "x" * 500)  # not wrapped
    assert json.loads(mloc("logs", prefix, "--json", env=env).stdout)["lines"][-1]["text"] == "x" * 500
    listed = json.loads(mloc("artifacts", prefix, "--json", env=env).stdout)
    assert listed["task_id"] == good and [i["path"] for i in listed["items"]] == ["responses.json"]
    assert listed["ok"] is True
    assert json.loads(mloc("artifacts", prefix, "-o", "json", env=env).stdout) == listed
    for row in ({"step": 1, "loss": 2.5, "learning_rate": 0.001}, {"step": 2, "loss": 1.25, "learning_rate": 0.0005}):
        sync_redis.rpush(keys.task_metrics(good), json.dumps(row))  # as the worker records them
    metrics = mloc("metrics", prefix, env=env).stdout
    assert table_rows(metrics, "step") == [["step", "loss", "learning_rate"]]
    assert table_rows(metrics, "[12]") == [["1", "2.5", "0.001"], ["2", "1.25", "0.0005"]]
    assert json.loads(mloc("metrics", prefix, "--json", env=env).stdout)["metrics"][1]["loss"] == 1.25
    sleeper = client.submit({"taskType": "echo", "hyperparameters": {"sleep_sec": 30, "steps": 30}})["task_id"]
    cancelled = mloc("cancel", sleeper[:10], env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert re.match(rf"^(cancelled|cancelling) {sleeper}", cancelled.stdout)

    # An ambiguous prefix lists the tasks it matches; one that matches nothing says so.
    first_chars = [task_id[0] for task_id in ids]
    shared = next(c for c in first_chars if first_chars.count(c) > 1)
    ambiguous = mloc("show", shared, env=env)
    assert ambiguous.returncode == 2
    assert f"task id prefix '{shared}' is ambiguous" in ambiguous.stderr
    matching = [task_id for task_id in ids if task_id.startswith(shared)]
    assert len(matching) > 10 or all(task_id in ambiguous.stderr for task_id in matching)
    unused = next(p for p in (f"{n:04x}" for n in range(65536)) if not any(i.startswith(p) for i in [*ids, sleeper]))
    nothing = mloc("logs", unused, env=env)
    assert nothing.returncode == 2 and f"no task id starts with '{unused}'" in nothing.stderr

    # workers, users and stats: JSON, and ids only for the lists.
    workers = json.loads(mloc("workers", "--json", env=env).stdout)
    assert [w["worker_id"] for w in workers["items"]] == ["local-1"] and workers["hidden"] == 0
    assert mloc("workers", "-q", env=env).stdout.split() == ["local-1"]
    assert mloc("users", "add", "erin", env=env).returncode == 0
    users = json.loads(mloc("users", "list", "-o", "json", env=env).stdout)
    assert [u["name"] for u in users["items"]] == ["erin"]
    assert mloc("users", "list", "-q", env=env).stdout.split() == ["erin"]
    stats = json.loads(mloc("stats", "--json", env=env).stdout)
    [admin] = [entry for entry in stats["users"] if entry["user"] == "admin"]
    assert admin["totals"]["tasks"] >= 17


def test_pipelines_take_their_id_a_task_id_or_a_prefix_and_ids_too_long_or_ended_tasks_read_clearly(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        "metadata: {name: first}\nspec: {taskType: echo}\n---\n"
        "metadata: {name: second}\nspec: {taskType: echo, dependsOn: [first]}\n"
    )
    submitted = mloc("submit", str(steps), "--json", env=env)
    assert submitted.returncode == 0, submitted.stderr
    answer = json.loads(submitted.stdout)
    first, second = (task["task_id"] for task in answer["tasks"])
    pipeline_id = answer["tasks"][0]["pipeline_id"]
    wait_all(client, [first, second])

    # The pipeline's id or a unique prefix of it, or one of its tasks' (a task knows its pipeline).
    for given in (pipeline_id, pipeline_id[:8], pipeline_id[:6].upper(), second, second[:8].upper()):
        shown = mloc("pipeline", given, "--json", env=env)
        assert shown.returncode == 0, (given, shown.stderr)
        assert json.loads(shown.stdout)["id"] == pipeline_id
    # `mloc show` of a step names its pipeline, for who lost the submit's output.
    step = dict(line.split(None, 1) for line in mloc("show", second, env=env).stdout.splitlines() if line.strip())
    assert step["pipeline"] == f"{pipeline_id} (`mloc pipeline {pipeline_id}` shows its steps)"
    nothing = "0" * 8 if not pipeline_id.startswith("0") else "f" * 8
    unknown = mloc("pipeline", nothing, env=env)
    assert unknown.returncode == 2 and "String should have" not in unknown.stderr
    assert unknown.stderr.startswith(f"error: '{nothing}' names no pipeline: give the pipeline id `mloc submit`")
    # More pipelines than hex digits: two share a first character, and that prefix is refused naming them.
    more = [client.submit_bulk([{"metadata": {"name": f"a{i}"}, "spec": {"taskType": "echo"}},
                                {"metadata": {"name": f"b{i}"}, "spec": {"taskType": "echo", "dependsOn": [f"a{i}"]}}])
            for i in range(16)]  # fmt: skip
    ids = [pipeline_id] + [m["tasks"][0]["pipeline_id"] for m in more]
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    ambiguous = mloc("pipeline", shared, env=env)
    assert ambiguous.returncode == 2, ambiguous
    assert ambiguous.stderr.startswith(f"error: pipeline id prefix '{shared}' is ambiguous: it matches "), ambiguous
    assert all(i in ambiguous.stderr for i in ids if i.startswith(shared))
    alone = client.submit({"taskType": "echo"})["task_id"]
    lonely = mloc("pipeline", alone[:8], env=env)
    assert lonely.returncode == 2 and f"task {alone} is not part of a pipeline" in lonely.stderr

    # A string longer than any id is not a task id; the API's length rule never reaches the user.
    too_long = mloc("show", "a" * 40, env=env)
    assert too_long.returncode == 2 and "String should have" not in too_long.stderr
    assert too_long.stderr.startswith(f"error: '{'a' * 40}' is not a task id: ids are UUIDs of 36 characters")

    # A cancelled task keeps the progress it made, without an ETA for a run that is over.
    sleeper = client.submit({"taskType": "echo", "hyperparameters": {"sleep_sec": 30, "steps": 30}})["task_id"]
    wait_until(client, sleeper, lambda r: bool((r.get("progress") or {}).get("step")))
    client.cancel(sleeper)
    wait_all(client, [sleeper])
    fields = dict(line.split(None, 1) for line in mloc("show", sleeper, env=env).stdout.splitlines())
    assert fields["state"].startswith("cancelled")
    assert re.fullmatch(r"\d+/30 \(\d+\.\d%\)", fields["progress"]), fields


def test_cancel_takes_many_ids_as_tasks_q_prints_them_and_lists_those_it_could_not_cancel(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    gpu = {"taskType": "echo", "resources": {"hardware": {"gpu": {"count": 1}}}}
    waiting = [client.submit(gpu)["task_id"] for _ in range(3)]  # no GPU here: they wait
    done = client.wait(client.submit({"taskType": "echo"})["task_id"], timeout=60)["task_id"]

    # As `mloc tasks --help` shows it: the pending ids, piped to one cancel.
    cli = f"{shlex.quote(sys.executable)} -m mloc.cli"
    piped = subprocess.run(
        f"{cli} tasks -q --state pending | xargs -r {cli} cancel",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **env},
    )
    assert piped.returncode == 0, piped.stderr
    assert sorted(re.findall(r"^cancelled (\S+)$", piped.stdout, re.M)) == sorted(waiting), piped.stdout
    assert piped.stdout.endswith("3 of 3 cancelled or stopping\n")
    assert {client.task(task_id)["state"] for task_id in waiting} == {"cancelled"}

    # One that ended is listed, not the end of the rest; the command then fails.
    again = client.submit(gpu)["task_id"]
    mixed = mloc("cancel", done[:8], again, "--json", env=env)
    assert mixed.returncode == 1, mixed.stderr
    answer = json.loads(mixed.stdout)
    assert answer["ok"] is False and [t["ok"] for t in answer["tasks"]] == [False, True]
    assert "already ended" in answer["tasks"][0]["error"], answer
    assert client.task(again)["state"] == "cancelled"


def test_submit_wait_json_prints_one_json_document_of_the_ended_tasks(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    good = tmp_path / "good.yaml"
    good.write_text("taskType: echo\npayload: {n: 1}\nhyperparameters: {steps: 3, sleep_sec: 0.3}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("taskType: echo\nretries: 0\nhyperparameters: {fail_message: deliberate failure}\n")

    # One task: its ended record with its result, and nothing else on stdout; the progress is on stderr.
    # The result is in `tasks` alone, as for several: the record's copy at the top leaves it out.
    waited = mloc("submit", str(good), "--wait", "--json", env=env)
    assert waited.returncode == 0, waited.stderr
    ended = json.loads(waited.stdout)
    [task] = one_shape(ended, 1)
    assert ended["state"] == task["state"] == "succeeded" and ended["ok"] is True
    assert "result" not in ended and task["result"]["payload"] == {"n": 1}, ended

    # Several: {"tasks": [...]} in the order submitted; a failed one has no result, and the exit code says so.
    both = mloc("submit", str(good), str(bad), "--wait", "--json", env=env)
    assert both.returncode == 1, both.stderr
    answer = json.loads(both.stdout)
    tasks = one_shape(answer, 2)
    assert answer["ok"] is False  # as the exit status says
    assert [task["state"] for task in tasks] == ["succeeded", "failed"]
    assert set(tasks[0]) == set(tasks[1]) == set(one_shape(ended, 1)[0])
    assert tasks[1]["result"] is None and tasks[1]["reason"] == "deliberate failure"
    assert "1 of 2 tasks did not succeed" in both.stderr


def test_submit_json_has_one_shape_for_one_task_many_or_a_pipeline_and_submit_dash_reads_stdin(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    client = Client(cluster.api_url)
    one = tmp_path / "one.yaml"
    one.write_text("taskType: echo\npayload: {n: 0}\n")
    many = tmp_path / "many.yaml"
    many.write_text("---\n".join(f"taskType: echo\npayload: {{n: {n}}}\n" for n in range(1, 4)))
    steps = tmp_path / "steps.yaml"
    steps.write_text(
        "metadata: {name: first}\nspec: {taskType: echo}\n---\n"
        "metadata: {name: second}\nspec: {taskType: echo, dependsOn: [first]}\n"
    )

    # One task, a file of three, two files, a pipeline: one shape, whose `tasks` a script reads alike.
    answers = {}
    for label, files, count in (("one", [one], 1), ("many", [many], 3), ("two", [one, many], 4), ("steps", [steps], 2)):
        submitted = mloc("submit", *map(str, files), "--json", env=env)
        assert submitted.returncode == 0, submitted.stderr
        answers[label] = json.loads(submitted.stdout)
        tasks = one_shape(answers[label], count)
        assert all(re.fullmatch(r"[0-9a-f-]{36}", task["task_id"]) for task in tasks), tasks
    assert answers["one"]["task_id"] == answers["one"]["tasks"][0]["task_id"]  # as scripts read it before
    # Each task answered alike, whether it came alone or with others; a pipeline's steps say a little more.
    required = {"ok", "task_id", "worker_id", "topic", "state"}
    for label, answer in answers.items():
        assert all(required <= set(task) for task in answer["tasks"]), (label, answer)
    assert [task["name"] for task in answers["steps"]["tasks"]] == ["first", "second"]

    # A dry run too: each task's check, whatever their number.
    dry_one = json.loads(mloc("submit", str(one), "--dry-run", "--json", env=env).stdout)
    dry_many = json.loads(mloc("submit", str(many), "--dry-run", "--json", env=env).stdout)
    assert dry_one["valid"] is dry_many["valid"] is True
    assert {frozenset(t) for t in one_shape(dry_one, 1)} == {frozenset(t) for t in one_shape(dry_many, 3)}
    assert dry_one["would_place_on"] == ["local-1"]  # as scripts read it before

    # `-` reads the tasks from standard input: one document as one task, several as several.
    piped = piped_in("taskType: echo\npayload: {piped: 1}\n", "submit", "-", "--json", env=env)
    assert piped.returncode == 0, piped.stderr
    [task] = one_shape(json.loads(piped.stdout), 1)
    assert client.wait(task["task_id"], timeout=60)["state"] == "succeeded"
    assert client.result(task["task_id"])["payload"] == {"piped": 1}
    several = piped_in(many.read_text(), "submit", "-", env=env)
    assert several.returncode == 0, several.stderr
    said = several.stdout.splitlines()
    assert [re.sub(r"^submitted \S+ \((.*?)\),.*$", r"\1", line) for line in said] == [
        f"stdin (document {n})" for n in range(1, 4)
    ], said
    # Beside files, in the order given; a problem in it is named after it.
    mixed = piped_in("taskType: echo\npayload: {piped: 2}\n", "submit", str(one), "-", "--json", env=env)
    assert mixed.returncode == 0, mixed.stderr
    ids = [task["task_id"] for task in one_shape(json.loads(mixed.stdout), 2)]
    wait_all(client, ids)
    assert [client.result(task_id)["payload"] for task_id in ids] == [{"n": 0}, {"piped": 2}]
    bad = piped_in("taskType: echoo\n", "submit", str(one), "-", env=env)
    assert bad.returncode == 2 and "stdin" in bad.stderr, bad.stderr
    twice = piped_in("taskType: echo\n", "submit", "-", "-", env=env)
    assert twice.returncode == 2 and "give - (standard input) once" in twice.stderr, twice.stderr


def test_users_list_keeps_user_names_whole_in_a_narrow_terminal(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    names = ["erin-of-the-data-team", "bo"]
    for name in names:
        assert mloc("users", "add", name, env=env).returncode == 0
    for columns in (60, 40):
        lines = in_a_terminal("users", "list", columns=columns, env=env)
        rows = [line.split() for line in lines if line.split() and line.split()[0] in names]
        assert sorted(row[0] for row in rows) == sorted(names), (columns, lines)
        assert "…" not in "\n".join(lines), (columns, lines)
        assert all(len(line.rstrip()) <= columns for line in lines), (columns, lines)
        # The other columns give way, folded, but are still there beside each name.
        assert all(len(row) >= 3 for row in rows), (columns, lines)
