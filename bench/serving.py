"""The serving benchmark, one command: plain PyTorch, LitServe, and our service (exits off, every profile).

    python -m bench.serving [--model-dir model_store/cifar10-resnet56] [--out docs] [--quick]

In one run on this machine, with the same real CIFAR-10 test PNGs sent by the same load generator
(``bench/loadgen.py``), each server started as a child process on 127.0.0.1 and stopped afterwards:

1. plain PyTorch forward of the full network, batch 1 and batch 32 (the physical reference, in process);
2. LitServe (PyPI) serving the same network with dynamic batching (``bench/litserve_server.py``);
3. ``classmeans serve`` with early exit disabled (``exits=off`` on every request);
4. ``classmeans serve`` at each profile of the active bundle (switched with ``POST /profiles``).

Each server configuration gets a warm-up (excluded), then 1 client and 32 clients. Writes
``docs/benchmarks.json``, ``docs/img/bench_*.png`` and ``docs/benchmarks.md`` (generated, not hand-typed).
The model store is copied to a temporary directory first: profile switches never touch the repository.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import torch

from bench import plain, procstat, profiling
from bench.images import ImageSet, load_images
from bench.loadgen import ClassmeansTarget, LitServeTarget, merge_rounds, run_load
from bench.servers import REPO, Server, classmeans_server, litserve_server
from bench.serving_report import render_markdown, render_plots, summarise, target_profile

DEFAULT_MODEL = REPO / "model_store" / "cifar10-resnet56"
PACKAGES = ("torch", "torchvision", "pillow", "numpy", "fastapi", "starlette", "uvicorn", "pydantic", "httpx",
            "litserve", "uvloop", "httptools")


def loadavg() -> str | None:
    """The 1/5/15-minute load averages: other work on the machine shows up here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def environment(threads: int) -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    import os

    return {"git_sha": sha, "git_dirty": dirty, "cpu": procstat.cpu_model(), "cpu_count": os.cpu_count(),
            "ram_gib": procstat.mem_total_gib(), "python": platform.python_version(),
            "torch_threads_default": torch.get_num_threads(), "torch_threads_used": threads,
            "packages": {p: version(p) for p in PACKAGES}, "loadavg_start": loadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _loads(srv: Server, target: Any, images: ImageSet, plan: dict[str, int], rnd: int) -> dict[str, Any]:
    """Round ``rnd``: 1 client then 32 clients against ``srv``, each with its own warm-up; each round
    uses other images (``offset``), so the pooled answers are about distinct images."""
    out = {}
    for clients in (1, 32):
        n = plan[f"requests_c{clients}"]
        out[f"c{clients}"] = run_load(srv.url, target, images, concurrency=clients, requests=n,
                                      warmup=plan[f"warmup_c{clients}"], offset=rnd * n, server_pid=srv.pid,
                                      time_limit_s=plan["time_limit_s"])
    return out


def switch(srv: Server, name: str) -> dict[str, Any]:
    with srv.client() as c:
        r = c.post("/profiles", json={"name": name})
    r.raise_for_status()
    return r.json()


def store_listing(model_dir: Path) -> dict[str, Any]:
    """What ``GET /profiles`` will say, read from the store: the active bundle's profiles."""
    bid = json.loads((model_dir / "active.json").read_text())["bundle"]
    prof = json.loads((model_dir / "bundles" / bid / "profiles.json").read_text())
    return {"bundle": bid, "default_profile": prof["default"], "profiles": prof["profiles"]}


def bench_servers(model_dir: Path, images: ImageSet, plan: dict[str, int], work: Path, threads: int,
                  max_delay_ms: float, picked: list[str], target_name: str, with_litserve: bool,
                  profile_run: bool) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Interleaved rounds, so that other work on the machine hits every configuration alike: in each round
    LitServe is started, measured and stopped (its idle workers poll and would tax the others), then our
    server (kept running: idle, it costs nothing) is measured with exits off and at each profile, the
    order rotated from round to round. Per configuration the rounds are merged (median throughput,
    pooled latencies and answers)."""
    store = work / "store"
    shutil.copytree(model_dir, store / model_dir.name, ignore=shutil.ignore_patterns("*.tmp"))
    settings = {"torch_threads": threads, "max_batch_size": 32, "max_delay_ms": max_delay_ms}
    ours: dict[str, Any] = {"settings": settings, "configs": {}}
    lit_rounds: list[dict[str, Any]] = []
    cm_rounds: dict[str, list[dict[str, Any]]] = {}
    configs: list[tuple[str, str | None]] = [("exits off", None), *((n, n) for n in picked)]
    with classmeans_server(store, model_dir.name, work / "classmeans.log", **settings) as srv:
        with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
            ours["profiles"] = c.get("/profiles").json()
        configs += [(n, n) for n in pick_ic_profiles(ours["profiles"]) if n not in picked]
        for rnd in range(plan["rounds"]):
            if with_litserve:
                print(f"[bench] round {rnd + 1}: LitServe", flush=True)
                with litserve_server(model_dir, work / f"litserve-{rnd}.log", 32, max_delay_ms / 1000.0,
                                     threads) as lit:
                    lit_rounds.append(_loads(lit, LitServeTarget(), images, plan, rnd))
            k = rnd * len(configs) // max(1, plan["rounds"])
            for label, profile in configs[k:] + configs[:k]:
                print(f"[bench] round {rnd + 1}: ours, {label}", flush=True)
                if profile is not None:
                    switch(srv, profile)
                target = ClassmeansTarget(exits="off") if profile is None else ClassmeansTarget()
                cm_rounds.setdefault(label, []).append(_loads(srv, target, images, plan, rnd))
        if profile_run:
            switch(srv, target_name)
            ours["py_spy"] = {"profile": target_name, **run_profiled(srv, images, plan, work)}
    for label, profile in configs:
        rounds = cm_rounds[label]
        ours["configs"][label] = {"profile": profile, **{c: merge_rounds([r[c] for r in rounds])
                                                          for c in ("c1", "c32")}}
    lit_res = None
    if with_litserve:
        lit_res = {c: merge_rounds([r[c] for r in lit_rounds]) for c in ("c1", "c32")}
        lit_res["settings"] = {"max_batch_size": 32, "batch_timeout_s": max_delay_ms / 1000.0,
                               "workers_per_device": 1, "torch_threads": threads,
                               "request": "JSON {image: base64 PNG}"}
    return lit_res, ours


def pick_ic_profiles(listing: dict[str, Any], tolerance: float = 0.005) -> list[str]:
    """Per internal-classifier mode the server offers, its cheapest profile within ``tolerance`` of the
    full network's accuracy on the selection split (the IC counterpart of the target profile)."""
    rows = listing["profiles"]
    full = next((p["accuracy"] for p in rows if p["name"] == "full"), None)
    if full is None:
        return []
    out = []
    for mode in sorted({p.get("mode", "cm") for p in rows} - {"cm"}):
        ok = [p for p in rows if p.get("mode") == mode and p["accuracy"] >= full - tolerance]
        if ok:
            out.append(min(ok, key=lambda p: p["flops_fraction"])["name"])
    return out


def pick_profiles(listing: dict[str, Any], limit: int, target: str) -> list[str]:
    """Every profile but ``full`` (served as 'exits off' already), thinned evenly by FLOPs to ``limit``;
    the default profile and the ``target`` profile are always kept."""
    rows = sorted((p for p in listing["profiles"] if p["name"] != "full"), key=lambda p: p["flops_fraction"])
    names = [p["name"] for p in rows]
    if len(names) <= limit:
        return names
    keep = {listing["default_profile"], target}
    step = (len(names) - 1) / max(1, limit - len(keep) - 1)
    keep.update(names[round(i * step)] for i in range(limit - len(keep)))
    return [n for n in names if n in keep]


def run_profiled(srv: Server, images: ImageSet, plan: dict[str, int], work: Path) -> dict[str, Any]:
    """An extra, unmeasured 32-client load with py-spy attached; returns the summary."""
    raw = work / "py-spy.txt"
    duration = 8
    proc = profiling.start(srv.pid, raw, duration)
    if proc is None:
        return {"skipped": "py-spy not installed (pip install -e '.[bench]')"}
    time.sleep(0.5)
    run_load(srv.url, ClassmeansTarget(), images, concurrency=32, requests=plan["requests_c32"] * 4, warmup=0,
             time_limit_s=duration)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {"skipped": "py-spy did not finish"}
    if proc.returncode != 0 or not raw.is_file():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-300:]}"}
    return {"duration_s": duration, **profiling.summarise(raw)}


def read_results_json(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--images", type=int, default=2000, help="distinct test images loaded (PNG-encoded in memory)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    ap.add_argument("--requests-c1", type=int, default=100, help="per round")
    ap.add_argument("--requests-c32", type=int, default=500, help="per round")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of every server and the reference")
    ap.add_argument("--max-delay-ms", type=float, default=2.0, help="batching wait of both servers")
    ap.add_argument("--max-profiles", type=int, default=10)
    ap.add_argument("--no-litserve", action="store_true", help="skip LitServe (e.g. not installed)")
    ap.add_argument("--no-py-spy", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke run, not a result")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render benchmarks.md and the plots from the existing benchmarks.json (no measuring)")
    args = ap.parse_args(argv)
    if args.render_only:
        results = json.loads((args.out / "benchmarks.json").read_text())
        results["summary"] = summarise(results, read_results_json(args.out))
        render_plots(results, args.out / "img")
        (args.out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "benchmarks.md").write_text(render_markdown(results))
        return 0
    if args.quick:
        args.images, args.requests_c1, args.requests_c32, args.max_profiles, args.rounds = 300, 30, 120, 3, 2
    plan = {"rounds": args.rounds, "requests_c1": args.requests_c1, "requests_c32": args.requests_c32,
            "warmup_c1": max(10, args.requests_c1 // 10), "warmup_c32": max(64, args.requests_c32 // 10),
            "time_limit_s": 240}
    t0 = time.perf_counter()
    results_json = read_results_json(args.out)
    images = load_images(args.images)
    results: dict[str, Any] = {"model_dir": str(args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO)
                                                else args.model_dir),
                               "environment": environment(args.torch_threads), "plan": plan,
                               "images": {"count": len(images), "source": images.source,
                                          "png_bytes_mean": sum(map(len, images.pngs)) / len(images)}}
    listing = store_listing(args.model_dir)
    target_name, _ = target_profile(listing, results_json)
    picked = pick_profiles(listing, args.max_profiles, target_name)
    print(f"[bench] plain PyTorch and exit runner ({args.torch_threads} thread(s)); profiles {picked}", flush=True)
    results["plain"] = plain.measure(args.model_dir, images, min(300, len(images)), min(1024, len(images)),
                                     args.torch_threads, picked)
    torch.set_num_threads(1)  # the orchestrator itself only runs the load generator from here on
    with tempfile.TemporaryDirectory(prefix="classmeans-bench-") as tmp:
        lit, ours = bench_servers(args.model_dir, images, plan, Path(tmp), args.torch_threads, args.max_delay_ms,
                                  picked, target_name, not args.no_litserve, not args.no_py_spy)
    if lit is not None:
        results["litserve"] = lit
    results["classmeans"] = ours
    results["environment"]["loadavg_end"] = loadavg()
    results["results_json"] = results_json is not None
    results["summary"] = summarise(results, results_json)
    results["wall_seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "img").mkdir(exist_ok=True)
    render_plots(results, args.out / "img")
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "benchmarks.md").write_text(render_markdown(results))
    print(json.dumps(results["summary"]["targets"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
