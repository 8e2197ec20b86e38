"""Replicas of the store, measured: convergence after a switch, and throughput with 1 vs 2 worker processes.

``python -m bench.replicas`` (defaults: the default model in ``model_store/``, real CIFAR-10 test PNGs) writes
``docs/replicas.json``:

* **convergence**: a server under moderate load (``--load-clients`` keep-alive clients classifying), an admin
  switching the operating point ``--switches`` times on one process; after each switch, the time until every
  worker process has answered a request with the new version (or a newer one). Two set-ups: one server with
  ``--workers 2`` (switches land on whichever worker accepts the admin's connection), and two separate
  ``classmeans serve`` processes on one store, switches made alternately on each (the replica case). The time
  is measured at the client: from the switch's 200 until the first answer of each process that names the new
  version, so it includes that answer's own latency (an upper bound of the swap time). Also counted: answers
  whose headers and body name different states (must be 0), and answers on one connection whose version is
  lower than an earlier one from the same process (versions going back; must be 0).
* **throughput**: 32 clients, ``--workers 2`` vs ``--workers 1`` (torch threads split so both use the same
  cores), exits on (the default profile) vs exits off (``?exits=off``): interleaved rounds in one run, the
  order rotated per round; per configuration the median round. Ratios only between configurations of this run.

The machine is shared and noisy (2 cores, a niced training job, other engineers' tests): the figures carry
that noise; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.images import ImageSet, load_images
from bench.loadgen import ClassmeansTarget, merge_rounds, run_load
from bench.servers import REPO, Server, classmeans_server
from service.earlyexit.modes import BUNDLE_MODE, get_mode

DEFAULT_MODEL_DIR = REPO / "model_store" / "cifar10-resnet20"
CAP_S = 15.0


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cores() -> int:
    return len(os.sched_getaffinity(0))


# -- convergence --------------------------------------------------------------------------------------------------


class LoadClient(threading.Thread):
    """One keep-alive connection classifying images in a loop; records (time, process, version) per answer."""

    def __init__(self, url: str, images: ImageSet, stop: threading.Event, key: int, log: list) -> None:
        super().__init__(daemon=True)
        self.url, self.images, self.stop_event, self.key, self.log = url, images, stop, key, log
        self.mixed = 0
        self.went_back = 0
        self.errors = 0
        self.answers = 0

    def run(self) -> None:
        target = ClassmeansTarget()
        last: dict[str, int] = {}
        with httpx.Client(base_url=self.url, timeout=30, trust_env=False,
                          limits=httpx.Limits(max_connections=1)) as c:
            for i in range(10_000_000):
                if self.stop_event.is_set():
                    return
                try:
                    r = c.request(**target.request(self.images, (self.key * 7919 + i) % len(self.images)))
                    r.raise_for_status()
                    a = target.parse(r)
                except (httpx.HTTPError, ValueError, KeyError):
                    self.errors += 1
                    continue
                who = f"{self.url.rsplit(':', 1)[1]}/{r.headers.get('x-classmeans-worker')}"
                self.answers += 1
                self.mixed += 0 if a.consistent else 1
                v = int(a.version or 0)
                if v < last.get(who, 0):
                    self.went_back += 1
                last[who] = v
                self.log.append((time.monotonic(), who, v))


def _switch(url: str, token: str, name: str) -> int:
    with httpx.Client(base_url=url, timeout=30, trust_env=False, headers={"Authorization": f"Bearer {token}"}) as c:
        r = c.post("/profiles", json={"name": name})
    r.raise_for_status()
    return int(r.json()["version"])


def _processes(log: list, since: float) -> set[str]:
    return {who for t, who, _ in list(log) if t >= since}


def converge(servers: list[Server], images: ImageSet, names: list[str], switches: int, clients: int,
             processes: int) -> dict[str, Any]:
    """Switch ``switches`` times (alternating servers and profiles) under load; per switch, the seconds until
    every process has answered with the new version."""
    log: list[tuple[float, str, int]] = []
    stop = threading.Event()
    load = [LoadClient(servers[k % len(servers)].url, images, stop, k, log) for k in range(clients)]
    for c in load:
        c.start()
    times: list[float] = []
    timeouts = 0
    try:
        deadline = time.monotonic() + 120
        while len(_processes(log, 0.0)) < processes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {_processes(log, 0.0)} answered; expected {processes} processes")
            time.sleep(0.1)
        procs = _processes(log, 0.0)
        for k in range(switches):
            srv = servers[k % len(servers)]
            version = _switch(srv.url, srv.token, names[k % len(names)])
            t0 = time.monotonic()
            first: dict[str, float] = {}
            while len(first) < len(procs) and time.monotonic() - t0 < CAP_S:
                for t, who, v in list(log[-400:]):
                    if v >= version and who in procs and who not in first and t >= t0 - 1.0:
                        first[who] = max(t, t0)
                time.sleep(0.005)
            if len(first) < len(procs):
                timeouts += 1
            else:
                times.append(max(first.values()) - t0)
            time.sleep(0.05)
    finally:
        stop.set()
        for c in load:
            c.join(60)
    arr = np.asarray(times)
    return {"switches": switches, "converged": len(times), "not_converged_within_s": {str(CAP_S): timeouts},
            "processes": sorted(procs), "load_clients": clients,
            "seconds": {"p50": float(np.percentile(arr, 50)) if len(arr) else None,
                        "p90": float(np.percentile(arr, 90)) if len(arr) else None,
                        "p99": float(np.percentile(arr, 99)) if len(arr) else None,
                        "max": float(arr.max()) if len(arr) else None},
            "answers_under_load": sum(c.answers for c in load),
            "mixed_state_answers": sum(c.mixed for c in load),
            "versions_went_back": sum(c.went_back for c in load),
            "client_errors": sum(c.errors for c in load)}


# -- throughput ---------------------------------------------------------------------------------------------------


def throughput(servers: dict[int, Server], images: ImageSet, rounds: int, requests: int,
               warmup: int) -> dict[str, Any]:
    configs = [(w, e) for w in sorted(servers) for e in ("on", "off")]
    per: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(rounds):
        k = rnd % len(configs)
        for workers, exits in configs[k:] + configs[:k]:
            label = f"workers={workers}, exits {exits}"
            print(f"[replicas] round {rnd + 1}/{rounds}: {label}", flush=True)
            srv = servers[workers]
            rep = run_load(srv.url, ClassmeansTarget(exits=exits), images, concurrency=32, requests=requests,
                           warmup=warmup, offset=(rnd * requests) % max(1, len(images) - requests),
                           server_pid=srv.pid)
            per.setdefault(label, []).append(rep)
    merged = {label: merge_rounds(reps) for label, reps in per.items()}
    rps = {label: m["ok_rps"] for label, m in merged.items()}
    ratios = {}
    top = max(servers)
    if 1 in servers and top != 1:
        ratios[f"workers {top} / workers 1, exits on"] = rps[f"workers={top}, exits on"] / rps["workers=1, exits on"]
        ratios[f"workers {top} / workers 1, exits off"] = (rps[f"workers={top}, exits off"]
                                                           / rps["workers=1, exits off"])
    for w in servers:
        on, off = merged[f"workers={w}, exits on"], merged[f"workers={w}, exits off"]
        frac = on["early_exit"]["mean_flops_fraction"]
        speed = rps[f"workers={w}, exits on"] / rps[f"workers={w}, exits off"]
        ratios[f"exits on / off, workers {w}"] = speed
        if frac:
            ratios[f"flops speedup (1 / fraction), workers {w}"] = 1.0 / frac
            ratios[f"time speedup / flops speedup, workers {w}"] = speed * frac
        ratios[f"accuracy exits on, workers {w}"] = on["early_exit"]["accuracy"]
        ratios[f"accuracy exits off, workers {w}"] = off["early_exit"]["accuracy"]
    slim = {label: {"ok_rps": m["ok_rps"], "rounds": m["rounds"], "latency_seconds": m["latency_seconds"],
                    "counts": {k: m["counts"][k] for k in ("sent", "ok_2xx", "overloaded_503", "other_5xx")},
                    "early_exit": {k: m["early_exit"].get(k) for k in ("accuracy", "mean_flops_fraction")},
                    "server": m["server"], "resources": m.get("resources"),
                    "mixed_state_responses": m["swap"]["mixed_state_responses"]} for label, m in merged.items()}
    return {"rounds": rounds, "requests_per_round": requests, "warmup_per_round": warmup, "concurrency": 32,
            "configs": slim, "ratios": ratios}


# -- main ---------------------------------------------------------------------------------------------------------


@contextmanager
def server(store: Path, model: str, log: Path, workers: int, threads: int) -> Iterator[Server]:
    with classmeans_server(store, model, log, workers=workers, torch_threads=threads, max_batch_size=32,
                           max_delay_ms=2.0) as srv:
        yield srv


def copy_store(model_dir: Path, root: Path) -> Path:
    shutil.copytree(model_dir, root / model_dir.name, ignore=shutil.ignore_patterns("*.tmp", "jobs", "locks"))
    return root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--switches", type=int, default=150)
    ap.add_argument("--load-clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", choices=("convergence", "throughput"), action="append", default=[])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "replicas.json")
    args = ap.parse_args(argv)
    model = args.model_dir.name
    images = load_images(args.images)
    out: dict[str, Any] = {"model": model, "images": images.source, "cores": cores(), "loadavg_before": loadavg(),
                           "note": "shared, noisy 2-core machine (a niced training job and other engineers' "
                                   "tests run alongside); ratios are between configurations of this one run"}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        work = Path(tmp)
        if "convergence" not in args.skip:
            store = copy_store(args.model_dir, work / "conv-a")
            with server(store, model, work / "conv-w.log", args.workers, 1) as srv:
                names = _two_profiles(srv)
                print(f"[replicas] convergence, one server --workers {args.workers}", flush=True)
                out["convergence_workers"] = {"setup": f"one classmeans serve --workers {args.workers}",
                                              "profiles": names, **converge([srv], images, names, args.switches,
                                                                            args.load_clients, args.workers)}
            store = copy_store(args.model_dir, work / "conv-b")
            with server(store, model, work / "rep-1.log", 1, 1) as a, server(store, model, work / "rep-2.log", 1,
                                                                             1) as b:
                names = _two_profiles(a)
                print("[replicas] convergence, two classmeans serve processes on one store", flush=True)
                out["convergence_replicas"] = {"setup": "two classmeans serve --workers 1 on one store, switches "
                                               "alternately on each", "profiles": names,
                                               **converge([a, b], images, names, args.switches, args.load_clients,
                                                          2)}
        if "throughput" not in args.skip:
            with ExitStack() as stack:
                servers = {}
                for w in sorted({1, args.workers}):
                    store = copy_store(args.model_dir, work / f"thr-{w}")
                    servers[w] = stack.enter_context(server(store, model, work / f"thr-{w}.log", w,
                                                            max(1, cores() // w)))
                out["throughput"] = {"torch_threads": {str(w): max(1, cores() // w) for w in servers},
                                     **throughput(servers, images, args.rounds, args.requests, args.warmup)}
    out["loadavg_after"] = loadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "throughput"}, indent=2)[:4000])
    if "throughput" in out:
        print(json.dumps(out["throughput"]["ratios"], indent=2))
    return 0


def _two_profiles(srv: Server) -> list[str]:
    with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
        body = c.get("/profiles").json()
    default = body["default_profile"]
    other = next(p["name"] for p in body["profiles"] if p["name"] != default
                 and get_mode(p.get("mode", BUNDLE_MODE)).from_bundle)
    return [other, default]


if __name__ == "__main__":
    raise SystemExit(main())
