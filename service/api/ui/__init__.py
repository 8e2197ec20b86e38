"""The operator's page and offline API docs: ``install_ui(app)`` adds ``/ui``, ``/ui/api/stats``, ``/docs``
and the packaged static files under ``/static``."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from service.api.ui.routes import STATIC_PREFIX, router


def install_ui(app: FastAPI) -> None:
    """Mount the page, its stats endpoint, the docs and the static assets (create the app with
    ``docs_url=None, redoc_url=None`` so FastAPI's CDN-loading pages are not registered)."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(packages=[("service.api", "static")]), name="static")


__all__ = ["install_ui"]
