"""A real Prometheus server scrapes a real `classmeans serve`; after a bounded burst of classify requests the
exit-depth histogram and the FLOPs counters in Prometheus equal what the responses reported. Also: promtool
accepts /metrics, the live labels match the metric contract, and every dashboard query runs in Prometheus.

Everything listens on 127.0.0.1 only; both processes are ended in teardown.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import LiveService
from tests.deploy.metrics_contract import DOCUMENTED, families_from_text
from tests.deploy.support import (
    DASHBOARD_JSON,
    PROMETHEUS_YML,
    free_port,
    require_tool,
    spawn,
    wait_until,
)
from tests.factories import synthetic_images

SCRAPE_INTERVAL = "1s"
SETTLE_TIMEOUT_S = 60.0


@dataclass
class Prometheus:
    port: int

    def query(self, expr: str) -> dict:
        with httpx.Client(timeout=10, trust_env=False) as c:
            r = c.get(f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": expr})
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body}")
        return body["data"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def vector(self, expr: str, label: str) -> dict[str, float]:
        return {s["metric"].get(label, ""): float(s["value"][1]) for s in self.query(expr)["result"]}


def prometheus_config(service_port: int) -> str:
    """docker/prometheus/prometheus.yml with the target moved to the test service and a 1 s interval."""
    text = PROMETHEUS_YML.read_text()
    replaced = (text.replace('"classmeans:8000"', f'"127.0.0.1:{service_port}"')
                .replace("scrape_interval: 5s", f"scrape_interval: {SCRAPE_INTERVAL}")
                .replace("scrape_timeout: 4s", "scrape_timeout: 1s"))
    assert f"127.0.0.1:{service_port}" in replaced and f"scrape_interval: {SCRAPE_INTERVAL}" in replaced, \
        "docker/prometheus/prometheus.yml changed shape; update prometheus_config()"
    return replaced


@pytest.fixture(scope="module")
def prometheus(live_service: LiveService, tmp_path_factory: pytest.TempPathFactory):
    exe = require_tool("prometheus", "Debian package prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    cfg = work / "prometheus.yml"
    cfg.write_text(prometheus_config(live_service.port))
    port = free_port()
    argv = [exe, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={work / 'data'}", "--storage.tsdb.retention.time=1h", "--log.level=warn"]
    with spawn("prometheus", argv, work / "prometheus.log", cwd=work, grace_s=15.0) as proc:
        prom = Prometheus(port)

        def ready() -> bool:
            proc.check_alive()
            with httpx.Client(timeout=5, trust_env=False) as c:
                return c.get(f"http://127.0.0.1:{port}/-/ready").status_code == 200
        wait_until(ready, 60, what="Prometheus /-/ready")
        wait_until(lambda: prom.scalar('up{job="classmeans"}') == 1.0, 60, what="the service target up")
        yield prom


def metric_value(text: str, family: str, sample: str, **match: str) -> float:
    """Sum of the ``sample`` series of ``family`` whose labels include ``match``."""
    total = 0.0
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            for s in fam.samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in match.items()):
                    total += s.value
    return total


def png(image) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Traffic:
    exits: list[int]
    flops: list[float]
    flops_full: float
    num_exits: int
    base: dict[str, float]
    base_buckets: dict[float, float]  # le -> count before the traffic
    base_exits: dict[int, float]      # exit -> samples before the traffic
    requests: int


@pytest.fixture(scope="module")
def traffic(live_service: LiveService, prometheus: Prometheus) -> Traffic:
    """A bounded burst: 6 single-file multipart requests, 3 raw image/png bodies, one 5-file multipart
    request (14 samples, 10 requests), after a baseline read of the counters."""
    before = live_service.metrics_text()
    base = {
        "count": metric_value(before, "classmeans_exit_depth", "classmeans_exit_depth_count"),
        "spent": metric_value(before, "classmeans_flops_spent", "classmeans_flops_spent_total"),
        "full": metric_value(before, "classmeans_flops_full", "classmeans_flops_full_total"),
        "saved": metric_value(before, "classmeans_flops_saved", "classmeans_flops_saved_total"),
    }
    base_buckets: dict[float, float] = {}
    base_exits: dict[int, float] = {}
    for fam in text_string_to_metric_families(before):
        for smp in fam.samples:
            if smp.name == "classmeans_exit_depth_bucket":
                le = float(smp.labels["le"])
                base_buckets[le] = base_buckets.get(le, 0.0) + smp.value
            elif smp.name == "classmeans_samples_total":
                j = int(smp.labels["exit"])
                base_exits[j] = base_exits.get(j, 0.0) + smp.value
    images = [png(img) for img in synthetic_images(14, seed=3).images]
    preds: list[dict] = []
    requests = 0
    with live_service.client(timeout=60) as c:
        for blob in images[:6]:
            r = c.post("/classify", files={"file": ("x.png", blob, "image/png")})
            assert r.status_code == 200, r.text
            preds += r.json()["predictions"]
            requests += 1
        for blob in images[6:9]:
            r = c.post("/classify", content=blob, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            preds += r.json()["predictions"]
            requests += 1
        r = c.post("/classify", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(images[9:])])
        assert r.status_code == 200, r.text
        preds += r.json()["predictions"]
        requests += 1
    assert len(preds) == 14
    full = {p["flops_full"] for p in preds}
    num_exits = {p["num_exits"] for p in preds}
    assert len(full) == 1 and len(num_exits) == 1
    return Traffic([p["exit_index"] for p in preds], [p["flops"] for p in preds], full.pop(), num_exits.pop(),
                   base, base_buckets, base_exits, requests)


def close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def test_prometheus_sees_exit_depth_and_flops(prometheus: Prometheus, traffic: Traffic, live_service):
    n = len(traffic.exits)
    m = f'{{model="{live_service.model}"}}'
    want = {
        f"sum(classmeans_exit_depth_count{m})": traffic.base["count"] + n,
        f"sum(classmeans_samples_total{m})": traffic.base["count"] + n,
        f"sum(classmeans_flops_spent_total{m})": traffic.base["spent"] + sum(traffic.flops),
        f"sum(classmeans_flops_full_total{m})": traffic.base["full"] + n * traffic.flops_full,
        f"sum(classmeans_flops_saved_total{m})":
            traffic.base["saved"] + sum(max(0.0, traffic.flops_full - f) for f in traffic.flops),
    }

    def settled() -> bool:
        return all(close(prometheus.scalar(q), v) for q, v in want.items())
    try:
        wait_until(settled, SETTLE_TIMEOUT_S, interval_s=0.5, what="Prometheus to see the traffic")
    except TimeoutError:
        got = {q: prometheus.scalar(q) for q in want}
        raise AssertionError(f"Prometheus has {got}, expected {want}") from None

    # the histogram, bucket by bucket: le="j" counts samples that left at exit j or earlier
    buckets = prometheus.vector(f"sum by (le) (classmeans_exit_depth_bucket{m})", "le")
    les = sorted(float(le) for le in buckets if le != "+Inf")
    assert les == [float(j) for j in range(traffic.num_exits)], les
    for le, value in buckets.items():
        bound = math.inf if le == "+Inf" else float(le)
        expected = traffic.base_buckets.get(bound, 0.0) + sum(1 for e in traffic.exits if e <= bound)
        assert value == expected, (le, value, expected, traffic.exits)
    per_exit = prometheus.vector(f"sum by (exit) (classmeans_samples_total{m})", "exit")
    for j in range(traffic.num_exits):
        expected = traffic.base_exits.get(j, 0.0) + traffic.exits.count(j)
        assert per_exit.get(str(j), 0.0) == expected, (j, per_exit, traffic.exits)


def test_promtool_check_metrics_is_clean(live_service: LiveService, traffic: Traffic):
    promtool = require_tool("promtool", "Debian package prometheus")
    text = live_service.metrics_text()
    assert "classmeans_exit_depth_bucket" in text
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", \
        out.stdout + out.stderr


def test_live_labels_match_the_metric_contract(live_service: LiveService, traffic: Traffic):
    families = families_from_text(live_service.metrics_text())
    problems = []
    for name, doc in DOCUMENTED.items():
        if name not in families:
            problems.append(f"{name} missing")
            continue
        _kind, label_sets = families[name]
        for labels in label_sets:
            if labels != doc.labels:
                problems.append(f"{name}: labels {sorted(labels)}, documented {sorted(doc.labels)}")
    for name in ("classmeans_exit_depth", "classmeans_samples", "classmeans_flops_per_sample",
                 "classmeans_requests", "classmeans_request_latency_seconds", "classmeans_batch_size"):
        assert families[name][1], f"{name} has no samples after traffic"
    assert not problems, "\n".join(problems)


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(Path(DASHBOARD_JSON).read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables the way Grafana would for an 'All' selection over the last minutes."""
    for var, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m")):
        expr = expr.replace(var, value)
    for var in ("$model", "$profile", "$endpoint"):
        expr = expr.replace(var, ".*")
    assert "$" not in expr, expr
    return expr


def test_every_dashboard_query_runs_in_prometheus(prometheus: Prometheus, traffic: Traffic):
    for _title, expr in dashboard_queries():
        prometheus.query(grafana_to_promql(expr))  # raises on a PromQL error
    core = [(t, e) for t, e in dashboard_queries()
            if t in ("Exit-depth distribution", "FLOPs per second: spent, saved, full network",
                     "Request rate by endpoint and status", "Ready")]
    assert len(core) >= 4

    def all_have_data() -> bool:
        return all(prometheus.query(grafana_to_promql(e))["result"] for _, e in core)
    wait_until(all_have_data, 30, interval_s=1.0, what="data in the core dashboard panels")


def test_prometheus_sees_a_profile_switch(prometheus: Prometheus, traffic: Traffic, live_service: LiveService):
    """An admin switch reaches the 'active profile and bundle' panel: the info gauge moves to the new profile
    and the switch counter goes up by one."""
    m = f'model="{live_service.model}"'
    before = prometheus.scalar(f"sum(classmeans_profile_switches_total{{{m}}})") or 0.0
    with live_service.client() as c:
        r = c.post("/profiles", json={"name": "full"}, headers={"Authorization": f"Bearer {live_service.token}"})
        assert r.status_code == 200, r.text
        bundle = r.json()["bundle"]

    def switched() -> bool:
        info = prometheus.query(f"classmeans_active_info{{{m}}} == 1")["result"]
        return (close(prometheus.scalar(f"sum(classmeans_profile_switches_total{{{m}}})"), before + 1)
                and [(s["metric"]["profile"], s["metric"]["bundle"]) for s in info] == [("full", bundle)])
    wait_until(switched, SETTLE_TIMEOUT_S, interval_s=0.5, what="Prometheus to see the profile switch")
