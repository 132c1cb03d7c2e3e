"""User and model text goes through every `mloc` command as text: Rich markup, emoji codes, ANSI escapes
and control characters come out literally (control characters as visible escapes), never interpreted."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from mloc import keys
from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.cli import mloc
from tests.support.tiny_model import build_tiny_causal_lm

# Markup that crashed Rich ([/INST] closes a tag never opened), styles, an emoji code, ANSI colour and
# screen-clear sequences, a bell, a lone carriage return, DEL, a C1 control and a right-to-left override.
TEXT = "[/INST] [bold]b[/bold] [red]r :smile: \x1b[31mred\x1b[0m\x1b[2J bell\x07 cr\r del\x7f csi\x9b rtl\u202e end"
# What the CLI prints for it: the same characters, each control character as an escape.
SHOWN = r"[/INST] [bold]b[/bold] [red]r :smile: \x1b[31mred\x1b[0m\x1b[2J bell\x07 cr\r del\x7f csi\x9b rtl\u202e end"
# In JSON, the escapes are JSON's own.
SHOWN_JSON = (
    r'"[/INST] [bold]b[/bold] [red]r :smile: \u001b[31mred\u001b[0m\u001b[2J bell\u0007 cr\r del\u007f '
    r'csi\u009b rtl\u202e end"'
)
REASON = TEXT + "\nsecond [/x] line"
GPU_NAME = "[red]GPU\x1b[2J\x07"  # an environment variable holds no NUL, every other byte goes
FILE_NAME = "[red]x[bold] :smile: \x1b[31mred\x1b[2J bell\x07 rtl\u202e.txt"  # no '/': a file name
FILE_SHOWN = r"[red]x[bold] :smile: \x1b[31mred\x1b[2J bell\x07 rtl\u202e.txt"


def lines_of(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def test_json_escapes_match_what_json_dumps_gives() -> None:
    # The expected JSON above is json.dumps's own spelling, plus DEL, which the CLI escapes as well.
    assert json.dumps(TEXT).replace("\x7f", "\\u007f") == SHOWN_JSON


def test_every_command_prints_markup_escapes_and_control_characters_as_text(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path, sync_redis: redis.Redis
) -> None:
    results = tmp_path / "results"
    cluster = make_cluster(
        1,
        env={"ORCHESTRATOR_TOKEN": "text-token", "RESULTS_DIR": str(results)},
        worker_env=[{"MLOC_WORKER_GPUS": f"{GPU_NAME}:1:1024"}],
    )
    env = {"MLOC_API_URL": cluster.api_url, "ORCHESTRATOR_TOKEN": "text-token"}

    # submit --wait: the result's text, and a failure reason.
    echo = tmp_path / "echo.json"
    echo.write_text(json.dumps({"taskType": "echo", "payload": {"text": TEXT}}))
    done = mloc("submit", str(echo), "--wait", env=env)
    assert done.returncode == 0, done.stderr
    assert f'    "text": {SHOWN_JSON}' in lines_of(done.stdout)
    good_id = re.search(r"^submitted (\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]

    failing = tmp_path / "fail.json"
    failing.write_text(json.dumps({"taskType": "echo", "retries": 0, "hyperparameters": {"fail_message": REASON}}))
    failed = mloc("submit", str(failing), "--wait", env=env)
    assert failed.returncode == 1, failed.stderr
    bad_id = re.search(r"^submitted (\S+)", failed.stdout, re.M).group(1)  # type: ignore[union-attr]
    # The final report keeps the reason's line break; everything else is escaped.
    assert f"task {bad_id} failed: {SHOWN}" in lines_of(failed.stdout)
    assert "second [/x] line" in lines_of(failed.stdout)

    # tasks: one line per task, the reason's line break shown as \n.
    wide = lines_of(mloc("tasks", "--wide", env=env).stdout)
    row = next(line for line in wide if line.lstrip().startswith(bad_id))
    assert row.endswith(SHOWN + r"\nsecond [/x] line")
    narrow = lines_of(mloc("tasks", env=env).stdout)
    row = next(line for line in narrow if line.lstrip().startswith(bad_id[:8]))
    assert row.endswith(SHOWN[:59] + "…")

    # show: the reason on one line, with the reason code after it.
    record = Client(cluster.api_url, "text-token").task(bad_id)
    shown = lines_of(mloc("show", bad_id, env=env).stdout)
    reason_line = next(line for line in shown if line.startswith("reason"))
    assert reason_line.split(None, 1)[1] == f"{SHOWN}\\nsecond [/x] line ({record['reason_code']})"

    # result: JSON, its escapes JSON's own.
    result = mloc("result", good_id, env=env)
    assert f'    "text": {SHOWN_JSON}' in lines_of(result.stdout)

    # logs: a library's lines (the executor process's output is the task's log), prefix and all.
    stamp = time.time()
    line = {"ts": str(stamp), "level": "WARNING", "source": "library", "text": f"[transformers] {TEXT}\nnext"}
    sync_redis.xadd(keys.task_logs(good_id), line)
    when = datetime.fromtimestamp(stamp).astimezone().isoformat(" ", "seconds")  # local, with its UTC offset
    logged = lines_of(mloc("logs", good_id, env=env).stdout)
    assert logged[-2:] == [f"{when} WARNING library  [transformers] {SHOWN}", "next"]
    followed = mloc("logs", "-f", good_id, env=env)
    assert lines_of(followed.stdout)[-2:] == [f"{when} WARNING library  [transformers] {SHOWN}", "next"]
    assert f"task {good_id} ended: succeeded" in followed.stderr

    # workers: a GPU model name from the worker's own report.
    workers = lines_of(mloc("workers", env=env).stdout)
    row = next(line for line in workers if line.lstrip().startswith("local-1"))
    assert r"1/1 [red]GPU\x1b[2J\x07" in row

    # stats: a counter named after a plug-in's task type (entry point names are free text).
    today = datetime.now(UTC).date().isoformat()
    sync_redis.hincrby(keys.usage_day("admin", today), f"tasks.{TEXT}.succeeded", 1)
    stats = lines_of(mloc("stats", env=env).stdout)
    counter = next(line for line in stats if line.lstrip().startswith("tasks.[/INST]"))
    assert counter.split() == [*f"tasks.{SHOWN}.succeeded".split(), "1"]

    # users list: a user record from an older version, whose name no current check would allow.
    sync_redis.hset(keys.USERS, TEXT, json.dumps({"created_at": time.time()}))
    users = lines_of(mloc("users", "list", env=env).stdout)
    assert any(line.lstrip().startswith(SHOWN + " ") for line in users), users
    quiet = lines_of(mloc("users", "list", "-q", env=env).stdout)
    assert SHOWN in quiet

    # artifacts: a file the executor named.
    (results / good_id / FILE_NAME).write_text("left by the executor")
    listed = lines_of(mloc("artifacts", good_id, env=env).stdout)
    assert any(line.lstrip().startswith(f"{FILE_SHOWN} ") for line in listed), listed
    got = mloc("artifacts", good_id, "--get", FILE_NAME, "-o", str(tmp_path / "copy.txt"), env=env)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "copy.txt").read_text() == "left by the executor"

    # Errors too: an unknown prefix is echoed back escaped.
    missing = mloc("show", "[bold]x\x1b[2J", env=env)
    assert missing.returncode == 2
    assert missing.stderr.startswith(r"error: '[bold]x\x1b[2J' is not a task id")

    # Nothing above wrote a raw escape or control character to the terminal.
    for proc in (done, failed, result):
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", proc.stdout + proc.stderr)


@pytest.mark.extra("inference")
def test_submit_wait_prints_prompts_and_outputs_of_a_real_model_as_text(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    model = build_tiny_causal_lm(tmp_path / "model")
    cluster = make_cluster(1)
    prompts = [f"<s>[INST] {TEXT} [/INST]", "plain [/b] prompt"]
    task = tmp_path / "inference.json"
    task.write_text(
        json.dumps(
            {
                "taskType": "inference",
                "model": {"source": {"type": "local", "identifier": str(model)}, "engine": "transformers"},
                "inference": {"max_tokens": 6, "temperature": 0, "prompts": prompts},
            }
        )
    )
    done = mloc("submit", str(task), "--wait", "--show", "1", env={"MLOC_API_URL": cluster.api_url}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = lines_of(done.stdout)
    assert f"prompt: <s>[INST] {SHOWN} [/INST]" in printed, done.stdout
    task_id = re.search(r"^submitted (\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    items = Client(cluster.api_url).result(task_id)["items"]
    first = printed.index(f"prompt: <s>[INST] {SHOWN} [/INST]")
    output = items[0]["output"]
    # The model's text, line breaks kept, any control character it produced shown as an escape.
    expected = re.sub(
        "[\x00-\x08\x0b-\x1f\x7f-\x9f]",
        lambda m: "\\r" if m.group() == "\r" else f"\\x{ord(m.group()):02x}",
        output.replace("\r\n", "\n"),
    ).split("\n")
    assert printed[first + 1 : first + 1 + len(expected)] == [line.rstrip() for line in expected]
    # Only the first of the two results is printed, then where the rest are.
    assert "plain [/b] prompt" not in done.stdout
    assert "... 1 more of 2 results not shown" in printed
    assert f"full result: mloc result {task_id}" in printed


@pytest.mark.extra("rag", "inference")
def test_submit_wait_and_show_print_each_rag_answer_with_the_sources_it_was_given_as_text(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    model = build_tiny_causal_lm(tmp_path / "model", chat_template=True)
    cluster = make_cluster(1)
    env = {"MLOC_API_URL": cluster.api_url}
    volcano, violin = "Which volcano erupts in Sicily?", f"How many strings does a violin have? {TEXT}"
    task = tmp_path / "rag.json"
    task.write_text(
        json.dumps(
            {
                "taskType": "rag_inference",
                "model": {"source": {"type": "local", "identifier": str(model)}, "engine": "transformers"},
                # A named collection: each document's metadata.source is its id, and so what a source is called.
                "hyperparameters": {"collection": "cli-text", "vector_db": "faiss", "retrieval_k": 2},
                "documents": [
                    {
                        "text": "Mount Etna is an active volcano on the east coast of Sicily, erupting lava every year.",
                        "metadata": {"source": f"etna {TEXT}"},
                    },
                    {
                        "text": "A violin has four strings tuned in perfect fifths: G, D, A and E.",
                        "metadata": {"source": "strings/violin.md"},
                    },
                ],
                "questions": [volcano, violin],
                "inference": {"max_tokens": 6, "temperature": 0, "seed": 1},
            }
        )
    )
    done = mloc("submit", str(task), "--wait", "--show", "1", env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = re.search(r"^submitted (\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    answers = Client(cluster.api_url).result(task_id)["answers"]
    assert answers[0]["sources"][0]["source"] == f"etna {TEXT}"

    def source_lines(answer: dict[str, Any]) -> list[str]:
        """What the CLI prints for an answer's sources, best first, the source's name escaped."""
        return ["sources:"] + [
            f"  {source['rank']}. {source['source'].replace(TEXT, SHOWN)} "
            f"(chunk {source['chunk']}, score {source['score']:.3f}): {source['excerpt']}"
            for source in answer["sources"]
        ]

    def printed_after(lines: list[str], question_line: str, count: int) -> list[str]:
        """The ``count`` lines that follow the answer to the question, from its 'sources:' line on."""
        start = lines.index(question_line)
        sources = lines.index("sources:", start)
        return lines[sources : sources + count]

    # --wait: the first answer (--show 1) with its question and its two sources; the rest is counted.
    printed = lines_of(done.stdout)
    assert printed_after(printed, f"question: {volcano}", 3) == source_lines(answers[0]), done.stdout
    assert "How many strings" not in done.stdout
    assert "... 1 more of 2 results not shown" in printed

    # show: the summary, then every answer with its sources.
    shown = mloc("show", task_id, env=env)
    assert shown.returncode == 0, shown.stderr
    summary = lines_of(shown.stdout)
    assert summary[0].split() == ["task", task_id]
    assert printed_after(summary, f"question: {volcano}", 3) == source_lines(answers[0])
    assert printed_after(summary, f"question: How many strings does a violin have? {SHOWN}", 3) == source_lines(
        answers[1]
    )
    for proc in (done, shown):
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202e]", proc.stdout + proc.stderr)
