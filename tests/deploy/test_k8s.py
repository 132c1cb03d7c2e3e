"""Kubernetes manifests: every overlay rendered by kustomize (`kubectl kustomize`, offline), every
object checked against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate ships
them: an unknown or misspelt field fails) or, for a custom resource, against the schema vendored from
its project (tests/deploy/schemas), then MLOC's invariants on what a cluster would receive. The KEDA
autoscaling objects have their own invariants in test_keda.py.
"""

from __future__ import annotations

import copy
import inspect
import io
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import (
    DEPLOY_SECRETS,
    K8S_DIR,
    NAMESPACE,
    REPO,
    command_line_secrets,
    custom_resource_errors,
    image_name,
    is_custom,
    is_mloc_image,
    kustomize,
    option,
    overlays,
    pod_templates,
    project_version,
    redis_start,
    rendered,
    unknown_env,
)

# The oldest Kubernetes minor the manifests promise to fit, and the newest the schemas know.
OLDEST_KUBERNETES = "1.29"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}


def _kube_versions(kv: ModuleType) -> list[str]:
    return [OLDEST_KUBERNETES, kv.latest_version()]


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind}/{name}"
    return found[0]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_overlays_exist() -> None:
    assert {"cpu-dev", "gpu"} <= set(overlays())


@pytest.mark.parametrize("overlay", overlays())
def test_overlay_renders_and_matches_the_kubernetes_schemas(overlay: str, kubernetes_validate: ModuleType) -> None:
    docs = rendered(overlay)
    errors = [
        f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs if is_custom(d) for e in custom_resource_errors(d)
    ]
    for version in _kube_versions(kubernetes_validate):
        for doc in docs:
            if is_custom(doc):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as exc:  # ValidationError, SchemaNotFoundError: both are failures here
                errors.append(f"{version} {doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert errors == [], "\n".join(errors)


def test_schema_check_rejects_broken_manifests(kubernetes_validate: ModuleType) -> None:
    deployment = copy.deepcopy(_by(rendered("gpu"), "Deployment", "orchestrator"))
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight"
    no_image_name = copy.deepcopy(deployment)
    del no_image_name["spec"]["template"]["spec"]["containers"][0]["name"]
    for broken in (misspelt, wrong_type, no_image_name):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomize_rejects_a_broken_overlay(tmp_path: Path) -> None:
    base = os.path.relpath(K8S_DIR / "base", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(f"resources:\n  - {base}\n  - missing.yaml\n")
    result = kustomize(tmp_path)
    assert result.returncode != 0 and "missing.yaml" in result.stderr, result.stderr
    (tmp_path / "kustomization.yaml").write_text(f"resources:\n  - {base}\n")
    assert kustomize(tmp_path).returncode == 0, "the same overlay without the broken entry renders"


@pytest.mark.parametrize("overlay", overlays())
def test_everything_lives_in_namespace_mloc(overlay: str) -> None:
    docs = rendered(overlay)
    assert any(d["kind"] == "Namespace" and d["metadata"]["name"] == NAMESPACE for d in docs)
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.parametrize("overlay", overlays())
def test_orchestrator_service_exposes_8000_with_probes(overlay: str) -> None:
    docs = rendered(overlay)
    service = _by(docs, "Service", "orchestrator")
    deployment = _by(docs, "Deployment", "orchestrator")
    pod = deployment["spec"]["template"]
    assert _selects(service["spec"]["selector"], pod["metadata"]["labels"]), "Service selects no orchestrator pod"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == 8000]
    container = pod["spec"]["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in container["ports"]}
    target = port.get("targetPort", 8000)
    assert (ports.get(target) if isinstance(target, str) else target) == 8000
    assert _env(container)["MLOC_PORT"]["value"] == "8000"
    assert container["args"] == ["mloc", "start", "--node-type", "orchestrator"]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert (ports.get(get["port"]) if isinstance(get["port"], str) else get["port"]) == 8000, probe
    assert deployment["spec"]["replicas"] >= 1


def test_gpu_overlay_runs_two_orchestrators_cpu_dev_one() -> None:
    assert _by(rendered("gpu"), "Deployment", "orchestrator")["spec"]["replicas"] == 2
    assert _by(rendered("cpu-dev"), "Deployment", "orchestrator")["spec"]["replicas"] == 1


def _workers(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (w, pod)
        for w, pod in pod_templates(docs)
        if any(image_name(c["image"]) in ("mloc-worker", "mloc-worker-cpu") for c in pod["containers"])
    ]


def test_gpu_worker_pools_request_gpus_on_their_gpu_model() -> None:
    pools = {}
    for workload, pod in _workers(rendered("gpu")):
        container = pod["containers"][0]
        if image_name(container["image"]) != "mloc-worker":
            continue
        limits = container["resources"]["limits"]
        requests = container["resources"].get("requests", {})
        assert int(limits["nvidia.com/gpu"]) >= 1, workload["metadata"]["name"]
        assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
        product = pod["nodeSelector"]["nvidia.com/gpu.product"]
        tags = _env(container)["WORKER_TAGS"]["value"].split(",")
        model = [t for t in tags if t != "gpu"]
        assert "gpu" in tags and model and model[0].upper() in product.upper(), (product, tags)
        assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", []))
        pools[model[0]] = product
    assert {"a100", "h100"} <= set(pools), pools
    assert pools["a100"] == "NVIDIA-A100-SXM4-80GB"


@pytest.mark.parametrize("overlay", overlays())
def test_cpu_workers_request_no_gpu(overlay: str) -> None:
    cpu = [
        (w, pod)
        for w, pod in _workers(rendered(overlay))
        if image_name(pod["containers"][0]["image"]) == "mloc-worker-cpu"
    ]
    assert cpu, "every overlay runs a CPU worker"
    for _, pod in cpu:
        resources = pod["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in {**resources.get("limits", {}), **resources.get("requests", {})}
        assert "nodeSelector" not in pod or "nvidia.com/gpu.product" not in pod["nodeSelector"]


def _longest_drain_sec(env: dict[str, dict[str, Any]]) -> float:
    """How long a worker can take to stop after SIGTERM (Worker._drain): its running tasks get
    MLOC_SHUTDOWN_GRACE_SEC, those still running are cancelled and their executors killed after
    MLOC_CANCEL_GRACE_SEC, then its idle executor processes get HostProcess.close's timeout."""
    from mloc.settings import Settings
    from mloc.worker.process import HostProcess

    def setting(name: str, field: str) -> float:
        default = Settings.model_fields[field].default
        return float(env[name]["value"]) if name in env else float(default)

    close_sec = float(inspect.signature(HostProcess.close).parameters["timeout"].default)
    return (
        setting("MLOC_SHUTDOWN_GRACE_SEC", "shutdown_grace_sec")
        + setting("MLOC_CANCEL_GRACE_SEC", "cancel_grace_sec")
        + close_sec
    )


@pytest.mark.parametrize("overlay", overlays())
def test_workers_hand_tasks_back_before_they_are_killed(overlay: str) -> None:
    for workload, pod in _workers(rendered(overlay)):
        container = pod["containers"][0]
        env = _env(container)
        name = workload["metadata"]["name"]
        assert container["args"] == ["mloc", "start", "--node-type", "worker"], name
        # 5 s more for the Redis writes that hand tasks back and mark the worker offline.
        assert pod["terminationGracePeriodSeconds"] >= _longest_drain_sec(env) + 5, name
        assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        assert env["RESULTS_DIR"]["value"].startswith("/data/"), name
        assert env["TASK_TOPICS"]["value"] and env["WORKER_TAGS"]["value"], name
        # What the worker advertises is what the container may use.
        limits = container["resources"]["limits"]
        assert env["MLOC_WORKER_MEMORY"]["value"] == str(limits["memory"]), name
        cpu = limits.get("cpu", container["resources"]["requests"]["cpu"])
        assert env["MLOC_WORKER_CPU"]["value"] == str(cpu), name
        # A stuck worker (its heartbeat stale while Redis answers) is restarted; a Redis outage alone is not its
        # fault (mloc-healthcheck worker-live, tests/deploy/test_healthcheck.py), and the probe gives it more
        # time than its heartbeats need to show.
        live = container["livenessProbe"]
        assert live["exec"]["command"] == ["mloc-healthcheck", "worker-live"], name
        interval = float(env["HEARTBEAT_INTERVAL_SEC"]["value"])
        assert live["periodSeconds"] * live["failureThreshold"] >= 3 * interval + 5, name


@pytest.mark.parametrize("overlay", overlays())
def test_redis_has_password_aof_and_a_volume(overlay: str) -> None:
    docs = rendered(overlay)
    redis = _by(docs, "StatefulSet", "redis")
    pod = redis["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert re.fullmatch(r"redis:7(\.\d+)*-[a-z0-9.]+", container["image"]), container["image"]
    args, config = redis_start(container.get("command", []) + container["args"])
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--maxmemory-policy") == "noeviction"
    # The password reaches redis-server on stdin, from an env var set from the Secret.
    assert config == ["requirepass ${REDIS_PASSWORD}"], config
    for variable in ("REDIS_PASSWORD", "REDISCLI_AUTH"):
        ref = _env(container)[variable]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("mloc-redis", "password"), variable
    data_dir = option(args, "--dir")
    claims = {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert any(m["mountPath"] == data_dir and m["name"] in claims for m in container["volumeMounts"])
    service = _by(docs, "Service", "redis")
    assert _selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]


@pytest.mark.parametrize("overlay", overlays())
def test_no_secret_is_committed_and_only_deploy_secrets_are_used(overlay: str) -> None:
    docs = rendered(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are generated by scripts/deploy_k8s.sh"
    for workload, pod in pod_templates(docs):
        for container in _containers(pod):
            for name, entry in _env(container).items():
                if re.search(r"TOKEN|PASSWORD|SECRET|REDIS_URL|AUTH", name):
                    assert "value" not in entry, f"{workload['metadata']['name']}: {name} set in clear"
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    assert ref["key"] in DEPLOY_SECRETS.get(ref["name"], set()), (name, ref)


def _command_lines(container: dict[str, Any]) -> list[list[str]]:
    """Every command line a container runs: its own, its probes' and its lifecycle hooks'."""
    lines = [container.get("command", []) + container.get("args", [])]
    handlers = [container.get(p, {}) for p in ("livenessProbe", "readinessProbe", "startupProbe")]
    handlers += [h for h in container.get("lifecycle", {}).values()]
    return lines + [h["exec"]["command"] for h in handlers if "exec" in h]


def _secrets_on_command_lines(pod: dict[str, Any]) -> list[str]:
    found = []
    for container in _containers(pod):
        name = container["name"]
        # envFrom a Secret brings names this check cannot see; the manifests name each variable instead.
        found += [f"{name}: envFrom a Secret" for source in container.get("envFrom", []) if "secretRef" in source]
        env = _env(container)
        from_secret = {key for key, entry in env.items() if "secretKeyRef" in entry.get("valueFrom", {})}
        found += [f"{name}: {f}" for f in command_line_secrets(_command_lines(container), set(), from_secret)]
    return found


@pytest.mark.parametrize("overlay", overlays())
def test_no_secret_is_on_a_command_line(overlay: str) -> None:
    """Every user of a node reads a process's arguments (ps, /proc/<pid>/cmdline), and the kubelet puts a
    $(VAR) in them in clear: secrets reach containers through their environment only, and no shell there
    expands them into an argument."""
    for workload, pod in pod_templates(rendered(overlay)):
        assert _secrets_on_command_lines(pod) == [], workload["metadata"]["name"]


@pytest.mark.parametrize(
    "args",
    [
        ["redis-server", "--requirepass", "$(REDIS_PASSWORD)"],
        ["sh", "-c", "exec redis-server --save '' $(REDISCLI_AUTH)"],
        ["sh", "-c", 'exec redis-server --x "$REDIS_PASSWORD"'],
    ],
)
def test_the_check_sees_a_secret_on_a_command_line(args: list[str]) -> None:
    redis = copy.deepcopy(_by(rendered("cpu-dev"), "StatefulSet", "redis"))
    pod = redis["spec"]["template"]["spec"]
    pod["containers"][0]["args"] = args
    assert _secrets_on_command_lines(pod)


def test_no_secret_values_in_the_deploy_files() -> None:
    files = [*K8S_DIR.rglob("*.yaml"), REPO / "docker-compose.yml", REPO / ".env.example"]
    for path in files:
        text = path.read_text()
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{path}: a long hex string (a secret?)"
        assert not re.search(r"redis://[^$\s\"]*:[^$@\s\"{]+@", text), f"{path}: a Redis password in a URL"
        assert "BEGIN" not in text or "PRIVATE KEY" not in text, path
        assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), f"{path}: a Hugging Face token"


@pytest.mark.parametrize("overlay", overlays())
def test_mloc_containers_set_only_variables_mloc_reads(overlay: str) -> None:
    for workload, pod in pod_templates(rendered(overlay)):
        for container in _containers(pod):
            if is_mloc_image(container["image"]):
                unknown = unknown_env(set(_env(container)))
                assert unknown == [], f"{workload['metadata']['name']}: {unknown}"
                assert "REDIS_URL" in _env(container)


@pytest.mark.parametrize("overlay", overlays())
def test_images_are_pinned_and_mloc_tags_follow_the_project_version(overlay: str) -> None:
    for workload, pod in pod_templates(rendered(overlay)):
        for container in _containers(pod):
            image = container["image"]
            tag = image.split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{workload['metadata']['name']}: {image} is not pinned"
            if is_mloc_image(image):
                assert tag == project_version(), (
                    f"{image}: overlays tag MLOC images with the version scripts/build.sh builds "
                    f"({project_version()}); update `images:` in deploy/k8s/overlays/*/kustomization.yaml"
                )


@pytest.mark.parametrize("overlay", overlays())
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    docs = rendered(overlay)
    namespace = _by(docs, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload, pod in pod_templates(docs):
        name = workload["metadata"]["name"]
        pod_sc = pod.get("securityContext", {})
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        assert all("hostPath" not in v for v in pod.get("volumes", [])), name
        for container in _containers(pod):
            sc = container.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, name
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, name
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not sc.get("privileged"), name
            assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, name


@pytest.mark.parametrize("overlay", overlays())
def test_disruption_budgets_select_workloads_and_allow_drains(overlay: str) -> None:
    docs = rendered(overlay)
    workloads = pod_templates(docs)
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        selected = [w for w, _ in workloads if _selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        assert len(selected) == 1, f"PDB {pdb['metadata']['name']} selects {len(selected)} workloads"
        replicas = selected[0]["spec"].get("replicas", 1)
        if "minAvailable" in pdb["spec"]:
            assert int(pdb["spec"]["minAvailable"]) < replicas, f"PDB {pdb['metadata']['name']} blocks drains"
        else:
            assert int(pdb["spec"]["maxUnavailable"]) >= 1
    for workload, _ in workloads:
        if workload["kind"] == "Deployment":
            assert any(
                _selects(p["spec"]["selector"]["matchLabels"], workload["spec"]["template"]["metadata"]["labels"])
                for p in docs
                if p["kind"] == "PodDisruptionBudget"
            ), workload["metadata"]["name"]


@pytest.mark.parametrize("overlay", overlays())
def test_selectors_match_their_pods(overlay: str) -> None:
    for workload, _ in pod_templates(rendered(overlay)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert _selects(workload["spec"]["selector"]["matchLabels"], labels), workload["metadata"]["name"]
        assert labels.get("app.kubernetes.io/part-of") == "mloc", "the Redis NetworkPolicy admits part-of=mloc"


def _image_defaults(image: str) -> tuple[dict[str, str], str]:
    """The environment and working folder an MLOC image gives its containers (its Dockerfile's last stage)."""
    from .conftest import DOCKER_DIR, DOCKERFILES, module

    (dockerfile,) = [name for name, (_, built) in DOCKERFILES.items() if built == image_name(image)]
    parser = module("dockerfile_parse").DockerfileParser(fileobj=io.BytesIO((DOCKER_DIR / dockerfile).read_bytes()))
    workdirs = [i["value"].strip() for i in parser.structure if i["instruction"] == "WORKDIR"]
    return dict(parser.envs), workdirs[-1] if workdirs else "/"


def _mount_at(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mount where ``path`` lies (the deepest), if any."""
    mounts = [
        m for m in container.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def _written_paths(container: dict[str, Any]) -> dict[str, str]:
    """What an MLOC container writes, by the setting that places it, as absolute paths."""
    defaults, workdir = _image_defaults(container["image"])
    env = {**defaults, **{name: e["value"] for name, e in _env(container).items() if "value" in e}}
    workdir = container.get("workingDir", workdir)

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(workdir, path))

    paths = {"RESULTS_DIR": absolute(env.get("RESULTS_DIR", "./results")), "TMPDIR": env.get("TMPDIR", "/tmp")}
    for name in ("MLOC_HOME", "MLOC_MODELS_DIR", "HF_HOME"):
        if name in env:
            paths[name] = absolute(env[name])
    log_file = env.get("MLOC_LOG_FILE")
    if log_file is None and container["args"][-1] == "orchestrator":
        paths["MLOC_LOG_FILE (unset: orchestrator.log in the working folder)"] = absolute("orchestrator.log")
    elif log_file and log_file.strip() not in ("", "-"):
        paths["MLOC_LOG_FILE"] = absolute(log_file)
    return paths


@pytest.mark.parametrize("overlay", overlays())
def test_containers_with_a_read_only_root_write_only_to_volumes(overlay: str) -> None:
    """Under readOnlyRootFilesystem every folder MLOC writes (results, uploads, home, log file, temporary
    files) must be a writable volume: anywhere else the write fails (Errno 30)."""
    checked = 0
    for workload, pod in pod_templates(rendered(overlay)):
        for container in pod["containers"]:
            if not is_mloc_image(container["image"]):
                continue
            if not container.get("securityContext", {}).get("readOnlyRootFilesystem"):
                continue
            checked += 1
            for setting, path in _written_paths(container).items():
                mount = _mount_at(container, path)
                where = f"{workload['metadata']['name']}: {setting} {path}"
                assert mount is not None, f"{where} is on the read-only root file system: mount a volume there"
                assert not mount.get("readOnly"), f"{where} is on a read-only mount"
    assert checked, "the orchestrator runs with a read-only root file system"


def _claim_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    mount = _mount_at(container, path)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    volume = volumes.get(mount["name"], {}) if mount else {}
    return volume.get("persistentVolumeClaim", {}).get("claimName")


@pytest.mark.parametrize("overlay", overlays())
def test_orchestrator_and_workers_share_one_results_volume(overlay: str) -> None:
    """The orchestrator stores batch uploads in its RESULTS_DIR and serves the files workers write to
    theirs: both must be one folder on one PersistentVolumeClaim, which pods on several nodes can mount
    only as ReadWriteMany (cpu-dev is for one-node clusters)."""
    docs = rendered(overlay)
    orch_pod = _by(docs, "Deployment", "orchestrator")["spec"]["template"]["spec"]
    orch = orch_pod["containers"][0]
    results = _written_paths(orch)["RESULTS_DIR"]
    claim = _claim_at(orch_pod, orch, results)
    assert claim, f"the orchestrator's RESULTS_DIR {results} is on no PersistentVolumeClaim"
    workers = _workers(docs)
    assert workers
    for workload, pod in workers:
        container = pod["containers"][0]
        name = workload["metadata"]["name"]
        assert _written_paths(container)["RESULTS_DIR"] == results, name
        assert _claim_at(pod, container, results) == claim, name
    modes = _by(docs, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    assert "ReadWriteMany" in modes or overlay == "cpu-dev", modes
