"""The serving benchmark with a C load generator (wrk): LitServe at its best, LitServe + ONNX Runtime, ours.

    python -m bench.serving_wrk [--model-dir model_store/cifar10-resnet56] [--out docs] [--seconds 20]
                                [--quick] [--rows litserve,litserve_ort,ours_oob,ours_exits_off,ours_target,...]

One server at a time, each started fresh as a child process on 127.0.0.1 for each row and client count,
then stopped. The load generator is wrk (C, Debian's build with LuaJIT, ``bench/wrk.py``): a generated Lua
script rotates the first 2,000 CIFAR-10 test images as raw ``image/png`` bodies, counts non-2xx answers and
prints its latency percentiles as JSON. 1-client rows pin the server to CPU 0 and wrk to CPU 1 (``taskset``;
``--no-pin`` turns it off); 32-client rows leave both unpinned (recorded per row). Before each measured run
the check images go once through httpx (answers compared with the labels and with the in-process full
network) and wrk runs a warm-up at the row's client count (excluded).

Rows:

1. ``litserve``: LitServe serving the same PyTorch network (``bench/litserve_server.py``, raw PNG body), at
   its best configuration here: workers_per_device x torch threads probed at 32 clients, the best used;
2. ``litserve_ort``: the same LitServe API running the full network exported to ONNX (opset 17, dynamic
   batch; ``bench/onnx_full.py``) in ONNX Runtime with the probe's best workers and intra-op threads;
3. ``ours_oob``: the README's ``classmeans serve`` with no settings (``--store``/``--port`` on a store copy,
   the admin token the README exports), answering at its active operating point;
4. ``ours_exits_off``: the same server, ``exits=off`` on every request;
5. ``ours_target``: the same server at the cheapest profile within 0.5 points of the full network's accuracy
   (the active bundle's ``profiles.json``), ``profile=`` on every request;
6. ``ours_default``: the same server at the bundle's default profile.

Both LitServe rows use max batch 32 and a 2 ms batch timeout, ours' defaults. Ours get ``top_k=1`` (LitServe
answers the top class only). For our server the per-stage time (request, queue, inference per batch, batch
size) comes from ``/metrics`` read before and after each measured run; decoding is timed in process on the
same PNGs. Plus the in-process runner per profile (``bench/plain.py``). Writes ``docs/serving_wrk.json``,
``docs/serving_wrk.md`` and ``docs/img/serving_wrk.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import onnx_full, procstat, wrk
from bench.images import ImageSet, load_images
from bench.loadgen import ClassmeansTarget, LitServeTarget
from bench.servers import REPO, Server, classmeans_oob_server, copy_model, litserve_server
from bench.serving import PACKAGES, environment, pick_profiles, read_results_json, store_listing
from bench.serving_report import target_profile

DEFAULT_MODEL = REPO / "model_store" / "cifar10-resnet56"
ROWS = ("litserve", "litserve_ort", "ours_oob", "ours_exits_off", "ours_target", "ours_default")
CLIENTS = (1, 32)
MAX_BATCH, BATCH_WAIT_S = 32, 0.002  # ours' defaults (service/api/settings.py), given to LitServe too
PROBE = ((1, 1), (1, 2), (2, 1), (2, 2))  # LitServe workers_per_device x threads
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
EXTRA_PACKAGES = ("onnxruntime", "onnx", "prometheus_client", "litserve")


# -- environment -------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    """CPU, flags, cores and versions (on top of bench.serving's environment)."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = environment(1)
    env.pop("torch_threads_used", None)
    env["packages"] = {p: version(p) for p in (*PACKAGES, *EXTRA_PACKAGES)}
    env["cpu_flags"] = procstat.cpu_flags(*CPU_FLAGS)
    env["cpus_allowed"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env["wrk"] = wrk.version()
    env["loadavg_start"] = list(os.getloadavg())
    return env


# -- our /metrics ------------------------------------------------------------------------------------------

METRICS = {"latency": "classmeans_request_latency_seconds", "queue": "classmeans_queue_wait_seconds",
           "inference": "classmeans_inference_seconds", "batch": "classmeans_batch_size"}


def parse_metrics(text: str) -> dict[str, float]:
    """Sums and counts of our histograms (``latency`` of ``/classify`` only) and ``classmeans_up``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    names = {v: k for k, v in METRICS.items()}
    for fam in text_string_to_metric_families(text):
        if fam.name == "classmeans_up":
            out["up"] = sum(s.value for s in fam.samples)
        key = names.get(fam.name)
        if key is None:
            continue
        for s in fam.samples:
            if key == "latency" and s.labels.get("endpoint") != "/classify":
                continue
            for suffix in ("_sum", "_count"):
                if s.name.endswith(suffix):
                    out[key + suffix] = out.get(key + suffix, 0.0) + s.value
    return out


def scrape(srv: Server) -> dict[str, float]:
    with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
        r = c.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


def breakdown(before: dict[str, float], after: dict[str, float], decode_s: float | None) -> dict[str, Any]:
    """Mean seconds per request and stage over one measured run, from two scrapes."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def mean(key: str) -> float | None:
        n = d(f"{key}_count")
        return d(f"{key}_sum") / n if n > 0 else None

    lat, queue, inf, batch = mean("latency"), mean("queue"), mean("inference"), mean("batch")
    rest = None
    if lat is not None and queue is not None and inf is not None:
        rest = lat - queue - inf - (decode_s or 0.0)
    return {"requests": d("latency_count"), "batches": d("inference_count"), "request_s": lat, "queue_s": queue,
            "inference_per_batch_s": inf, "mean_batch_samples": batch, "decode_s": decode_s,
            "http_and_rest_s": rest,
            "note": "request: server-side latency of /classify; inference: per batch (each request waits for its "
                    "whole batch); decode: timed in process on the same PNGs; http_and_rest = request - queue - "
                    "inference - decode (HTTP parsing, admission, response, event-loop waits)"}


ANSWER_FIELDS = ("latency_seconds", "queue_seconds", "inference_seconds", "batch_samples")


def answer_breakdown(rep: dict[str, Any], decode_s: float | None) -> dict[str, Any] | None:
    """Mean seconds per request and stage from our answers' own timing fields (summed by wrk's Lua
    ``response`` callback over every 2xx answer of the measured run) and wrk's client-side mean latency."""
    f = rep.get("field_means") or {}
    if not all(k in f for k in ANSWER_FIELDS):
        return None
    server, queue, inf = f["latency_seconds"], f["queue_seconds"], f["inference_seconds"]
    client = rep["latency_seconds"]["mean"]
    return {"answers": rep.get("field_count"), "client_s": client, "server_s": server,
            "http_and_transport_s": client - server, "decode_s": decode_s, "queue_s": queue, "inference_s": inf,
            "admission_and_loop_s": server - queue - inf - (decode_s or 0.0),
            "mean_batch_samples": f["batch_samples"],
            "note": "client: wrk's mean latency; server: the answer's latency_seconds (arrival to answer built); "
                    "http_and_transport = client - server (parsing, response write, loopback, wrk); queue and "
                    "inference: the answer's queue_seconds and inference_seconds; decode: timed in process; "
                    "admission_and_loop = server - queue - inference - decode"}


def wait_workers(srv: Server, timeout_s: float = 180.0) -> tuple[int, int]:
    """Until every worker of an out-of-the-box server is ready (``classmeans_up`` counts them); returns
    (expected: one per CPU the server may use, its default; ready when the wait ended)."""
    try:
        expected = len(os.sched_getaffinity(srv.pid))
    except (AttributeError, OSError):
        expected = os.cpu_count() or 1
    deadline = time.monotonic() + timeout_s
    up = 0
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            up = int(scrape(srv).get("up", 0))
        if up >= expected:
            break
        time.sleep(0.5)
    return expected, up


def decode_seconds(images: ImageSet, n: int = 500) -> float:
    """Mean seconds to decode one of the PNGs with the service's decoder (in this process)."""
    from service.ingest.images import decode_image

    size = tuple(images.pixels.shape[1:3])
    pngs = images.pngs[:n]
    for p in pngs[:20]:
        decode_image(p, size=size)
    t0 = time.perf_counter()
    for p in pngs:
        decode_image(p, size=size)
    return (time.perf_counter() - t0) / len(pngs)


# -- answers checked ---------------------------------------------------------------------------------------

def reference_predictions(model_dir: Path, images: ImageSet, n: int) -> np.ndarray:
    """The full network's top-1 on the first ``n`` images, eager, in this process."""
    import torch

    _, net, norm = onnx_full.full_network(model_dir)  # a cascade's: its last member alone
    x = norm(images.pixels[:n])
    with torch.inference_mode():
        return torch.cat([net.module(b).argmax(1) for b in x.split(64)]).numpy()


def check_answers(srv: Server, target: Any, images: ImageSet, n: int, ref: np.ndarray,
                  concurrency: int = 8) -> dict[str, Any]:
    """Send the first ``n`` images once (httpx, ``concurrency`` at a time); accuracy against the labels,
    agreement with the in-process full network, non-2xx answers, and what our answers said."""
    def one(c: httpx.Client, i: int) -> tuple[int, Any]:
        kw = target.request(images, i)
        r = c.request(kw["method"], kw["url"], params=kw.get("params"), content=kw["content"],
                      headers=kw["headers"])
        return r.status_code, (target.parse(r) if 200 <= r.status_code < 300 else None)

    with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c, ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda i: one(c, i), range(n)))
    answers = [(i, a) for i, (st, a) in enumerate(results) if a is not None]
    pred = np.array([a.class_index for _, a in answers])
    idx = np.array([i for i, _ in answers], dtype=int)
    out: dict[str, Any] = {"images": n, "answers": len(answers), "non2xx": n - len(answers),
                           "accuracy": float((pred == images.labels[idx]).mean()) if len(idx) else None,
                           "agreement_with_full_network": float((pred == ref[idx]).mean()) if len(idx) else None}
    fr = [a.flops_fraction for _, a in answers if a.flops_fraction is not None]
    out["mean_flops_fraction"] = float(np.mean(fr)) if fr else None
    profiles = sorted({a.profile for _, a in answers if a.profile})
    if profiles:
        out["profiles_named"] = profiles
        ex_idx = [a.exit_index for _, a in answers if a.exit_index is not None]
        out["mean_exit_index"] = float(np.mean(ex_idx)) if ex_idx else None
    return out


# -- one row -----------------------------------------------------------------------------------------------

def _ours_path(row: str, target: str, default: str) -> tuple[str, ClassmeansTarget]:
    if row == "ours_exits_off":
        return "/classify?top_k=1&exits=off", ClassmeansTarget(exits="off")
    if row == "ours_target":
        return f"/classify?top_k=1&profile={target}", ClassmeansTarget(profile=target)
    if row == "ours_default":
        return f"/classify?top_k=1&profile={default}", ClassmeansTarget(profile=default)
    return "/classify?top_k=1", ClassmeansTarget()


class Bench:
    """Everything one run shares: images, payload files, the store copy, the ONNX file, the plan."""

    def __init__(self, args: argparse.Namespace, images: ImageSet, work: Path, target: str, default: str) -> None:
        self.args, self.images, self.work = args, images, work
        self.target, self.default = target, default
        self.bodies, self.sizes = wrk.write_payload(images.pngs, work / "payload")
        self.store = work / "store"
        copy_model(args.model_dir, self.store)
        self.onnx: Path | None = None
        self.ref = reference_predictions(args.model_dir, images, args.check_images)
        self.decode_s = decode_seconds(images)
        self.scripts: dict[str, Path] = {}
        self.n_logs = 0

    def script(self, path: str, fields: tuple[str, ...] = ()) -> Path:
        key = f"{path} {fields}"
        if key not in self.scripts:
            p = self.work / f"wrk-{len(self.scripts)}.lua"
            p.write_text(wrk.lua_script(self.bodies, self.sizes, path, fields=fields))
            self.scripts[key] = p
        return self.scripts[key]

    def log(self, name: str) -> Path:
        self.n_logs += 1
        return self.work / f"{self.n_logs:02d}-{name}.log"

    def pins(self, clients: int) -> tuple[list[str] | None, str | None, str]:
        """(server prefix, wrk CPUs, description) for a row with ``clients`` clients."""
        if clients == 1 and self.args.pin:
            return ["taskset", "-c", "0"], "1", "server taskset -c 0, wrk taskset -c 1"
        return None, None, "none (server and wrk share every CPU)"

    def server(self, row: str, prefix: list[str] | None, config: tuple[int, int] | None
               ) -> AbstractContextManager[Server]:
        model_dir = self.args.model_dir
        if row in ("litserve", "litserve_ort"):
            assert config is not None
            workers, threads = config
            return litserve_server(model_dir, self.log(row), MAX_BATCH, BATCH_WAIT_S, threads,
                                   workers_per_device=workers, onnx=self.onnx if row == "litserve_ort" else None,
                                   raw_body=True, prefix=prefix)
        return classmeans_oob_server(self.store, model_dir.name, self.log(row), prefix=prefix)

    def measure(self, row: str, clients: int, seconds: float, config: tuple[int, int] | None = None,
                check: bool = True) -> dict[str, Any]:
        """Start a fresh server for ``row``, check its answers, warm it up, run wrk, read it, stop it."""
        prefix, wrk_cpus, pin_note = self.pins(clients)
        ours = row.startswith("ours")
        if ours:
            path, target = _ours_path(row, self.target, self.default)
        else:
            path, target = "/predict", LitServeTarget(raw=True)
        rec: dict[str, Any] = {"row": row, "clients": clients, "path": path, "pinning": pin_note,
                               "loadavg_before": list(os.getloadavg())}
        if config is not None:
            rec["workers_per_device"], rec["threads"] = config
        t0 = time.perf_counter()
        with self.server(row, prefix, config) as srv:
            if ours:
                rec["workers"], rec["workers_ready"] = wait_workers(srv)
            rec["start_s"] = time.perf_counter() - t0
            if check:
                rec["check"] = check_answers(srv, target, self.images, self.args.check_images, self.ref)
            script = self.script(path, ANSWER_FIELDS if ours else ())
            plan = wrk.WrkPlan(clients, self.args.wrk_threads, self.args.warmup_s, wrk_cpus)
            wrk.run(srv.url, script, plan)  # warm-up, excluded
            before = scrape(srv) if ours else None
            rec["wrk"] = wrk.run(srv.url, script, wrk.WrkPlan(clients, self.args.wrk_threads, seconds, wrk_cpus))
            if ours:
                rec["breakdown"] = breakdown(before or {}, scrape(srv), self.decode_s)
                rec["breakdown_answers"] = answer_breakdown(rec["wrk"], self.decode_s)
            procs = procstat.per_process(srv.pid)
            rec["processes"] = procs
            rec["rss_mib_total"] = sum(float(p["rss_mib"]) for p in procs)  # type: ignore[arg-type]
            if not srv.alive():
                raise RuntimeError(f"{row} died:\n{srv.log_tail()}")
        rec["loadavg_after"] = list(os.getloadavg())
        w = rec["wrk"]
        lat = w["latency_seconds"]
        print(f"[wrk] {row:15s} c={clients:2d} {w['ok_rps']:8.1f} req/s  p50 {1e3 * lat['p50']:7.2f} ms"
              f"  p99 {1e3 * lat['p99']:7.2f} ms  non-2xx {w['non2xx']}"
              + (f"  acc {rec['check']['accuracy']:.4f}" if check and rec["check"]["accuracy"] is not None else "")
              + f"  load {rec['loadavg_after'][0]:.2f}", flush=True)
        return rec


def probe_litserve(b: Bench) -> dict[str, Any]:
    """LitServe (PyTorch) at 32 clients for each workers x threads; the best by 2xx requests/s."""
    runs = []
    for cfg in PROBE:
        rec = b.measure("litserve", 32, b.args.probe_seconds, cfg, check=False)
        runs.append({"workers_per_device": cfg[0], "threads": cfg[1], "ok_rps": rec["wrk"]["ok_rps"],
                     "p50_s": rec["wrk"]["latency_seconds"]["p50"], "p99_s": rec["wrk"]["latency_seconds"]["p99"],
                     "non2xx": rec["wrk"]["non2xx"], "socket_errors": rec["wrk"]["socket_errors"],
                     "requests": rec["wrk"]["requests"], "rss_mib_total": rec["rss_mib_total"],
                     "loadavg_after": rec["loadavg_after"]})
    best = max(runs, key=lambda r: r["ok_rps"] or 0.0)
    return {"clients": 32, "seconds": b.args.probe_seconds, "runs": runs,
            "best": [best["workers_per_device"], best["threads"]]}


def parse_config(text: str) -> tuple[int, int]:
    w, t = text.lower().split("x")
    return int(w), int(t)


def iter_rows(selected: list[str]) -> Iterator[tuple[str, int]]:
    for row in selected:
        for clients in CLIENTS:
            yield row, clients


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    images = load_images(args.images)
    listing = store_listing(args.model_dir)
    target, basis = target_profile(listing, read_results_json(args.out) if args.target_basis == "test" else None)
    default = listing["default_profile"]
    results: dict[str, Any] = {
        "generated_by": "python -m bench.serving_wrk", "quick": args.quick,
        "model_dir": str(args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO) else args.model_dir),
        "environment": machine(),
        "load_generator": {"name": "wrk", "language": "C (Debian build, LuaJIT scripting)",
                           "version": wrk.version(), "threads": args.wrk_threads,
                           "connections": {"1 client": 1, "32 clients": 32},
                           "closed_loop": True, "warmup_s": args.warmup_s, "seconds_per_row": args.seconds,
                           "pinning": {"1 client": "server taskset -c 0, wrk taskset -c 1" if args.pin else "none",
                                       "32 clients": "none (server and wrk share every CPU)"}},
        "images": {"count": len(images), "source": images.source,
                   "png_bytes_mean": sum(map(len, images.pngs)) / len(images), "check_images": args.check_images},
        "profiles": {"bundle": listing["bundle"], "target": target, "target_basis": basis, "default": default,
                     "active_operating": json.loads((args.model_dir / "active.json").read_text()).get("operating"),
                     "target_row": next((p for p in listing["profiles"] if p["name"] == target), None),
                     "default_row": next((p for p in listing["profiles"] if p["name"] == default), None),
                     "full_row": next((p for p in listing["profiles"] if p["name"] == "full"), None)},
        "batching": {"max_batch_size": MAX_BATCH, "batch_wait_s": BATCH_WAIT_S},
        "rows": [],
    }
    print(f"[wrk] target profile {target} ({basis}), default {default}", flush=True)
    with tempfile.TemporaryDirectory(prefix="classmeans-wrk-") as tmp:
        b = Bench(args, images, Path(tmp), target, default)
        results["decode_s_in_process"] = b.decode_s
        best = parse_config(args.litserve_config) if args.litserve_config else None
        lit_rows = [r for r in args.rows if r.startswith("litserve")]
        if lit_rows and best is None:
            results["litserve_probe"] = probe_litserve(b)
            best = tuple(results["litserve_probe"]["best"])  # type: ignore[assignment]
        if "litserve_ort" in args.rows:
            b.onnx = b.work / "full.onnx"
            results["onnx"] = {**onnx_full.export(args.model_dir, b.onnx),
                               "check": onnx_full.check(args.model_dir, b.onnx, images.pixels[:args.check_images])}
            results["onnx"]["path"] = "full.onnx (temporary)"
        results["litserve_config"] = {"workers_per_device": best[0], "threads": best[1],
                                      "chosen_by": "--litserve-config" if args.litserve_config else "probe"
                                      } if best else None
        for row, clients in iter_rows(args.rows):
            cfg = best if row.startswith("litserve") else None
            results["rows"].append(b.measure(row, clients, args.seconds, cfg))
    if not args.no_in_process:
        from bench import plain

        print("[wrk] in-process runner", flush=True)
        n1, n32 = (50, 128) if args.quick else (300, 1024)
        names = {target, default} | set(pick_profiles(listing, args.in_process_profiles, target)
                                        if args.in_process_profiles else ())
        results["in_process"] = plain.measure(args.model_dir, images, min(n1, len(images)), min(n32, len(images)),
                                              args.in_process_threads, sorted(names - {"full"}))
    results["environment"]["loadavg_end"] = list(os.getloadavg())
    results["wall_seconds"] = time.perf_counter() - t_start
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per row and client count")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="wrk warm-up per row (excluded)")
    ap.add_argument("--probe-seconds", type=float, default=8.0, help="LitServe probe run per configuration")
    ap.add_argument("--images", type=int, default=2000, help="test images wrk rotates")
    ap.add_argument("--check-images", type=int, default=2000, help="images sent once through httpx per row")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (at most the connections)")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin 1-client rows")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--litserve-config", help="WORKERSxTHREADS (e.g. 2x1): skip the probe")
    ap.add_argument("--in-process-threads", type=int, default=1, help="torch threads of the in-process runner")
    ap.add_argument("--in-process-profiles", type=int, default=10,
                    help="profiles the in-process runner times besides the target and default (thinned by FLOPs)")
    ap.add_argument("--target-basis", choices=("selection", "test"), default="selection",
                    help="judge 'full - 0.5 points' on the bundle's profiles.json (held-out selection split) or "
                         "on the test set (docs/results.json)")
    ap.add_argument("--no-in-process", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3 s per row, fewer checks: a smoke run, not a result")
    ap.add_argument("--render-only", action="store_true", help="re-render the Markdown and plot from the JSON")
    args = ap.parse_args(argv)
    from bench.serving_wrk_report import render_markdown, render_plot, summarise

    out_json = args.out / "serving_wrk.json"
    if args.render_only:
        results = json.loads(out_json.read_text())
    else:
        if wrk.available() is None:
            ap.error("wrk not found: apt-get install wrk")
        args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = set(args.rows) - set(ROWS)
        if unknown:
            ap.error(f"unknown rows {sorted(unknown)}")
        if args.quick:
            args.seconds, args.warmup_s, args.probe_seconds = 3.0, 1.0, 2.0
            args.check_images = min(args.check_images, 200)
            args.in_process_profiles = 0
        args.check_images = min(args.check_images, args.images)
        results = run(args)
    results["summary"] = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "img").mkdir(exist_ok=True)
    render_plot(results, args.out / "img" / "serving_wrk.png")
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "serving_wrk.md").write_text(render_markdown(results))
    print(json.dumps(results["summary"]["goals"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
