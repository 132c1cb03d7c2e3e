"""Shared helpers for the static checks of the deployment files (no Docker engine, no cluster).

The tools come from PyPI through scripts/install_deploy_tools.sh; a missing one skips the test that
needs it, with the command that installs it. scripts/test.sh installs them all and sets
MLOC_STRICT_SKIPS=1, under which such a skip fails: in CI a missing tool never looks like a pass.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
K8S_DIR = REPO / "deploy" / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
INSTALL_HINT = "run scripts/install_deploy_tools.sh (installs the deploy check tools from PyPI)"
TOOL_TIMEOUT_SEC = 120
# Secrets given to `docker-compose config` and the Kubernetes Secrets in the tests; never real ones.
TEST_PASSWORD = "compose-test-password-0123"
TEST_TOKEN = "compose-test-token-4567"
NAMESPACE = "mloc"

# Dockerfile -> the node type its image runs and the image name scripts/build.sh gives it.
DOCKERFILES = {
    "Dockerfile.orchestrator": ("orchestrator", "mloc-orchestrator"),
    "Dockerfile.worker": ("worker", "mloc-worker"),
    "Dockerfile.worker-cpu": ("worker", "mloc-worker-cpu"),
}
MLOC_IMAGES = {image for _, image in DOCKERFILES.values()}
# The Secrets and keys scripts/deploy_k8s.sh creates (the manifests may reference only these, or
# optional ones).
DEPLOY_SECRETS = {"mloc-redis": {"password", "url"}, "mloc-auth": {"orchestrator-token"}}

# Environment variables MLOC's containers may set although mloc.settings does not read them, each
# with the reader. Anything else set on an MLOC container must be a Settings alias (typos fail).
THIRD_PARTY_ENV = {
    "HF_HOME": "Hugging Face cache folder (huggingface_hub, transformers)",
    "HF_TOKEN": "Hugging Face token for gated models (huggingface_hub)",
    "PATH": "the image's virtual environment first",
    "PYTHONUNBUFFERED": "Python: logs reach the container log at once",
    "PYTHONDONTWRITEBYTECODE": "Python: no .pyc writes (read-only root file system)",
    "PIP_NO_CACHE_DIR": "pip, at build time: no cache in the image",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip, at build time",
    "DEBIAN_FRONTEND": "apt, at build time",
}


# Custom resources the manifests use, each with the schema vendored from its project (the
# Kubernetes schemas kubernetes-validate ships know only the built-in kinds).
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda-2.20.2-scaledobject.yaml"}
KEDA_PROMETHEUS_SCALER = SCHEMAS_DIR / "keda-2.20.2-prometheus-scaler.yaml"
# The CEL rules (x-kubernetes-validations) of those schemas, which jsonschema cannot run, each written
# again in Python. A rule missing here fails the check, so a newer vendored schema cannot add one unseen.
CEL_RULES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": (
        lambda spec: "minReplicaCount" not in spec or spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100)
    ),
}


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused, as kubectl's default strict field validation refuses them
    (a structural schema leaves additionalProperties out, and JSON Schema then allows anything)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and not open_ended:
        out["additionalProperties"] = False
    return out


def _cel_rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, str]]:
    """(property path, rule, message) of every x-kubernetes-validations rule under ``schema``."""
    found = [(path, r["rule"], r.get("message", "")) for r in schema.get("x-kubernetes-validations", [])]
    for name, sub in schema.get("properties", {}).items():
        found += _cel_rules(sub, (*path, name))
    if isinstance(schema.get("items"), dict):
        found += _cel_rules(schema["items"], (*path, "[]"))
    return found


def custom_resource_errors(doc: dict[str, Any]) -> list[str]:
    """Why a custom resource does not match its vendored schema (empty when it does)."""
    from jsonschema import Draft4Validator

    raw = yaml.safe_load((SCHEMAS_DIR / CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]).read_text())
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in Draft4Validator(_strict(raw)).iter_errors(doc)
    ]
    if errors:  # the rules are typed: they run on objects whose fields have the schema's types
        return errors
    for path, rule, message in _cel_rules(raw):
        check = CEL_RULES.get(" ".join(rule.split()))
        if check is None:
            errors.append(f"{'.'.join(path)}: the schema's CEL rule {rule!r} has no Python check in CEL_RULES")
            continue
        target: Any = doc
        for name in path:
            target = target.get(name) if isinstance(target, dict) else None
        if isinstance(target, dict) and not check(target):
            errors.append(f"{'.'.join(path)}: {message}")
    return errors


def tool(name: str) -> str:
    """Path of a command-line tool: the one installed beside this Python first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    pytest.skip(f"{name} not found beside {sys.executable} or on PATH: {INSTALL_HINT}")


def module(name: str) -> ModuleType:
    """Import a Python package the checks need, or fail saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"Python package {name} missing ({exc}): {INSTALL_HINT}")


def run(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SEC,
        check=False,
    )


def clean_env(tmp_home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: no user settings (kubeconfig, docker config, MLOC_*) leak in."""
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_home),
        "LANG": "C.UTF-8",
        "KUBECONFIG": str(tmp_home / "no-kubeconfig"),
        "DOCKER_CONFIG": str(tmp_home / "docker"),
    }
    env.update(extra)
    return env


def mloc_env_names() -> set[str]:
    """Every environment variable name mloc.settings.Settings reads."""
    from pydantic import AliasChoices, AliasPath

    from mloc.settings import Settings

    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
        elif isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasPath) or alias is None:
            names.add(field_name)
    return {name.upper() for name in names}


def unknown_env(names: set[str] | list[str]) -> list[str]:
    known = mloc_env_names() | set(THIRD_PARTY_ENV)
    return sorted(name for name in names if name.upper() not in known)


def project_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert match, "pyproject.toml has no version"
    return match.group(1)


# Options that hand a secret to a program on its command line, which every user of the host can read
# (ps, /proc/<pid>/cmdline): redis-server/redis-cli/redis-sentinel and the usual spellings elsewhere.
SECRET_FLAGS = re.compile(r"(?<![\w-])(--requirepass|--masterauth|--pass|--password|--token|-a)(?![\w-])")
# An environment variable whose value is a secret, by its name.
SECRET_ENV_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|REDIS_URL|AUTH|_KEY$")


def shell_secret_expansions(script: str) -> list[str]:
    """The secret variables a shell script expands where they can reach a command's arguments: anywhere
    but in a here-document (a program's stdin) and the guard `: "${VAR:?...}"` (a builtin, no process)."""
    found: list[str] = []
    end = None
    for line in script.splitlines():
        if end is not None:
            end = None if line.strip() == end else end
            continue
        code, heredoc, rest = line.partition("<<")
        if heredoc:
            end = re.match(r"-?\s*['\"]?(\w+)", rest).group(1)  # type: ignore[union-attr]
        if re.fullmatch(r'\s*:\s+"\$\{\w+:\?[^}]*\}"\s*', code):
            continue
        found += [name for name in re.findall(r"\$\{?(\w+)", code) if SECRET_ENV_NAME.search(name)]
    return found


def command_line_secrets(
    argvs: list[list[str]], values: set[str], secret_vars: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """What in these command lines puts a secret on a process's arguments: a secret's value, an option
    that takes one (-a, --requirepass, ...), a secret variable a shell expands into arguments, or a
    $(VAR) the kubelet replaces with its value (``secret_vars``: those set from a Secret)."""
    found: list[str] = []
    for arg in (arg for argv in argvs for arg in argv):
        found += [f"the value of a secret in {arg!r}" for value in values if value and value in arg]
        found += [f"{m.group(1)} in {arg!r}" for m in SECRET_FLAGS.finditer(arg)]
        found += [f"${name} in {arg!r}" for name in shell_secret_expansions(arg)]
        found += [
            f"$({name}) in {arg!r}"
            for name in re.findall(r"(?<!\$)\$\((\w+)\)", arg)
            if name in secret_vars or SECRET_ENV_NAME.search(name)
        ]
    return found


def redis_start(argv: list[str]) -> tuple[list[str], list[str]]:
    """(redis-server's arguments, the config lines it reads on stdin) of a Redis container's command,
    which must be `sh -c SCRIPT` with one `exec ... redis-server ARGS - <<EOF` and its here-document."""
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, f"Redis must start through `sh -c SCRIPT`, not {argv}"
    lines = argv[2].splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("exec ") and " redis-server " in line]
    assert len(starts) == 1, f"one `exec ... redis-server` line expected in:\n{argv[2]}"
    head, heredoc = lines[starts[0]].split("<<", 1)
    words = shlex.split(head)
    args = words[words.index("redis-server") + 1 :]
    assert args and args[-1] == "-", f"redis-server must read its config on stdin (`-` last): {words}"
    end = heredoc.strip().strip("'\"")
    body = lines[starts[0] + 1 :]
    assert end in body, f"here-document {end} not closed in:\n{argv[2]}"
    return args[:-1], body[: body.index(end)]


def option(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line (``--dir /data`` -> /data)."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def overlays() -> list[str]:
    return sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))


def kustomize(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("kubectl"), "kustomize", str(path)])


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The overlay's manifests as `kubectl kustomize` renders them (cached for the session)."""
    if overlay not in _RENDERED:
        result = kustomize(OVERLAYS_DIR / overlay)
        assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
        _RENDERED[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _RENDERED[overlay]


def pod_templates(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) for every Deployment and StatefulSet."""
    return [
        (doc, doc["spec"]["template"]["spec"])
        for doc in docs
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def image_name(image: str) -> str:
    """registry.example.com/team/mloc-worker:1.0 -> mloc-worker"""
    return image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]


def is_mloc_image(image: str) -> bool:
    return image_name(image) in MLOC_IMAGES


def compose(
    docker_compose: str, tmp_path: Path, *args: str, file: Path | str = COMPOSE_FILE, **env: str
) -> subprocess.CompletedProcess[str]:
    """`docker-compose` on the repository's compose file, with .env.example and only ``env`` set."""
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


def compose_config(docker_compose: str, tmp_path: Path, **env: str) -> dict[str, Any]:
    """The compose model with every profile, the test secrets set, as `docker-compose config` resolves it."""
    env = {"REDIS_PASSWORD": TEST_PASSWORD, "ORCHESTRATOR_TOKEN": TEST_TOKEN, **env}
    result = compose(docker_compose, tmp_path, "--profile", "gpu", "config", "--format", "json", **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def container_argv(argv: list[str]) -> list[str]:
    """A resolved compose command as the container receives it (`$$` is a literal `$`)."""
    return [arg.replace("$$", "$") for arg in argv]


@pytest.fixture
def resolved(docker_compose: str, tmp_path: Path) -> dict[str, Any]:
    return compose_config(docker_compose, tmp_path)


@pytest.fixture(scope="session")
def hadolint() -> str:
    return tool("hadolint")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return tool("docker-compose")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    return tool("shellcheck")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return tool("kubectl")


@pytest.fixture(scope="session")
def kubernetes_validate() -> ModuleType:
    return module("kubernetes_validate")
