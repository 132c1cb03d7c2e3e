"""Autoscaling with KEDA (deploy/k8s/components/keda): in an overlay that uses it, every worker pool is
scaled from zero by one ScaledObject, valid against KEDA's CRD schema (vendored in tests/deploy/schemas,
checked with the other manifests in test_k8s.py), whose Prometheus trigger queries series that /metrics
exports (names and labels imported from mloc.api.metrics) and counts the work that pool can take.
"""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mloc.api.metrics import BUSY_WORKERS, PENDING_DEMAND_TASKS, SERIES
from mloc.orchestrator.demand import ANY_GPU, NO_GPU, gpu_label
from mloc.orchestrator.placement import topic_matches
from mloc.settings import Settings

from .conftest import KEDA_PROMETHEUS_SCALER, custom_resource_errors, overlays, rendered

KEDA_OVERLAYS = ["gpu-keda"]
# Labels Prometheus adds to every series it scrapes, which a query may group by.
TARGET_LABELS = {"instance", "job"}
# Topics a task may have, to compare a trigger's topic matcher with the pool's TASK_TOPICS.
SAMPLE_TOPICS = ("tasks.inference", "tasks.sft", "tasks.echo", "tasks.big", "batch.nightly", "other")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")\s*'
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_DIVISOR = re.compile(r"\)\s*/\s*(\d+)\s*\)\s*$")

Matcher = tuple[str, str]  # (operator, value)


def _matchers(body: str) -> dict[str, Matcher]:
    """A selector's label matchers ('a="x", b=~"y.*"'), by label; a malformed one raises ValueError."""
    if not re.fullmatch(f"(?:{_MATCHER}(?:,{_MATCHER})*,?)?\\s*", body):
        raise ValueError(f"malformed label matchers {{{body}}}")
    return {label: (op, yaml.safe_load(value)) for label, op, value in re.findall(_MATCHER, body)}


def selectors(query: str) -> list[tuple[str, dict[str, Matcher]]]:
    return [(name, _matchers(body)) for name, body in _SELECTOR.findall(query)]


def query_problems(query: str) -> list[str]:
    """What is wrong with a trigger's PromQL as far as MLOC's series go (empty when nothing is)."""
    problems = []
    bare = _STRING.sub('""', query)
    depth = 0
    for char in bare:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            break
    if depth != 0 or bare.count("{") != bare.count("}"):
        problems.append("unbalanced parentheses or braces")
    names = set(re.findall(r"\bmloc_[a-z0-9_]+\b", bare))
    problems += [f"{name} is not a series /metrics exports" for name in sorted(names - set(SERIES))]
    if not names:
        problems.append("names no MLOC series")
    try:
        found = selectors(query)
    except ValueError as exc:
        return [*problems, str(exc)]
    for name, matchers in found:
        for label, (op, value) in matchers.items():
            if label not in SERIES.get(name, ()):
                problems.append(f"{name} has no label {label!r} (it has {', '.join(SERIES.get(name, ())) or 'none'})")
            if op in ("=~", "!~"):
                try:
                    re.compile(value)
                except re.error as exc:
                    problems.append(f"{name}{{{label}{op}{value!r}}}: {exc}")
    known = TARGET_LABELS.union(*(SERIES.get(name, ()) for name in names))
    for group in _GROUPING.findall(bare):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known:
                problems.append(f"groups by {label!r}, which no series in the query has")
    return problems


def selects(matcher: Matcher | None, value: str) -> bool:
    """Whether a PromQL label matcher (None: no matcher on that label) selects ``value``."""
    if matcher is None:
        return True
    op, pattern = matcher
    hit = value == pattern if op in ("=", "!=") else re.fullmatch(pattern, value) is not None
    return hit if op in ("=", "=~") else not hit


def _scaled(overlay: str) -> list[dict[str, Any]]:
    return [d for d in rendered(overlay) if d["kind"] == "ScaledObject"]


def _worker_deployments(overlay: str) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d
        for d in rendered(overlay)
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def _gpus(deployment: dict[str, Any]) -> int:
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def _query(scaled: dict[str, Any]) -> str:
    (trigger,) = scaled["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


def _one(query: str, name: str) -> dict[str, Matcher]:
    found = [matchers for series, matchers in selectors(query) if series == name]
    assert len(found) == 1, f"{name} should appear once in {query!r}"
    return found[0]


def test_keda_overlays_are_the_ones_with_scaled_objects() -> None:
    assert sorted(o for o in overlays() if _scaled(o)) == KEDA_OVERLAYS


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_every_worker_pool_scales_from_zero_by_one_scaled_object(overlay: str) -> None:
    workers = _worker_deployments(overlay)
    targets = [s["spec"]["scaleTargetRef"] for s in _scaled(overlay)]
    assert sorted(t["name"] for t in targets) == sorted(workers), "one ScaledObject per worker pool"
    for scaled in _scaled(overlay):
        spec, name = scaled["spec"], scaled["metadata"]["name"]
        assert (spec["scaleTargetRef"].get("apiVersion"), spec["scaleTargetRef"].get("kind")) == (
            "apps/v1",
            "Deployment",
        )
        assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1, name
        assert spec["pollingInterval"] > 0 and spec["cooldownPeriod"] >= 60, name
        assert [t["type"] for t in spec["triggers"]] == ["prometheus"], name
        # A replicas field would put back its count on every `kubectl apply`, over what KEDA chose.
        assert "replicas" not in workers[spec["scaleTargetRef"]["name"]]["spec"], name
        # Scaling in sooner than a pod can drain would stop tasks that had a worker to go back to.
        down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 60, name


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_triggers_use_only_the_prometheus_scalers_parameters(overlay: str) -> None:
    parameters = yaml.safe_load(KEDA_PROMETHEUS_SCALER.read_text())["parameters"]
    known = {p["name"] for p in parameters}
    required = {p["name"] for p in parameters if not p.get("optional") and "default" not in p}
    assert required == {"serverAddress", "query", "threshold"}
    for scaled in _scaled(overlay):
        (trigger,) = scaled["spec"]["triggers"]
        metadata = trigger["metadata"]
        assert set(metadata) <= known, f"unknown prometheus parameters: {set(metadata) - known}"
        assert required <= set(metadata), f"missing: {required - set(metadata)}"
        assert float(metadata["threshold"]) > 0 and float(metadata.get("activationThreshold", "0")) >= 0
        address = urlsplit(metadata["serverAddress"])
        assert address.scheme in ("http", "https") and address.hostname, metadata["serverAddress"]


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_trigger_queries_name_series_and_labels_metrics_exports(overlay: str) -> None:
    for scaled in _scaled(overlay):
        query = _query(scaled)
        assert query_problems(query) == [], (scaled["metadata"]["name"], query)
        _one(query, BUSY_WORKERS)
        _one(query, PENDING_DEMAND_TASKS)


def test_the_query_check_catches_a_wrong_series_label_or_regex() -> None:
    good = 'max(sum by (instance) (mloc_pending_demand_tasks{gpu_type=~"a100", topic=~"tasks[.].*"})) or vector(0)'
    assert query_problems(good) == []
    broken = {
        good.replace("mloc_pending_demand_tasks", "mloc_pending_demand"): "is not a series",
        good.replace("gpu_type=~", "gpu_model=~"): "has no label 'gpu_model'",
        good.replace('"a100"', '"a100(("'): "missing ), unterminated subpattern",
        good.replace("by (instance)", "by (pool)"): "groups by 'pool'",
        good.replace("max(sum", "max(sum("): "unbalanced",
        good.replace('gpu_type=~"a100"', "gpu_type=a100"): "malformed label matchers",
        "sum(up)": "names no MLOC series",
    }
    for query, wanted in broken.items():
        problems = query_problems(query)
        assert any(wanted in problem for problem in problems), (query, problems)


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_each_pool_counts_the_work_it_can_take_and_only_that(overlay: str) -> None:
    workers = _worker_deployments(overlay)
    pools = []  # (deployment name, GPUs per pod, GPU product as NVML names it, model tag, query)
    for scaled in _scaled(overlay):
        deployment = workers[scaled["spec"]["scaleTargetRef"]["name"]]
        pod = deployment["spec"]["template"]["spec"]
        product = pod.get("nodeSelector", {}).get("nvidia.com/gpu.product", "")
        tags = [t for t in _env(deployment)["WORKER_TAGS"].split(",") if t not in ("gpu", "cpu")]
        pools.append((deployment["metadata"]["name"], _gpus(deployment), product.replace("-", " ", 1), tags, scaled))
    gpu_pools = [p for p in pools if p[1]]
    assert gpu_pools and len(gpu_pools) < len(pools), "the overlay has GPU pools and a CPU pool"

    for name, gpus, gpu_name, tags, scaled in pools:
        query = _query(scaled)
        busy, waiting = _one(query, BUSY_WORKERS), _one(query, PENDING_DEMAND_TASKS)
        env = _env(workers[name])
        # The pool's topics, and no others.
        takes = env["TASK_TOPICS"].split(",")
        for topic in SAMPLE_TOPICS:
            assert selects(waiting.get("topic"), topic) == topic_matches(topic, takes), (name, topic)
        if not gpus:
            assert busy["model"] == ("=", NO_GPU), name
            assert waiting["gpu_type"] == ("=", NO_GPU), name
            slots = int(env.get("MLOC_WORKER_SLOTS", Settings.model_fields["worker_slots"].default))
            divisor = _DIVISOR.search(query)
            assert divisor and int(divisor.group(1)) == slots, f"{name}: pods = waiting tasks / {slots} slots"
            continue
        # Its busy workers are the ones with its GPU model, and no other pool's.
        assert selects(busy["model"], gpu_name), (name, busy, gpu_name)
        for other, _, other_gpu, _, _ in gpu_pools:
            assert other == name or not selects(busy["model"], other_gpu), (name, other_gpu)
        # A task that fills one of its pods, asking for its GPU model by tag, in any spelling.
        assert waiting["gpu_count"] == ("=", str(gpus)), name
        for tag in tags:
            for asked in (tag, tag.upper(), f"NVIDIA {tag.upper()}"):
                label = gpu_label(asked, gpus)
                assert [
                    n for n, *_, s in gpu_pools if selects(_one(_query(s), PENDING_DEMAND_TASKS)["gpu_type"], label)
                ] == [name]
        assert not selects(waiting["gpu_type"], NO_GPU), name
    # A task that takes any GPU model wakes exactly one GPU pool.
    for_any = [n for n, *_, s in gpu_pools if selects(_one(_query(s), PENDING_DEMAND_TASKS)["gpu_type"], ANY_GPU)]
    assert len(for_any) == 1, for_any


def test_keda_schema_check_rejects_broken_scaled_objects() -> None:
    (good,) = [d for d in _scaled("gpu-keda") if d["metadata"]["name"] == "worker-gpu-h100"]
    assert custom_resource_errors(good) == []

    def broken(change: Any) -> list[str]:
        doc = copy.deepcopy(good)
        change(doc["spec"])
        return custom_resource_errors(doc)

    assert any("minReplicas" in e for e in broken(lambda s: s.update(minReplicas=s.pop("minReplicaCount"))))
    assert any(
        "'1' is not of type 'string'" in e or "1 is not of type 'string'" in e
        for e in broken(lambda s: s["triggers"][0]["metadata"].update(threshold=1))
    )
    assert any("scaleTargetRef" in e for e in broken(lambda s: s.pop("scaleTargetRef")))
    assert any("triggers" in e for e in broken(lambda s: s.update(triggers=[])))
    assert any("'zero' is not of type 'integer'" in e for e in broken(lambda s: s.update(minReplicaCount="zero")))
    over = broken(lambda s: s.update(minReplicaCount=9, maxReplicaCount=8))
    assert over == ["spec: minReplicaCount must be less than or equal to maxReplicaCount"], over
