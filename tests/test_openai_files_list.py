"""GET /v1/files through the official `openai` client (the caller's uploads and, once their batch has
ended, its output and error files, in pages), batch file problems in OpenAI's shape (`param` a field or
null, `line` the line), a batch model that is not served failing the batch at validation, a batch's
`finalizing` while the orchestrator joins its lines, and the error entry of a batch whose part failed,
on a real cluster."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from mloc import keys
from mloc.api.openai_errors import openai_body
from mloc.client import Client
from mloc.localcluster import LocalCluster
from mloc.openai_lines import COMPLETIONS, Problem, convert
from tests.test_openai_batch import ADMIN, TINY, jsonl, lines_of, request, wait_ended


def users(cluster: LocalCluster, client_for: Callable[..., Client], *names: str) -> list[openai.OpenAI]:
    admin = client_for(cluster, ADMIN)
    tokens = [admin.http.post("/api/v1/admin/users", json={"name": name}).json()["token"] for name in names]
    return [openai.OpenAI(base_url=cluster.api_url + "/v1", api_key=token, max_retries=0) for token in tokens]


def first_problem(data: bytes) -> Problem:
    return convert(io.BytesIO(data), io.BytesIO(), endpoint=COMPLETIONS).problems[0]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (jsonl([request("a", {"model": "m", "prompt": "x"})]) + b"{not json\n", "line 2: the line is not JSON"),
        (b'\xef\xbb\xbf{"custom_id": "a"}\r\n', "line 1: the line starts with a byte order mark (BOM)"),
        (jsonl([request("a", {"model": "m", "prompt": "x"})]) + b"[1, 2]\n",
         "line 2: the line is a JSON array, not an object"),
        (b"caf\xe9\n", "line 1: the line is not UTF-8 text (byte 3)"),
    ],
    ids=["not-json", "bom", "array", "not-utf8"],
)  # fmt: skip
def test_a_problem_with_a_whole_line_has_no_param_and_names_the_line(data: bytes, message: str) -> None:
    problem = first_problem(data)
    assert message in problem.message and problem.code == "invalid_json_line"
    assert problem.param is None and problem.line == int(message.split(":")[0].removeprefix("line "))


def test_a_problem_with_a_field_names_it_and_its_line() -> None:
    problem = first_problem(jsonl([request("a", {"model": "m", "prompt": "x"}), request("b", {"prompt": "y"})]))
    assert (problem.param, problem.line, problem.code) == ("body.model", 2, "missing_required_parameter")
    # An error answer keeps OpenAI's four fields.
    plain = orjson.loads(openai_body(b'{"error": "not_found", "message": "no"}', 404))["error"]
    assert plain == {"message": "no", "type": "invalid_request_error", "param": None, "code": "not_found"}


def test_the_openai_client_lists_its_own_files_in_pages(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], redis_url: str
) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": ADMIN})
    alice, bob = users(cluster, client_for, "alice", "bob")
    lines = jsonl([request("a", {"model": "tiny", "prompt": "Hello"})])
    uploaded = []
    for index in range(5):
        uploaded.append(alice.files.create(file=(f"f{index}.jsonl", lines), purpose="batch").id)
        time.sleep(0.002)  # distinct upload times, so the order is the upload order
    theirs = bob.files.create(file=("bob.jsonl", lines), purpose="batch").id

    page = alice.files.list()
    assert [f.id for f in page.data] == uploaded[::-1] and page.has_more is False
    first = page.data[0]
    assert (first.object, first.filename, first.purpose, first.bytes, first.status) == (
        "file", "f4.jsonl", "batch", len(lines), "processed"
    )  # fmt: skip
    answer = httpx.get(
        cluster.api_url + "/v1/files", params={"limit": 2}, headers={"Authorization": f"Bearer {alice.api_key}"}
    )
    body = answer.json()
    assert (body["object"], body["first_id"], body["last_id"], body["has_more"]) == (
        "list", uploaded[4], uploaded[3], True
    )  # fmt: skip

    # The client follows the pages by the last id of each.
    assert [f.id for f in alice.files.list(limit=2)] == uploaded[::-1]
    assert [f.id for f in alice.files.list(limit=2, order="asc")] == uploaded
    second = alice.files.list(limit=2, order="asc", after=uploaded[1])
    assert [f.id for f in second.data] == uploaded[2:4] and second.has_more
    assert [f.id for f in alice.files.list(after=uploaded[0]).data] == []
    assert [f.id for f in alice.files.list(purpose="batch", limit=3)] == uploaded[::-1]
    assert alice.files.list(purpose="fine-tune").data == []

    # Each user sees their own only; another user's id is no cursor.
    assert [f.id for f in bob.files.list()] == [theirs]
    with pytest.raises(openai.BadRequestError) as foreign:
        alice.files.list(after=theirs)
    assert foreign.value.param == "after" and "is not one of your files" in foreign.value.message
    with pytest.raises(openai.UnprocessableEntityError) as sideways:
        alice.files.list(order="sideways")  # type: ignore[arg-type]
    assert sideways.value.param == "order"  # as OpenAI names its parameters
    with pytest.raises(openai.UnprocessableEntityError) as missing:
        alice.batches.create(input_file_id=None, endpoint=COMPLETIONS, completion_window="24h")  # type: ignore[arg-type]
    assert missing.value.param == "input_file_id"

    # A deleted file is no longer listed.
    assert alice.files.delete(uploaded[2]).deleted
    assert [f.id for f in alice.files.list()] == [uploaded[4], uploaded[3], uploaded[1], uploaded[0]]

    # Uploads stored before the listing existed (no owner index) are listed once the index is made.
    plain = redis.Redis.from_url(redis_url)
    try:
        plain.delete(keys.openai_files_of("alice"), keys.OPENAI_FILES_INDEXED)
        # Their times are whole seconds (created_at): within one second, the order is the ids'.
        assert sorted(f.id for f in alice.files.list(order="asc")) == sorted(uploaded[:2] + uploaded[3:])
        assert plain.exists(keys.OPENAI_FILES_INDEXED)
    finally:
        plain.close()


def test_a_batch_naming_a_model_that_is_not_served_fails_validation(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_OPENAI_MODELS": json.dumps({"tiny": TINY})})
    (alice,) = users(cluster, client_for, "alice")

    def create(model: str, *more: dict[str, Any]) -> Any:
        lines = [request("a", {"model": model, "prompt": "x"}), request("b", {"model": model, "prompt": "y"}), *more]
        upload = alice.files.create(file=("m.jsonl", b"\n" + jsonl(lines)), purpose="batch")
        return alice.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")

    failed = create("gpt-4o-mini")
    assert failed.status == "failed" and failed.model == "gpt-4o-mini", failed
    assert failed.errors is not None and failed.errors.data is not None
    (error,) = failed.errors.data
    assert (error.code, error.param, error.line) == ("model_not_found", "body.model", 2)
    assert error.message is not None
    assert error.message.startswith("line 2: body.model is 'gpt-4o-mini', which is not a model of this MLOC; ")
    assert "name one of 'tiny'" in error.message and "MLOC_OPENAI_MODELS" in error.message
    # Told with the file's other problems, in line order.
    also = create("gpt-4o-mini", request("a", {"model": "gpt-4o-mini", "prompt": "z"}))
    assert also.errors is not None and also.errors.data is not None
    assert [(e.line, e.code) for e in also.errors.data] == [(2, "model_not_found"), (4, "duplicate_custom_id")]
    # A configured name and a Hugging Face id (owner/name) are taken, as the README promises.
    assert create("tiny").status == "validating"
    assert create("mloc-tests/some-model").model == "mloc-tests/some-model"


def test_a_batch_whose_part_failed_says_which_requests_why_and_how_to_run_the_rest(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client]
) -> None:
    # The worker cannot reach the hub: a hub model it does not hold fails the batch's chunk on the worker.
    env = {"ORCHESTRATOR_TOKEN": ADMIN, "HF_HUB_OFFLINE": "1", "MLOC_OFFLINE": "1"}
    cluster = make_cluster(1, env=env)
    (alice,) = users(cluster, client_for, "alice")
    lines = [request(f"r{i}", {"model": "mloc-tests/no-such-model", "prompt": f"{i}"}) for i in range(3)]
    upload = alice.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
    batch = alice.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    done = wait_ended(alice, batch.id, timeout=120)
    assert done.status == "failed", done
    assert done.errors is not None and done.errors.data is not None
    (error,) = done.errors.data
    task_id = batch.id.removeprefix("batch_")
    assert error.message is not None and error.message.startswith(
        "requests 1-3 of the batch (in file order) could not run: "
    )
    assert f"POST /api/v1/tasks/{task_id}/resume" in error.message and f"`mloc resume {task_id}`" in error.message
    # None was answered: no output file is promised.
    assert "; no request was answered; once the cause is fixed, resume the batch with" in error.message
    assert "output file" not in error.message and done.output_file_id is None
    assert "chunk" not in error.message and error.code != "replica_failed"
    assert error.line is None and error.param is None


@pytest.mark.extra("inference")
def test_a_batch_finalizes_while_its_lines_are_joined_then_its_files_are_listed_until_deleted(
    make_cluster: Callable[..., LocalCluster], client_for: Callable[..., Client], tmp_path: Path
) -> None:
    cluster = make_cluster(0, env={"ORCHESTRATOR_TOKEN": ADMIN, "MLOC_OPENAI_MODELS": json.dumps({"tiny": TINY})})
    admin = client_for(cluster, ADMIN)
    alice, bob = users(cluster, client_for, "alice", "bob")
    lines = [
        request(f"r{i}", {"model": "tiny", "prompt": f"Say {i}:", "max_tokens": 2, "temperature": 0}) for i in range(3)
    ]
    lines[1]["body"]["prompt"] = ""  # fails alone, into the error file
    upload = alice.files.create(file=("r.jsonl", jsonl(lines)), purpose="batch")
    batch = alice.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    task_id = batch.id.removeprefix("batch_")
    # A file where the task's own result folder goes: the orchestrator cannot join its chunk's lines there, and
    # tries again at each sweep, as it would on a disk that is slow to take them.
    blocker = tmp_path / "results" / task_id
    blocker.write_text("")
    cluster.add_worker("local-1")
    deadline = time.monotonic() + 240
    while (seen := alice.batches.retrieve(batch.id)).status != "finalizing":
        assert seen.status in ("validating", "in_progress") and time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert seen.finalizing_at is not None and seen.in_progress_at is not None and seen.completed_at is None, seen
    assert seen.in_progress_at <= seen.finalizing_at
    counts = seen.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (3, 2, 1)
    # Every line is there to read. The files are listed once the batch has ended, and kept until then.
    assert [line["custom_id"] for line in lines_of(alice, seen.output_file_id)] == ["r0", "r2"]
    assert alice.files.list(purpose="batch_output").data == []
    with pytest.raises(openai.ConflictError) as kept:
        alice.files.delete(seen.error_file_id or "")
    assert "which has not ended: its lines are still being written" in kept.value.message

    blocker.unlink()
    done = wait_ended(alice, batch.id)
    assert done.status == "completed" and done.finalizing_at == seen.finalizing_at, done
    assert done.completed_at is not None and done.completed_at >= seen.finalizing_at
    output, errors = done.output_file_id or "", done.error_file_id or ""
    assert {f.id for f in alice.files.list(purpose="batch_output")} == {output, errors}
    assert [f.id for f in alice.files.list(purpose="batch")] == [upload.id]
    assert bob.files.list().data == []

    # Deleted as at OpenAI: no longer listed nor read, while the batch still names it. Its lines stay the
    # task's results.
    deleted = alice.files.delete(errors)
    assert (deleted.id, deleted.object, deleted.deleted) == (errors, "file", True)
    for gone in (lambda: alice.files.retrieve(errors), lambda: alice.files.content(errors),
                 lambda: alice.files.delete(errors)):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as caught:
            gone()
        assert f"file {errors} was deleted" in caught.value.message
    assert [f.id for f in alice.files.list()] == [output, upload.id]
    assert alice.batches.retrieve(batch.id).error_file_id == errors
    assert [line["custom_id"] for line in lines_of(alice, output)] == ["r0", "r2"]
    answer = httpx.get(
        f"{cluster.api_url}/api/v1/tasks/{task_id}/results", headers={"Authorization": f"Bearer {alice.api_key}"}
    )
    assert [json.loads(line)["id"] for line in answer.text.splitlines()] == ["r0", "r1", "r2"]

    # A batch that ended with no output file and is resumed has its files listed once it ends again.
    cluster.stop_worker("local-1")
    waiting = alice.batches.create(input_file_id=upload.id, endpoint=COMPLETIONS, completion_window="24h")
    assert alice.batches.cancel(waiting.id).status == "cancelled"
    assert {f.id for f in alice.files.list(purpose="batch_output")} == {output}
    admin.resume(waiting.id.removeprefix("batch_"))
    cluster.add_worker("local-2")
    again = wait_ended(alice, waiting.id)
    assert again.status == "completed" and again.output_file_id and again.error_file_id, again
    listed = {f.id: f for f in alice.files.list(purpose="batch_output")}
    assert set(listed) == {output, again.output_file_id, again.error_file_id}
    assert listed[again.output_file_id].bytes == len(alice.files.content(again.output_file_id).content)
