"""The operator's page (``GET /ui``), its live figures (``GET /ui/api/stats``) and the API docs (``GET /docs``),
all served from files in the package: nothing is fetched from outside at run time.

The page holds no data of its own: it reads the public ``GET /profiles`` and ``GET /ui/api/stats`` and, with
the admin token typed into it (kept in a JavaScript variable only), calls the admin API itself
(``GET /admin/bundles``, ``POST /profiles``, ``POST /admin/bundles/{id}/activate``) with the same checks as
any client. A Content-Security-Policy keeps both pages to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from service.api import schemas
from service.api.deps import EngineDep, StateDep
from service.api.ui.stats import UiStats, collect_stats

router = APIRouter()

STATIC_PREFIX = "/static"
SWAGGER_DIR = "swagger-ui"
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                  "Cache-Control": "no-cache"}
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page's HTML, shipped as package data next to this module."""
    return (resources.files("service.api.ui") / "index.html").read_text(encoding="utf-8")


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def docs_csp(html: str) -> str:
    """Swagger UI's page has one inline script (FastAPI writes its options there): allow exactly that one by
    its hash; Swagger UI sets inline styles, so styles stay ``'unsafe-inline'`` (styles cannot run code)."""
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                      for s in _INLINE_SCRIPT.findall(html))
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'")


@router.api_route("/docs", methods=["GET", "HEAD"], include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI over this app's OpenAPI document, with the vendored swagger-ui-dist assets."""
    root, app = _root(request), request.app
    assets = f"{root}{STATIC_PREFIX}/{SWAGGER_DIR}"
    page = get_swagger_ui_html(
        openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
        swagger_js_url=f"{assets}/swagger-ui-bundle.js", swagger_css_url=f"{assets}/swagger-ui.css",
        swagger_favicon_url=f"{assets}/favicon-32x32.png", oauth2_redirect_url=None,
        # validatorUrl null: never send the spec's URL to the public validator for its badge.
        swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None})
    html = bytes(page.body).decode()
    return HTMLResponse(html, headers={**COMMON_HEADERS, "Content-Security-Policy": docs_csp(html)})


@router.api_route("/ui", methods=["GET", "HEAD"], include_in_schema=False)
async def operator_page() -> HTMLResponse:
    """The operator's page (static HTML; its script reads the JSON APIs)."""
    return HTMLResponse(page_html(), headers={**COMMON_HEADERS, "Content-Security-Policy": PAGE_CSP})


@router.get("/ui/api/stats", response_model=UiStats, tags=["operator page"],
            responses={503: {"model": schemas.ErrorBody, "description": "not_ready"}})
async def ui_stats(state: StateDep, engine: EngineDep) -> UiStats:
    """This process's live figures for the operator's page: samples per exit, the rule that let them out,
    inference requests and rejections, FLOPs spent and what the full network would have spent (totals since
    the process started; the page turns two readings into rates)."""
    return collect_stats(state.metrics, engine)


class AutopilotTrace(BaseModel):
    """The answering process's autopilot ticks, one a second, oldest first (a bounded ring buffer)."""

    enabled: bool
    pid: int = Field(description="the process whose controller this is (each worker steers on its own load)")
    every_s: float = Field(description="seconds between records")
    max_len: int = Field(description="records kept (older ones fall off)")
    ticks: list[dict[str, Any]] = Field(
        description="records: t (unix seconds), enabled, target_ms, p99_ms, accuracy (estimate of the point "
                    "held), operating, flops_fraction, axis, budget (on the axis), shed_rate, offered_rps, "
                    "answered_sps, queue_delay_ms")


@router.get("/ui/api/autopilot", response_model=AutopilotTrace, tags=["operator page"],
            responses={503: {"model": schemas.ErrorBody, "description": "not_ready"}})
async def ui_autopilot_trace(state: StateDep, engine: EngineDep,
                             since: float | None = Query(None, description="only records after this unix time")
                             ) -> AutopilotTrace:
    """The last minutes of the latency autopilot in the answering process: target vs p99, estimated
    accuracy, budget and shed rate, for the page's trace chart."""
    rt = state.autopilot
    if rt is None:
        return AutopilotTrace(enabled=False, pid=os.getpid(), every_s=1.0, max_len=0, ticks=[])
    return AutopilotTrace(pid=os.getpid(), **rt.trace_info(since))
