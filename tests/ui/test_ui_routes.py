"""/docs, /ui, /static and /ui/api/stats over ASGI (no browser): only local assets, a CSP on both pages, the
vendored Swagger UI byte for byte as recorded, and live figures equal to the service's own counters."""

from __future__ import annotations

import hashlib
import re
from html.parser import HTMLParser
from importlib import resources

from prometheus_client.parser import text_string_to_metric_families

from service.api.ui.stats import is_inference
from tests.api.conftest import AUTH, Served, assert_envelope, make_settings, sample_pngs, serve

SWAGGER = resources.files("service.api") / "static" / "swagger-ui"


class _Refs(HTMLParser):
    """Every src/href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]
        self.tags.append((tag, dict(attrs)))


def parse(html: str) -> _Refs:
    parser = _Refs()
    parser.feed(html)
    return parser


def refs(html: str) -> list[str]:
    return parse(html).refs


def is_local(ref: str) -> bool:
    return ref.startswith("data:") or not re.match(r"^([a-z][a-z0-9+.-]*:|//)", ref, re.IGNORECASE)


async def test_docs_use_only_packaged_assets(served: Served):
    r = await served.client.get("/docs")
    assert r.status_code == 200
    found = refs(r.text)
    assert "/static/swagger-ui/swagger-ui-bundle.js" in found and "/static/swagger-ui/swagger-ui.css" in found
    assert all(is_local(x) for x in found), found
    assert "cdn.jsdelivr.net" not in r.text and "fastapi.tiangolo.com" not in r.text
    assert '"validatorUrl": null' in r.text  # the spec's URL is never sent to the public validator
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self' 'sha256-" in csp and "connect-src 'self'" in csp
    for path in ("/static/swagger-ui/swagger-ui-bundle.js", "/static/swagger-ui/swagger-ui.css",
                 "/static/swagger-ui/favicon-32x32.png"):
        asset = await served.client.get(path)
        assert asset.status_code == 200 and asset.content, path
    assert (await served.client.get("/redoc")).status_code == 404  # FastAPI's CDN page is not registered
    assert (await served.client.head("/docs")).status_code == 200
    text = (await served.client.get("/metrics")).text
    requests = _metric(text, "classmeans_requests_total")
    assert requests[(("endpoint", "/static"), ("model", "tiny"), ("status", "200"))] == 3  # labelled, bounded
    assert not any(dict(k)["endpoint"].startswith("/static/") for k in requests)


def test_vendored_swagger_ui_matches_its_record():
    record = (SWAGGER / "VENDORED.md").read_text()
    rows = dict(re.findall(r"^\| (\S+) \| ([0-9a-f]{64}) \|$", record, re.MULTILINE))
    assert set(rows) == {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}
    for name, digest in rows.items():
        assert hashlib.sha256((SWAGGER / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in (SWAGGER / "LICENSE").read_text()
    assert (SWAGGER / "NOTICE").is_file() and (SWAGGER / "swagger-ui-bundle.js.LICENSE.txt").is_file()


async def test_ui_page_is_static_local_and_locked_down(served: Served):
    r = await served.client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    found = refs(r.text)
    assert "static/ui/ui.js" in found and "static/ui/ui.css" in found
    assert all(is_local(x) for x in found), found
    tags = parse(r.text).tags
    assert all(attrs.get("src") for tag, attrs in tags if tag == "script")  # no inline code
    assert not [tag for tag, _ in tags if tag == "form"]  # the token can never be submitted into a URL
    assert all(not k.startswith("on") for _, attrs in tags for k in attrs)  # no inline handlers
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["referrer-policy"] == "no-referrer"
    for asset in ("/static/ui/ui.js", "/static/ui/charts.js", "/static/ui/ui.css"):
        a = await served.client.get(asset)
        assert a.status_code == 200, asset
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", a.text), asset  # only the SVG namespace
        assert "localStorage" not in a.text and "sessionStorage" not in a.text and "document.cookie" not in a.text
    assert (await served.client.get("/static/../pyproject.toml")).status_code == 404


def _metric(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


async def test_stats_equal_the_service_counters(served: Served):
    client = served.client
    empty = (await client.get("/ui/api/stats")).json()
    assert empty["samples"] == 0 and all(e["samples"] == 0 for e in empty["exits"])
    assert empty["requests"] == {"inference": 0, "inference_errors": 0}
    pngs = sample_pngs(6)
    r = await client.post("/classify", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
    assert r.status_code == 200, r.text
    exits_seen = [p["exit_index"] for p in r.json()["predictions"]]
    assert (await client.post("/classify", content=b"not an image",
                              headers={"content-type": "image/png"})).status_code in (400, 415, 422)
    s = (await client.get("/ui/api/stats")).json()
    assert s["samples"] == 6
    assert [e["samples"] for e in s["exits"]] == [exits_seen.count(j) for j in range(len(s["exits"]))]
    assert [e["index"] for e in s["exits"]] == list(range(len(s["exits"])))
    assert s["exits"][-1]["flops_fraction"] == 1.0
    assert s["requests"] == {"inference": 2, "inference_errors": 1}
    assert s["instance"] == empty["instance"] and s["uptime_s"] > empty["uptime_s"]
    assert sum(s["rules"].values()) == 6
    text = (await client.get("/metrics")).text
    spent = sum(_metric(text, "classmeans_flops_spent_total").values())
    assert abs(s["flops"]["spent"] - spent) <= 1e-6 * max(1.0, spent)
    prof = (await client.get("/profiles")).json()
    assert (s["bundle"], s["profile"], s["version"]) == (prof["bundle"], prof["active"]["name"], prof["version"])


async def test_stats_not_ready_is_503_envelope(tmp_path):
    async with serve(make_settings(tmp_path / "empty-store")) as s:
        assert_envelope(await s.client.get("/ui/api/stats"), 503, "not_ready")
        assert (await s.client.get("/ui")).status_code == 200  # the page itself loads and shows why


def test_inference_endpoints():
    assert is_inference("/classify") and is_inference("/v2/models/{model_name}/infer")
    assert not is_inference("/ui/api/stats") and not is_inference("/profiles") and not is_inference("unmatched")


async def test_stats_of_one_process_say_so(served: Served):
    s = (await served.client.get("/ui/api/stats")).json()
    assert s["scope"] == "process" and s["processes"] == 1 and s["clock_s"] > 0


async def test_autopilot_trace_endpoint(served: Served):
    client = served.client
    off = (await client.get("/ui/api/autopilot")).json()
    assert off["enabled"] is False and off["every_s"] == 1.0 and off["max_len"] >= 300 and isinstance(off["pid"], int)
    r = await client.post("/profiles", json={"latency_slo_ms": 80}, headers=AUTH)
    assert r.status_code == 200, r.text
    rt = served.state.autopilot
    rt.tick()  # one record now (the live loop adds one a second)
    got = (await client.get("/ui/api/autopilot")).json()
    assert got["enabled"] is True and got["ticks"]
    last = got["ticks"][-1]
    assert last["target_ms"] == 80 and last["axis"] == "flops" and last["enabled"] is True
    assert set(last) >= {"t", "p99_ms", "accuracy", "budget", "shed_rate", "operating", "offered_rps"}
    later = (await client.get(f"/ui/api/autopilot?since={last['t']}")).json()
    assert all(t["t"] > last["t"] for t in later["ticks"])
    assert_envelope(await client.get("/ui/api/autopilot?since=soon"), 422, "validation_error")


def test_two_workers_report_merged_live_figures(tiny_store_root, tmp_path, monkeypatch):
    """``classmeans serve --workers 2``: every worker answers /ui/api/stats for the whole server, so the
    samples classified by both workers add up whichever worker answers the poll."""
    import shutil

    from tests.api.test_e2e import start, stop
    from tests.factories import REPO

    store = tmp_path / "store"
    shutil.copytree(tiny_store_root, store)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    srv = start(store, tmp_path / "serve.log", workers=2)
    try:
        png = sample_pngs(1)[0]
        answered_by = set()
        for _ in range(30):  # new connections: the kernel spreads them over both workers
            with srv.client() as one:
                r = one.post("/classify", content=png, headers={"Content-Type": "image/png"})
                assert r.status_code == 200, r.text
                answered_by.add(r.headers["X-Classmeans-Worker"])
        instances = set()
        for _ in range(10):
            with srv.client() as one:
                body = one.get("/ui/api/stats").json()
            assert body["scope"] == "server" and body["processes"] == 2, body
            assert body["samples"] == 30 and body["requests"]["inference"] == 30, body
            instances.add(body["instance"])
        assert len(instances) == 1  # one server id, whichever worker answers: the page's rates never restart
    finally:
        stop(srv)
def json_instance(c) -> str:
    return c.get("/ui/api/stats").json()["instance"]
