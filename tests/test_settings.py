"""Configuration from the environment: both seeds' names, precedence, and nothing read by accident."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mloc.connection import choose_redis
from mloc.settings import NodeType, Settings, describe_invalid


def test_first_seed_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "REDIS_URL": "redis://r:6379/0",
        "ORCHESTRATOR_TOKEN": "t",
        "HEARTBEAT_TTL_SEC": "60",
        "PORT": "9000",
        "LOG_LEVEL": "debug",
        "TASK_TOPICS": "tasks.inference, tasks.sft",
        "RESULTS_DIR": "/tmp/res",
        "HEARTBEAT_INTERVAL_SEC": "5",
        "WORKER_ID": "gpu-7",
        "WORKER_TAGS": "a100,eu",
        "VLLM_MODEL": "m",
    }.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert (s.redis_url, s.admin_token, s.heartbeat_ttl_sec, s.port, s.log_level) == (
        "redis://r:6379/0",
        "t",
        60,
        9000,
        "DEBUG",
    )
    assert s.topics == ["tasks.inference", "tasks.sft"] and s.tags == ["a100", "eu"]
    assert (s.results_dir, s.heartbeat_interval_sec, s.resolved_worker_id, s.vllm_model) == (
        Path("/tmp/res"),
        5,
        "gpu-7",
        "m",
    )


def test_second_seed_names_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    monkeypatch.setenv("MLOC_REDIS_URL", "redis://mloc:6379/0")
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("MLOC_PORT", "9100")
    monkeypatch.setenv("MLOC_NODE_TYPE", "orchestrator")
    monkeypatch.setenv("MLOC_HOST", "127.0.0.1")
    s = Settings()
    assert (s.redis_url, s.port, s.node_type, s.host) == (
        "redis://mloc:6379/0",
        9100,
        NodeType.ORCHESTRATOR,
        "127.0.0.1",
    )


def test_unrelated_variables_named_like_fields_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/somewhere/else")
    monkeypatch.setenv("HOST", "attacker.example")
    monkeypatch.setenv("TOKEN", "leak")
    s = Settings()
    assert s.host == "0.0.0.0" and s.token is None
    assert s.home.name == ".mloc" and s.home.parent != Path("/somewhere/else")


def test_executor_interpreters_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOC_EXECUTOR_PYTHON", "ppo=/opt/ppo/bin/python, grpo = /opt/g/bin/python")
    s = Settings()
    assert s.executor_pythons == {"ppo": "/opt/ppo/bin/python", "grpo": "/opt/g/bin/python"}
    assert s.topics == ["tasks.inference"] and s.heartbeat_ttl_sec == 120 and s.heartbeat_interval_sec == 30


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOC_PORT", "70000")
    with pytest.raises(ValueError, match="less than or equal to 65535"):
        Settings()


def test_the_requeue_budget_defaults_to_twenty_and_refuses_a_negative_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().max_requeues == 20
    monkeypatch.setenv("MLOC_MAX_REQUEUES", "-1")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert describe_invalid(refused.value).startswith("invalid setting MLOC_MAX_REQUEUES='-1': ")
    assert "greater than or equal to 0" in describe_invalid(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "fix"),
    [
        ("MLOC_MAX_REQUEUES", "abc", "give a whole number, e.g. MLOC_MAX_REQUEUES=20 (the default)"),
        ("HEARTBEAT_TTL_SEC", "2 minutes", "give a number, e.g. HEARTBEAT_TTL_SEC=120 (the default)"),
        ("MLOC_LOG_JSON", "maybe", "give true or false, e.g. MLOC_LOG_JSON=false (the default)"),
        ("MLOC_OFFLINE", "maybe", "give true or false"),
    ],
)
def test_a_value_of_the_wrong_kind_is_told_what_to_give_with_the_default(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, fix: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    said = describe_invalid(refused.value)
    assert said.startswith(f"invalid setting {variable}={value!r}: ") and said.endswith(f"; {fix}"), said


def test_tokens_from_secret_files_lose_their_line_break_and_whitespace_alone_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stripped on both sides, the orchestrator's admin token and the CLI's token stay the same token.
    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "admin-secret\n")
    monkeypatch.setenv("MLOC_TOKEN", " user-secret\r\n")
    settings = Settings()
    assert (settings.admin_token, settings.client_token) == ("admin-secret", "user-secret")
    # Read as "no token", a blank line would turn auth off.
    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "\n")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert describe_invalid(refused.value).startswith("invalid setting ORCHESTRATOR_TOKEN='\\n': holds only whitespace")
    monkeypatch.setenv("ORCHESTRATOR_TOKEN", "")
    assert Settings().admin_token is None


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("WORKER_ID", "bad id/../x", "is not a worker id"),
        ("WORKER_ID", ".hidden", "starting with a letter or digit"),
        ("MLOC_ARTIFACT_STORE", "{bad", "is not a URL; write s3://bucket/prefix"),
        ("MLOC_ARTIFACT_STORE", "shared/results", "is not a URL"),
        ("MLOC_ARTIFACT_STORE_OPTIONS", "{bad", "is not JSON"),
        ("MLOC_ARTIFACT_STORE_OPTIONS", "[1, 2]", "is JSON but not an object"),
        ("MLOC_EXECUTOR_PYTHON", "ppo", "'ppo' is not TASK_TYPE=PYTHON"),
        ("MLOC_EXECUTOR_PYTHON", "ppo=/opt/p/bin/python,=x", "'=x' is not TASK_TYPE=PYTHON"),
        ("TASK_TOPICS", " , ", "names no topic; name at least one"),
    ],
)
def test_worker_id_artifact_store_and_executor_pythons_are_checked_at_start(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    """A typo here once became a private folder named '{bad' or a worker no URL could name."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = describe_invalid(refused.value)
    assert message.startswith(f"invalid setting {variable}") and says in message, message


def test_good_worker_ids_and_store_urls_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_ID", "gpu-node-3.rack_2:a")
    monkeypatch.setenv("MLOC_ARTIFACT_STORE", "s3://bucket/mloc")
    monkeypatch.setenv("MLOC_ARTIFACT_STORE_OPTIONS", '{"endpoint_url": "http://127.0.0.1:9000"}')
    settings = Settings()
    assert settings.worker_id == "gpu-node-3.rack_2:a" and settings.artifact_store_url == "s3://bucket/mloc"
    monkeypatch.setenv("MLOC_ARTIFACT_STORE", "")
    assert Settings().artifact_store_url is None


@pytest.mark.parametrize("variable", ["MLOC_REDIS_URL", "REDIS_URL", "mloc_redis_url"])
def test_the_redis_line_names_the_variable_the_url_came_from(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    for name in ("MLOC_REDIS_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "redis://db.example:6380/0")
    choice = choose_redis(Settings())
    assert choice.describe() == f"Redis: redis://db.example:6380/0 ({variable.upper()})"


def test_only_the_orchestrator_logs_to_the_log_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # One environment for every process (a compose file, a shell profile): the workers must not share the
    # orchestrator's file, which each process would rotate on its own.
    monkeypatch.setenv("MLOC_LOG_FILE", str(tmp_path / "orchestrator.log"))
    settings = Settings()
    assert settings.log_file_for(NodeType.ORCHESTRATOR) == tmp_path / "orchestrator.log"
    assert settings.log_file_for(NodeType.WORKER) is None
    monkeypatch.delenv("MLOC_LOG_FILE")
    assert Settings().log_file_for(NodeType.ORCHESTRATOR) == Path("orchestrator.log")
    assert Settings().log_file_for(NodeType.WORKER) is None


def test_vectors_dir_is_beside_the_models_folder_unless_set_and_always_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path.resolve()
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLOC_VECTORS_DIR", raising=False)
    monkeypatch.setenv("MLOC_HOME", str(root / "home"))
    monkeypatch.delenv("MLOC_MODELS_DIR", raising=False)
    assert Settings().resolved_vectors_dir() == root / "home" / "vectors"

    # A relative MODELS_DIR: the worker advertises (no models_dir) and its runs open (the resolved
    # ctx.models_dir) the same absolute folder, so a later task finds the collection an earlier one wrote.
    monkeypatch.setenv("MLOC_MODELS_DIR", "models")
    advertised = Settings().resolved_vectors_dir()
    assert advertised == root / "vectors"
    assert Settings().resolved_vectors_dir(Path("models").resolve()) == advertised
    assert Settings().resolved_vectors_dir(Path("models")) == advertised
    # "Beside" the models folder even when it is named by "." or "..".
    monkeypatch.setenv("MLOC_MODELS_DIR", ".")
    assert Settings().resolved_vectors_dir() == root.parent / "vectors"

    monkeypatch.setenv("MLOC_MODELS_DIR", str(root / "disk" / "models"))
    assert Settings().resolved_vectors_dir() == root / "disk" / "vectors"
    # The run's models folder is the one a worker actually uses.
    assert Settings().resolved_vectors_dir(root / "run" / "models") == root / "run" / "vectors"

    monkeypatch.setenv("MLOC_VECTORS_DIR", str(root / "volume"))
    assert Settings().resolved_vectors_dir() == root / "volume"
    assert Settings().resolved_vectors_dir(root / "run" / "models") == root / "volume"
    monkeypatch.setenv("MLOC_VECTORS_DIR", "kept/vectors")
    monkeypatch.setenv("MLOC_MODELS_DIR", "models")
    assert Settings().resolved_vectors_dir() == root / "kept" / "vectors"
    assert Settings().resolved_vectors_dir(root / "models").is_absolute()
    monkeypatch.setenv("HOME", str(root / "user"))
    monkeypatch.setenv("MLOC_VECTORS_DIR", "~/vectors")
    assert Settings().resolved_vectors_dir() == root / "user" / "vectors"
