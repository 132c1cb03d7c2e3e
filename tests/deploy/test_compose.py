"""docker-compose.yml: validated by Docker Compose itself (`docker-compose config`, which checks the
file against the Compose specification and needs no engine), then MLOC's invariants on the resolved
model: Redis with a password and AOF, no secret on any command line, a health-checked orchestrator on
8000, workers with stable ids of their own that get time to hand tasks back, a GPU worker only in the
`gpu` profile, no secret in the repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from mloc.settings import WORKER_ID, Settings

from .conftest import (
    COMPOSE_FILE,
    DOCKERFILES,
    ENV_EXAMPLE,
    REPO,
    SECRET_ENV_NAME,
    TEST_PASSWORD,
    TEST_TOKEN,
    command_line_secrets,
    compose,
    compose_config,
    container_argv,
    option,
    redis_start,
    unknown_env,
)

WORKERS = ("worker-cpu", "worker-gpu")


def test_compose_file_is_valid(docker_compose: str, tmp_path: Path) -> None:
    for profile in ([], ["--profile", "gpu"]):
        result = compose(
            docker_compose,
            tmp_path,
            *profile,
            "config",
            "--quiet",
            REDIS_PASSWORD=TEST_PASSWORD,
            ORCHESTRATOR_TOKEN=TEST_TOKEN,
        )
        assert result.returncode == 0, f"docker-compose config {profile}:\n{result.stderr}"


def test_compose_rejects_an_invalid_file(docker_compose: str, tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  api:\n    image: mloc-orchestrator\n    restrat: always\n    ports: 8000\n")
    result = compose(docker_compose, tmp_path, "config", "--quiet", file=bad)
    assert result.returncode != 0
    assert "restrat" in result.stderr or "ports" in result.stderr, result.stderr


def test_compose_refuses_to_start_without_the_secrets(docker_compose: str, tmp_path: Path) -> None:
    result = compose(docker_compose, tmp_path, "config", "--quiet")
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr and "ORCHESTRATOR_TOKEN" in result.stderr, result.stderr


def test_default_services_and_gpu_profile(docker_compose: str, tmp_path: Path) -> None:
    env = {"REDIS_PASSWORD": TEST_PASSWORD, "ORCHESTRATOR_TOKEN": TEST_TOKEN}
    default = compose(docker_compose, tmp_path, "config", "--services", **env)
    gpu = compose(docker_compose, tmp_path, "--profile", "gpu", "config", "--services", **env)
    assert set(default.stdout.split()) == {"redis", "orchestrator", "worker-cpu"}, default.stderr
    assert set(gpu.stdout.split()) == {"redis", "orchestrator", "worker-cpu", "worker-gpu"}, gpu.stderr


def test_redis_has_password_and_persistence(resolved: dict[str, Any]) -> None:
    redis = resolved["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*-[a-z0-9.]+", redis["image"]), redis["image"]
    args, config = redis_start(container_argv(redis["command"]))
    assert config == ["requirepass ${REDIS_PASSWORD}"], config
    assert redis["environment"]["REDIS_PASSWORD"] == TEST_PASSWORD
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--maxmemory-policy") == "noeviction"
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert not redis.get("ports"), "Redis must not be published on the host"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    # redis-cli takes the password from the environment, never from an -a argument.
    assert redis["environment"]["REDISCLI_AUTH"] == TEST_PASSWORD


def _command_lines(service: dict[str, Any]) -> list[list[str]]:
    """Every command line the service's containers run: entrypoint, command and health check."""
    found = [service.get("entrypoint"), service.get("command"), (service.get("healthcheck") or {}).get("test")]
    return [container_argv([argv] if isinstance(argv, str) else argv) for argv in found if argv]


def _secrets_on_command_lines(service: dict[str, Any]) -> list[str]:
    env = service.get("environment", {})
    secrets = {TEST_PASSWORD, TEST_TOKEN} | {value for key, value in env.items() if SECRET_ENV_NAME.search(key)}
    return command_line_secrets(_command_lines(service), secrets)


def test_no_secret_is_on_a_command_line(resolved: dict[str, Any]) -> None:
    """Anyone on the host reads a process's arguments (ps, /proc/<pid>/cmdline) and `docker inspect` shows a
    container's command: secrets reach the containers through their environment only."""
    for name, service in resolved["services"].items():
        assert _secrets_on_command_lines(service) == [], name


@pytest.mark.parametrize(
    "leak", ["--requirepass ${REDIS_PASSWORD}", "--requirepass $${REDIS_PASSWORD}", "--x $${REDISCLI_AUTH}"]
)
def test_the_check_sees_a_password_on_a_command_line(docker_compose: str, tmp_path: Path, leak: str) -> None:
    """Interpolated by compose (the value in the container's command) or by the container's shell."""
    original = COMPOSE_FILE.read_text()
    leaky = tmp_path / "compose.yml"
    leaky.write_text(original.replace("--maxmemory-policy noeviction -", f"--maxmemory-policy noeviction {leak} -"))
    assert leaky.read_text() != original
    result = compose(
        docker_compose,
        tmp_path,
        "config",
        "--format",
        "json",
        file=leaky,
        REDIS_PASSWORD=TEST_PASSWORD,
        ORCHESTRATOR_TOKEN=TEST_TOKEN,
    )
    assert result.returncode == 0, result.stderr
    assert _secrets_on_command_lines(json.loads(result.stdout)["services"]["redis"])


def test_orchestrator_serves_8000_with_healthcheck(resolved: dict[str, Any]) -> None:
    orch = resolved["services"]["orchestrator"]
    assert orch["command"] == ["mloc", "start", "--node-type", "orchestrator"]
    assert any(p["target"] == 8000 for p in orch["ports"]), orch["ports"]
    # mloc-healthcheck orchestrator = GET /healthz (tests/deploy/test_healthcheck.py).
    assert orch["healthcheck"]["test"] == ["CMD", "mloc-healthcheck", "orchestrator"]
    assert orch["depends_on"]["redis"]["condition"] == "service_healthy"
    assert orch["environment"]["ORCHESTRATOR_TOKEN"] == TEST_TOKEN
    assert orch["environment"]["MLOC_PORT"] == "8000"


def test_services_use_the_seed_image_names_and_dockerfiles(resolved: dict[str, Any]) -> None:
    expected = {
        "orchestrator": "Dockerfile.orchestrator",
        "worker-cpu": "Dockerfile.worker-cpu",
        "worker-gpu": "Dockerfile.worker",
    }
    for service, dockerfile in expected.items():
        svc = resolved["services"][service]
        assert svc["build"]["dockerfile"] == f"docker/{dockerfile}"
        assert (REPO / svc["build"]["dockerfile"]).is_file()
        assert svc["image"].split(":")[0] == DOCKERFILES[dockerfile][1], svc["image"]


def test_every_mloc_service_reaches_redis_with_the_password(resolved: dict[str, Any]) -> None:
    for name in ("orchestrator", "worker-cpu", "worker-gpu"):
        env = resolved["services"][name]["environment"]
        assert env["REDIS_URL"] == f"redis://:{TEST_PASSWORD}@redis:6379/0", name
        assert unknown_env(set(env)) == [], f"{name} sets variables MLOC does not read"


def test_workers_store_on_data_and_get_time_to_hand_back(resolved: dict[str, Any]) -> None:
    for name in ("worker-cpu", "worker-gpu"):
        svc = resolved["services"][name]
        env = svc["environment"]
        assert svc["command"] == ["mloc", "start", "--node-type", "worker"]
        assert env["RESULTS_DIR"].startswith("/data/") and env["MLOC_MODELS_DIR"].startswith("/data/")
        assert env["TASK_TOPICS"] and env["WORKER_TAGS"]
        assert any(v["target"] == "/data" for v in svc["volumes"])
        grace = _seconds(svc["stop_grace_period"])
        assert grace >= float(env["MLOC_SHUTDOWN_GRACE_SEC"]) + 15, (name, grace)
        assert svc["healthcheck"]["test"] == ["CMD", "mloc-healthcheck", "worker"]


def test_gpu_worker_reserves_nvidia_gpus(resolved: dict[str, Any]) -> None:
    gpu = resolved["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert "gpu" in gpu["environment"]["WORKER_TAGS"].split(",")
    assert "deploy" not in resolved["services"]["worker-cpu"]


def test_env_example_holds_no_secret() -> None:
    values = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    assert values["REDIS_PASSWORD"] == "" and values["ORCHESTRATOR_TOKEN"] == "", (
        ".env.example must leave the secrets empty (compose then refuses to start)"
    )
    compose_text = COMPOSE_FILE.read_text()
    assert not re.search(r"requirepass\s+\S*[0-9a-f]{16}", compose_text)


def _seconds(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value) / (1e9 if value > 10_000 else 1)  # compose json: nanoseconds
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(h|ms|m|s)", str(value)):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def _volume_at(service: dict[str, Any], path: str) -> str | None:
    """The named volume a service has mounted where ``path`` lies (the deepest mount), if any."""
    mounts = [v for v in service.get("volumes", []) if path == v["target"] or path.startswith(v["target"] + "/")]
    deepest = max(mounts, key=lambda v: len(v["target"]), default=None)
    return deepest["source"] if deepest and deepest["type"] == "volume" else None


def test_orchestrator_stores_uploads_on_the_workers_results_volume(resolved: dict[str, Any]) -> None:
    """Batch uploads land in the orchestrator's RESULTS_DIR and the worker running the batch reads them
    there: one folder on one volume for all, or uploads vanish into the orchestrator's container."""
    orch = resolved["services"]["orchestrator"]
    results = orch["environment"].get("RESULTS_DIR")
    assert results and results.startswith("/"), "the orchestrator needs RESULTS_DIR on the shared volume"
    volume = _volume_at(orch, results)
    assert volume, f"the orchestrator's RESULTS_DIR {results} is on no volume"
    for name in ("worker-cpu", "worker-gpu"):
        worker = resolved["services"][name]
        assert worker["environment"]["RESULTS_DIR"] == results, name
        assert _volume_at(worker, results) == volume, name


def test_every_worker_has_a_stable_worker_id_of_its_own(resolved: dict[str, Any]) -> None:
    """Without WORKER_ID a worker is named <hostname>-<random> anew at every start: a restarted or
    re-created container would register as a new worker and leave its old entry lost until reaped."""
    ids = {}
    for name in WORKERS:
        service = resolved["services"][name]
        worker_id = service["environment"].get("WORKER_ID")
        assert worker_id and WORKER_ID.match(worker_id), f"{name}: WORKER_ID {worker_id!r}"
        assert Settings(worker_id=worker_id).resolved_worker_id == worker_id
        # One id is one running worker: replicas of a service would share it.
        assert service.get("deploy", {}).get("replicas", 1) == 1, name
        ids[name] = worker_id
    assert len(set(ids.values())) == len(ids), f"two worker services share an id: {ids}"


def test_worker_ids_are_the_same_at_every_start_and_can_be_set(docker_compose: str, tmp_path: Path) -> None:
    first, again = (compose_config(docker_compose, tmp_path) for _ in range(2))
    for name in WORKERS:
        assert (
            first["services"][name]["environment"]["WORKER_ID"] == again["services"][name]["environment"]["WORKER_ID"]
        )
    chosen = compose_config(docker_compose, tmp_path, WORKER_CPU_ID="cpu-a", WORKER_GPU_ID="gpu-a")
    assert chosen["services"]["worker-cpu"]["environment"]["WORKER_ID"] == "cpu-a"
    assert chosen["services"]["worker-gpu"]["environment"]["WORKER_ID"] == "gpu-a"


def test_env_example_names_the_worker_ids() -> None:
    names = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line and line[0] != "#"}
    assert {"WORKER_CPU_ID", "WORKER_GPU_ID"} <= names


def test_a_second_worker_service_gets_an_id_of_its_own(docker_compose: str, tmp_path: Path) -> None:
    """The way docs/deployment.md adds a worker (a service per worker, not --scale)."""
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(
        "services:\n"
        "  worker-cpu-2:\n"
        f"    extends: {{ file: {COMPOSE_FILE}, service: worker-cpu }}\n"
        "    environment:\n"
        "      WORKER_ID: worker-cpu-2\n"
    )
    result = compose(
        docker_compose,
        tmp_path,
        "-f",
        str(override),
        "config",
        "--format",
        "json",
        REDIS_PASSWORD=TEST_PASSWORD,
        ORCHESTRATOR_TOKEN=TEST_TOKEN,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    first, second = services["worker-cpu"]["environment"], services["worker-cpu-2"]["environment"]
    assert (first["WORKER_ID"], second["WORKER_ID"]) == ("worker-cpu", "worker-cpu-2")
    assert {k: v for k, v in second.items() if k != "WORKER_ID"} == {k: v for k, v in first.items() if k != "WORKER_ID"}
