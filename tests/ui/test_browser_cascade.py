"""The operator's page of a cascade of models: each member alone is drawn beside the cascade's curve."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.test_e2e import Server
from tests.ui.conftest import open_page

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                             "(pip install -e '.[test]')").expect


def test_cascade_curve_shows_each_member_alone(playwright_driver: Any, cascade_ui_server: Server):
    with cascade_ui_server.client() as c:
        data = c.get("/profiles").json()
    names = [m["name"] for m in data["members"]]
    assert names == ["small", "big"]
    with open_page(playwright_driver, cascade_ui_server) as p:
        p.goto("/ui")
        expect(p.page.locator("#curve circle.point")).to_have_count(len(data["profiles"]))
        for name in names:
            expect(p.page.locator(f'#curve g.member[data-member="{name}"] polyline.member-hull')).to_have_count(1)
            expect(p.page.locator(f'#legend [data-member="{name}"]')).to_contain_text(f"{name} alone")
        assert p.console_errors == []
