"""The mloc/v1 task spec: the seeds' examples, fragments, quantities and the errors people see."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jsonschema
import pytest
import yaml

from mloc.errors import PayloadTooLarge, SpecError
from mloc.spec import Document, json_schema, load, validate
from mloc.spec.echo import EchoSpec
from mloc.spec.inference import InferenceSpec
from mloc.spec.loader import MAX_DEPTH, parse_stream
from mloc.spec.quantity import format_memory, parse_cpu, parse_memory, readable_memory

SEED1 = """
apiVersion: mloc/v1
kind: InferenceTask
metadata:
  name: mistral-7b-infer
  owner: alice
spec:
  taskType: "inference"
  resources:
    replicas: 1
    hardware:
      cpu: "8"
      memory: "32Gi"
      gpu:
        type: "any"
        count: 1
  model:
    source:
      type: "huggingface"
      identifier: "mistralai/Mistral-7B-Instruct-v0.1"
    vllm:
      tensor_parallel_size: 1
      gpu_memory_utilization: 0.9
  inference:
    max_tokens: 128
    temperature: 0.7
    prompts:
      - "Explain quantum computing in simple terms."
      - "Write a Python function to sort a list."
"""

REPO = Path(__file__).resolve().parents[2]


def test_seed_one_inference_example_validates() -> None:
    doc = load(SEED1)
    assert doc.kind == "InferenceTask"
    assert doc.metadata.owner == "alice"
    hw = doc.spec.resources.hardware
    assert (hw.cpu, hw.memory, hw.gpu.count) == (8000, 32 * 1024**3, 1)
    assert doc.spec.model.vllm.gpu_memory_utilization == 0.9  # type: ignore[attr-defined]
    assert doc.spec.effective_topic == "tasks.inference"


def test_wire_form_round_trips() -> None:
    doc = load(SEED1)
    again = load(json.dumps(doc.to_wire()), "application/json")
    assert again.to_wire() == doc.to_wire()
    assert doc.to_wire()["spec"]["resources"]["hardware"]["memory"] == "32Gi"


def test_a_model_source_written_as_a_string_is_its_identifier() -> None:
    written = SEED1.replace(
        'source:\n      type: "huggingface"\n      identifier: "mistralai/Mistral-7B-Instruct-v0.1"',
        "source: mistralai/Mistral-7B-Instruct-v0.1",
    )
    assert written != SEED1
    assert load(written).to_wire() == load(SEED1).to_wire()
    url = load(written.replace("mistralai/Mistral-7B-Instruct-v0.1", "https://example.com/m.gguf"))
    assert url.spec.model.source.type == "url"  # type: ignore[attr-defined]
    with pytest.raises(SpecError, match=r"model\.source needs .identifier."):
        load(written.replace("mistralai/Mistral-7B-Instruct-v0.1", "''"))
    # The published schema takes what the validator takes, so an editor does not flag the short form.
    as_written = yaml.safe_load(written)
    assert as_written["spec"]["model"]["source"] == "mistralai/Mistral-7B-Instruct-v0.1"
    jsonschema.validate(as_written, json_schema())
    as_written["spec"]["model"]["source"] = ""
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(as_written, json_schema())


def test_a_packaged_model_is_named_by_any_of_its_names_and_another_is_refused_at_submit() -> None:
    packaged = 'source:\n      type: "package"\n      identifier: "{}"'
    original = 'source:\n      type: "huggingface"\n      identifier: "mistralai/Mistral-7B-Instruct-v0.1"'
    for name in ("gemma3-270m", "Gemma-3-270M", "mloc-tiny-llama"):
        load(SEED1.replace(original, packaged.format(name)))
    with pytest.raises(SpecError) as refused:
        load(SEED1.replace(original, packaged.format("gemma3-27b")))
    assert (
        "source.identifier 'gemma3-27b' is not a packaged model; source type package takes one of "
        "gemma3-270m, mloc-tiny-llama (a Hugging Face id takes source.type huggingface)"
    ) in str(refused.value)


def test_seed_two_sft_fragment_is_accepted_and_names_what_is_missing() -> None:
    fragment = """
taskType: "sft"
model:
  source:
    type: "huggingface"
    identifier: "mistralai/Mistral-7B-Instruct-v0.1"
  adapter:
    type: "qlora"
    r: 16
    lora_alpha: 32
"""
    with pytest.raises(SpecError) as err:
        load(fragment)
    paths = [d["path"] for d in err.value.details]
    assert paths == ["spec.dataset"]
    doc = load(fragment + "dataset:\n  examples: [{prompt: hi, completion: there}]\n")
    assert doc.kind == "SFTTask" and doc.spec.model.adapter.type == "qlora"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "fragment",
    [
        'taskType: "rag_inference"\nhyperparameters:\n  embedding_model: "sentence-transformers/all-MiniLM-L6-v2"\n'
        '  vector_db: "chromadb"\n  retrieval_k: 5\nquestions: ["What is MLOC?"]\n'
        'documents: [{text: "MLOC is a control plane."}]\n',
        'taskType: "agent_inference"\nhyperparameters:\n  agent_type: "react"\n  tools: ["python_repl", "web_search"]\n'
        'input: "What is 2+2?"\n',
    ],
)
def test_seed_two_rag_and_agent_fragments(fragment: str) -> None:
    assert load(fragment).spec.task_type in ("rag_inference", "agent_inference")


def test_ppo_fragment_names_the_model_it_needs() -> None:
    with pytest.raises(SpecError) as err:
        load(
            'taskType: "ppo"\nhyperparameters:\n  reward_model: "OpenAssistant/reward-model-deberta-v3-large-v2"\n'
            "  ppo_epochs: 4\n  target_kl: 0.1\n"
        )
    assert {d["path"] for d in err.value.details} == {"spec.model", "spec.dataset"}


def test_typo_gets_a_did_you_mean() -> None:
    with pytest.raises(SpecError) as err:
        load("taskType: inference\ninference:\n  max_token: 5\n  prompts: [hi]\n")
    detail = err.value.details[0]
    assert detail["path"] == "spec.inference.max_token"
    assert "max_tokens" in detail["fix"]
    assert "spec.inference.max_token" in err.value.message


def test_unknown_task_type_suggests_the_closest() -> None:
    with pytest.raises(SpecError, match="did you mean 'inference'"):
        load("taskType: inferense\n")


def test_kind_must_match_task_type() -> None:
    with pytest.raises(SpecError, match="use kind 'InferenceTask'"):
        load("apiVersion: mloc/v1\nkind: SFTTask\nspec:\n  taskType: inference\n  inference: {prompts: [a]}\n")


def test_kind_alone_implies_task_type() -> None:
    doc = load("apiVersion: mloc/v1\nkind: EchoTask\nspec: {payload: 1}\n")
    assert doc.spec.task_type == "echo"


def test_wrong_api_version() -> None:
    with pytest.raises(SpecError, match="apiVersion 'mloc/v2' is not supported"):
        load("apiVersion: mloc/v2\nspec: {taskType: echo}\n")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("taskType: echo\nresources: {hardware: {cpu: -1}}\n", "negative"),
        ("taskType: echo\nresources: {hardware: {memory: 10Xi}}\n", "not a quantity"),
        ("taskType: echo\nresources: {hardware: {memory: 5Pi}}\n", "more than 1Pi"),
        ("taskType: echo\nresources: {hardware: {gpu: {count: 1000}}}\n", "spec.resources.hardware.gpu.count"),
        ("taskType: echo\nresources: {replicas: 0}\n", "spec.resources.replicas"),
        ("taskType: echo\nresources: {replicas: 2}\n", "resources.replicas > 1 is supported for inference tasks"),
        ("taskType: inference\ninference: {prompts: []}\n", "no input"),
        ("taskType: inference\ninference: {prompts: ['  ']}\n", "prompt 0 is empty"),
        ("taskType: echo\nmetadata: {name: ../../etc/passwd}\n", "metadata.name"),
        ("taskType: echo\nmetadata: {owner: 'a/b'}\n", "metadata.owner"),
        ("taskType: echo\ntopic: '../x'\n", "spec.topic"),
        ("taskType: inference\ninference: {prompts: [a], max_tokens: '12abc'}\n", "spec.inference.max_tokens"),
    ],
)
def test_bad_values_name_the_field(body: str, needle: str) -> None:
    with pytest.raises(SpecError) as err:
        load(body)
    assert needle in err.value.message


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("spec: [unclosed\n", "invalid YAML at line"),
        ('{"spec": }', "invalid JSON at line 1"),
        ("", "empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("just a string", "must be a mapping"),
    ],
)
def test_malformed_documents(body: str, needle: str) -> None:
    with pytest.raises(SpecError, match=needle):
        load(body)


def test_yaml_bomb_is_refused_before_expansion() -> None:
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
    bomb += "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    with pytest.raises(SpecError, match="aliases are not allowed"):
        load(bomb)


def test_oversized_body() -> None:
    with pytest.raises(PayloadTooLarge):
        load("taskType: echo\npayload: '" + "x" * 2_000_000 + "'\n")


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(SpecError, match="deeper than"):
        load("taskType: echo\npayload: " + "[" * 100 + "]" * 100 + "\n")


def _echo(document: Document) -> EchoSpec:
    assert isinstance(document.spec, EchoSpec), document.spec
    return document.spec


def test_yaml_sent_with_json_content_type_is_read_as_yaml() -> None:
    assert load("taskType: echo\n", "application/json").spec.task_type == "echo"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [("{taskType: echo, payload: hi}\n", None), ("{taskType: echo, payload: hi}\n", "application/json")],
)
def test_yaml_flow_style_is_yaml_though_it_starts_as_json_does(body: str, content_type: str | None) -> None:
    assert _echo(load(body, content_type)).payload == "hi"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"taskType": "echo", "payload": NaN}', "NaN is not a JSON number"),
        ('{"taskType": "echo", "payload": [-Infinity]}', "-Infinity is not a JSON number"),
        ('{"taskType": "echo", "payload": {"x": 1e999}}', "payload.x: inf is not a finite number"),
        ("taskType: echo\npayload: .nan\n", "payload: nan is not a finite number"),
        ("spec: {taskType: echo, payload: {a: [1, .inf]}}\n", "spec.payload.a.1: inf is not a finite number"),
    ],
)
def test_numbers_json_cannot_hold_are_refused_where_they_are(body: str, needle: str) -> None:
    # Stored, NaN and infinities would come back as null: the task's data changed without a word.
    with pytest.raises(SpecError, match=re.escape(needle)):
        load(body)


def test_empty_documents_are_skipped_and_several_are_sent_to_the_bulk_endpoint() -> None:
    assert _echo(load("taskType: echo\npayload: 1\n---\n")).payload == 1
    assert load("---\ntaskType: echo\n---\n---\n").spec.task_type == "echo"
    with pytest.raises(SpecError, match="holds only comments"):
        load("# nothing here\n")
    with pytest.raises(SpecError, match=r"2 YAML documents .* POST /api/v1/tasks/bulk"):
        load("taskType: echo\n---\ntaskType: echo\n")


@pytest.mark.parametrize(("text", "milli"), [("8", 8000), ("500m", 500), (0.5, 500), (2, 2000), ("1.5", 1500)])
def test_cpu_quantities(text: object, milli: int) -> None:
    assert parse_cpu(text) == milli


@pytest.mark.parametrize(
    ("text", "size"),
    [("32Gi", 32 * 1024**3), ("512Mi", 512 * 1024**2), ("1G", 10**9), (1024, 1024), ("1.5Gi", 1610612736)],
)
def test_memory_quantities(text: object, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize(
    ("parse", "value", "needle"),
    [
        (parse_cpu, float("inf"), "cpu inf is not a finite quantity; write cores such as '8', '0.5' or '500m'"),
        (parse_cpu, float("nan"), "cpu nan is not a finite quantity"),
        (parse_cpu, 10**400, "more than 100000 cores"),
        (parse_cpu, "1" * 400, "more than 100000 cores"),
        (parse_memory, float("inf"), "memory inf is not a finite quantity; write bytes with a unit such as '32Gi'"),
        (parse_memory, float("-inf"), "memory -inf is not a finite quantity"),
        (parse_memory, 10**400, "more than 1Pi"),
        (parse_memory, "1" * 400 + "Gi", "more than 1Pi"),
    ],
)
def test_quantities_no_machine_has_are_refused_with_the_forms_to_write(
    parse: Callable[[object], int], value: object, needle: str
) -> None:
    # Infinity and numbers past a float once crashed the rounding (OverflowError: a 500, a traceback).
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse(value)


def test_a_cpu_too_large_for_a_float_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as err:
        load("taskType: echo\nresources: {hardware: {cpu: 1" + "0" * 400 + "}}\n")
    assert "spec.resources.hardware.cpu" in err.value.message and "check the unit" in err.value.message


def test_json_schema_covers_every_task_type_and_validates_the_seed() -> None:
    schema = json_schema()
    assert len(schema["oneOf"]) >= 8
    jsonschema.validate(load(SEED1).to_wire(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"apiVersion": "mloc/v1", "kind": "InferenceTask", "spec": {"taskType": "nope"}}, schema)


def test_every_shipped_template_and_config_validates() -> None:
    files = sorted([*REPO.glob("templates/*.yaml"), *REPO.glob("configs/*.yaml")])
    assert files, "templates/ and configs/ ship example tasks"
    for file in files:
        raw = file.read_bytes()
        documents = [d for d in parse_stream(raw, limit=len(raw) + 1) if d is not None]
        if len(documents) == 1:
            load(raw)
        else:  # a pipeline: every step validates
            assert all(validate(document) for document in documents), file


def _task_nested(levels: int) -> dict[str, object]:
    """A task whose innermost value lies ``levels`` levels below the top of the document (the
    document and its spec take two of them)."""
    payload: object = 1
    for _ in range(levels - 2):
        payload = [payload]
    return {"spec": {"taskType": "echo", "payload": payload}}


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_refused() -> None:
    assert validate(_task_nested(MAX_DEPTH)).spec.task_type == "echo"
    with pytest.raises(SpecError, match="deeper than"):
        validate(_task_nested(MAX_DEPTH + 1))


def test_json_schema_accepts_every_shipped_template_and_config() -> None:
    # Editors check files against `mloc schema`: a template the validator takes must pass it too,
    # short names (batch_size, epochs, max_seq_length) included.
    checker = jsonschema.Draft202012Validator(json_schema())
    files = sorted([*REPO.glob("templates/**/*.yaml"), *REPO.glob("configs/**/*.yaml")])
    assert any(file.parent.name == "cpu" for file in files), "templates/cpu/ ships training templates"
    for file in files:
        raw = file.read_bytes()
        for number, document in enumerate(d for d in parse_stream(raw, limit=len(raw) + 1) if d is not None):
            problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in checker.iter_errors(document)]
            assert not problems, f"{file} (document {number + 1}): {problems}"


def _sft(hyperparameters: Mapping[str, object]) -> dict[str, object]:
    spec = {
        "taskType": "sft",
        "model": {"source": {"type": "package", "identifier": "mloc-tiny-llama"}},
        "dataset": {"examples": [{"prompt": "Q?", "completion": " A."}]},
        "hyperparameters": hyperparameters,
    }
    return {"apiVersion": "mloc/v1", "kind": "SFTTask", "spec": spec}


def test_json_schema_takes_a_fields_other_names_but_not_two_names_at_once() -> None:
    schema = json_schema()
    for hyperparameters in ({"batch_size": 2, "epochs": 1, "max_seq_length": 64}, {"per_device_train_batch_size": 2}):
        jsonschema.validate(_sft(hyperparameters), schema)
        validate(_sft(hyperparameters))
    # Both names at once, or a misspelt one: the validator refuses them, and so does the schema.
    for refused in ({"batch_size": 2, "per_device_train_batch_size": 4}, {"batch_sise": 2}):
        with pytest.raises(SpecError):
            validate(_sft(refused))
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(_sft(refused), schema)


@pytest.mark.parametrize("tag", ["", "  ", " eu", "eu ", "a100,eu"])
def test_a_tag_no_worker_could_carry_is_refused(tag: str) -> None:
    """WORKER_TAGS is split on commas and trimmed: such a tag would hold its task for ever."""
    with pytest.raises(SpecError) as refused:
        validate({"taskType": "echo", "resources": {"tags": ["gpu", tag]}})
    assert refused.value.details[0]["path"] == "spec.resources.tags"
    assert "cannot be carried by a worker" in refused.value.message


def test_tags_with_inner_spaces_and_any_case_are_kept() -> None:
    document = validate({"taskType": "echo", "resources": {"tags": ["eu west", "A100-Pool"]}})
    assert document.spec.resources.tags == ["eu west", "A100-Pool"]


def test_memory_reads_in_the_largest_unit_it_fills_for_a_person_and_exactly_for_a_spec() -> None:
    assert readable_memory(24683784 * 1024) == "23.5Gi"
    assert readable_memory(1 << 40) == "1Ti"
    assert readable_memory(1536 * 1024) == "1.5Mi"
    assert readable_memory(512) == "512B"
    # A spec's memory goes back to the orchestrator as written: exact, whatever it reads like.
    assert format_memory(24683784 * 1024) == "24683784Ki"
    assert parse_memory(format_memory(24683784 * 1024)) == 24683784 * 1024


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("s3:/mybucket/ds/data.jsonl", "is not a URL: it starts 's3:/'; write 's3://mybucket/ds/data.jsonl'"),
        ("S3:bucket/rows.csv", "is not a URL: it starts 's3:'; write 's3://bucket/rows.csv'"),
        ("https:/host/rows.csv", "is not a URL: it starts 'https:/'; write 'https://host/rows.csv'"),
        ("s3:///rows.jsonl", "names no bucket or host after 's3://'; write 's3://BUCKET/rows.jsonl'"),
    ],
)
def test_a_mistyped_dataset_url_is_refused_at_submit_with_the_url_it_meant(path: str, said: str) -> None:
    spec = {"taskType": "inference", "model": {"source": "gemma3-270m"}, "inference": {"input": {"path": path}}}
    with pytest.raises(SpecError) as refused:
        validate({"spec": spec})
    assert said in str(refused.value), refused.value
    # Its fix stands apart too, for a client that shows the fix alone.
    assert refused.value.details == [
        {"path": "spec.inference.input", "message": f"inference.input.path {path!r} {said}", "fix": said.split("; ")[1]}
    ]


@pytest.mark.parametrize("path", ["s3://bucket/rows.jsonl", "/data/rows.jsonl", "C:/data/rows.jsonl", "v1:x/rows.csv"])
def test_dataset_paths_and_urls_that_are_fine(path: str) -> None:
    spec = {"taskType": "inference", "model": {"source": "gemma3-270m"}, "inference": {"input": {"path": path}}}
    validated = validate({"spec": spec}).spec
    assert isinstance(validated, InferenceSpec) and validated.inference.input is not None, validated
    assert validated.inference.input.path == path


@pytest.mark.parametrize(
    ("field", "value", "message", "fix"),
    [
        ("learning_rate", "fast", "expected a number, got the text 'fast'", "write a number, e.g. 0.0002 or 2e-4"),
        ("max_length", "two", "expected a whole number, got the text 'two'", "write a whole number, e.g. 8"),
        ("max_length", 1.5, "expected a whole number, got the number 1.5", "write a whole number, e.g. 8"),
    ],
)
def test_a_number_written_wrong_names_the_field_and_the_fix(field: str, value: object, message: str, fix: str) -> None:
    spec = {"taskType": "sft", "model": {"source": "mloc-tiny-llama"}, "dataset": {"path": "/d.jsonl"},
            "hyperparameters": {field: value}}  # fmt: skip
    with pytest.raises(SpecError) as refused:
        validate({"spec": spec})
    assert refused.value.details == [{"path": f"spec.hyperparameters.{field}", "message": message, "fix": fix}]


def test_a_tab_that_yaml_refuses_is_named_with_the_fix() -> None:
    with pytest.raises(SpecError) as refused:
        load("apiVersion: mloc/v1\nkind: InferenceTask\nspec:\n\ttaskType: inference\n")
    assert refused.value.message == (
        "invalid YAML at line 4, column 1: found character that cannot start any token; it is a tab, and YAML "
        "indents with spaces only: replace the tabs with spaces"
    )
    # A tab inside a value is text, and another mistake on a line with no tab says nothing of tabs.
    with pytest.raises(SpecError) as other:
        load("spec:\n  taskType: inference\n  inference: {prompts: [a\n")
    assert "tab" not in other.value.message


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[2] / "templates").rglob("*.yaml")), ids=lambda p: p.name
)
def test_every_template_validates_again_as_stored(path: Path) -> None:
    """The orchestrator stores a task's spec with every default filled in, and the worker validates that
    stored form again: it must pass, and mean the same."""
    for data in parse_stream(path.read_bytes(), limit=1 << 20):
        stored = validate(data).to_wire()
        assert validate(stored).to_wire() == stored


def test_a_key_given_twice_in_one_mapping_is_refused_naming_both_lines() -> None:
    text = (
        "apiVersion: mloc/v1\nkind: RAGTask\nspec:\n  taskType: rag_inference\n"
        "  hyperparameters: {collection: handbook, embedding_model: all-MiniLM-L6-v2}\n"
        "  hyperparameters: {collection: handbook}\n"
    )
    with pytest.raises(SpecError) as twice:
        load(text)
    assert twice.value.message == (
        "invalid YAML at line 6, column 3: the key 'hyperparameters' is given twice in one mapping (first at line 5); "
        "the later one would replace the first: keep one"
    )
    # Inside a flow mapping too, and with anchors about (the careful loader): each loader refuses it.
    with pytest.raises(SpecError, match=r"the key 'k' is given twice in one mapping \(first at line 2\)"):
        parse_stream(b"taskType: echo\npayload: {k: 1, k: 2}\n", limit=1 << 20)
    with pytest.raises(SpecError, match="the key 'taskType' is given twice"):
        parse_stream(b"taskType: echo\ntaskType: sft\nnote: '&*'\n", limit=1 << 20)
    # The same key in two mappings is no repeat.
    assert parse_stream(b"a: {k: 1}\nb: {k: 2}\n", limit=1 << 20) == [{"a": {"k": 1}, "b": {"k": 2}}]


@pytest.mark.parametrize(
    ("name", "fix"), [("my task", "e.g. 'my-task'"), ("задача-😀", "e.g. 'task-1'"), ("-x-", "e.g. 'x'")]
)
def test_a_name_outside_ascii_says_so_and_offers_one_that_fits(name: str, fix: str) -> None:
    with pytest.raises(SpecError) as refused:
        validate({"metadata": {"name": name}, "spec": {"taskType": "echo"}})
    [detail] = refused.value.details or []
    assert detail["path"] == "metadata.name" and detail["fix"] == fix
    assert detail["message"].startswith(f"name {name!r} must be 1-128 ASCII letters, digits, '.', '_' or '-'")
    assert validate({"metadata": {"name": fix[6:-1]}, "spec": {"taskType": "echo"}}).metadata.name == fix[6:-1]
