"""``classmeans serve``: the HTTP server (uvicorn) over ``create_app(settings)``, one or several worker processes.

``--workers N`` (env ``CLASSMEANS_WORKERS``) and ``--threads T`` (env ``CLASSMEANS_TORCH_THREADS``, the intra-op
threads of each worker) default to a plan that fits the cores this process may use (affinity and cgroup CPU
quota, :mod:`service.serving.cpu_budget`): one worker per usable core with one thread each, or the share of
the cores left by the one you set; the choice and the reason are logged at start. N workers run
under uvicorn's own supervisor, all answering on the same port; uvicorn replaces a worker that dies. Every
worker is a replica of the model store: it loads the model, runs its own batcher, and follows
``active.json``, so a switch made on any worker (or any other replica sharing the store volume) serves
everywhere within a poll interval. Metrics of all workers are merged on every scrape (prometheus_client's
multiprocess mode, in a fresh folder made here). Responses name the process that answered
(``X-Classmeans-Worker``).

On SIGTERM readiness flips to 503 at once (in each worker), uvicorn stops accepting connections, in-flight
requests finish (up to ``graceful_timeout_s``), then the batcher drains.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.serving.cpu_budget import ThreadPlan

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (N uvicorn workers, each a replica of the store)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="model store root (env CLASSMEANS_STORE, default model_store)")
    p.add_argument("--model", help="model folder to serve (env CLASSMEANS_MODEL, default cifar10-cascade)")
    p.add_argument("--host", help="bind address (env CLASSMEANS_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (env CLASSMEANS_PORT, default 8000)")
    p.add_argument("--workers", type=int, help="worker processes (env CLASSMEANS_WORKERS; default 0: one per "
                   "usable CPU core)")
    p.add_argument("--threads", type=int, help="intra-op threads per worker (env CLASSMEANS_TORCH_THREADS; "
                   "default 0: the usable cores divided among the workers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.api.settings import Settings

    overrides: dict[str, Any] = {k: v for k, v in (("store", args.store), ("model", args.model),
                                                   ("host", args.host), ("port", args.port),
                                                   ("workers", args.workers),
                                                   ("torch_threads", args.threads))
                                  if v is not None}
    settings = Settings(**overrides)
    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")
    plan = choose_plan(settings)
    # Every process (this one, or each uvicorn worker through the environment) runs exactly the planned threads.
    overrides["torch_threads"] = plan.threads
    settings = Settings(**overrides)
    if plan.workers == 1:
        return _serve_one(settings)
    overrides["workers"] = plan.workers
    return _serve_workers(settings, plan.workers, overrides)


def choose_plan(settings: Any) -> ThreadPlan:
    """Workers x threads for the cores this process may use; logged with the reason (a warning when the
    configured numbers oversubscribe the cores)."""
    from service.serving.cpu_budget import plan_threads, read_cpu_budget

    budget = read_cpu_budget()
    plan = plan_threads(budget.cores, workers=settings.workers, threads=settings.torch_threads)
    log = logging.getLogger("classmeans.serve")
    (log.warning if plan.oversubscribed else log.info)(
        "serving with %d worker(s) x %d intra-op thread(s): %s (%s); override with --workers/--threads or "
        "CLASSMEANS_WORKERS/CLASSMEANS_TORCH_THREADS", plan.workers, plan.threads, plan.why, budget.describe())
    return plan


def _uvicorn_options(settings: Any) -> dict[str, Any]:
    return {"host": settings.host, "port": settings.port, "lifespan": "on", "log_level": settings.log_level.lower(),
            "timeout_graceful_shutdown": settings.graceful_timeout_s, "timeout_keep_alive": settings.keep_alive_s,
            "proxy_headers": False, "server_header": False}


def _serve_one(settings: Any) -> int:
    import uvicorn

    from service.api import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, workers=1, **_uvicorn_options(settings))
    _make_server(config, app.state.classmeans).run()
    return 0


def _serve_workers(settings: Any, workers: int, overrides: dict[str, Any]) -> int:
    """uvicorn's multi-worker mode: an import string + factory, settings passed through the environment."""
    import uvicorn

    from service.api.auth import resolve_admin_token

    for key, value in overrides.items():
        os.environ[f"CLASSMEANS_{key.upper()}"] = str(value)
    # One token for all workers: resolved (and, if new, stored) once here, before any worker starts.
    os.environ["CLASSMEANS_ADMIN_TOKEN"] = resolve_admin_token(settings)
    metrics_dir = _fresh_multiproc_dir()
    log = logging.getLogger("classmeans.serve")
    log.info("starting %d worker processes on %s:%d (metrics merged in %s)", workers, settings.host, settings.port,
             metrics_dir)
    try:
        uvicorn.run("service.api.replica:worker_app", factory=True, workers=workers, **_uvicorn_options(settings))
    finally:
        if metrics_dir.name.startswith("classmeans-metrics-"):
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _fresh_multiproc_dir() -> Path:
    """``$PROMETHEUS_MULTIPROC_DIR`` emptied (values of an earlier run must not add up), or a new temp folder."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for f in path.glob("*.db"):
            f.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="classmeans-metrics-"))
        os.environ[MULTIPROC_ENV] = str(path)
    return path


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
