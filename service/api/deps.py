"""FastAPI dependencies, declared once as ``Annotated`` aliases. All ``async``: FastAPI would run plain
``def`` dependencies in its thread pool, a thread hop per request for a trivial lookup."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import not_ready
from service.api.state import AppState
from service.serving.engine import Engine


async def get_state(request: Request) -> AppState:
    return request.app.state.classmeans


StateDep = Annotated[AppState, Depends(get_state)]


async def get_engine(state: StateDep) -> Engine:
    """The engine, or 503 ``not_ready`` while loading or after a failed load.

    While shutting down, readiness is already 503 but requests that reach the app (on connections opened
    before the signal) are still served until the batcher has drained; after that they get 503 too.
    """
    if state.engine is None or state.batcher is None:
        raise not_ready(state.not_ready_reason or "not ready")
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
