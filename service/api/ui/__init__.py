"""The operator's page and offline API docs: ``install_ui(app)`` adds ``/ui``, ``/ui/api/stats``, ``/docs``
and the packaged static files under ``/static``."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from service.api.ui.routes import STATIC_PREFIX, router


class PackagedStatic(StaticFiles):
    """The package's ``static/`` folder. It names itself in ``scope["route"]`` (as FastAPI's routes do) so
    that request metrics label these responses with the mount path, not ``unmatched``."""

    def __init__(self, mount_path: str) -> None:
        super().__init__(packages=[("service.api", "static")])
        self.path = mount_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self
        await super().__call__(scope, receive, send)


def install_ui(app: FastAPI) -> None:
    """Mount the page, its stats endpoint, the docs and the static assets (create the app with
    ``docs_url=None, redoc_url=None`` so FastAPI's CDN-loading pages are not registered)."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, PackagedStatic(STATIC_PREFIX), name="static")


__all__ = ["install_ui"]
