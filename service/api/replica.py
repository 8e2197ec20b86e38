"""What makes one worker process a replica: the app factory uvicorn's workers import, the drain on SIGTERM,
the header naming the process that answered.

``classmeans serve --workers N`` hands uvicorn the import string ``service.api.replica:worker_app``
(``factory=True``); every worker process builds its own app from the ``CLASSMEANS_*`` environment the parent
set, loads the model, runs its own batcher and follows ``active.json`` (service/serving/follower.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.types import Message

from service.api.state import AppState

log = logging.getLogger("classmeans.serve")

WORKER_HEADER = b"x-classmeans-worker"


def worker_app() -> FastAPI:
    """The ASGI app of one worker process, configured from the environment (uvicorn ``factory=True``)."""
    from service.api.app import create_app
    from service.api.settings import Settings

    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    return create_app(settings)


def add_worker_header(message: Message) -> None:
    """Name the answering process (``X-Classmeans-Worker: <pid>``) on a ``http.response.start`` message."""
    pid = str(os.getpid()).encode()
    message["headers"] = [*message.get("headers", []), (WORKER_HEADER, pid)]


def drain_on_signal(state: AppState) -> Callable[[], None]:
    """Flip readiness to 503 the moment SIGTERM/SIGINT arrives, then let the server's own handler drain.

    Wraps the handler uvicorn installed (main thread only; a no-op elsewhere, or where no handler is set).
    Returns the function that puts the previous handlers back."""
    saved: dict[int, Any] = {}

    def restore() -> None:
        for sig, previous in saved.items():
            if signal.getsignal(sig) is not previous:
                signal.signal(sig, previous)

    if threading.current_thread() is not threading.main_thread():
        return restore
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            if not state.shutting_down:
                log.info("signal %s: worker %d not ready any more, draining", signum, os.getpid())
            state.begin_shutdown()
            previous(signum, frame)

        saved[sig] = previous
        signal.signal(sig, handler)
    return restore
