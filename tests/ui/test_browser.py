"""/docs and /ui in a real browser (Debian's Chromium via Playwright) against a real server on 127.0.0.1, with
every other host blocked: the pages load offline, the curve has one point per profile, a click with the admin
token moves the operating point (seen in GET /profiles), a click without it changes nothing and says why, and
bundles activate and roll back in one click."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import AUTH, TOKEN, sample_pngs
from tests.api.test_e2e import Server
from tests.ui.conftest import OLD_BUNDLE, Page

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                             "(pip install -e '.[test]')").expect
expect.set_options(timeout=60_000)  # a wait, not a performance bound: generous for a loaded 2-core machine


def profiles(server: Server) -> dict:
    with server.client() as c:
        r = c.get("/profiles")
        assert r.status_code == 200, r.text
        return r.json()


def assert_offline(p: Page) -> None:
    assert p.outside == [], f"the page tried to reach other hosts: {p.outside}"
    assert all(url.startswith(p.base) for _, url in p.requests), p.requests


def assert_token_kept_in_memory(p: Page, server: Server) -> None:
    assert all(TOKEN not in url for _, url in p.requests)
    stored = p.storage()
    assert TOKEN not in str(stored), stored
    assert TOKEN not in server.log_text()


def unlock(p: Page, token: str = TOKEN) -> None:
    p.page.fill("#token", token)
    p.page.click("#token-use")


def test_docs_load_offline(browser_page: Page, ui_server: Server):
    with ui_server.client() as c:
        spec = c.get("/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method in
                     {"get", "post", "put", "patch", "delete"})
    p = browser_page
    p.goto("/docs")
    expect(p.page.locator(".opblock")).to_have_count(operations)
    assert p.page.locator(".opblock-summary-path", has_text="/profiles").count() >= 2
    p.shot("docs.png")
    assert_offline(p)
    assert p.console_errors == []
    assert any(url.endswith("/static/swagger-ui/swagger-ui-bundle.js") for _, url in p.requests)


def test_ui_curve_has_one_point_per_profile(browser_page: Page, ui_server: Server):
    data = profiles(ui_server)
    p = browser_page
    p.goto("/ui")
    n = len(data["profiles"])
    expect(p.page.locator("#curve circle.point")).to_have_count(n)
    modes = {r["mode"] for r in data["profiles"]}
    assert len(modes) >= 2, modes  # the IC store serves several decision modes: one series each
    for mode in modes:
        expected = sum(r["mode"] == mode for r in data["profiles"])
        assert p.page.locator(f'#curve g.series[data-mode="{mode}"] circle.point').count() == expected
    assert p.page.locator("#curve polyline.hull").count() == len(modes)
    assert p.page.get_attribute("#curve .active-marker", "data-name") == data["active"]["name"]
    assert p.page.text_content("#active-name") == data["active"]["name"]
    with ui_server.client() as c:
        exits = len(c.get("/ui/api/stats").json()["exits"])
    expect(p.page.locator("#exits rect.bar")).to_have_count(exits)
    p.shot("ui.png")
    assert_offline(p)
    assert p.console_errors == []


def _other_point(data: dict) -> dict:
    active = {data["active"]["a"], data["active"].get("b")}
    cm = [r for r in data["profiles"] if r["mode"] == "cm" and r["name"] not in active]
    return min(cm, key=lambda r: r["flops_fraction"])


def test_click_without_token_changes_nothing_and_says_why(browser_page: Page, ui_server: Server):
    before = profiles(ui_server)
    target = _other_point(before)
    p = browser_page
    p.goto("/ui")
    p.page.click(f'#curve circle.point[data-name="{target["name"]}"]')
    p.page.wait_for_selector("#message.warn")
    assert "admin token" in p.page.text_content("#message")
    after = profiles(ui_server)
    assert (after["active"], after["version"]) == (before["active"], before["version"])
    assert not [u for m, u in p.requests if m != "GET"], p.requests
    assert p.page.is_hidden("#bundles-box")  # admin data only with the token
    assert_offline(p)


def test_wrong_token_is_refused_and_page_stays_read_only(browser_page: Page, ui_server: Server):
    p = browser_page
    p.goto("/ui")
    unlock(p, "not-the-token-0123456789")
    p.page.wait_for_selector("#message.error")
    assert "401" in p.page.text_content("#message") and "unauthorized" in p.page.text_content("#message")
    assert p.page.text_content("#token-state") == "read-only"
    assert p.page.is_hidden("#bundles-box")


def test_click_with_token_switches_the_operating_point(browser_page: Page, ui_server: Server):
    before = profiles(ui_server)
    target = _other_point(before)
    p = browser_page
    p.goto("/ui")
    unlock(p)
    p.page.wait_for_selector("#bundles tbody tr")
    p.page.click(f'#curve circle.point[data-name="{target["name"]}"]')
    expect(p.page.locator("#active-name")).to_have_text(target["name"])
    after = profiles(ui_server)
    assert after["active"]["name"] == target["name"]
    assert after["version"] > before["version"]
    assert p.page.get_attribute("#curve .active-marker", "data-name") == target["name"]
    p.shot("ui-switched.png")
    assert_token_kept_in_memory(p, ui_server)
    assert_offline(p)


def test_bundle_activate_and_roll_back_in_one_click(browser_page: Page, ui_server: Server):
    start = profiles(ui_server)["bundle"]
    assert start != OLD_BUNDLE
    p = browser_page
    p.goto("/ui")
    unlock(p)
    rollback = p.page.locator("#rollback")
    rollback.wait_for()
    assert OLD_BUNDLE in rollback.text_content()
    rollback.click()
    p.page.wait_for_selector(f'#bundles tr.active[data-bundle="{OLD_BUNDLE}"]')
    assert profiles(ui_server)["bundle"] == OLD_BUNDLE
    p.page.click(f'#bundles button.activate[data-bundle="{start}"]')
    p.page.wait_for_selector(f'#bundles tr.active[data-bundle="{start}"]')
    assert profiles(ui_server)["bundle"] == start
    with ui_server.client() as c:
        bundles = c.get("/admin/bundles", headers=AUTH).json()
    assert p.page.locator("#bundles tbody tr").count() == len(bundles["bundles"])
    assert_token_kept_in_memory(p, ui_server)
    assert_offline(p)


def test_live_histogram_counts_the_service_counters(browser_page: Page, ui_server: Server):
    pngs = sample_pngs(12)
    with ui_server.client() as c:
        r = c.post("/classify", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
        assert r.status_code == 200, r.text
        stats = c.get("/ui/api/stats").json()
    p = browser_page
    p.goto("/ui")
    expect(p.page.locator("#total-samples")).to_have_text(str(stats["samples"]))
    bars = p.page.locator("#exits rect.bar")
    assert bars.count() == len(stats["exits"])
    shown = sum(int(bars.nth(i).get_attribute("data-samples")) for i in range(bars.count()))
    assert shown == stats["samples"] >= 12
    assert_offline(p)


def test_autopilot_point_and_floor_are_drawn_when_it_is_on(browser_page: Page, ui_server: Server):
    """GET /profiles as the latency autopilot reports itself (an ``autopilot`` object); the real response with
    that object added, so the page is checked against the shape, not against a running controller."""
    data = profiles(ui_server)
    floor = min(r["accuracy"] for r in data["profiles"])

    def with_autopilot(route) -> None:
        response = route.fetch()
        body = response.json()
        body["autopilot"] = {"enabled": True, "target_ms": 100.0, "min_accuracy": floor, "mode": "cm",
                             "operating": body["active"], "why": "p99 within target", "p99_ms": 42.0}
        route.fulfill(response=response, json=body)

    p = browser_page
    p.page.route("**/profiles", with_autopilot)
    p.goto("/ui")
    expect(p.page.locator("#curve path.autopilot-marker")).to_have_count(1)
    expect(p.page.locator("#curve line.floor")).to_have_count(1)
    info = p.page.locator("#autopilot-info")
    expect(info).to_be_visible()
    expect(info).to_contain_text("p99 target 100 ms")
    expect(info).to_contain_text("p99 within target")
    p.shot("ui-autopilot.png")
    assert_offline(p)


def test_autopilot_off_draws_nothing(browser_page: Page, ui_server: Server):
    def with_autopilot_off(route) -> None:
        response = route.fetch()
        body = {**response.json(), "autopilot": {"enabled": False}}
        route.fulfill(response=response, json=body)

    p = browser_page
    p.page.route("**/profiles", with_autopilot_off)
    p.goto("/ui")
    expect(p.page.locator("#curve circle.point").first).to_be_attached()
    assert p.page.locator("#curve path.autopilot-marker").count() == 0
    assert p.page.is_hidden("#autopilot-info")


def test_stats_endpoint_needs_no_token_but_admin_routes_do(ui_server: Server):
    with httpx.Client(base_url=ui_server.url, trust_env=False, timeout=30) as c:
        assert c.get("/ui/api/stats").status_code == 200
        assert c.get("/admin/bundles").status_code == 401
        assert c.post("/profiles", json={"name": "full"}).status_code == 401


def test_the_curve_switches_to_the_time_axis_and_back(browser_page: Page, ui_server: Server):
    data = profiles(ui_server)
    timed = [r for r in data["profiles"] if r.get("time_fraction") is not None]
    assert timed and all(r["mode"] == "cm" for r in timed)  # the bundle's profiles; IC modes are not timed
    p = browser_page
    p.goto("/ui")
    expect(p.page.locator("#curve circle.point")).to_have_count(len(data["profiles"]))
    p.page.click("#axis-time")
    expect(p.page.locator("#curve circle.point")).to_have_count(len(timed))
    assert p.page.get_attribute("#curve", "data-axis") == "time"
    assert p.page.get_attribute("#axis-time", "aria-pressed") == "true"
    assert "measured time" in p.page.text_content("#curve")
    assert p.page.get_attribute("#curve .active-marker", "data-name") == data["active"]["name"]
    p.shot("ui_time.png")
    p.page.click("#axis-flops")
    expect(p.page.locator("#curve circle.point")).to_have_count(len(data["profiles"]))
    assert p.page.get_attribute("#curve", "data-axis") == "flops"
    assert p.console_errors == []
