"""Graceful shutdown finishes in-flight requests (research 2f F1, 2g S4).

The worker is held (fault harness) while ``inflight`` requests are admitted: one in the worker, the rest
queued. Then SIGTERM goes to the server. While it drains: readiness is no longer 200 and new connections
are refused. Released, every request admitted before the signal answers 200 with a prediction, and the
process exits 0 within the grace period.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from bench.rel.common import FAULT_MODULE, ScenarioResult, Timer, copy_store, images, metric_value, wait_for
from bench.servers import classmeans_server

GRACE_S = 30.0


def run(model_dir: Path, work: Path, inflight: int = 24) -> ScenarioResult:
    res = ScenarioResult("graceful shutdown finishes in-flight requests")
    block = work / "block"
    with Timer(res):
        store = copy_store(model_dir, work)
        env = {"CLASSMEANS_FAULT_BLOCK_FILE": str(block)}
        with classmeans_server(store, model_dir.name, work / "shutdown.log", module=FAULT_MODULE, extra_env=env,
                               torch_threads=1, max_batch_size=4, warmup="false",
                               graceful_timeout_s=GRACE_S) as srv:
            block.write_text("hold")

            async def scenario() -> tuple[list[tuple[int, str]], dict[str, object]]:
                imgs = images()
                limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=inflight)
                async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits, trust_env=False) as c:
                    async def one(i: int) -> tuple[int, str]:
                        try:
                            r = await c.post("/classify", content=imgs.pngs[i % len(imgs)],
                                             headers={"Content-Type": "image/png"})
                        except httpx.HTTPError as exc:
                            return -1, type(exc).__name__
                        return r.status_code, r.json()["predictions"][0]["label"] if r.status_code == 200 else r.text

                    tasks = [asyncio.create_task(one(i)) for i in range(inflight)]
                    probe: dict[str, object] = {}
                    with httpx.Client(base_url=srv.url, timeout=5, trust_env=False) as pc:
                        def admitted() -> bool:
                            text = pc.get("/metrics").text
                            return metric_value(text, "classmeans_inflight_requests") >= inflight

                        await asyncio.to_thread(wait_for, admitted, 60, "every request to be admitted")
                    srv.signal(signal.SIGTERM)
                    t_sig = time.monotonic()
                    await asyncio.sleep(0.5)
                    with httpx.Client(base_url=srv.url, timeout=5, trust_env=False) as pc:
                        try:
                            probe["ready_status"] = pc.get("/v2/health/ready").status_code
                        except httpx.HTTPError as exc:
                            probe["ready_status"] = type(exc).__name__
                    block.unlink()
                    out = await asyncio.gather(*tasks)
                    probe["drained_s"] = time.monotonic() - t_sig
                    return out, probe

            outcomes, probe = asyncio.run(scenario())
            try:
                code = srv.popen.wait(timeout=GRACE_S + 5)
            except Exception:  # reported as a failed check below
                code = None
    ok = [o for o in outcomes if o[0] == 200]
    res.figures.update({"in_flight_at_sigterm": inflight, "answered_200": len(ok),
                        "readiness_after_sigterm": probe.get("ready_status"),
                        "drain_seconds": round(float(probe.get("drained_s", 0.0)), 2), "exit_code": code})
    res.check("every in-flight request answered 200 with a prediction", len(ok) == inflight,
              [o for o in outcomes if o[0] != 200][:3])
    res.check("after SIGTERM, readiness is not 200 (503 or connection refused)",
              probe.get("ready_status") != 200, probe.get("ready_status"))
    res.check("the server exited 0 after the drain", code == 0, code)
    log = (work / "shutdown.log").read_text(errors="replace")
    res.check("no traceback in the log", "Traceback" not in log, log[-300:])
    return res
