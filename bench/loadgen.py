"""A bounded loopback load generator (asyncio) that checks every answer and reports the 2g schema.

``N`` concurrent clients, each with its own keep-alive connection (:mod:`bench.rawhttp` by default, which
costs the shared CPU far less than httpx; ``client="httpx"`` is kept), send requests until a fixed count is
reached: first ``warmup`` requests (excluded from every figure), then ``requests`` measured ones. Request
``i`` of the measured phase carries image ``i mod n`` of the payload set, so with ``requests <= n`` every
answer is about a different image and the accuracy is over distinct images.

A :class:`Target` knows how to build a request for one image and how to read the answer (one per server
kind). The report (:func:`run_load`) follows ``shared/research/style-and-reliability.md`` section 2g: load
shape, counts by outcome, throughput, client and server latency percentiles, early-exit figures, accuracy,
resources of the server's process tree, and the (bundle, profile, version) triples that answered.

Only 127.0.0.1 / localhost / ::1 URLs are accepted; every loop is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
import numpy as np

from bench import procstat
from bench.images import ImageSet
from bench.rawhttp import RawClient, RawConnectionError, RawResponse

LOOPBACK = ("127.0.0.1", "localhost", "::1")
AnyResponse = httpx.Response | RawResponse


def check_loopback(url: str) -> None:
    """Refuse any URL that is not on this machine's loopback interface."""
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK and not host.startswith("127."):
        raise ValueError(f"the load generator only talks to loopback addresses, not {host!r}")


@dataclass
class Answer:
    """What one answer said, as far as the benchmark cares (missing fields are ``None``)."""

    class_index: int | None = None
    exit_index: int | None = None
    flops_fraction: float | None = None
    bundle: str | None = None
    profile: str | None = None
    version: int | None = None
    queue_s: float | None = None
    inference_s: float | None = None
    batch_samples: int | None = None
    consistent: bool = True  # headers, body and per-sample fields name the same state
    sample_profile: str | None = None  # the profile that served the (first) sample: a mix's vertex
    time_fraction: float | None = None  # the sample's time cost / the full network's, when the answer says


class Target(Protocol):
    """One server kind: how to ask about image ``i`` and how to read the answer."""

    name: str

    def request(self, images: ImageSet, i: int) -> dict[str, Any]:
        """Keyword arguments for ``httpx.AsyncClient.request`` (``method``, ``url``, ...)."""

    def parse(self, response: AnyResponse) -> Answer:
        """Read a 2xx answer; raise ``ValueError`` if it is malformed."""


@dataclass
class ClassmeansTarget:
    """``POST /classify`` with a raw ``image/png`` body; ``exits="off"`` runs the full network."""

    exits: str = "on"
    profile: str | None = None
    name: str = "classmeans"

    def request(self, images: ImageSet, i: int) -> dict[str, Any]:
        params: dict[str, str] = {"top_k": "1"}
        if self.exits == "off":
            params["exits"] = "off"
        if self.profile is not None:
            params["profile"] = self.profile
        return {"method": "POST", "url": "/classify", "params": params, "content": images.pngs[i],
                "headers": {"Content-Type": "image/png"}}

    def parse(self, response: AnyResponse) -> Answer:
        body = response.json()
        pred = body["predictions"][0]
        h = response.headers
        consistent = (h.get("x-classmeans-bundle") == body["bundle"]
                      and h.get("x-classmeans-profile") == body["profile"]
                      and h.get("x-classmeans-version") == str(body["version"])
                      and (body["operating"] is not None or all(p["profile"] == body["profile"]
                                                                for p in body["predictions"])))
        tf = pred.get("time_fraction")
        return Answer(int(pred["class_index"]), int(pred["exit_index"]), float(pred["flops_fraction"]),
                      body["bundle"], body["profile"], int(body["version"]), float(body["queue_seconds"]),
                      float(body["inference_seconds"]), int(body["batch_samples"]), consistent,
                      pred.get("profile"), None if tf is None else float(tf))


@dataclass
class LitServeTarget:
    """LitServe's documented image pattern: ``POST /predict`` with JSON ``{"image": <base64 PNG>}``; with
    ``raw=True`` the PNG itself as an ``image/png`` body (``bench/litserve_server.py --raw-body``)."""

    name: str = "litserve"
    _cache: dict[int, bytes] = field(default_factory=dict, repr=False)
    raw: bool = False

    def request(self, images: ImageSet, i: int) -> dict[str, Any]:
        if self.raw:
            return {"method": "POST", "url": "/predict", "content": images.pngs[i],
                    "headers": {"Content-Type": "image/png"}}
        body = self._cache.get(i)
        if body is None:
            body = json.dumps({"image": base64.b64encode(images.pngs[i]).decode()}).encode()
            self._cache[i] = body
        return {"method": "POST", "url": "/predict", "content": body,
                "headers": {"Content-Type": "application/json"}}

    def parse(self, response: AnyResponse) -> Answer:
        body = response.json()
        return Answer(class_index=int(body["class_index"]), flops_fraction=1.0)


@dataclass
class _Record:
    i: int
    start: float
    end: float
    status: int | None  # None: no HTTP answer (see ``failure``)
    code: str = ""
    failure: str = ""
    retry_after: bool = False
    answer: Answer | None = None


def _pct(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def latency_summary(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p95/p99/max/mean of a list of seconds (``None`` when empty)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": _pct(arr, 50), "p90": _pct(arr, 90), "p95": _pct(arr, 95), "p99": _pct(arr, 99),
            "max": float(arr.max()) if arr.size else None, "mean": float(arr.mean()) if arr.size else None}


async def _one(client: httpx.AsyncClient | RawClient, target: Target, images: ImageSet, i: int) -> _Record:
    start = time.perf_counter()
    try:
        r = await client.request(**target.request(images, i % len(images)))
    except (httpx.TimeoutException, TimeoutError):
        return _Record(i, start, time.perf_counter(), None, failure="timeout")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        return _Record(i, start, time.perf_counter(), None, failure=f"reset: {type(exc).__name__}")
    except httpx.ConnectError:
        return _Record(i, start, time.perf_counter(), None, failure="connect_error")
    except RawConnectionError as exc:
        kind = "connect_error" if str(exc).startswith("connect") else f"reset: {exc}"
        return _Record(i, start, time.perf_counter(), None, failure=kind)
    end = time.perf_counter()
    rec = _Record(i, start, end, r.status_code, retry_after="retry-after" in r.headers)
    if 200 <= r.status_code < 300:
        try:
            rec.answer = target.parse(r)
        except (ValueError, KeyError, TypeError, IndexError):
            rec.code = "malformed_answer"
    else:
        try:
            rec.code = str(r.json()["error"]["code"])
        except (ValueError, KeyError, TypeError):
            rec.code = f"http_{r.status_code}"
    return rec


async def _phase(base_url: str, target: Target, images: ImageSet, concurrency: int, count: int, offset: int,
                 timeout_s: float, time_limit_s: float, client_kind: str) -> tuple[list[_Record], float]:
    """Send ``count`` requests from ``concurrency`` clients; returns the records and the wall time."""
    next_i = 0
    records: list[_Record] = []
    stop_at = time.perf_counter() + time_limit_s

    async def worker(client: httpx.AsyncClient | RawClient) -> None:
        nonlocal next_i
        while next_i < count and time.perf_counter() < stop_at:
            i = next_i
            next_i += 1
            records.append(await _one(client, target, images, offset + i))

    if client_kind == "raw":
        clients = [RawClient(base_url, timeout_s) for _ in range(concurrency)]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        wall = time.perf_counter() - t0
        await asyncio.gather(*(c.close() for c in clients))
        return records, wall
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, trust_env=False) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return records, wall


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process while a load runs: collect and freeze what it holds, turn
    the collector off, and turn it back on (if it was on) afterwards.

    A generator's pause is read as the server's latency: requests leave late (an open loop counts from the
    scheduled time) and answers are read late. Freezing alone (what the open loop did first) keeps the
    earlier steps' answers out of the walk, but a step's own records still set off full collections: on
    2 EPYC cores at 630 requests/s, a 49 ms one 17.5 s into a 30 s step (the requests due then left up to
    48 ms late, and the burst they made was refused 19 times) and a 95 ms one as the step ended, over the
    last answers in flight (measured with ``gc.callbacks``), plus a 2-4 ms young collection every 1.6 s. A
    step's garbage is a few megabytes, freed by reference counting as it goes; its cycles wait for the end.
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (a cheaper client), else on asyncio's loop, with the
    collector paused (:func:`collector_paused`)."""
    with collector_paused():
        try:
            import uvloop
        except ImportError:
            return asyncio.run(coro)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)


def merge_rounds(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several rounds of the same load: throughput is the median round's, latency
    percentiles and accuracy are pooled over every answer, counts are summed; ``rounds`` keeps each
    round's throughput and p50. Raw latencies are dropped."""
    order = sorted(range(len(reports)), key=lambda i: reports[i]["ok_rps"] or 0.0)
    out = {k: v for k, v in reports[order[len(order) // 2]].items() if k != "raw_latencies"}
    lat = [x for r in reports for x in r.get("raw_latencies", [])]
    out["latency_seconds"] = latency_summary(lat)
    out["rounds"] = [{"ok_rps": r["ok_rps"], "p50": r["latency_seconds"]["p50"]} for r in reports]
    out["ok_rps"] = float(np.median([r["ok_rps"] or 0.0 for r in reports]))
    out["throughput_rps"] = float(np.median([r["throughput_rps"] or 0.0 for r in reports]))
    counts = dict(out["counts"])
    for key in ("sent", "completed", "ok_2xx", "overloaded_503", "queue_timeout_503", "deadline_504", "other_5xx",
                "rejections_without_retry_after", "client_timeouts", "resets", "connect_errors"):
        counts[key] = sum(r["counts"][key] for r in reports)
    out["counts"] = counts
    answers = sum(r["early_exit"]["answers"] for r in reports)
    ee = dict(out["early_exit"])
    ee["answers"] = answers
    ee["correct"] = sum(r["early_exit"]["correct"] for r in reports)
    ee["accuracy"] = ee["correct"] / answers if answers and ee["accuracy"] is not None else ee["accuracy"]
    fr = [(r["early_exit"]["mean_flops_fraction"], r["early_exit"]["answers"]) for r in reports
          if r["early_exit"]["mean_flops_fraction"] is not None]
    if fr:
        ee["mean_flops_fraction"] = sum(f * n for f, n in fr) / sum(n for _, n in fr)
        ee["flops_saving"] = 1.0 - ee["mean_flops_fraction"]
    out["early_exit"] = ee
    out["swap"] = {"responses_per_state": {}, "mixed_state_responses": sum(r["swap"]["mixed_state_responses"]
                                                                            for r in reports)}
    for r in reports:
        for k, v in r["swap"]["responses_per_state"].items():
            out["swap"]["responses_per_state"][k] = out["swap"]["responses_per_state"].get(k, 0) + v
    out["load"] = {**out["load"], "rounds": len(reports), "requests": sum(r["load"]["requests"] for r in reports)}
    return out


def _counts(records: list[_Record]) -> dict[str, Any]:
    status = Counter(r.status for r in records if r.status is not None)
    codes = Counter(r.code for r in records if r.code)
    failures = Counter(r.failure.split(":")[0] for r in records if r.failure)
    return {"sent": len(records), "completed": sum(1 for r in records if r.status is not None),
            "ok_2xx": sum(n for s, n in status.items() if 200 <= s < 300),
            "by_status": {str(k): v for k, v in sorted(status.items())},
            "by_code": dict(sorted(codes.items())),
            "overloaded_503": codes.get("overloaded", 0), "queue_timeout_503": codes.get("queue_timeout", 0),
            "deadline_504": status.get(504, 0),
            "other_5xx": sum(n for s, n in status.items() if s >= 500 and s not in (503, 504)),
            "rejections_without_retry_after": sum(1 for r in records if r.status == 503 and not r.retry_after),
            "client_timeouts": failures.get("timeout", 0), "resets": failures.get("reset", 0),
            "connect_errors": failures.get("connect_error", 0)}


def _early_exit(answers: list[tuple[int, Answer]], images: ImageSet) -> dict[str, Any]:
    labelled = [(i, a) for i, a in answers if a.class_index is not None]
    correct = sum(1 for i, a in labelled if a.class_index == int(images.labels[i % len(images)]))
    exits = Counter(a.exit_index for _, a in answers if a.exit_index is not None)
    fracs = [a.flops_fraction for _, a in answers if a.flops_fraction is not None]
    n_exit = sum(exits.values())
    mean_frac = float(np.mean(fracs)) if fracs else None
    return {"answers": len(answers), "accuracy": correct / len(labelled) if labelled else None,
            "correct": correct,
            "exit_share": {str(k): v / n_exit for k, v in sorted(exits.items())} if n_exit else {},
            "mean_flops_fraction": mean_frac,
            "flops_saving": (1.0 - mean_frac) if mean_frac is not None else None}


def _states(answers: list[Answer]) -> dict[str, Any]:
    triples = Counter(f"{a.bundle}|{a.profile}|{a.version}" for a in answers if a.bundle is not None)
    return {"responses_per_state": dict(sorted(triples.items())),
            "mixed_state_responses": sum(1 for a in answers if not a.consistent)}


def _server_side(answers: list[Answer]) -> dict[str, Any]:
    q = [a.queue_s for a in answers if a.queue_s is not None]
    c = [a.inference_s for a in answers if a.inference_s is not None]
    b = [a.batch_samples for a in answers if a.batch_samples is not None]
    return {"source": "per-response queue_seconds / inference_seconds" if q else "not reported by this server",
            "queue_p50": _pct(q, 50), "queue_p99": _pct(q, 99), "compute_p50": _pct(c, 50),
            "compute_p99": _pct(c, 99), "mean_batch_samples": float(np.mean(b)) if b else None}


def run_load(base_url: str, target: Target, images: ImageSet, *, concurrency: int, requests: int,
             warmup: int = 0, offset: int = 0, timeout_s: float = 60.0, time_limit_s: float = 300.0,
             server_pid: int | None = None, client: str = "raw") -> dict[str, Any]:
    """Warm up, then measure; returns the 2g report of the measured phase (a JSON-able dict).

    ``client``: ``"raw"`` (:mod:`bench.rawhttp`, cheap) or ``"httpx"``.
    """
    check_loopback(base_url)
    if client not in ("raw", "httpx"):
        raise ValueError(f"unknown client {client!r}")
    if warmup:
        _run(_phase(base_url, target, images, concurrency, warmup, offset + requests, timeout_s, time_limit_s,
                    client))
    before = procstat.sample(server_pid)
    client_cpu0 = sum(os.times()[:2])
    records, wall = _run(_phase(base_url, target, images, concurrency, requests, offset, timeout_s, time_limit_s,
                                client))
    client_cpu = sum(os.times()[:2]) - client_cpu0
    after = procstat.sample(server_pid)
    ok = [r for r in records if r.answer is not None]
    answers = [(r.i, r.answer) for r in ok if r.answer is not None]
    counts = _counts(records)
    resources: dict[str, Any] = {"client_cpu_percent": 100 * client_cpu / wall if wall else None}
    if before is not None and after is not None:
        resources.update({"server_processes": after.processes, "rss_mib_before": round(before.rss_mib, 1),
                          "rss_mib_after": round(after.rss_mib, 1),
                          "rss_change_percent": 100 * (after.rss_mib - before.rss_mib) / before.rss_mib
                          if before.rss_mib else None,
                          "peak_rss_mib": round(after.peak_rss_mib, 1),
                          "server_cpu_percent": 100 * (after.cpu_seconds - before.cpu_seconds) / wall})
    return {
        "target": target.name,
        "load": {"concurrency": concurrency, "warmup_requests": warmup, "requests": requests, "client": client,
                 "payload": "one CIFAR-10 test PNG per request", "timeout_s": timeout_s},
        "counts": counts,
        "window_seconds": wall,
        "throughput_rps": counts["completed"] / wall if wall else None,
        "ok_rps": len(ok) / wall if wall else None,
        "latency_seconds": latency_summary([r.end - r.start for r in ok]),
        "raw_latencies": [r.end - r.start for r in ok],  # for pooling rounds; callers drop it before saving
        "server": _server_side([a for _, a in answers]),
        "early_exit": _early_exit(answers, images),
        "swap": _states([a for _, a in answers]),
        "resources": resources,
    }
