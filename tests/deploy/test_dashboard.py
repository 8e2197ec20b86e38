"""The Grafana dashboard queries only metrics and labels that the service exports."""

from __future__ import annotations

import json

import pytest

from tests.deploy.metrics_contract import DOCUMENTED, Family, series_index
from tests.deploy.promql import LEGEND_LABEL, template_query, usage
from tests.deploy.support import DASHBOARD_JSON, GRAFANA_DIR, load_yaml


def dashboard() -> dict:
    return json.loads(DASHBOARD_JSON.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def panel_targets(dash: dict) -> list[tuple[str, dict]]:
    return [(p["title"], t) for p in panels(dash) for t in p.get("targets", [])]


def template_queries(dash: dict) -> list[tuple[str, str]]:
    out = []
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((var["name"], q))
    return out


def check_expr(where: str, expr: str, index: dict[str, Family], legend: str = "") -> list[str]:
    """Problems of one PromQL expression against the exported series ``index``."""
    problems: list[str] = []
    use = usage(expr)
    if use.unknown_functions:
        problems.append(f"{where}: unknown PromQL functions {sorted(use.unknown_functions)}")
    if not use.metrics:
        problems.append(f"{where}: names no metric: {expr}")
    available: set[str] = set()
    for series, matcher_labels in use.metrics.items():
        fam = index.get(series)
        if fam is None:
            problems.append(f"{where}: metric {series!r} is not exported")
            continue
        labels = fam.series_labels(series)
        available |= labels
        if matcher_labels - labels:
            problems.append(f"{where}: {series} has no label(s) {sorted(matcher_labels - labels)}")
    if available and use.grouping - available:
        problems.append(f"{where}: groups by unknown label(s) {sorted(use.grouping - available)}")
    legend_labels = set(LEGEND_LABEL.findall(legend))
    if available and legend_labels - available:
        problems.append(f"{where}: legend uses unknown label(s) {sorted(legend_labels - available)}")
    return problems


def test_dashboard_is_a_provisionable_dashboard():
    dash = dashboard()
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert panel_targets(dash), "no queries"
    for title, t in panel_targets(dash):
        assert t.get("expr", "").strip(), f"{title}: empty query"
        assert t.get("refId"), f"{title}: query without refId"


def test_every_dashboard_query_names_an_exported_metric(exported_families):
    source, families = exported_families
    index = series_index(families)
    problems: list[str] = []
    for title, t in panel_targets(dashboard()):
        problems += check_expr(f"panel {title!r} ({t['refId']})", t["expr"], index, t.get("legendFormat", ""))
    for name, query in template_queries(dashboard()):
        parsed = template_query(query)
        if parsed is None:
            problems.append(f"variable ${name}: not a label_values(selector, label) query: {query}")
            continue
        selector, label = parsed
        problems += check_expr(f"variable ${name}", selector, index)
        for series in usage(selector).metrics:
            if series in index and label not in index[series].series_labels(series):
                problems.append(f"variable ${name}: {series} has no label {label!r}")
    assert not problems, f"checked against the {source}:\n" + "\n".join(problems)


def test_dashboard_covers_the_issue_panels():
    """Exit depth over time, FLOPs saved, request rate and latency percentiles, batch size, rejections, active
    profile and bundle, admin job outcomes: each has a query on the metric that carries it."""
    used: set[str] = set()
    for _, t in panel_targets(dashboard()):
        used |= set(usage(t["expr"]).metrics)
    required = {
        "exit-depth distribution": {"classmeans_exit_depth_bucket", "classmeans_samples_total"},
        "FLOPs saved": {"classmeans_flops_saved_total"},
        "request rate": {"classmeans_requests_total"},
        "latency percentiles": {"classmeans_request_latency_seconds_bucket"},
        "batch size": {"classmeans_batch_size_bucket"},
        "queue rejections": {"classmeans_rejected_total"},
        "active profile and bundle": {"classmeans_active_info"},
        "admin job outcomes": {"classmeans_admin_jobs_total"},
    }
    missing = {what: sorted(names - used) for what, names in required.items() if not names & used}
    assert not missing, f"dashboard lacks panels for {missing}"
    quantile_exprs = [t["expr"] for _, t in panel_targets(dashboard())
                      if "classmeans_request_latency_seconds_bucket" in t["expr"]]
    assert {q for e in quantile_exprs for q in ("0.5", "0.95", "0.99") if f"histogram_quantile({q}," in e} \
        == {"0.5", "0.95", "0.99"}, "latency panel should show p50, p95 and p99"


def test_the_service_exports_every_documented_metric(exported_families):
    """The metric contract the dashboard and docs are built on: every documented family is exported, with the
    documented type and (where the live service already has samples) the documented labels."""
    source, families = exported_families
    problems = []
    for name, doc in DOCUMENTED.items():
        fam = families.get(name)
        if fam is None:
            problems.append(f"{name} ({doc.type}) is not exported")
            continue
        if fam.type != doc.type:
            problems.append(f"{name}: type {fam.type}, documented {doc.type}")
        if fam.labels != doc.labels:
            problems.append(f"{name}: labels {sorted(fam.labels)}, documented {sorted(doc.labels)}")
    assert not problems, f"checked against the {source}:\n" + "\n".join(problems)


def test_dashboard_datasource_is_the_provisioned_one():
    ds = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    uids = {p["datasource"]["uid"] for p in panels(dashboard()) if "datasource" in p}
    uids |= {t["datasource"]["uid"] for _, t in panel_targets(dashboard()) if "datasource" in t}
    uids |= {v["datasource"]["uid"] for v in dashboard()["templating"]["list"] if "datasource" in v}
    assert uids == {prom["uid"]}


@pytest.mark.parametrize("expr, bad", [
    ('sum(rate(classmeans_requets_total{model="m"}[5m]))', "classmeans_requets_total"),
    ('sum by (exitt) (rate(classmeans_samples_total[$__rate_interval]))', "exitt"),
    ('rate(classmeans_flops_saved_total{profile="x"}[5m])', "profile"),
    ('histogram_quantile(0.5, rate(classmeans_exit_depth[5m]))', "classmeans_exit_depth"),
    ('sum(classmeans_up) by (model) + nosuchfn(classmeans_up)', "nosuchfn"),
])
def test_the_checker_catches_typos(expr, bad):
    index = series_index(DOCUMENTED)
    problems = check_expr("probe", expr, index)
    assert problems and bad in " ".join(problems)
