"""Schemathesis against the running orchestrator's own OpenAPI document, over real HTTP with a real
Redis: valid and invalid data for every operation, as the admin and as a user, and no answer is a 5xx.

Every answer's status must be one the document lists for its operation, with the documented content
type and body schema (tests/test_openapi_conformance.py holds the document to the same checks)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Err

from tests.reliability.conftest import Secured

EXAMPLES = 14  # per operation, mode and caller
MIN_CASES = 1000
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def schema(secured: Secured) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{secured.cluster.api_url}/openapi.json")


@pytest.fixture(scope="module")
def callers(secured: Secured) -> Iterator[dict[str, str]]:
    _, token = secured.add_user("fuzz")
    yield {"admin": secured.admin, "user": token}


@dataclass
class Tally:
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def fuzz(
    operation: APIOperation, mode: GenerationMode, caller: str, token: str, tally: Tally, session: requests.Session
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        # Always the caller's token: tests/reliability/test_auth.py covers bad ones on every route.
        generated = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        headers = {**generated, "Authorization": f"Bearer {token}"}
        response = case.call(headers=headers, timeout=30, session=session)
        tally.calls[operation.label] += 1
        tally.statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except AssertionError as exc:
            tally.failures.append(f"{caller} {mode.value} {operation.label}: {str(exc)[:800]}")

    try:
        run()
    except Unsatisfiable:
        # An operation with no parameters or body has no invalid form to generate.
        if mode != GenerationMode.NEGATIVE:
            raise


def test_no_generated_request_gets_a_server_error(
    schema: schemathesis.BaseSchema, callers: dict[str, str], secured: Secured
) -> None:
    tally = Tally()
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # a part of the schema that does not load fails here rather than going untested
        operations.append(result.ok())
    assert len(operations) >= 30, [op.label for op in operations]
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for caller, token in callers.items():
                    fuzz(operation, mode, caller, token, tally, session)
    total = sum(tally.calls.values())
    statuses = dict(sorted(tally.statuses.items()))
    print(f"\n{total} generated requests over {len(operations)} operations; statuses {statuses}")
    assert tally.failures == [], "\n\n".join(tally.failures[:10])
    assert total >= MIN_CASES
    assert not any(code >= 500 for code in statuses)
    assert secured.cluster.orchestrator and secured.cluster.orchestrator.poll() is None
