"""Schemathesis against the live OpenAPI spec: no 5xx, and every response matches its documented schema.

The server is a real ``classmeans serve`` on 127.0.0.1; the spec is its own ``/openapi.json``. Every
operation is fuzzed with Hypothesis-generated positive (schema-valid) and negative (schema-violating)
requests, with the admin token so that the admin routes are exercised past authentication. Checks:
``not_a_server_error`` and ``response_schema_conformance`` (both must hold for every call).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from bench.rel.common import ScenarioResult, Timer, copy_store
from bench.servers import classmeans_server


def _fuzz(base_url: str, token: str, max_examples: int) -> dict[str, Any]:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    calls = 0
    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy
    operations: list[str] = []
    no_negative: list[str] = []
    def make_test(strategy: Any, label: str) -> Any:
        @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case: Any) -> None:
            nonlocal calls
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
            calls += 1
            statuses[str(response.status_code)] += 1
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance],
                                       headers=headers)
            except Exception as exc:  # every failure is recorded, the fuzzing goes on
                if len(failures) < 20:
                    failures.append(f"{label}: {str(exc).strip().splitlines()[0][:300]}")

        return fuzz

    for result in schema.get_all_operations():
        op = result.ok()
        operations.append(f"{op.method.upper()} {op.path}")
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                make_test(op.as_strategy(generation_mode=mode), f"{operations[-1]} ({mode.value})")()
            except Unsatisfiable:  # nothing in this operation can be made schema-invalid (no parameters)
                no_negative.append(operations[-1])
    return {"operations": operations, "calls": calls, "statuses": dict(sorted(statuses.items())),
            "failures": failures, "no_negative_cases": no_negative}


def run(model_dir: Path, work: Path, max_examples: int = 50) -> ScenarioResult:
    res = ScenarioResult("schemathesis: no 5xx, responses match the OpenAPI schemas")
    with Timer(res):
        store = copy_store(model_dir, work)
        with classmeans_server(store, model_dir.name, work / "schema.log", torch_threads=1, warmup="false") as srv:
            out = _fuzz(srv.url, srv.token, max_examples)
    server_errors = sum(n for s, n in out["statuses"].items() if s.startswith("5"))
    res.figures.update({"operations": len(out["operations"]), "calls": out["calls"],
                        "max_examples_per_operation_and_mode": max_examples, "statuses": out["statuses"],
                        "operations_without_negative_cases": len(out["no_negative_cases"]),
                        "failures": out["failures"]})
    res.check("every operation fuzzed", out["calls"] >= len(out["operations"]), out["operations"])
    res.check("no 5xx", server_errors == 0, out["statuses"])
    res.check("no check failed (5xx or schema mismatch)", not out["failures"], out["failures"][:3])
    return res
