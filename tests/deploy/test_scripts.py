"""scripts/build.sh and scripts/deploy_k8s.sh: ShellCheck, then each script run for real against a
stand-in docker / kubectl that records what it is asked (no engine, no cluster is contacted).
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from .conftest import DOCKERFILES, OVERLAYS_DIR, REPO, clean_env, project_version, run

SCRIPTS = ["scripts/build.sh", "scripts/deploy_k8s.sh", "scripts/install_deploy_tools.sh"]
PORT_FORWARD = "kubectl port-forward service/orchestrator 8000:8000 -n mloc"

# A stand-in kubectl: logs every call, renders and creates objects with the real kubectl offline
# (`kustomize`, `create --dry-run=client`), keeps applied Secrets in a state file, answers the rest.
FAKE_KUBECTL = r"""
import json, os, subprocess, sys
args = sys.argv[1:]
log, state_path, applied = os.environ["FAKE_LOG"], os.environ["FAKE_STATE"], os.environ["FAKE_APPLIED"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\n")
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
real = os.environ["REAL_KUBECTL"]
words = [a for a in args if not a.startswith("-")]
if args[:1] == ["version"]:
    sys.exit(0)
if "create" in args and "--dry-run=client" in args:
    sys.exit(subprocess.call([real, *args]))
if args[:2] == ["apply", "-f"]:
    import yaml
    text = sys.stdin.read()
    with open(applied, "a") as f:
        f.write(text + "\n---\n")
    for doc in yaml.safe_load_all(text):
        if doc and doc["kind"] == "Secret":
            state[doc["metadata"]["name"]] = doc["data"]
    json.dump(state, open(state_path, "w"))
    sys.exit(0)
if args[:2] == ["apply", "-k"]:
    out = subprocess.run([real, "kustomize", args[2]], capture_output=True, text=True)
    with open(applied, "a") as f:
        f.write(out.stdout + "\n---\n")
    sys.stderr.write(out.stderr)
    sys.exit(out.returncode)
if "get" in words and "secret" in words:
    name = words[words.index("secret") + 1]
    key = next(a for a in args if a.startswith("jsonpath=")).split(".data.")[1].rstrip("}")
    if name not in state:
        sys.stderr.write(f'Error from server (NotFound): secrets "{name}" not found\n')
        sys.exit(1)
    print(state[name].get(key, ""), end="")
    sys.exit(0)
if "rollout" in words:
    sys.exit(0)
if "get" in words and "deployments" in words:
    print("deployment.apps/worker-cpu")
    sys.exit(0)
if "get" in words and "pods" in words:
    print("NAME READY STATUS")
    sys.exit(0)
sys.stderr.write(f"fake kubectl: unexpected call {args}\n")
sys.exit(3)
"""

FAKE_DOCKER = r"""
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
"""


def _stub(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


PREFLIGHT = (["info"], ["buildx", "version"])


def _log(path: Path) -> list[list[str]]:
    """The fake docker's calls, less build.sh's checks that an engine and buildx are there."""
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [call for call in calls if call not in PREFLIGHT]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_pass_shellcheck_and_are_executable(script: str, shellcheck: str) -> None:
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable (chmod +x; git tracks the mode)"
    result = run([shellcheck, "--severity=style", "--shell=bash", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_rejects_a_bad_script(shellcheck: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $DIR/*\ncd /tmp\nfor f in $(ls); do echo $f; done\n")
    result = run([shellcheck, "--severity=style", str(bad)])
    assert result.returncode != 0 and "SC2086" in result.stdout, result.stdout


# --- build.sh -----------------------------------------------------------------------------------
def test_build_without_a_docker_engine_says_so_in_one_line(tmp_path: Path) -> None:
    # A docker client with no daemon behind it, as on a machine where Docker is installed but not running.
    docker = _stub(
        tmp_path, "docker", "import sys\nsys.stderr.write('Cannot connect to the Docker daemon\\n')\nsys.exit(1)\n"
    )
    result = run(["bash", "scripts/build.sh"], env=clean_env(tmp_path, DOCKER=str(docker)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "build.sh: no Docker engine answers ('"
        + str(docker)
        + " info' failed): start the Docker daemon, or use --dry-run to print the build commands"
    ]


def test_build_builds_the_seed_images(tmp_path: Path) -> None:
    log = tmp_path / "docker.log"
    docker = _stub(tmp_path, "docker", FAKE_DOCKER)
    result = run(["bash", "scripts/build.sh"], env=clean_env(tmp_path, DOCKER=str(docker), FAKE_LOG=str(log)))
    assert result.returncode == 0, result.stderr
    calls = _log(log)
    version = project_version()
    built = {}
    for call in calls:
        assert call[0] == "build" and call[-1] == "." and call[-3] == "-f", call
        tags = [call[i + 1] for i, word in enumerate(call) if word == "-t"]
        built[Path(call[-2]).name] = tags
        assert (REPO / call[-2]).is_file()
    assert set(built) == set(DOCKERFILES)
    for dockerfile, (_, image) in DOCKERFILES.items():
        assert built[dockerfile] == [f"{image}:{version}", f"{image}:latest"]


def test_build_pushes_to_a_registry_only(tmp_path: Path) -> None:
    log = tmp_path / "docker.log"
    docker = _stub(tmp_path, "docker", FAKE_DOCKER)
    env = clean_env(tmp_path, DOCKER=str(docker), FAKE_LOG=str(log))
    refused = run(["bash", "scripts/build.sh", "--push", "orchestrator"], env=env)
    assert refused.returncode == 2 and "registry" in refused.stderr and not log.exists()
    env["MLOC_REGISTRY"] = "registry.example.com/team"
    result = run(
        [
            "bash",
            "scripts/build.sh",
            "--push",
            "--tag",
            "1.2.3",
            "--build-arg",
            "VLLM_VERSION=0.32.0",
            "worker",
        ],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    calls = _log(log)
    assert calls[0][:5] == [
        "build",
        "-t",
        "registry.example.com/team/mloc-worker:1.2.3",
        "-t",
        "registry.example.com/team/mloc-worker:latest",
    ]
    assert "VLLM_VERSION=0.32.0" in calls[0]
    assert calls[1:] == [
        ["push", "registry.example.com/team/mloc-worker:1.2.3"],
        ["push", "registry.example.com/team/mloc-worker:latest"],
    ]
    bad_tag = run(["bash", "scripts/build.sh", "--tag", "bad tag!"], env=env)
    assert bad_tag.returncode == 2


# --- deploy_k8s.sh ------------------------------------------------------------------------------
@pytest.fixture
def fake_cluster(tmp_path: Path, kubectl: str) -> dict[str, Any]:
    fake = _stub(tmp_path, "kubectl", FAKE_KUBECTL)
    files = {
        "log": tmp_path / "kubectl.log",
        "state": tmp_path / "state.json",
        "applied": tmp_path / "applied.yaml",
    }
    env = clean_env(
        tmp_path,
        KUBECTL=str(fake),
        REAL_KUBECTL=kubectl,
        FAKE_LOG=str(files["log"]),
        FAKE_STATE=str(files["state"]),
        FAKE_APPLIED=str(files["applied"]),
    )
    return {"env": env, **files}


def _secret(state: Path, name: str, key: str) -> str:
    return base64.b64decode(json.loads(state.read_text())[name][key]).decode()


def test_deploy_creates_secrets_applies_and_waits(fake_cluster: dict[str, Any]) -> None:
    result = run(["bash", "scripts/deploy_k8s.sh"], env=fake_cluster["env"])
    assert result.returncode == 0, result.stderr
    password = _secret(fake_cluster["state"], "mloc-redis", "password")
    token = _secret(fake_cluster["state"], "mloc-auth", "orchestrator-token")
    assert re.fullmatch(r"[0-9a-f]{64}", password) and re.fullmatch(r"[0-9a-f]{64}", token)
    assert _secret(fake_cluster["state"], "mloc-redis", "url") == f"redis://:{password}@redis.mloc.svc:6379/0"
    log_text = fake_cluster["log"].read_text()
    for secret in (password, token):
        assert secret not in log_text, "a secret reached kubectl's command line"
        assert secret not in result.stdout + result.stderr, "a secret was printed"
    calls = _log(fake_cluster["log"])
    applied = [d for d in yaml.safe_load_all(fake_cluster["applied"].read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in applied}
    assert {
        ("Namespace", "mloc"),
        ("Deployment", "orchestrator"),
        ("StatefulSet", "redis"),
        ("Deployment", "worker-cpu"),
    } <= kinds
    assert ["apply", "-k", str(OVERLAYS_DIR / "cpu-dev")] in calls
    waited = [c for c in calls if "rollout" in c]
    assert any("statefulset/redis" in c for c in waited) and any("deployment/orchestrator" in c for c in waited)
    assert PORT_FORWARD in result.stdout


def test_deploy_keeps_existing_secrets_and_takes_given_ones(fake_cluster: dict[str, Any]) -> None:
    first = run(["bash", "scripts/deploy_k8s.sh", "--no-wait", "gpu"], env=fake_cluster["env"])
    assert first.returncode == 0, first.stderr
    password = _secret(fake_cluster["state"], "mloc-redis", "password")
    token = _secret(fake_cluster["state"], "mloc-auth", "orchestrator-token")
    again = run(["bash", "scripts/deploy_k8s.sh", "--no-wait", "gpu"], env=fake_cluster["env"])
    assert again.returncode == 0 and again.stderr.count("exists: kept") == 2, again.stderr
    assert _secret(fake_cluster["state"], "mloc-redis", "password") == password
    assert _secret(fake_cluster["state"], "mloc-auth", "orchestrator-token") == token
    given = run(
        ["bash", "scripts/deploy_k8s.sh", "--no-wait", "gpu"],
        env={
            **fake_cluster["env"],
            "ORCHESTRATOR_TOKEN": "given-token-0123",
            "REDIS_URL": "rediss://mloc:pw@redis.example.internal:6380/0",
        },
    )
    assert given.returncode == 0, given.stderr
    assert _secret(fake_cluster["state"], "mloc-auth", "orchestrator-token") == "given-token-0123"
    assert _secret(fake_cluster["state"], "mloc-redis", "url") == "rediss://mloc:pw@redis.example.internal:6380/0"
    assert _secret(fake_cluster["state"], "mloc-redis", "password") == password
    assert not any("rollout" in c for c in _log(fake_cluster["log"]))


def test_deploy_refuses_bad_input(fake_cluster: dict[str, Any], tmp_path: Path) -> None:
    unknown = run(["bash", "scripts/deploy_k8s.sh", "prod-eu"], env=fake_cluster["env"])
    assert unknown.returncode == 2 and "cpu-dev" in unknown.stderr
    no_kubectl = run(["bash", "scripts/deploy_k8s.sh"], env={**fake_cluster["env"], "KUBECTL": "no-such-kubectl"})
    assert no_kubectl.returncode == 2 and "not found" in no_kubectl.stderr
    bad_password = run(["bash", "scripts/deploy_k8s.sh"], env={**fake_cluster["env"], "REDIS_PASSWORD": "a@b/c"})
    assert bad_password.returncode == 2 and "REDIS_PASSWORD" in bad_password.stderr


def test_render_retags_images_and_leaves_nothing_behind(
    kubectl: str, kubernetes_validate: ModuleType, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, KUBECTL=kubectl, MLOC_REGISTRY="registry.example.com/team", MLOC_TAG="1.2.3")
    result = run(["bash", "scripts/deploy_k8s.sh", "--render", "gpu"], env=env)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    images = {
        c["image"] for d in docs if "template" in d.get("spec", {}) for c in d["spec"]["template"]["spec"]["containers"]
    }
    assert images == {
        "registry.example.com/team/mloc-orchestrator:1.2.3",
        "registry.example.com/team/mloc-worker:1.2.3",
        "registry.example.com/team/mloc-worker-cpu:1.2.3",
        "redis:7.4-alpine",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    assert not list(OVERLAYS_DIR.glob(".render-*")), "deploy_k8s.sh left a temporary overlay behind"
