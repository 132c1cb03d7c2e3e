"""What the CLI says where a user trial found it saying too little or the wrong thing: a dataset task's
result lines after --wait, pipeline files `validate` passed but every submit refused, `tasks -q` past
the first page, downloads over an existing file, and the ids `mloc pipeline` and `mloc show` name."""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from mloc.cli import waiting
from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.cli import mloc

TINY: dict[str, object] = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
ID = r"[0-9a-f-]{36}"


@pytest.mark.extra("inference")
def test_wait_prints_a_dataset_tasks_first_result_lines_and_where_the_rest_are(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"qid": f"q{i:02d}", "text": f"Count to {i}:"}) + "\n" for i in range(12)))
    task = tmp_path / "dataset.json"
    task.write_text(
        json.dumps(
            {
                "taskType": "inference",
                "model": TINY,
                "inference": {
                    "max_tokens": 2,
                    "temperature": 0,
                    "input": {"path": str(data), "columns": {"prompt": "text", "id": "qid"}},
                },
            }
        )
    )
    cluster = make_cluster(1)
    done = mloc("submit", str(task), "--wait", "--show", "3", env={"MLOC_API_URL": cluster.api_url}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = re.search(rf"^submitted ({ID})", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    printed = done.stdout.splitlines()
    # The first three result lines, as `mloc results` prints them; not the totals' JSON.
    assert [line.split(" (")[0] for line in printed if line.startswith("--- ")] == ["--- q00", "--- q01", "--- q02"]
    assert any(re.fullmatch(r"--- q00 \(length, \d+\+2 tokens\)", line) for line in printed), printed
    assert '"ok": true' not in done.stdout and "more lines not shown" not in done.stdout
    assert f"... 9 more of 12 result lines: mloc results {task_id} --offset 3" in printed
    assert f"rows 12: 12 succeeded, 0 failed (from dataset {data}, 1 chunk(s))" in printed, done.stdout
    assert any(line.startswith("usage: prompt_tokens=") for line in printed), printed
    assert printed[-1] == f"totals: mloc result {task_id}"

    # `mloc run` reports through the same function, naming files: its cluster is gone once it returns.
    client = client_for(cluster)
    shown = io.StringIO()
    with redirect_stdout(shown):
        waiting.report(client, client.task(task_id), shown=12, results_dir="/runs")
    lines = shown.getvalue().splitlines()
    assert sum(line.startswith("--- q") for line in lines) == 12 and "more of 12" not in shown.getvalue()
    assert lines[-1] == f"totals: /runs/{task_id}/responses.json"
    shown = io.StringIO()
    with redirect_stdout(shown):
        waiting.report(client, client.task(task_id), shown=0, results_dir="/runs")
    assert f"... 12 more of 12 result lines: /runs/{task_id}/results.jsonl" in shown.getvalue().splitlines()


def _write(path: Path, *documents: dict[str, object]) -> Path:
    path.write_text("---\n".join(json.dumps(document) + "\n" for document in documents))
    return path


def _echo(name: str, *after: str) -> dict[str, object]:
    return {"metadata": {"name": name}, "spec": {"taskType": "echo", "dependsOn": list(after)}}


def _reading(name: str, lines_of: str = "", adapter_of: str = "") -> dict[str, object]:
    """An inference task that reads another task's result lines, or loads its adapter."""
    model: dict[str, object] = dict(TINY) | ({"adapter": {"from": adapter_of}} if adapter_of else {})
    inference = {"input": {"from": lines_of}} if lines_of else {"prompts": ["hi"]}
    return {"metadata": {"name": name}, "spec": {"taskType": "inference", "model": model, "inference": inference}}


def test_validate_refuses_the_pipeline_graphs_a_submit_refuses_in_the_submits_words(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    known = str(uuid.uuid4())
    files = {
        "cycle": (
            _write(tmp_path / "cycle.yaml", _echo("x", "y"), _echo("y", "x")),
            "the tasks wait for each other in a cycle: x -> y -> x; remove one of these dependencies",
        ),
        "itself": (
            _write(tmp_path / "itself.yaml", _echo("a"), _echo("b", "b")),
            "spec.dependsOn[0]: the task names itself ('b'); name another task",
        ),
        "twice": (
            _write(tmp_path / "twice.yaml", _echo("a"), _echo("a"), _echo("c", "a")),
            "metadata.name: two tasks are named 'a'; give each a name of its own",
        ),
        "unknown": (
            _write(tmp_path / "unknown.yaml", _echo("a"), _echo("b", "a", "nosuch")),
            "spec.dependsOn[1]: 'nosuch' is neither a task of this submission (metadata.name: a, b) nor a task id "
            "of yours; name one of them",
        ),
        "misspelt": (
            _write(tmp_path / "misspelt.yaml", _echo("prepare"), _echo("b", "prepair")),
            "spec.dependsOn[0]: 'prepair' is neither a task of this submission (metadata.name: b, prepare) nor a task "
            "id of yours; did you mean 'prepare'?",
        ),
        # The same rules hold for a name given where a task's output is read (from:).
        "unknown output": (
            _write(tmp_path / "unknown_output.yaml", _echo("a"), _reading("b", lines_of="nosuch")),
            "spec.inference.input.from: 'nosuch' is neither a task of this submission (metadata.name: a, b) nor a "
            "task id of yours; name one of them",
        ),
        "output not made": (
            _write(tmp_path / "not_made.yaml", _echo("a"), _reading("b", adapter_of="a")),
            "spec.model.adapter.from: 'a' is a task of type 'echo', which makes no adapter; name a dpo or grpo or "
            "ppo or sft task",
        ),
        "output cycle": (
            _write(tmp_path / "output_cycle.yaml", _reading("x", lines_of="y"), _reading("y", lines_of="x")),
            "the tasks wait for each other in a cycle: x -> y -> x; remove one of these dependencies",
        ),
    }
    cluster = make_cluster(0)
    env = {"MLOC_API_URL": cluster.api_url}
    for what, (path, said) in files.items():
        checked = mloc("validate", str(path))
        assert checked.returncode == 1, (what, checked.stdout, checked.stderr)
        assert f"invalid {path} (document " in checked.stderr and said in checked.stderr, (what, checked.stderr)
        submitted = mloc("submit", str(path), env=env)
        assert submitted.returncode == 2 and said in submitted.stderr, (what, submitted.stderr)
    # Only the tasks with the problem are called invalid: both of a cycle, the one naming itself.
    cycle = mloc("validate", str(files["cycle"][0]))
    assert cycle.stdout == "" and cycle.stderr.count("invalid") == 2
    itself = mloc("validate", str(files["itself"][0]))
    assert itself.stdout.splitlines() == [f"ok {files['itself'][0]} (document 1): EchoTask (echo)"]

    # What validate cannot know offline passes: a task id, a name from another file sent along (its
    # output checked there too: the files are one submission), and two tasks of one name where none
    # waits (such a submission is not planned, so the orchestrator takes it).
    by_id = _write(tmp_path / "by_id.yaml", _echo("a"), _echo("b", "a", known), _reading("r", lines_of=known))
    other = _write(tmp_path / "other.yaml", _echo("c", "a"), _reading("d", lines_of="lines"))
    lines = _write(tmp_path / "lines.yaml", _reading("lines", lines_of=known))
    plain = _write(tmp_path / "plain.yaml", _echo("a"), _echo("a"))
    for given in ((by_id, other, lines), (plain,), (Path("templates/pipeline_gemma3_270m.yaml"),)):
        fine = mloc("validate", *map(str, given))
        assert fine.returncode == 0, fine.stderr
    assert mloc("submit", str(plain), env=env).returncode == 0
    # Files given together are one submission: a name in two of them is refused, as their submit is.
    twice = mloc("validate", str(by_id), str(plain))
    assert twice.returncode == 1 and "two tasks are named 'a'" in twice.stderr
    assert mloc("submit", str(by_id), str(plain), env=env).returncode == 2
    # A name from another file whose task makes no such output is refused as a submit refuses it.
    made_nothing = _write(tmp_path / "made_nothing.yaml", _reading("lines"))
    wrong = mloc("validate", str(other), str(made_nothing))
    assert wrong.returncode == 1
    assert (
        f"invalid {other} (document 2): spec.inference.input.from: 'lines' runs inline prompts and writes no result "
        "lines; give it inference.input"
    ) in wrong.stderr


def test_tasks_quiet_prints_every_matching_id_and_the_table_says_how_to_see_more(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(0)  # no worker: every task stays pending
    client = client_for(cluster)
    ids = [answer["task_id"] for answer in client.submit_bulk([{"taskType": "echo"}] * 520)["tasks"]]
    env = {"MLOC_API_URL": cluster.api_url}

    # More than one of the largest pages, so -q reads several.
    quiet = mloc("tasks", "-q", "--state", "pending", env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert sorted(quiet.stdout.split()) == sorted(ids) and quiet.stderr == ""
    assert len(mloc("tasks", "-q", "--page-size", "7", env=env).stdout.split()) == 520

    # A page asked for is that page, and stderr says what is left.
    paged = mloc("tasks", "-q", "--page", "2", "--page-size", "500", env=env)
    assert len(paged.stdout.split()) == 20 and paged.stderr == ""
    first = mloc("tasks", "-q", "--page", "1", env=env)
    assert len(first.stdout.split()) == 20
    assert "500 more: mloc tasks -q --page 2; -q without --page prints every id" in first.stderr

    table = mloc("tasks", "--state", "pending", env=env)
    assert "tasks (page 1, 20 of 520)" in table.stdout
    assert table.stderr.strip() == "500 more: mloc tasks --state pending --page 2"
    last = mloc("tasks", "--page", "11", "--page-size", "50", env=env)
    assert "tasks (page 11, 20 of 520)" in last.stdout and last.stderr == ""


def test_artifacts_get_refuses_to_overwrite_a_file_unless_forced(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    task_id = client.submit({"taskType": "echo", "payload": {"n": 1}})["task_id"]
    assert client.wait(task_id, timeout=60)["state"] == "succeeded"
    env = {"MLOC_API_URL": cluster.api_url}
    target = tmp_path / "r.json"

    got = mloc("artifacts", task_id, "--get", "responses.json", "-o", str(target), env=env)
    assert got.returncode == 0 and got.stderr.strip() == f"wrote {target}", got.stderr
    target.write_text("mine")
    again = mloc("artifacts", task_id, "--get", "responses.json", "-o", str(target), env=env)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        f"error: {target} already exists (a file); choose a new name with -o, or replace it with --force"
    )
    assert target.read_text() == "mine"
    forced = mloc("artifacts", task_id, "--get", "responses.json", "-o", str(target), "--force", env=env)
    assert forced.returncode == 0 and json.loads(target.read_text())["payload"] == {"n": 1}

    # A folder given as -o gets the file under its own name, as cp does, and keeps what is there too.
    into = mloc("artifacts", task_id, "--get", "responses.json", "-o", str(tmp_path), env=env)
    assert into.returncode == 0 and (tmp_path / "responses.json").is_file()
    twice = mloc("artifacts", task_id, "--get", "responses.json", "-o", str(tmp_path), env=env)
    assert twice.returncode == 2 and f"{tmp_path / 'responses.json'} already exists" in twice.stderr

    # A folder fetched again with --force replaces the one there, its stale files gone.
    folder = tmp_path / "all"
    assert mloc("artifacts", task_id, "--get", "/", "-o", str(folder), env=env).returncode == 0
    (folder / "stale.txt").write_text("old")
    refused = mloc("artifacts", task_id, "--get", "/", "-o", str(folder), env=env)
    assert refused.returncode == 2 and "or replace it with --force" in refused.stderr
    replaced = mloc("artifacts", task_id, "--get", "/", "-o", str(folder), "--force", env=env)
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["responses.json"]


def test_pipeline_and_show_name_the_pipelines_own_id(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(1)
    client = client_for(cluster)
    env = {"MLOC_API_URL": cluster.api_url}
    failing = {
        "metadata": {"name": "first"},
        "spec": {"taskType": "echo", "retries": 0, "hyperparameters": {"fail_message": "no"}},
    }
    answers = client.submit_bulk([failing, _echo("second", "first")])["tasks"]
    pipeline_id = answers[0]["pipeline_id"]
    first = answers[0]["task_id"]
    assert client.wait(answers[1]["task_id"], timeout=60)["state"] == "failed"

    shown = mloc("pipeline", first[:6], env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"pipeline {pipeline_id}: failed"

    sleeper = {"metadata": {"name": "slow"}, "spec": {"taskType": "echo", "hyperparameters": {"sleep_sec": 60}}}
    steps = client.submit_bulk([sleeper, _echo("after", "slow")])["tasks"]
    cancelled = mloc("pipeline", steps[1]["task_id"], "--cancel", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"cancelled 2 step(s) of pipeline {steps[0]['pipeline_id']}"

    # A pipeline's id where a task's is taken: say which command shows it, in the CLI's words; so does
    # every command that takes a task id, for an id no task has.
    nobody = str(uuid.uuid4())
    for command in ("show", "result", "cancel", "logs", "results", "artifacts", "metrics", "resume"):
        said = mloc(command, pipeline_id, env=env)
        assert said.returncode == 2, (command, said.stderr)
        assert said.stderr.strip() == (
            f"error: {pipeline_id} is a pipeline's id, not a task's: `mloc pipeline {pipeline_id}` shows its steps"
        ), command
        missing = mloc(command, nobody, env=env)
        assert missing.returncode == 2, (command, missing.stderr)
        assert missing.stderr.strip() == (
            f"error: task {nobody} not found; `mloc tasks` lists yours (a finished task is removed "
            "MLOC_TASK_RETENTION_SEC after it ended, 30 days unless the orchestrator says otherwise)"
        ), command


def test_an_agent_that_stopped_without_an_answer_is_shown_why(capsys: pytest.CaptureFixture[str]) -> None:
    from mloc.cli import results

    steps = [{"tool": "python_repl", "input": "print(1)", "output": "1"}] * 3
    stopped = {
        "ok": True,
        "final_answer": None,
        "stop_reason": "loop",
        "stop_message": "stopped: the agent asked for the same python_repl call 3 times in a row",
        "steps": steps,
        "items": [{"index": 0, "output": "", "finish_reason": "loop"}],
    }
    results.print_result({"task_id": "8d6a1fe9-0000-4000-8000-000000000000"}, stopped, 10)
    shown = capsys.readouterr().out.splitlines()
    assert shown[-1] == (
        "no answer: stopped: the agent asked for the same python_repl call 3 times in a row after 3 step(s) "
        "(`mloc result 8d6a1fe9-0000-4000-8000-000000000000` shows them)"
    )
    answered = {
        **stopped,
        "final_answer": "42",
        "stop_reason": "final_answer",
        "stop_message": "the agent gave its final answer",
    }
    answered["items"] = [{"index": 0, "output": "42", "finish_reason": "final_answer"}]
    asked = {"task_id": "x", "spec": {"spec": {"taskType": "agent_inference", "input": "What is 6*7?"}}}
    results.print_result(asked, answered, 10)
    shown = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("no answer") for line in shown)
    # The question, each tool call on the way, then the answer: what `mloc submit --wait` prints.
    assert shown == [
        "question: What is 6*7?",
        "steps (3):",
        "  1. python_repl('print(1)') -> 1",
        "  2. python_repl('print(1)') -> 1",
        "  3. python_repl('print(1)') -> 1",
        "answer:",
        "42",
    ], shown
