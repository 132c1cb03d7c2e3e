"""The OpenAI Batch API served by MLOC: batch files checked and turned into dataset rows, result lines
turned into OpenAI's output and error lines, and the official `openai` client against a real cluster."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from mloc import openai_files
from mloc.api.openai_errors import openai_body
from mloc.client import ApiError, Client
from mloc.errors import BadRequest, MlocError
from mloc.localcluster import LocalCluster
from mloc.modelroots import ModelRoots
from mloc.openai_files import FileStore
from mloc.openai_lines import (
    CHAT,
    COMPLETIONS,
    MAX_PROBLEMS,
    BatchOutput,
    Converted,
    Counts,
    Problem,
    convert,
    count_lines,
    output_blocks,
    output_sizes,
    request_error,
)
from mloc.settings import Settings, describe_invalid

TINY = {"source": {"type": "package", "identifier": "mloc-tiny-llama"}, "engine": "transformers"}
ADMIN = "openai-batch-admin-token"


def request(custom_id: str, body: dict[str, Any], url: str = COMPLETIONS) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def converted(lines: list[dict[str, Any]], endpoint: str = COMPLETIONS) -> tuple[Converted, list[dict[str, Any]]]:
    target = io.BytesIO()
    result = convert(io.BytesIO(jsonl(lines)), target, endpoint=endpoint)
    assert result.problems == ()
    return result, [json.loads(line) for line in target.getvalue().splitlines()]


def problems(lines: list[dict[str, Any]] | bytes, endpoint: str = COMPLETIONS) -> list[Problem]:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    found = list(convert(io.BytesIO(data), io.BytesIO(), endpoint=endpoint).problems)
    assert found
    return found


def problem(lines: list[dict[str, Any]] | bytes, endpoint: str = COMPLETIONS) -> Problem:
    (only,) = problems(lines, endpoint)
    return only


def test_completion_lines_become_dataset_rows_with_their_sampling() -> None:
    lines = [
        request("a", {"model": "tiny", "prompt": "Hello", "max_completion_tokens": 5, "stop": "\n", "n": 1}),
        request("b", {"model": "tiny", "prompt": "", "temperature": 0, "seed": 7, "user": "u1", "top_p": None}),
    ]
    result, rows = converted(lines)
    assert result == Converted(requests=2, model="tiny")
    assert rows == [
        {"id": "a", "prompt": "Hello", "max_tokens": 5, "stop": "\n"},
        # An empty prompt is the request's own problem: it fails alone, on the worker.
        {"id": "b", "prompt": "", "temperature": 0, "seed": 7},
    ]


def test_chat_lines_keep_text_parts_and_take_developer_as_system() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    result, rows = converted([request("c1", {"model": "m", "messages": messages, "max_tokens": 4}, CHAT)], CHAT)
    assert result.requests == 1
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert rows == [{"id": "c1", "messages": chat, "max_tokens": 4}]


@pytest.mark.parametrize(
    ("lines", "code", "param", "expected"),
    [
        (
            [request("a", {"model": "m", "prompt": "x"}), request("b", {"model": "m", "prompt": "y"}),
             request("a", {"model": "m", "prompt": "z"})],
            "duplicate_custom_id", "custom_id",
            ["line 3: custom_id 'a' is also the custom_id of line 1", "give each line its own custom_id"],
        ),
        (
            [request("a", {"model": "m", "prompt": "x"}), request("b", {"model": "other", "prompt": "y"})],
            "model_mismatch", "body.model",
            ["line 2: body.model is 'other' but line 1 has 'm'", "split the file into one per model"],
        ),
        (
            [request("a", {"model": "m", "prompt": "x"}, url="/v1/embeddings")],
            "invalid_url", "url", ["line 1: url is \"/v1/embeddings\"", "/v1/chat/completions and /v1/completions"],
        ),
        (
            [request("a", {"model": "m", "prompt": "x"}, url=CHAT)],
            "invalid_url", "url", ["line 1: url is \"/v1/chat/completions\"", "create a batch per endpoint"],
        ),
        ([request("a", {"model": "m", "prompt": "x", "n": 2})], "unsupported_value", "body.n",
         ["line 1: body.n is 2", "set it to 1"]),
        ([request("a", {"model": "m", "prompt": "x", "stream": True})], "streaming_unsupported", "body.stream",
         ["line 1: body.stream is true, which MLOC's batches do not support", "set it to false or leave it out"]),
        ([request("a", {"model": "m", "prompt": ["x", "y"]})], "invalid_type", "body.prompt",
         ["line 1: body.prompt is a list, not a string"]),
        ([request("a", {"model": "m", "prompt": "x", "tools": []})], "unsupported_parameter", "body.tools",
         ["line 1: body.tools is not supported", "remove it"]),
        ([request("a", {"prompt": "x"})], "missing_required_parameter", "body.model",
         ["line 1: body.model is missing", "name the model every line runs on"]),
        ([{"method": "POST", "url": COMPLETIONS, "body": {}}], "missing_required_parameter", "custom_id",
         ["line 1: custom_id is missing"]),
        ([{"custom_id": "a", "method": "GET", "url": COMPLETIONS, "body": {}}], "invalid_value", "method",
         ['line 1: method is "GET"', 'set it to "POST"']),
        (jsonl([request("a", {"model": "m", "prompt": "x"})]) + b"{not json\n", "invalid_json_line", None,
         ["line 2: the line is not JSON (unexpected character, expected a string key at column 2)",
          "one JSON object per line"]),
        (jsonl([request("a", {"model": "m", "prompt": "x"})]) + b'{"custom_id": "b", "body": {"x": 1\n',
         "invalid_json_line", None, ["line 2: the line is not JSON (unexpected end of data at column 35)"]),
        (b"\n\n", "empty_file", None, ["the file has no request lines; give one JSON request per line"]),
        (jsonl([request("a", {"model": "m", "prompt": "x"})]) + b'{"custom_id": "caf\xe9"}\n', "invalid_json_line",
         None, ["line 2: the line is not UTF-8 text (byte 18)", "save the file as UTF-8"]),
    ],
    ids=["duplicate", "two-models", "other-endpoint", "wrong-endpoint", "n", "stream", "prompt-list", "tools",
         "no-model", "no-custom-id", "get", "not-json", "cut-short", "empty", "not-utf8"],
)  # fmt: skip
def test_a_batch_files_problem_names_its_line_field_and_fix_with_openais_code(
    lines: list[dict[str, Any]] | bytes, code: str, param: str | None, expected: list[str]
) -> None:
    found = problem(lines)
    assert (found.code, found.param) == (code, param)
    if code != "empty_file":
        assert found.line == int(expected[0].split(":")[0].removeprefix("line "))
    for part in expected:
        assert part in found.message


def test_every_lines_problem_is_told_at_once_and_the_rest_of_the_lines_still_checked() -> None:
    lines = (
        jsonl(
            [
                request("a", {"model": "m", "prompt": "x"}),
                request("b", {"prompt": "no model"}),
                request("a", {"model": "m", "prompt": "again"}),
                request("c", {"model": "m", "prompt": "fine"}),
            ]
        )
        + b"{nope\n"
    )
    found = problems(lines)
    assert [(p.line, p.code, p.param) for p in found] == [
        (2, "missing_required_parameter", "body.model"),
        (3, "duplicate_custom_id", "custom_id"),
        (5, "invalid_json_line", None),
    ]
    assert found[0].to_openai() == {
        "code": "missing_required_parameter",
        "message": "line 2: body.model is missing or empty; name the model every line runs on",
        "param": "body.model",
        "line": 2,
    }
    # A file with many bad lines lists the first of them, and counts the rest (every line is checked).
    many = jsonl([request(f"r{i}", {"prompt": "x"}) for i in range(MAX_PROBLEMS + 7)])
    listed = problems(many)
    assert len(listed) == MAX_PROBLEMS + 1
    assert [p.line for p in listed[:-1]] == list(range(1, MAX_PROBLEMS + 1))
    last = listed[-1]
    assert (last.code, last.line, last.param) == ("too_many_errors", None, None)
    assert last.message.startswith(f"7 more line(s) have problems, the first of them line {MAX_PROBLEMS + 1}, ")


def test_an_unsupported_endpoint_is_refused_and_a_bad_chat_is_a_problem() -> None:
    with pytest.raises(BadRequest, match="is not one MLOC's batches serve"):
        convert(io.BytesIO(jsonl([request("a", {})])), io.BytesIO(), endpoint="/v1/embeddings")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    found = problem([request("a", {"model": "m", "messages": image}, CHAT)], CHAT)
    assert "body.messages[0].content has a part that is not text" in found.message
    assert found.param == "body.messages[0].content"
    found = problem([request("a", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, CHAT)], CHAT)
    assert "line 1: body.messages[0].role is 'robot'; use one of system, developer" in found.message


def test_result_lines_become_openai_output_and_error_lines() -> None:
    lines: list[dict[str, Any]] = [
        {"id": "a", "output": " four", "finish_reason": "length", "prompt_tokens": 5, "completion_tokens": 2,
         "error": None},
        {"id": "b", "output": None, "finish_reason": None, "prompt_tokens": 0, "completion_tokens": 0,
         "error": "prompt column 'prompt' is empty"},
        {"id": "c", "output": "!", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1, "error": None},
    ]  # fmt: skip
    data = jsonl(lines) + b'{"id": "d", "outp'  # a batch still being written
    batch = BatchOutput(key="k", endpoint=CHAT, model="tiny", created=100)
    out = [json.loads(x) for x in b"".join(output_blocks(io.BytesIO(data), batch, errors=False)).splitlines()]
    assert [line["custom_id"] for line in out] == ["a", "c"]
    first = out[0]
    assert first["id"] == "batch_req_k-0" and first["error"] is None and first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny" and body["created"] == 100
    assert body["choices"] == [
        {"index": 0, "finish_reason": "length", "logprobs": None, "message": {"role": "assistant", "content": "four"}}
    ]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    errors = [json.loads(x) for x in b"".join(output_blocks(io.BytesIO(data), batch, errors=True)).splitlines()]
    assert [(line["id"], line["custom_id"]) for line in errors] == [("batch_req_k-1", "b")]
    assert errors[0]["response"]["status_code"] == 400
    error = errors[0]["response"]["body"]["error"]
    assert (error["message"], error["param"]) == ("body.prompt is empty", "body.prompt")
    assert count_lines(io.BytesIO(data)) == Counts(completed=2, failed=1, prompt_tokens=8, completion_tokens=3)
    # An output file's size is told without sending it: that of the lines it sends.
    sent = [len(b"".join(output_blocks(io.BytesIO(data), batch, errors=errors))) for errors in (False, True)]
    assert output_sizes(io.BytesIO(data), batch) == tuple(sent)


@pytest.mark.parametrize(
    ("row_error", "message", "param"),
    [
        ("column 'temperature' (temperature) is 7: Input should be less than or equal to 5",
         "body.temperature is 7: Input should be less than or equal to 5", "body.temperature"),
        ("column 'max_tokens' (max_tokens) is -1: Input should be greater than 0",
         "body.max_tokens is -1: Input should be greater than 0", "body.max_tokens"),
        ("messages column 'messages' is an empty chat; give at least one message",
         "body.messages is an empty chat; give at least one message", "body.messages"),
        ("column 'max_tokens' (max_tokens) is 5000: not below the model's context of 2048 tokens; set it below 2048",
         "body.max_tokens is 5000: not below the model's context of 2048 tokens; set it below 2048",
         "body.max_tokens"),
        ("the prompt is longer than the model's context (4096 tokens)",
         "the prompt is longer than the model's context (4096 tokens)", None),
    ],
)  # fmt: skip
def test_a_failed_rows_error_names_the_request_field(row_error: str, message: str, param: str | None) -> None:
    assert request_error(row_error) == (message, param)


def test_mloc_error_bodies_become_openais() -> None:
    error = BadRequest("purpose 'x' is not supported", details=[{"path": "purpose", "message": "is 'x'"}])
    assert orjson.loads(openai_body(orjson.dumps(error.to_dict()), 400)) == {
        "error": {"message": "purpose 'x' is not supported", "type": "invalid_request_error", "param": "purpose",
                  "code": "bad_request"}
    }  # fmt: skip
    assert orjson.loads(openai_body(b"not json", 502))["error"]["type"] == "server_error"
    # A field of the call's body is named as OpenAI names it.
    missing = BadRequest("input_file_id: Field required", details=[{"path": "body.input_file_id", "message": "x"}])
    assert orjson.loads(openai_body(orjson.dumps(missing.to_dict()), 422))["error"]["param"] == "input_file_id"


def test_uploaded_files_and_their_rows_are_known_to_the_model_roots(tmp_path: Path) -> None:
    roots = ModelRoots.of(Settings(), results_dir=tmp_path)
    file_id = "file-" + "a" * 32
    assert roots.uploaded_file(tmp_path / "files" / file_id) == file_id
    assert roots.uploaded_file(tmp_path / "files" / f"{file_id}.rows.jsonl") == file_id
    assert roots.uploaded_file(tmp_path / "files" / "sub" / file_id) is None
    assert roots.uploaded_file(tmp_path / "other" / file_id) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("{tiny", "is not JSON"), ("[1]", "is JSON but not an object"), ('{"t": {"engine": "x"}}', "model 't': source")],
)
def test_a_malformed_openai_models_setting_names_the_variable(value: str, expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(MLOC_OPENAI_MODELS=value)
    message = describe_invalid(caught.value)
    assert message.startswith(f"invalid setting MLOC_OPENAI_MODELS={value!r}: ") and expected in message


def wait_ended(client: openai.OpenAI, batch_id: str, timeout: float = 240) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.5)


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


@pytest.mark.extra("inference")
def test_the_openai_client_runs_batches_on_mloc(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    models = json.dumps({"tiny": TINY})
    cluster = make_cluster(
        1, env={"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_OPENAI_MODELS": models, "MLOC_MAX_FILE_BYTES": "64Ki"}
    )
    admin = client_for(cluster, ADMIN)
    tokens = {
        name: admin.http.post("/api/v1/admin/users", json={"name": name}).json()["token"] for name in ("alice", "bob")
    }
    alice = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=tokens["alice"], max_retries=0)
    bob = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=tokens["bob"], max_retries=0)

    completions = [
        request(f"q{i:02d}", {"model": "tiny", "prompt": f"Question: what is {i} plus one?\nAnswer:",
                              "max_tokens": 2 + i % 3, "temperature": 0})
        for i in range(20)
    ]  # fmt: skip
    completions[7]["body"]["prompt"] = ""  # a bad request: it fails alone
    chats = [
        request(f"c{i}", {"model": "tiny", "messages": [{"role": "user", "content": f"Say {i}."}],
                          "max_completion_tokens": 3, "temperature": 0}, CHAT)
        for i in range(5)
    ]  # fmt: skip
    upload = alice.files.create(file=("questions.jsonl", jsonl(completions)), purpose="batch")
    assert (upload.object, upload.purpose, upload.filename, upload.bytes) == (
        "file", "batch", "questions.jsonl", len(jsonl(completions))
    )  # fmt: skip
    assert alice.files.retrieve(upload.id).bytes == upload.bytes
    assert alice.files.content(upload.id).content == jsonl(completions)
    chat_upload = alice.files.create(file=("chats.jsonl", jsonl(chats)), purpose="batch")

    batch = alice.batches.create(
        input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h", metadata={"run": "nightly"}
    )
    chat_batch = alice.batches.create(input_file_id=chat_upload.id, endpoint=CHAT, completion_window="24h")
    assert batch.id.startswith("batch_") and batch.input_file_id == upload.id and batch.endpoint == COMPLETIONS
    assert batch.request_counts is not None and batch.request_counts.total == 20
    assert batch.metadata == {"run": "nightly"} and batch.model == "tiny"

    done = wait_ended(alice, batch.id)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (20, 19, 1)
    assert done.completed_at is not None and done.in_progress_at is not None
    assert batch.expires_at is None and done.expired_at is None  # a batch on MLOC runs until it ends
    assert done.usage is not None and done.usage.output_tokens == sum(2 + i % 3 for i in range(20) if i != 7)
    output = lines_of(alice, done.output_file_id)
    assert [line["custom_id"] for line in output] == [r["custom_id"] for i, r in enumerate(completions) if i != 7]
    # Its task knows how many requests it holds: its one chunk is cut to them (and its log says so),
    # not to a chunk's full size.
    task = admin.task(done.id.removeprefix("batch_"))
    assert len(task["children"]) == 1
    window = admin.task(task["children"][0])["spec"]["spec"]["inference"]["input"]
    assert (window.get("skip_rows", 0), window["max_rows"]) == (0, 20), window
    for line in output:
        asked = completions[int(line["custom_id"][1:])]["body"]
        body = line["response"]["body"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert body["object"] == "text_completion" and body["model"] == "tiny"
        assert isinstance(body["choices"][0]["text"], str)
        usage = body["usage"]
        assert usage["completion_tokens"] == asked["max_tokens"] and usage["prompt_tokens"] > 0
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    errors = lines_of(alice, done.error_file_id)
    assert [line["custom_id"] for line in errors] == ["q07"]
    assert errors[0]["response"]["status_code"] == 400
    failed = errors[0]["response"]["body"]["error"]
    assert (failed["message"], failed["param"]) == ("body.prompt is empty", "body.prompt")
    assert alice.files.retrieve(done.output_file_id).bytes == len(alice.files.content(done.output_file_id).content)

    chat_done = wait_ended(alice, chat_batch.id)
    assert chat_done.status == "completed" and chat_done.error_file_id is None, chat_done
    chat_lines = lines_of(alice, chat_done.output_file_id)
    assert [line["custom_id"] for line in chat_lines] == [f"c{i}" for i in range(5)]
    for line in chat_lines:
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] <= 3

    # The batches have ended: their output and error files are alice's files, listed beside her uploads.
    outputs = {f.id: f for f in alice.files.list(purpose="batch_output")}
    assert set(outputs) == {done.output_file_id, done.error_file_id, chat_done.output_file_id}
    listed = outputs[done.output_file_id or ""]
    assert (listed.purpose, listed.filename, listed.status, listed.created_at) == (
        "batch_output", f"{batch.id}_output.jsonl", "processed", done.completed_at
    )  # fmt: skip
    assert listed.bytes == len(alice.files.content(listed.id).content)
    assert alice.files.retrieve(listed.id) == listed
    errors_file = outputs[done.error_file_id or ""]
    assert errors_file.filename == f"{batch.id}_error.jsonl"
    assert errors_file.bytes == len(alice.files.content(errors_file.id).content)
    everything = [f.id for f in alice.files.list()]
    assert set(everything) == {upload.id, chat_upload.id, *outputs}
    assert everything.index(chat_done.output_file_id or "") < everything.index(chat_upload.id)  # newest first
    assert bob.files.list().data == []

    # Listing: the caller's own, newest first, a page at a time.
    assert [b.id for b in alice.batches.list()] == [chat_batch.id, batch.id]
    first_page = alice.batches.list(limit=1)
    assert [b.id for b in first_page.data] == [chat_batch.id] and first_page.has_more
    assert [b.id for b in alice.batches.list(limit=1, after=chat_batch.id).data] == [batch.id]
    assert list(bob.batches.list()) == []

    # Usage went to alice, the batches' owner.
    stats = admin.http.get("/api/v1/stats", params={"user": "alice"}).json()["users"][0]["totals"]
    expected_tokens = sum(2 + i % 3 for i in range(20) if i != 7)
    assert stats["completion_tokens"] >= expected_tokens

    # A bad input file is taken, as at OpenAI, and makes a batch that failed validation: each line's problem
    # is an entry of its errors, with the line, the field and the fix. No task is made, no rows are kept.
    files_dir = tmp_path / "results" / "files"
    failed_ids: list[str] = []

    def failed_with(lines: list[dict[str, Any]]) -> list[tuple[int | None, str | None, str | None, str]]:
        bad = alice.files.create(file=("bad.jsonl", jsonl(lines)), purpose="batch")
        created = alice.batches.create(
            input_file_id=bad.id, endpoint=COMPLETIONS, completion_window="24h", metadata={"run": "bad"}
        )
        assert created.status == "failed" and created.failed_at is not None and created.in_progress_at is None
        assert (created.output_file_id, created.error_file_id, created.metadata) == (None, None, {"run": "bad"})
        assert created.request_counts is not None and created.request_counts.total == 0
        assert alice.batches.retrieve(created.id) == created
        assert not (files_dir / f"{bad.id}.rows.jsonl").exists()
        with pytest.raises(ApiError) as no_task:
            admin.task(created.id.removeprefix("batch_"))
        assert no_task.value.status_code == 404
        failed_ids.append(created.id)
        assert created.errors is not None and created.errors.data is not None
        return [(e.line, e.code, e.param, e.message or "") for e in created.errors.data]

    twice = [completions[0], completions[1], completions[0]]
    assert failed_with(twice) == [
        (3, "duplicate_custom_id", "custom_id",
         "line 3: custom_id 'q00' is also the custom_id of line 1; give each line its own custom_id"),
    ]  # fmt: skip
    mixed = [completions[0], request("x", {"model": "gpt-4o", "prompt": "hi"})]
    ((number, code, param, message),) = failed_with(mixed)
    assert (number, code, param) == (2, "model_mismatch", "body.model")
    assert message.startswith("line 2: body.model is 'gpt-4o' but line 1 has 'tiny'; a batch runs one model")
    escape = [request("m", {"model": "../escape", "prompt": "hi"})]
    ((number, code, param, message),) = failed_with(escape)
    assert (number, code, param) == (1, "model_not_found", "body.model")
    assert message.startswith("line 1: body.model '../escape' cannot be run: ") and "MLOC_OPENAI_MODELS" in message
    elsewhere = [request("e", {"model": "tiny", "input": "hi"}, url="/v1/embeddings")]
    ((number, code, param, message),) = failed_with(elsewhere)
    assert (number, code, param) == (1, "invalid_url", "url")
    assert "/v1/chat/completions and /v1/completions" in message
    # Every problem at once, in line order: one new file fixes them all.
    several = [
        request("x", {"prompt": "no model"}),
        request("y", {"model": "tiny", "prompt": "fine"}),
        request("y", {"model": "tiny", "prompt": "twice"}, url=CHAT),
    ]
    assert [entry[:3] for entry in failed_with(several)] == [
        (1, "missing_required_parameter", "body.model"),
        (3, "duplicate_custom_id", "custom_id"),
    ]
    with pytest.raises(openai.ConflictError) as ended:
        alice.batches.cancel(failed_ids[0])
    assert f"batch {failed_ids[0]} is failed (its input file did not pass validation)" in ended.value.message
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(failed_ids[0])
    assert [b.id for b in alice.batches.list(limit=len(failed_ids)).data] == failed_ids[::-1]
    with pytest.raises(openai.BadRequestError) as caught:
        alice.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert "is not one MLOC's batches serve" in caught.value.message
    assert caught.value.code == "bad_request" and caught.value.param == "endpoint"
    with pytest.raises(openai.BadRequestError) as caught:
        alice.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert "set purpose to 'batch'" in caught.value.message
    with pytest.raises(openai.APIStatusError) as too_large:
        alice.files.create(file=("big.jsonl", b"x" * (65 << 10)), purpose="batch")
    assert too_large.value.status_code == 413 and "MLOC_MAX_FILE_BYTES" in too_large.value.message
    assert "big.jsonl is 66560 bytes; the limit is 65536" in too_large.value.message
    # The limit is the file's: one of exactly that size goes, though the form around it is larger.
    row = json.dumps(completions[0]).encode() + b"\n"
    exact = row + b" " * ((64 << 10) - len(row) - 1) + b"\n"
    assert alice.files.create(file=("exact.jsonl", exact), purpose="batch").bytes == 64 << 10
    with pytest.raises(openai.NotFoundError) as missing:
        bob.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    assert f"input file {upload.id} not found" in missing.value.message
    with pytest.raises(openai.BadRequestError) as derived:
        alice.batches.create(input_file_id=done.output_file_id or "", endpoint=COMPLETIONS, completion_window="24h")
    assert "is a batch's output or error file; a batch reads an uploaded file" in derived.value.message
    for steal in (lambda: bob.files.content(upload.id), lambda: bob.files.content(done.output_file_id or ""),
                  lambda: bob.files.retrieve(done.output_file_id or ""),
                  lambda: bob.files.delete(done.output_file_id or ""),
                  lambda: bob.batches.retrieve(batch.id), lambda: bob.batches.cancel(batch.id)):  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            steal()
    assert [b.id for b in alice.batches.list()] == [*failed_ids[::-1], chat_batch.id, batch.id]

    # A user's task cannot read another user's batch rows by their path; the owner's can.
    rows = str(files_dir / f"{upload.id}.rows.jsonl")
    task = {"spec": {"taskType": "inference", "model": TINY, "inference": {"max_tokens": 2, "input": {"path": rows}}}}
    with pytest.raises(ApiError) as forbidden:
        client_for(cluster, tokens["bob"]).submit(task)
    assert (
        forbidden.value.status_code == 403
        and "not in the result folder of one of your tasks" in forbidden.value.message
    )
    assert client_for(cluster, tokens["alice"]).submit(task, dry_run=True)["ok"]

    # Errors on /v1 are in OpenAI's shape, with MLOC's status.
    answer = httpx.get(cluster.api_url + "/v1/batches/batch_nope", headers={"Authorization": f"Bearer {tokens['bob']}"})
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found" and "batch_nope" in answer.json()["error"]["message"]
    assert httpx.get(cluster.api_url + "/v1/batches").json()["error"]["code"] == "unauthorized"

    # Cancel: a finished batch cannot be; one that waits is cancelled at once.
    with pytest.raises(openai.ConflictError) as finished:
        alice.batches.cancel(batch.id)
    assert f"batch {batch.id} is completed; only a batch that has not ended can be cancelled" in finished.value.message
    cluster.stop_worker("local-1")
    waiting = alice.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    assert waiting.status == "validating" and waiting.output_file_id is None
    cancelled = alice.batches.cancel(waiting.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert cancelled.cancelling_at == cancelled.cancelled_at
    assert alice.batches.retrieve(waiting.id).status == "cancelled"


def test_an_uploaded_file_is_deleted_by_its_owner_once_no_batch_that_has_not_ended_reads_it(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    # No worker: a batch waits, which is a batch that has not ended.
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_OPENAI_MODELS": json.dumps({"tiny": TINY})})
    admin = client_for(cluster, ADMIN)
    tokens = {
        name: admin.http.post("/api/v1/admin/users", json={"name": name}).json()["token"] for name in ("alice", "bob")
    }
    alice = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=tokens["alice"], max_retries=0)
    bob = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=tokens["bob"], max_retries=0)
    files_dir = tmp_path / "results" / "files"
    lines = jsonl([request("a", {"model": "tiny", "prompt": "Hello", "max_tokens": 2})])

    plain = alice.files.create(file=("plain.jsonl", lines), purpose="batch")
    # Another user's file answers as one that does not exist, and stays.
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(plain.id)
    assert alice.files.retrieve(plain.id).id == plain.id
    deleted = alice.files.delete(plain.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (plain.id, "file", True)
    assert not (files_dir / plain.id).exists()
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(plain.id)
    with pytest.raises(openai.NotFoundError) as again:
        alice.files.delete(plain.id)
    assert again.value.code == "not_found" and plain.id in again.value.message and again.value.param == "file_id"
    with pytest.raises(openai.NotFoundError) as gone:
        alice.batches.create(input_file_id=plain.id, endpoint=COMPLETIONS, completion_window="24h")
    assert f"input file {plain.id} not found" in gone.value.message
    with pytest.raises(openai.NotFoundError):
        alice.files.delete("file-nope")

    used = alice.files.create(file=("used.jsonl", lines), purpose="batch")
    waiting = alice.batches.create(input_file_id=used.id, endpoint=COMPLETIONS, completion_window="24h")
    assert waiting.status == "validating"
    for caller in (alice, openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=ADMIN, max_retries=0)):
        with pytest.raises(openai.ConflictError) as held:
            caller.files.delete(used.id)
        assert held.value.code == "conflict" and held.value.param == "file_id"
        assert f"file {used.id} is the input of batch {waiting.id}, which has not ended" in held.value.message
        assert f"POST /v1/batches/{waiting.id}/cancel" in held.value.message
    assert (files_dir / used.id).is_file() and (files_dir / f"{used.id}.rows.jsonl").is_file()
    assert alice.files.content(used.id).content == lines

    # A batch's output file is deleted only once the batch has ended: until then its lines are being written.
    output_id = "file-" + waiting.id.removeprefix("batch_") + "-output"
    with pytest.raises(openai.ConflictError) as derived:
        alice.files.delete(output_id)
    assert f"file {output_id} is the output file of batch {waiting.id}, which has not ended" in derived.value.message
    assert f"POST /v1/batches/{waiting.id}/cancel" in derived.value.message
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(output_id)

    # Once the batch has ended, the file goes with its rows; the batch stays. It answered no request, so
    # it has no output file to delete.
    assert alice.batches.cancel(waiting.id).status == "cancelled"
    with pytest.raises(openai.NotFoundError) as none:
        alice.files.delete(output_id)
    assert f"no request was answered in batch {waiting.id}, so it has no output file" in none.value.message
    assert alice.files.list(purpose="batch_output").data == []
    assert alice.files.delete(used.id).deleted
    assert not (files_dir / used.id).exists() and not (files_dir / f"{used.id}.rows.jsonl").exists()
    assert alice.batches.retrieve(waiting.id).input_file_id == used.id
    # Its unfinished requests have nothing left to read: a resume is refused, and the batch stays as it was.
    task_id = waiting.id.removeprefix("batch_")
    with pytest.raises(MlocError, match=f"reads the uploaded file {used.id}, which has been deleted"):
        admin.resume(task_id)
    assert alice.batches.retrieve(waiting.id).status == "cancelled"


def test_a_file_a_batch_is_being_made_from_is_not_deleted_under_it(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        files = FileStore(client, tmp_path)
        try:
            await run(files)
        finally:
            await client.aclose()

    async def nothing_runs(task_ids: list[str]) -> list[str]:
        return []

    async def run(files: FileStore) -> None:
        stored = await files.save(io.BytesIO(b"{}\n"), filename="a.jsonl", purpose="batch", owner="alice")
        claim = await files.claim(stored.id)
        assert claim is not None
        held = await files.delete(stored.id, nothing_runs)
        assert (held.deleted, held.in_use) == (False, [])
        await files.used_by(stored.id, claim, "task-1")
        asked: list[list[str]] = []

        async def task_1_runs(task_ids: list[str]) -> list[str]:
            asked.append(task_ids)
            return ["task-1"]

        assert (await files.delete(stored.id, task_1_runs)).in_use == ["task-1"] and asked == [["task-1"]]

        # A batch made from the file while the delete looks (here: while it asks about the tasks) wins.
        raced: list[str | None] = []

        async def a_batch_is_made_meanwhile(task_ids: list[str]) -> list[str]:
            if not raced:
                raced.append(await files.claim(stored.id))
            return []

        assert (await files.delete(stored.id, a_batch_is_made_meanwhile)).in_use == []
        assert raced[0] is not None and files.path(stored.id).is_file()
        await files.release(stored.id, raced[0])
        done = await files.delete(stored.id, nothing_runs)
        assert done.deleted and done.file == stored and not files.path(stored.id).exists()
        assert await files.claim(stored.id) is None and await files.get(stored.id) is None

        # A claim left by a batch create that died holds a delete back only for CLAIM_SEC.
        other = await files.save(io.BytesIO(b"{}\n"), filename="b.jsonl", purpose="batch", owner="alice")
        assert await files.claim(other.id) is not None
        assert not (await files.delete(other.id, nothing_runs)).deleted
        monkeypatch.setattr(openai_files, "CLAIM_SEC", 0)
        assert (await files.delete(other.id, nothing_runs)).deleted

    asyncio.run(scenario())


@pytest.mark.extra("inference")
def test_with_an_artifact_store_a_batch_runs_on_a_worker_that_cannot_see_the_orchestrators_disk(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = {"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_OPENAI_MODELS": json.dumps({"tiny": TINY}),
           "MLOC_ARTIFACT_STORE": f"file://{store}"}  # fmt: skip
    cluster = make_cluster(0, env=env)  # no worker yet: the batch waits
    admin = client_for(cluster, ADMIN)
    tokens = {
        name: admin.http.post("/api/v1/admin/users", json={"name": name}).json()["token"] for name in ("alice", "bob")
    }
    alice = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=tokens["alice"], max_retries=0)
    lines = [
        request(f"r{i}", {"model": "tiny", "prompt": f"Say {i}:", "max_tokens": 2, "temperature": 0}) for i in range(3)
    ]
    upload = alice.files.create(file=("rows.jsonl", jsonl(lines)), purpose="batch")
    batch = alice.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    rows_url = f"file://{store}/files/{upload.id}.rows.jsonl"
    assert (store / "files" / f"{upload.id}.rows.jsonl").is_file()
    task_id = batch.id.removeprefix("batch_")
    assert rows_url in json.dumps(admin.task(task_id))
    # The orchestrator's own copy is on a disk the worker does not share.
    (tmp_path / "results" / "files" / f"{upload.id}.rows.jsonl").unlink()

    # Another user's task may not read it from the store.
    bob = client_for(cluster, tokens["bob"])
    spec = {"taskType": "inference", "model": TINY, "inference": {"input": {"path": rows_url}}}
    with pytest.raises(ApiError) as refused:
        bob.submit({"spec": spec})
    assert refused.value.status_code == 403 and "is in the artifact store" in str(refused.value)

    cluster.add_worker("elsewhere", {"RESULTS_DIR": str(tmp_path / "worker-results")})
    done = wait_ended(alice, batch.id)
    assert done.status == "completed", done
    assert [line["custom_id"] for line in lines_of(alice, done.output_file_id)] == ["r0", "r1", "r2"]
    # Deleting the upload takes the store's copy too.
    assert alice.files.delete(upload.id).deleted
    assert not (store / "files" / f"{upload.id}.rows.jsonl").exists()


def test_a_packaged_model_is_served_by_its_name_with_nothing_configured() -> None:
    from mloc.api.openai_batch import _model_section

    gemma = converted([request("a", {"model": "gemma3-270m", "prompt": "x"})])[0]
    assert _model_section({}, gemma, "file-x") == {"source": {"type": "package", "identifier": "gemma3-270m"}}
    # What the operator configured under that name wins.
    assert _model_section({"gemma3-270m": TINY}, gemma, "file-x") == TINY
    hub = converted([request("a", {"model": "Qwen/Qwen2.5-0.5B", "prompt": "x"})])[0]
    assert _model_section({}, hub, "file-x") == {"source": {"type": "huggingface", "identifier": "Qwen/Qwen2.5-0.5B"}}
    # With models configured, a bare name of none of them is refused, naming the packaged ones too.
    other = converted([request("a", {"model": "gpt-4o-mini", "prompt": "x"})])[0]
    with pytest.raises(BadRequest, match="name one of 'tiny', 'gemma3-270m', 'mloc-tiny-llama', or a Hugging Face"):
        _model_section({"tiny": TINY}, other, "file-x")


@pytest.mark.extra("inference")
def test_a_running_batch_cancelled_is_cancelling_until_its_chunk_has_stopped(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    import time

    cluster = make_cluster(1, env={"MLOC_OPENAI_MODELS": json.dumps({"tiny": TINY})})
    client = openai.OpenAI(base_url=cluster.api_url + "/v1", api_key="unused", max_retries=0)
    lines = [
        request(f"q{i}", {"model": "tiny", "prompt": f"Count to {i}:", "max_tokens": 16, "temperature": 0})
        for i in range(3000)
    ]
    upload = client.files.create(file=("many.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    deadline = time.monotonic() + 120
    while client.batches.retrieve(batch.id).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1)  # generating now: a cancel stops it after the request batch it is in
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status == "cancelling", cancelled
    assert cancelled.cancelling_at is not None and cancelled.cancelled_at is None
    ended = wait_ended(client, batch.id, timeout=60)
    assert ended.status == "cancelled" and ended.cancelling_at == cancelled.cancelling_at, ended
    assert ended.cancelled_at is not None and ended.cancelled_at >= ended.cancelling_at


def test_a_chat_reply_is_the_assistants_text_without_the_space_after_a_plain_cue() -> None:
    from mloc.openai_lines import CHAT, BatchOutput, response_line

    batch = BatchOutput(key="k", endpoint=CHAT, model="gemma3-270m", created=0)
    line = {"id": "c0", "output": " Blue.", "finish_reason": "stop", "prompt_tokens": 9, "completion_tokens": 2}
    body = response_line(line, 0, batch)["response"]["body"]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Blue."}
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
