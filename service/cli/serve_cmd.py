"""``classmeans serve``: the HTTP server (uvicorn, one worker) over ``create_app(settings)``.

One worker per process on purpose: admin actions (profile switches, new bundles) change the state held in
process memory, and metrics live in one registry. Scale by running more replicas (containers), each with
its own store volume or a shared one. On SIGTERM readiness flips to 503 at once, uvicorn stops accepting
connections, in-flight requests finish (up to ``graceful_timeout_s``), then the batcher drains.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (one uvicorn worker; scale by replicas)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="model store root (env CLASSMEANS_STORE, default model_store)")
    p.add_argument("--model", help="model folder to serve (env CLASSMEANS_MODEL, default cifar10-resnet20)")
    p.add_argument("--host", help="bind address (env CLASSMEANS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (env CLASSMEANS_PORT, default 8000)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app
    from service.serving.settings import Settings

    overrides: dict[str, Any] = {k: v for k, v in (("store", args.store), ("model", args.model),
                                                   ("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, lifespan="on",
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=settings.graceful_timeout_s,
                            timeout_keep_alive=settings.keep_alive_s, proxy_headers=False, server_header=False)
    _make_server(config, app.state.classmeans).run()
    return 0


def _make_server(config: Any, state: Any) -> Any:
    """A uvicorn.Server whose signal handler first flips readiness to 503, then shuts down as usual."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not state.shutting_down:
                logging.getLogger("classmeans.serve").info("signal %s: not ready any more, draining", sig)
            state.begin_shutdown()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the captured signal after its drain, so the process would die *by* SIGTERM
            # (status 143); a completed graceful shutdown exits 0 instead.
            self._captured_signals.clear()

    return Server(config)
