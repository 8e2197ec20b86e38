"""The operator's page and the latency autopilot in a real browser (Debian's Chromium via Playwright) against
``classmeans serve --workers 2`` on 127.0.0.1: the autopilot is turned on and off from the page (POST /profiles
with the token typed into it), a target nothing can meet is refused with what is reachable, the trace chart
fills, and the live figures are the whole server's (both workers merged), not the answering process's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.api.conftest import sample_pngs
from tests.api.test_e2e import Server
from tests.ui.conftest import Page, open_page
from tests.ui.test_browser import assert_offline, assert_token_kept_in_memory, profiles, unlock

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                             "(pip install -e '.[test]')").expect
expect.set_options(timeout=60_000)  # a wait, not a performance bound: generous for a loaded 2-core machine


FOLLOW_CAP_S = 30.0  # workers follow active.json within a second; a bound on the wait, not a performance goal


def settled(srv: Server, ok: Callable[[dict], bool]) -> dict:
    """GET /profiles' autopilot once ``ok`` holds on several answers in a row (any worker may answer; the other
    one follows the store within its poll interval)."""
    deadline = time.monotonic() + FOLLOW_CAP_S
    streak, ap = 0, {}
    while time.monotonic() < deadline and streak < 4:
        ap = profiles(srv)["autopilot"]
        streak = streak + 1 if ok(ap) else 0
        time.sleep(0.2)
    return ap


@pytest.fixture()
def page2(playwright_driver: Any, two_worker_server: Server) -> Iterator[Page]:
    with open_page(playwright_driver, two_worker_server) as p:
        yield p


def test_turn_the_autopilot_on_and_off_from_the_page(page2: Page, two_worker_server: Server):
    srv = two_worker_server
    assert profiles(srv)["autopilot"]["enabled"] is False
    p = page2
    p.goto("/ui")
    unlock(p)
    p.page.wait_for_selector("#bundles tbody tr")
    p.page.fill("#ap-target", "1")  # below what the cheapest point needs at batch 1
    p.page.click("#ap-on")
    p.page.wait_for_selector("#message.error")
    text = p.page.text_content("#message")
    assert "422" in text and "slo_unreachable" in text and "reachable" in text
    assert profiles(srv)["autopilot"]["enabled"] is False

    p.page.fill("#ap-target", "250")
    p.page.fill("#ap-floor", "60")
    p.page.click("#ap-on")
    expect(p.page.locator("#ap-state")).to_contain_text("on")
    ap = settled(srv, lambda a: a["enabled"])  # both workers: the configuration is the store's
    assert ap["enabled"] and ap["latency_slo_ms"] == 250 and ap["min_accuracy"] == pytest.approx(0.6)
    assert ap["axis"] == "time"
    expect(p.page.locator("#autopilot-info")).to_contain_text("p99 target 250 ms")
    expect(p.page.locator("#curve path.autopilot-marker")).to_have_count(1)
    expect(p.page.locator("#trace path.trace-line.target")).to_have_count(1)  # the trace chart fills
    p.shot("ui-autopilot-on.png")

    p.page.click("#ap-off")
    expect(p.page.locator("#ap-state")).to_have_text("off")
    assert settled(srv, lambda a: not a["enabled"])["enabled"] is False
    assert_token_kept_in_memory(p, srv)
    assert_offline(p)
    assert [e for e in p.console_errors if "422" not in e and "Unprocessable" not in e] == []


def test_live_figures_merge_both_workers(page2: Page, two_worker_server: Server):
    srv = two_worker_server
    with srv.client() as c:
        before = c.get("/ui/api/stats").json()
    assert before["scope"] == "server" and before["processes"] == 2
    pngs = sample_pngs(4)
    answered_by = set()
    for i in range(24):  # a new connection each: the kernel spreads them over both workers
        with srv.client() as c:
            r = c.post("/classify", content=pngs[i % 4], headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            answered_by.add(r.headers["X-Classmeans-Worker"])
    p = page2
    p.goto("/ui")
    expect(p.page.locator("#total-samples")).to_have_text(str(before["samples"] + 24))
    expect(p.page.locator("#live-scope")).to_contain_text("2 workers merged")
    assert p.page.get_attribute("#live-card", "data-scope") == "server"
    p.shot("ui-two-workers.png")
    assert_offline(p)
