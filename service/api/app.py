"""The app factory: ``create_app(settings)`` and the lifespan that loads, warms up, then reports ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import FastAPI

from service import __version__
from service.api.auth import resolve_admin_token
from service.api.errors import install_error_handlers
from service.api.fastlane import ClassifyFastLane
from service.api.limits import BodyLimitMiddleware
from service.api.middleware import MetricsMiddleware
from service.api.oip.errors import OipErrorMiddleware
from service.api.replica import drain_on_signal
from service.api.routes import admin, classify, health, profiles, v2
from service.api.settings import Settings
from service.api.state import AppState
from service.api.ui import install_ui
from service.control.jobs import JobManager
from service.control.recompute import abandoned_cleanup
from service.serving.autopilot_runtime import AutopilotRuntime
from service.serving.batcher import Batcher
from service.serving.cpu_budget import intra_op_threads, read_cpu_budget
from service.serving.engine import Engine, EngineLoadError
from service.serving.follower import start_follower
from service.serving.gc_pauses import GcPauses, freeze_startup_heap
from service.serving.metrics import Metrics
from service.serving.runners import RunnerOptions

log = logging.getLogger("classmeans.api")


def _load(settings: Settings, metrics: Metrics) -> Engine:
    """Load and warm up (in a worker thread: torch never runs on the event loop)."""
    threads = intra_op_threads(settings.torch_threads, settings.workers)
    torch.set_num_threads(threads)
    log.info("intra-op threads: %d (process %d)", threads, os.getpid())
    options = RunnerOptions(settings.engine, threads, prebuild=settings.engine_prebuild)
    engine = Engine.load(settings.model_dir, metrics, options)
    if settings.measure_time:
        engine.measure_time()
    if settings.warmup:
        engine.warm_up(batch_sizes=(1, min(8, settings.max_batch_size)))
    return engine


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.classmeans
    s = state.settings
    restore_signals = drain_on_signal(state)  # readiness flips to 503 on SIGTERM in every worker process
    gc_pauses = GcPauses(state.metrics.observe_gc_pause).install()
    gc_export = asyncio.create_task(gc_pauses.export_every(1.0), name="classmeans-gc-pauses")
    state.token = await anyio.to_thread.run_sync(resolve_admin_token, s)
    if (s.model_dir / "model.json").is_file():  # jobs whose process died are reported failed
        await anyio.to_thread.run_sync(state.jobs.recover, abandoned_cleanup(s.model_dir))
    try:
        engine = await anyio.to_thread.run_sync(_load, s, state.metrics)
    except EngineLoadError as exc:
        state.not_ready_reason = str(exc)
        log.error("NOT READY: %s", exc)
    except Exception:
        state.not_ready_reason = "the model failed to load (unexpected error; see the server log)"
        log.exception("NOT READY: unexpected error while loading the model")
    else:
        m = state.metrics
        batcher = Batcher(engine.run_batch, max_batch_size=s.max_batch_size, max_delay_s=s.max_delay_s,
                          queue_size=s.queue_size,
                          on_depth=lambda n: m.queue_depth.labels(m.model).set(n),
                          on_wait=lambda sec: m.queue_wait.labels(m.model).observe(sec), on_reject=m.reject)
        await batcher.start()
        state.engine, state.batcher = engine, batcher
        state.follower = start_follower(engine, s.follow_interval_s)  # switches made by other processes
        cores = read_cpu_budget().cores / max(1, s.workers)  # this process's share, as its threads are planned
        state.autopilot = AutopilotRuntime(engine, batcher, state.latency, m,  # off unless active.json says on
                                           cores=max(1.0, cores))
        state.autopilot.start()
        if s.gc_freeze:  # full collections leave the start-up heap alone (gc_pauses.py)
            frozen = freeze_startup_heap()
            log.info("gc: %d start-up objects frozen (%d collected) in %.0f ms", frozen.frozen, frozen.collected,
                     1000 * frozen.seconds)
        state.mark_ready()
        snap = engine.snapshot
        log.info("ready: model %s, bundle %s, profile %s (version %d)", engine.spec.name, snap.bundle_id,
                 snap.profile_name, snap.version)
    try:
        yield
    finally:
        state.begin_shutdown()
        if state.follower is not None:
            state.follower.stop()
        if state.autopilot is not None:
            await state.autopilot.stop()
        if state.batcher is not None:
            await state.batcher.stop(timeout=s.graceful_timeout_s)
        restore_signals()
        gc_pauses.uninstall()
        gc_export.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gc_export
        active = state.jobs.active
        if active is not None:
            log.warning("job %s is still running at shutdown; it is abandoned (the store stays consistent)",
                        active.id)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app; nothing is loaded until the lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics(settings.model)
    # docs_url/redoc_url None: FastAPI's own pages load their assets from a CDN; install_ui serves /docs offline.
    app = FastAPI(title="classmeans-serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with training-free early exit (E2CM class means).")
    jobs = JobManager(metrics, model_dir=settings.model_dir)  # job records live in the store
    app.state.classmeans = AppState(settings=settings, metrics=metrics, jobs=jobs,
                                    decode_limiter=anyio.CapacityLimiter(settings.decode_threads))
    install_error_handlers(app)
    for r in (health.router, classify.router, profiles.router, v2.router, admin.router):
        app.include_router(r)
    install_ui(app)  # /ui, /ui/api/stats, /docs and /static (packaged files)
    static = frozenset(getattr(r, "path", "") for r in app.routes if "{" not in getattr(r, "path", "{"))
    classify_route = next((r for r in classify.router.routes if getattr(r, "path", None) == "/classify"), None)
    # Innermost (added first): the lean lane for raw-body /classify, inside the body limit and metrics.
    app.add_middleware(ClassifyFastLane, state=app.state.classmeans, route=classify_route)
    app.add_middleware(BodyLimitMiddleware, default=settings.max_body_bytes,
                       limits={"/admin/class-means": settings.max_upload_bytes})
    app.add_middleware(OipErrorMiddleware)  # /v2 paths: the protocol's error body (inside metrics: final status)
    app.add_middleware(MetricsMiddleware, metrics=metrics, static_paths=static,
                       window=app.state.classmeans.latency)
    return app
