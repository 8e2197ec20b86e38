"""Overload with exact accounting (research 2g S2', Triton ``test_max_queue_size``).

The worker is held busy on request 0 (fault harness: inference blocks while a file exists). Then ``N``
requests arrive at once against a queue of ``Q`` samples: exactly ``Q`` are queued, exactly ``N - Q`` get
503 ``overloaded`` with ``Retry-After``, fast. Released, request 0 and the ``Q`` queued ones answer 200.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from bench.rel.common import FAULT_MODULE, ScenarioResult, Timer, copy_store, images, metric_value, wait_for
from bench.servers import Server, classmeans_server


async def _send_all(srv: Server, n: int) -> list[tuple[int, str, bool, float]]:
    imgs = images()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=limits, trust_env=False) as c:
        async def one(i: int) -> tuple[int, str, bool, float]:
            t0 = time.perf_counter()
            r = await c.post("/classify", content=imgs.pngs[i % len(imgs)], headers={"Content-Type": "image/png"})
            code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
            return r.status_code, code, "retry-after" in r.headers, time.perf_counter() - t0

        return await asyncio.gather(*(one(i) for i in range(n)))


def run(model_dir: Path, work: Path, queue_size: int = 16, surplus: int = 48) -> ScenarioResult:
    """Queue of ``queue_size`` samples, ``queue_size + surplus`` requests sent while the worker is busy."""
    res = ScenarioResult("overload: exact 503 accounting")
    block = work / "block"
    with Timer(res):
        store = copy_store(model_dir, work)
        env = {"CLASSMEANS_FAULT_BLOCK_FILE": str(block)}
        with classmeans_server(store, model_dir.name, work / "overload.log", module=FAULT_MODULE, extra_env=env,
                               queue_size=queue_size, max_files=1, max_batch_size=queue_size,
                               request_deadline_s=120, torch_threads=1, warmup="false") as srv:
            block.write_text("hold")
            first: dict[str, object] = {}

            async def scenario() -> list[tuple[int, str, bool, float]]:
                async def hold() -> None:
                    async with httpx.AsyncClient(base_url=srv.url, timeout=120, trust_env=False) as c:
                        r = await c.post("/classify", content=images().pngs[0], headers={"Content-Type": "image/png"})
                        first["status"] = r.status_code

                holder = asyncio.create_task(hold())
                await asyncio.to_thread(wait_for, lambda: Path(str(block) + ".entered").exists(), 60,
                                        "the worker to take request 0")
                burst = asyncio.create_task(_send_all(srv, queue_size + surplus))
                with httpx.Client(base_url=srv.url, timeout=10, trust_env=False) as c:
                    def full() -> bool:
                        return metric_value(c.get("/metrics").text, "classmeans_queue_depth") >= queue_size
                    await asyncio.to_thread(wait_for, full, 60, "the queue to fill")
                    # every surplus request is refused without waiting: let them all come back, then release
                    await asyncio.sleep(1.0)
                    depth = metric_value(c.get("/metrics").text, "classmeans_queue_depth")
                res.figures["queue_depth_while_held"] = depth
                block.unlink()
                out = await burst
                await holder
                return out

            results = asyncio.run(scenario())
            with srv.client() as c:
                metrics = c.get("/metrics").text
    rejected_series = f'classmeans_rejected_total{{model="{model_dir.name}",reason="overloaded"}}'
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503 and r[1] == "overloaded"]
    other = [r for r in results if r not in ok and r not in rejected]
    rej_lat = sorted(r[3] for r in rejected)
    res.figures.update({"queue_size": queue_size, "sent": len(results), "ok_200": len(ok),
                        "overloaded_503": len(rejected), "other": len(other),
                        "rejection_latency_p50_ms": 1000 * rej_lat[len(rej_lat) // 2] if rej_lat else None,
                        "rejection_latency_max_ms": 1000 * rej_lat[-1] if rej_lat else None,
                        "rejected_metric": metric_value(metrics, rejected_series)})
    res.check("request 0 (held in the worker) answered 200", first.get("status") == 200, first)
    res.check(f"exactly {surplus} requests refused with 503 overloaded", len(rejected) == surplus, len(rejected))
    res.check(f"exactly {queue_size} queued requests answered 200", len(ok) == queue_size, len(ok))
    res.check("no other outcome", not other, other[:5])
    res.check("every 503 carries Retry-After", all(r[2] for r in rejected))
    res.check("the rejections metric counts exactly them", res.figures["rejected_metric"] == surplus,
              res.figures["rejected_metric"])
    res.check("queue depth was exactly the queue size while held",
              res.figures["queue_depth_while_held"] == queue_size, res.figures["queue_depth_while_held"])
    return res
