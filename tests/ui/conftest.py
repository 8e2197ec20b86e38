"""Browser fixtures: Debian's Chromium driven by Playwright for Python, against a real ``classmeans serve``
on 127.0.0.1, with every request to any other host blocked and recorded.

Chromium comes from the Debian packages (``.ci/browser-deps.sh`` installs ``chromium``); Playwright is only
the driver, pointed at that binary (``playwright install`` is never run). Without either, the tests skip
and say which is missing. Screenshots go to ``runs/ui/`` (gitignored; CI keeps it as an artifact).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.api.conftest import Served, make_settings, serve
from tests.api.test_e2e import Server, start, stop
from tests.factories import attach_made_up_timing

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "runs" / "ui"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OLD_BUNDLE = "20200101T000000-0a0a0a-old"


def chromium_path() -> str | None:
    """``CLASSMEANS_CHROMIUM`` if set (and nothing else), else Debian's Chromium, if present."""
    configured = os.environ.get("CLASSMEANS_CHROMIUM")
    candidates = (configured,) if configured else CHROMIUM_CANDIDATES
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None if configured else shutil.which("chromium")


def _skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        return ("Chromium not found (Debian package `chromium`, installed by .ci/browser-deps.sh; or set "
                "CLASSMEANS_CHROMIUM)")
    return None


@dataclass
class Page:
    """A page in a fresh Chromium profile, with what it tried to fetch and what it logged."""

    page: Any
    base: str
    outside: list[str] = field(default_factory=list)  # requests to any host but 127.0.0.1 (all blocked)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, url) of every request
    console_errors: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path, wait_until="load")

    def shot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def storage(self) -> dict[str, Any]:
        """What the page could have persisted: local and session storage, cookies."""
        return {"local": self.page.evaluate("JSON.stringify(window.localStorage)"),
                "session": self.page.evaluate("JSON.stringify(window.sessionStorage)"),
                "cookies": self.page.context.cookies()}


def _route(outside: list[str]):
    def handle(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(url)
            route.abort("blockedbyclient")
    return handle


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Any]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@contextmanager
def open_page(playwright_driver: Any, server: Server) -> Iterator[Page]:
    """A new Chromium (fresh --user-data-dir) with one page on ``server``; non-127.0.0.1 requests aborted and
    recorded."""
    profile = tempfile.mkdtemp(prefix="ui-chromium-")
    ctx = playwright_driver.chromium.launch_persistent_context(
        profile, executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 1000}, service_workers="block")
    try:
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        p = Page(page, server.url)
        ctx.route("**/*", _route(p.outside))
        page.on("request", lambda r: p.requests.append((r.method, r.url)))
        page.on("console", lambda m: p.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: p.console_errors.append(str(exc)))
        page.set_default_timeout(60_000)
        yield p
    finally:
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture()
def browser_page(playwright_driver: Any, ui_server: Server) -> Iterator[Page]:
    """A page on :func:`ui_server` (:func:`open_page`)."""
    with open_page(playwright_driver, ui_server) as p:
        yield p


def add_old_bundle(model_dir: Path) -> str:
    """A second bundle, older by its id, copied from the active one: something to activate and roll back to."""
    active = json.loads((model_dir / "active.json").read_text())["bundle"]
    dst = model_dir / "bundles" / OLD_BUNDLE
    shutil.copytree(model_dir / "bundles" / active, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["id"] = OLD_BUNDLE
    (dst / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
    return OLD_BUNDLE


@pytest.fixture(scope="module")
def ui_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``classmeans serve`` on 127.0.0.1 over a copy of the tiny store with ICs (four decision modes) and two
    bundles."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)  # before building the store: a machine without Chromium skips at once
    work = tmp_path_factory.mktemp("ui")
    store = work / "store"
    shutil.copytree(request.getfixturevalue("tiny_ic_store_root"), store)
    add_old_bundle(store / "tiny")
    attach_made_up_timing(store / "tiny")  # the active bundle has a time axis (the curve's time toggle)
    srv = start(store, work / "serve.log")
    try:
        yield srv
    finally:
        stop(srv)


@pytest.fixture()
async def served(tiny_store: Path) -> AsyncIterator[Served]:
    """The app over ASGI on a private copy of the tiny store (as in tests/api)."""
    async with serve(make_settings(tiny_store)) as s:
        yield s


@pytest.fixture(scope="module")
def two_worker_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``classmeans serve --workers 2`` over a copy of the tiny store with graded, timed profiles (an
    autopilot has a hull to move along)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from tests.factories import attach_graded_profiles

    work = tmp_path_factory.mktemp("ui2")
    store = work / "store"
    shutil.copytree(request.getfixturevalue("tiny_store_root"), store)
    attach_graded_profiles(store / "tiny")
    srv = start(store, work / "serve.log", workers=2)
    try:
        yield srv
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def cascade_ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``classmeans serve`` of a tiny cascade of two models (tests/factories.py)."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from tests.factories import make_tiny_cascade_store

    work = tmp_path_factory.mktemp("ui-cascade")
    store = work / "store"
    store.mkdir()
    make_tiny_cascade_store(store, "casc")
    srv = start(store, work / "serve.log", model="casc")
    try:
        yield srv
    finally:
        stop(srv)
