"""docker-compose.yml: validated by Docker Compose itself (`docker-compose config`, which checks the
file against the Compose specification and needs no engine), then MLOC's invariants on the resolved
model: Redis with a password and AOF, a health-checked orchestrator on 8000, workers that get time to
hand tasks back, a GPU worker only in the `gpu` profile, no secret in the repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from .conftest import COMPOSE_FILE, DOCKERFILES, ENV_EXAMPLE, REPO, clean_env, run, unknown_env

TEST_PASSWORD = "compose-test-password-0123"
TEST_TOKEN = "compose-test-token-4567"


def _compose(docker_compose: str, tmp_path: Path, *args: str, file: Path = COMPOSE_FILE, **env: str):
    return run(
        [
            docker_compose,
            "--project-directory",
            str(REPO),
            "--env-file",
            str(ENV_EXAMPLE),
            "-f",
            str(file),
            *args,
        ],
        env=clean_env(tmp_path, **env),
    )


@pytest.fixture
def resolved(docker_compose: str, tmp_path: Path) -> dict[str, Any]:
    result = _compose(
        docker_compose,
        tmp_path,
        "--profile",
        "gpu",
        "config",
        "--format",
        "json",
        REDIS_PASSWORD=TEST_PASSWORD,
        ORCHESTRATOR_TOKEN=TEST_TOKEN,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid(docker_compose: str, tmp_path: Path) -> None:
    for profile in ([], ["--profile", "gpu"]):
        result = _compose(
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
    result = _compose(docker_compose, tmp_path, "config", "--quiet", file=bad)
    assert result.returncode != 0
    assert "restrat" in result.stderr or "ports" in result.stderr, result.stderr


def test_compose_refuses_to_start_without_the_secrets(docker_compose: str, tmp_path: Path) -> None:
    result = _compose(docker_compose, tmp_path, "config", "--quiet")
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr and "ORCHESTRATOR_TOKEN" in result.stderr, result.stderr


def test_default_services_and_gpu_profile(docker_compose: str, tmp_path: Path) -> None:
    env = {"REDIS_PASSWORD": TEST_PASSWORD, "ORCHESTRATOR_TOKEN": TEST_TOKEN}
    default = _compose(docker_compose, tmp_path, "config", "--services", **env)
    gpu = _compose(docker_compose, tmp_path, "--profile", "gpu", "config", "--services", **env)
    assert set(default.stdout.split()) == {"redis", "orchestrator", "worker-cpu"}, default.stderr
    assert set(gpu.stdout.split()) == {"redis", "orchestrator", "worker-cpu", "worker-gpu"}, gpu.stderr


def test_redis_has_password_and_persistence(resolved: dict[str, Any]) -> None:
    redis = resolved["services"]["redis"]
    assert re.fullmatch(r"redis:7(\.\d+)*-[a-z0-9.]+", redis["image"]), redis["image"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == TEST_PASSWORD
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v["type"] == "volume" and v["target"] == "/data" for v in redis["volumes"])
    assert not redis.get("ports"), "Redis must not be published on the host"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])


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
