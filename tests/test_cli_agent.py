"""An agent task through a real cluster and the `mloc` CLI: one that answers shows its question, tool calls
(as many as --show asks) and answer in `mloc show` and `mloc submit --wait`; one stopped at max_steps fails,
naming the limit and the fix, with its steps in its log.

The model is a real tiny Llama (mloc.llm.tiny) taught here, in seconds, to write the ReAct text of two
scripted runs, so the worker's transformers engine, the text tool-call protocol, the python_repl sandbox
and the agent loop all run for real."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mloc.client import Client
from mloc.localcluster import LocalCluster
from tests.support.cli import mloc
from tests.support.tiny_model import build_tiny_causal_lm

SYSTEM = "Answer with the tools."
SUMS = "What are 6 * 7 and 6 + 7?"  # two tool calls, then the answer
STARS = "Count the stars."  # a tool call at every turn: it never answers
# Each turn of the two runs: the question, the calls before it (thought, code, what python_repl prints),
# and what the model writes after "Thought:". The second call prints an escape sequence and the answer
# holds markup, which the CLI must print as text.
PRODUCT = ("I will compute the product.", "print(6 * 7)", "42")
SUM = ("Now the sum.", "print(6 + 7, chr(27) + '[2J')", "13 \x1b[2J")
COUNT = ("I will count.", "print(1)", "1")
ANSWER = "42 and 13 [/INST]"


def reply(thought: str, code: str) -> str:
    return f" {thought}\nAction: python_repl\nAction Input: {code}"


TURNS: list[tuple[str, list[tuple[str, str, str]], str]] = [
    (SUMS, [], reply(*PRODUCT[:2])),
    (SUMS, [PRODUCT], reply(*SUM[:2])),
    (SUMS, [PRODUCT, SUM], f" I know the answer\nFinal Answer: {ANSWER}"),
    *((STARS, [COUNT] * done, reply(*COUNT[:2])) for done in range(3)),
]


def prompt(engine: Any, question: str, calls: list[tuple[str, str, str]]) -> str:
    """The prompt the agent executor sends for this turn, rendered by its own chat model."""
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

    from mloc.executors.agent.chat_model import EngineChatModel
    from mloc.executors.agent.sandbox import PythonSandbox
    from mloc.executors.agent.tools import python_tool
    from mloc.spec.sampling import Sampling

    def no_sandbox() -> PythonSandbox:
        raise AssertionError("rendering a prompt runs no code")

    chat = EngineChatModel(engine=engine, sampling=Sampling()).bind_tools([python_tool(no_sandbox)])
    messages: list[BaseMessage] = [SystemMessage(content=SYSTEM), HumanMessage(content=question)]
    for n, (thought, code, printed) in enumerate(calls):
        call = {"name": "python_repl", "args": {"code": code}, "id": f"c{n}", "type": "tool_call"}
        messages += [AIMessage(content=thought, tool_calls=[call]), ToolMessage(content=printed, tool_call_id=f"c{n}")]
    assert isinstance(chat, EngineChatModel)
    return chat.render(messages)


@pytest.fixture(scope="module")
def react_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model that writes each turn of TURNS, greedily, as the worker's engine will run it."""
    import torch

    from mloc.llm.hf_engine import TransformersEngine
    from mloc.spec.sampling import Sampling

    path = build_tiny_causal_lm(tmp_path_factory.mktemp("react") / "model", chat_template=True)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # the tool instructions and two steps are over 512 tokens
    (path / "config.json").write_text(json.dumps(config))
    engine = TransformersEngine("react", path)
    tokenizer, model = engine.tokenizer, engine.model
    rows = []
    for question, calls, written in TURNS:
        asked = tokenizer(prompt(engine, question, calls), add_special_tokens=False).input_ids
        rows.append((asked, [*tokenizer(written, add_special_tokens=False).input_ids, tokenizer.eos_token_id]))
    width = max(len(asked) + len(target) for asked, target in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (asked, target) in enumerate(rows):
        ids[row, : len(asked) + len(target)] = torch.tensor(asked + target)
        labels[row, len(asked) : len(asked) + len(target)] = torch.tensor(target)
        mask[row, : len(asked) + len(target)] = 1
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(400):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    model.eval()
    stops = ["\nObservation:", "Observation:"]
    for question, calls, written in TURNS:
        said = engine.generate([prompt(engine, question, calls)], Sampling(max_tokens=64, temperature=0, stop=stops))
        assert said[0][0].output == written, (question, len(calls), said[0][0].output, loss.item())
    model.save_pretrained(path, safe_serialization=True)
    return path


def agent_task(folder: Path, model: Path, question: str, max_steps: int) -> Path:
    task = folder / f"agent-{max_steps}.json"
    task.write_text(
        json.dumps(
            {
                "taskType": "agent_inference",
                "model": {"source": {"type": "local", "identifier": str(model)}, "engine": "transformers"},
                "hyperparameters": {"tools": ["python_repl"], "max_steps": max_steps, "system_prompt": SYSTEM},
                "messages": [{"role": "user", "content": question}],
                "inference": {"max_tokens": 64, "temperature": 0},
            }
        )
    )
    return task


def lines_of(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


@pytest.mark.extra("inference", "agent")
def test_show_prints_an_agents_question_tool_calls_and_answer_as_text(
    make_cluster: Callable[..., LocalCluster], react_model: Path, tmp_path: Path
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_ALLOW_PYTHON_TOOL": "1"}])
    env = {"MLOC_API_URL": cluster.api_url}
    done = mloc("submit", str(agent_task(tmp_path, react_model, SUMS, 4)), "--wait", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = re.search(r"^submitted (\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    result = Client(cluster.api_url).result(task_id)
    assert result["final_answer"] == ANSWER and result["stop_reason"] == "final_answer"
    assert [step["output"] for step in result["steps"]] == ["42", "13 \x1b[2J"]

    shown = mloc("show", task_id, env=env)
    assert shown.returncode == 0, shown.stderr
    printed = lines_of(shown.stdout)
    start = printed.index(f"question: {SUMS}")
    # Each call as the result records it, the escape sequence the tool printed shown as an escape.
    answered = [
        f"question: {SUMS}",
        "steps (2):",
        "  1. python_repl('print(6 * 7)') -> 42",
        "  2. python_repl(\"print(6 + 7, chr(27) + '[2J')\") -> 13 \\x1b[2J",
        "answer:",
        ANSWER,
    ]
    assert printed[start:] == answered, shown.stdout
    assert "\x1b" not in shown.stdout
    # --wait printed the same: the question from the task's messages, each call, the answer.
    waited = lines_of(done.stdout)
    start = waited.index(f"question: {SUMS}")
    assert waited[start : start + len(answered)] == answered, done.stdout
    assert "\x1b" not in done.stdout

    # --show N: the first N calls, then how many more and where they all are; --show 0: none of it.
    first = lines_of(mloc("show", task_id, "--show", "1", env=env).stdout)
    start = first.index("steps (2):")
    assert first[start + 1 : start + 3] == [
        "  1. python_repl('print(6 * 7)') -> 42",
        f"  ... 1 more of 2 steps: mloc result {task_id}",
    ]
    assert first[-2:] == ["answer:", ANSWER]
    brief = mloc("show", task_id, "--show", "0", env=env).stdout
    assert "question:" not in brief and "steps" not in brief


@pytest.mark.extra("inference", "agent")
def test_submit_wait_prints_an_agents_question_given_as_input_and_as_many_tool_calls_as_show_asks(
    make_cluster: Callable[..., LocalCluster], react_model: Path, tmp_path: Path
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_ALLOW_PYTHON_TOOL": "1"}])
    env = {"MLOC_API_URL": cluster.api_url}
    task = agent_task(tmp_path, react_model, SUMS, 4)
    # The question as `input`, the spec's other way to ask it: the prompt the model sees is the same.
    document = json.loads(task.read_text())
    document["input"] = document.pop("messages")[0]["content"]
    task.write_text(json.dumps(document))
    done = mloc("submit", str(task), "--wait", "--show", "1", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = re.search(r"^submitted (\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    printed = lines_of(done.stdout)
    start = printed.index(f"question: {SUMS}")
    # As `mloc show --show 1` prints it: the first call, then how many more and where they all are.
    assert printed[start : start + 6] == [
        f"question: {SUMS}",
        "steps (2):",
        "  1. python_repl('print(6 * 7)') -> 42",
        f"  ... 1 more of 2 steps: mloc result {task_id}",
        "answer:",
        ANSWER,
    ], done.stdout
    assert printed[start : start + 6] == lines_of(mloc("show", task_id, "--show", "1", env=env).stdout)[-6:]
    assert "print(6 + 7" not in done.stdout
    assert Client(cluster.api_url).task(task_id)["spec"]["spec"]["input"] == SUMS
    # --show 0: none of it, only where the result is.
    brief = mloc("submit", str(task), "--wait", "--show", "0", env=env, timeout=300)
    assert brief.returncode == 0, brief.stdout + brief.stderr
    assert "question:" not in brief.stdout and "steps" not in brief.stdout, brief.stdout
    assert re.search(r"^full result: mloc result \S+$", brief.stdout, re.M), brief.stdout


@pytest.mark.extra("inference", "agent")
def test_an_agent_stopped_at_max_steps_fails_with_the_limit_the_fix_and_its_steps_in_its_log(
    make_cluster: Callable[..., LocalCluster], react_model: Path, tmp_path: Path
) -> None:
    cluster = make_cluster(1, worker_env=[{"MLOC_ALLOW_PYTHON_TOOL": "1"}])
    env = {"MLOC_API_URL": cluster.api_url}
    done = mloc("submit", str(agent_task(tmp_path, react_model, STARS, 2)), "--wait", env=env, timeout=300)
    # Not an answer: --wait exits 1, as for any task that failed.
    assert done.returncode == 1, done.stdout + done.stderr
    task_id = re.search(r"^submitted (\S+)", done.stdout, re.M).group(1)  # type: ignore[union-attr]
    reason = (
        "stopped at max_steps=2: the agent made 2 tool call(s) and asked for more without giving a final answer; "
        "raise hyperparameters.max_steps, or show the model when to answer (worked examples in messages, a "
        f"clearer system_prompt); its 2 step(s) are in `mloc logs {task_id}`"
    )
    assert reason in done.stdout + done.stderr

    record = Client(cluster.api_url).task(task_id)
    assert record["state"] == "failed" and record["reason_code"] == "executor_error"
    assert record["reason"] == reason
    assert record["usage"]["tool_calls"] == 2 and record["usage"]["completion_tokens"] > 0
    fields = dict(line.split(None, 1) for line in mloc("show", task_id, env=env).stdout.splitlines() if line.strip())
    assert fields["state"] == "failed" and fields["reason"] == f"{reason} (executor_error)"

    logged = [line for line in lines_of(mloc("logs", task_id, env=env).stdout) if " step " in line]
    assert [line.split(" step ", 1)[1] for line in logged] == [
        "1: python_repl('print(1)') -> 1",
        "2: python_repl('print(1)') -> 1",
    ], logged


def test_show_says_plainly_that_an_agent_result_from_before_such_runs_failed_has_no_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mloc.cli.results import print_result

    record = {
        "task_id": "8d6a1fe9-0000-4000-8000-000000000000",
        "task_type": "agent_inference",
        "spec": {"spec": {"input": "Count\x1b[2J"}},
    }
    stopped = {
        "final_answer": None,
        "stop_reason": "max_steps",
        "stop_message": "stopped after max_steps=1 tool calls without a final answer; raise hyperparameters.max_steps",
        "steps": [{"step": 1, "tool": "python_repl", "input": {"code": "print(1)"}, "output": "1\n2", "error": True}],
    }
    print_result(record, stopped, 10)
    assert capsys.readouterr().out.splitlines() == [
        "question: Count\\x1b[2J",
        "steps (1):",
        '  1. python_repl({"code": "print(1)"}) failed: 1\\n2',
        "no answer: stopped after max_steps=1 tool calls without a final answer; raise hyperparameters.max_steps",
    ]
