"""What each Dockerfile's RUN steps read from the repository is in the image when they run.

A RUN step that runs a script, installs the project or hands pip a constraints file reads files that
only a COPY puts in the image, and a COPY sees only what .dockerignore lets into the build context.
Each file such a step needs, and each file the scripts it runs need (the constraints they export or
pass to pip, the project they install, the scripts they run), must be COPYed to the path the step
reads, by a COPY before it whose source the context holds. No Docker engine runs here: this is what a
`docker build` would stop on, found from the files.
"""

from __future__ import annotations

import io
import posixpath
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import DOCKER_DIR, DOCKERFILES, REPO, module
from .dockerignore import Rules, in_context, rules_of

# `ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"`: a variable naming a folder relative to
# the script's own, as MLOC's scripts find the repository.
SCRIPT_ROOT = re.compile(r'(\w+)="\$\(cd "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)(/[^"]*)?" && pwd\)"')
PIP_FILE_ENV = re.compile(r"\bPIP_(?:CONSTRAINT|REQUIREMENT)=[\"']?([^\"'\s;]+)")
PIP_FILE_FLAG = re.compile(r"(?:^|\s)(?:-c|--constraint|-r|--requirement)(?:=|\s+)[\"']?([^\"'\s;]+)")
CONSTRAINTS_PATH = re.compile(r"[\"']?([^\s\"'=;]*\bconstraints/[\w.\-/]+)")
EDITABLE = re.compile(r"(?:^|\s)(?:-e|--editable)\s+[\"']?([^\s\"';\[]+)")
SCRIPT_RUN = re.compile(r"(?:^|[\s;&|(])(?:bash|sh|source|\.)\s+(?:-\w+\s+)*[\"']?([^\s\"';&|]+\.sh)\b")
SCRIPT_EXEC = re.compile(r"(?:^|[\s;&|(])[\"']?((?:@@\w+@@|\.{1,2})?/[^\s\"';&|]+\.sh)\b")


@dataclass(frozen=True)
class Need:
    """A repository file a RUN step reads, and the path in the image it reads it at."""

    image_path: str
    repo_path: str
    why: str


@dataclass
class Stage:
    """What the build has put in one stage's file system so far: image path -> repository path."""

    workdir: str = "/"
    copied: dict[str, str] | None = None  # what the context let through
    named: dict[str, str] | None = None  # what the COPY lines name, .dockerignore or not


def _image_path(path: str, workdir: str) -> str:
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(workdir, path))


def _copy(value: str, stage: Stage, rules: Rules, repo: Path) -> None:
    words = [w for w in value.split() if not w.startswith("--")]
    sources, dest = words[:-1], words[-1]
    into_folder = dest.endswith("/") or len(sources) > 1
    dest = _image_path(dest, stage.workdir)
    assert stage.copied is not None and stage.named is not None
    for source in sources:
        clean = posixpath.normpath(source)
        hits = sorted(repo.glob(clean)) if any(ch in clean for ch in "*?[") else [repo / clean]
        for hit in hits:
            if hit.is_dir():
                pairs = [(f, posixpath.join(dest, f.relative_to(hit).as_posix())) for f in hit.rglob("*")]
            elif hit.is_file():
                pairs = [(hit, posixpath.join(dest, hit.name) if into_folder else dest)]
            else:
                pairs = []
            for file, target in pairs:
                if not file.is_file():
                    continue
                rel = file.relative_to(repo).as_posix()
                stage.named[target] = rel
                if in_context(rel, rules):
                    stage.copied[target] = rel


def _project_needs(image_root: str, repo_root: str, why: str, repo: Path) -> list[Need]:
    """pyproject.toml and the files its [project] table names (readme, license files), which the build
    backend reads before it looks for packages."""
    names = ["pyproject.toml"]
    pyproject = repo / repo_root / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if isinstance(project.get("readme"), str):
            names.append(project["readme"])
        names += [n for n in project.get("license-files", []) if not any(ch in n for ch in "*?[")]
    return [Need(posixpath.join(image_root, n), posixpath.normpath(posixpath.join(repo_root, n)), why) for n in names]


def _pip_project_args(text: str) -> list[str]:
    """The local projects `pip install` is given in a RUN step (`.`, `/opt/src[extra]`)."""
    found = []
    for command in re.split(r"&&|;|\|\|", text):
        words = [w.strip("\"'") for w in command.split()]
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                for word in words[i + 2 :]:
                    path = word.split("[", 1)[0]
                    if path == "." or path.startswith(("./", "/")):
                        found.append(path)
    return found


def _script_needs(image_path: str, repo_path: str, cwd: str, repo: Path, seen: set[str]) -> list[Need]:
    """What a script reads from the repository: the constraints it exports or passes to pip, the
    projects it installs, the scripts it runs (and what those read)."""
    file = repo / repo_path
    if repo_path in seen or not file.is_file():
        return []
    seen.add(repo_path)
    text = file.read_text()
    roots = {
        name: (
            posixpath.normpath(posixpath.dirname(image_path) + (rel or "")),
            posixpath.normpath(posixpath.dirname(repo_path) + (rel or "")),
        )
        for name, rel in SCRIPT_ROOT.findall(text)
    }
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    body = "\n".join(lines)
    for name in roots:
        body = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", f"@@{name}@@", body)

    def place(token: str) -> tuple[str, str] | None:
        """(image path, repository path) of a path the script names; None for one it does not read
        from the repository (a variable of its own, an absolute path outside it)."""
        match = re.fullmatch(r"@@(\w+)@@(/.*)?", token)
        if match:
            image_root, repo_root = roots[match.group(1)]
            rest = (match.group(2) or "").lstrip("/")
            return posixpath.join(image_root, rest).rstrip("/"), posixpath.normpath(posixpath.join(repo_root, rest))
        if "$" in token or token.startswith("/"):
            return None
        return _image_path(token, cwd), posixpath.normpath(token)

    where = f"{repo_path}"
    needs: list[Need] = []
    for token in {*PIP_FILE_ENV.findall(body), *PIP_FILE_FLAG.findall(body), *CONSTRAINTS_PATH.findall(body)}:
        placed = place(token)
        if placed:
            needs.append(Need(*placed, f"the pip constraints/requirements of {where}"))
    for token in EDITABLE.findall(body):
        placed = place(token)
        if placed:
            needs += _project_needs(placed[0], placed[1], f"the project {where} installs", repo)
    for token in {*SCRIPT_RUN.findall(body), *SCRIPT_EXEC.findall(body)}:
        placed = place(token)
        if placed:
            needs.append(Need(*placed, f"a script {where} runs"))
            needs += _script_needs(placed[0], placed[1], cwd, repo, seen)
    return needs


def _run_needs(text: str, stage: Stage, repo: Path) -> list[Need]:
    assert stage.named is not None
    needs: list[Need] = []
    for token in {*PIP_FILE_ENV.findall(text), *PIP_FILE_FLAG.findall(text)}:
        if "$" not in token:
            image = _image_path(token, stage.workdir)
            needs.append(Need(image, stage.named.get(image, posixpath.normpath(token)), "pip's constraints"))
    for path in _pip_project_args(text):
        image = _image_path(path, stage.workdir)
        known = stage.named.get(posixpath.join(image, "pyproject.toml"))
        repo_root = posixpath.dirname(known) if known else "."
        needs += _project_needs(image, repo_root or ".", f"the project pip installs from {path}", repo)
    seen: set[str] = set()
    for token in {*SCRIPT_RUN.findall(text), *SCRIPT_EXEC.findall(text)}:
        if "$" in token:
            continue
        image = _image_path(token, stage.workdir)
        repo_path = stage.named.get(image) or (None if token.startswith("/") else posixpath.normpath(token))
        if repo_path is None:
            continue  # an absolute path no COPY put there: not a repository file
        needs.append(Need(image, repo_path, "the script it runs"))
        needs += _script_needs(image, repo_path, stage.workdir, repo, seen)
    return needs


def build_context_problems(content: str, repo: Path = REPO) -> list[str]:
    """Each repository file a RUN step of this Dockerfile reads that would not be in the image when it
    runs, with the reason. [] when every one is there."""
    parser = module("dockerfile_parse").DockerfileParser(fileobj=io.BytesIO(content.encode()))
    rules = rules_of(repo)
    problems: list[str] = []
    stage = Stage()
    for ins in parser.structure:
        kind, value = ins["instruction"], ins["value"].replace("\\\n", " ")
        if kind == "FROM":
            stage = Stage(copied={}, named={})
        elif kind == "WORKDIR":
            stage.workdir = _image_path(value.strip(), stage.workdir)
        elif kind in ("COPY", "ADD") and "--from" not in value:
            _copy(value, stage, rules, repo)
        elif kind == "RUN":
            assert stage.copied is not None and stage.named is not None
            step = " ".join(value.split())
            step = step if len(step) <= 80 else step[:77] + "..."
            for need in dict.fromkeys(_run_needs(value, stage, repo)):
                where = f"RUN {step}: {need.repo_path} ({need.why}, read at {need.image_path})"
                if not (repo / need.repo_path).is_file():
                    problems.append(f"{where} does not exist in the repository")
                elif stage.copied.get(need.image_path) == need.repo_path:
                    continue
                elif stage.named.get(need.image_path) == need.repo_path:
                    problems.append(
                        f"{where} is COPYed but excluded by .dockerignore: let it in with !{need.repo_path}"
                    )
                else:
                    problems.append(f"{where} is not COPYed into the image before this RUN")
    return problems


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_every_file_a_run_step_reads_is_copied_and_in_the_context(name: str) -> None:
    problems = build_context_problems((DOCKER_DIR / name).read_text())
    assert problems == [], f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", ["Dockerfile.worker", "Dockerfile.worker-cpu"])
def test_the_ppo_step_is_seen_to_read_its_constraints(name: str) -> None:
    """The check finds what scripts/setup_ppo_env.sh reads: a check that found nothing would pass."""
    stage = Stage(workdir="/opt/mloc-src", copied={}, named={})
    needs = _run_needs("bash scripts/setup_ppo_env.sh /opt/mloc-ppo", stage, REPO)
    read = {need.repo_path: need.image_path for need in needs}
    assert read["scripts/setup_ppo_env.sh"] == "/opt/mloc-src/scripts/setup_ppo_env.sh"
    assert read["constraints/ppo.txt"] == "/opt/mloc-src/constraints/ppo.txt"
    assert read["pyproject.toml"] == "/opt/mloc-src/pyproject.toml"
    assert "bash scripts/setup_ppo_env.sh /opt/mloc-ppo" in (DOCKER_DIR / name).read_text()


def test_dockerignore_allow_list_matching() -> None:
    from .dockerignore import dockerignore_rules

    rules = dockerignore_rules("*\n!pyproject.toml\n!src/\n!scripts/setup.sh\n**/__pycache__\n")
    assert in_context("pyproject.toml", rules)
    assert in_context("src/mloc/settings.py", rules), "!dir/ lets in everything under dir"
    assert in_context("scripts/setup.sh", rules), "!path lets in that file under an excluded folder"
    assert not in_context("scripts/other.sh", rules), "only the file named"
    assert not in_context("constraints/ppo.txt", rules), "`*` keeps out every top-level entry"
    assert not in_context("src/mloc/__pycache__/x.pyc", rules), "a later pattern wins"
    shipped = rules_of(REPO)
    assert in_context("constraints/ppo.txt", shipped), "the PPO environment's constraints reach the context"


def test_build_context_check_rejects_what_a_build_would_trip_over(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "constraints").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nreadme = "README.md"\n')
    (tmp_path / "README.md").write_text("x\n")
    (tmp_path / "constraints" / "env.txt").write_text("x==1\n")
    (tmp_path / "scripts" / "helper.sh").write_text("#!/usr/bin/env bash\ntrue\n")
    (tmp_path / "scripts" / "setup.sh").write_text(
        "#!/usr/bin/env bash\n"
        'ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"\n'
        "# a comment naming constraints/ignored.txt is not read\n"
        'export PIP_CONSTRAINT="$ROOT/constraints/env.txt"\n'
        'bash "$ROOT/scripts/helper.sh"\n'
        'pip install -e "$ROOT"\n'
    )
    (tmp_path / ".dockerignore").write_text("*\n!pyproject.toml\n!scripts/setup.sh\n")
    dockerfile = (
        "FROM python:3.11-slim\n"
        "WORKDIR /src\n"
        "RUN bash scripts/setup.sh\n"
        "COPY pyproject.toml ./\n"
        "COPY scripts/setup.sh scripts/helper.sh ./scripts/\n"
        "COPY constraints ./constraints\n"
        "RUN bash scripts/setup.sh\n"
    )
    problems = "\n".join(build_context_problems(dockerfile, repo=tmp_path))
    for expected in (
        "RUN bash scripts/setup.sh: scripts/setup.sh (the script it runs, read at /src/scripts/setup.sh) is not COPYed",
        "constraints/env.txt (the pip constraints/requirements of scripts/setup.sh, read at "
        "/src/constraints/env.txt) is COPYed but excluded by .dockerignore",
        "scripts/helper.sh (a script scripts/setup.sh runs, read at /src/scripts/helper.sh) is COPYed but excluded",
        "README.md (the project scripts/setup.sh installs, read at /src/README.md) is not COPYed",
    ):
        assert expected in problems, f"not reported: {expected}\n{problems}"
    assert "ignored.txt" not in problems, problems

    (tmp_path / ".dockerignore").write_text("*\n!pyproject.toml\n!README.md\n!scripts/\n!constraints/env.txt\n")
    fixed = dockerfile.replace("COPY pyproject.toml ./", "COPY pyproject.toml README.md ./").replace(
        "RUN bash scripts/setup.sh\nCOPY", "COPY", 1
    )
    assert build_context_problems(fixed, repo=tmp_path) == []
