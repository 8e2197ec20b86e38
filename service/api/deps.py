"""FastAPI dependencies, declared once as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import not_ready
from service.api.state import AppState
from service.runtime.engine import Engine


def get_state(request: Request) -> AppState:
    return request.app.state.classmeans


StateDep = Annotated[AppState, Depends(get_state)]


def get_engine(state: StateDep) -> Engine:
    """The engine, or 503 ``not_ready`` while loading, after a failed load, or while shutting down."""
    if not state.ready or state.engine is None:
        raise not_ready(state.not_ready_reason or "not ready")
    return state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
