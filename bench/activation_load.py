"""Bundle activations under 32-client load: does a swap stall traffic? (issue 23's activation goal)

    python -m bench.activation_load [--model-dir model_store/cifar10-resnet56] [--seconds 20] [--activations 5]

``classmeans serve`` out of the box (compiled engine, its default workers and threads) on a private copy of the
store; wrk (C) with 32 connections rotating CIFAR-10 test PNGs. Two measured windows of the same length on the
same server: a steady one, then one during which the store's bundles are activated in turn every
``seconds / (activations + 1)`` seconds (each activation builds the new catalog's serving sessions in the admin
thread and the rest on the background builder). Reports both windows' p50/p99/throughput, the ratio of p99s
(goal <= 2), every activation's own time, and RSS per process. Writes ``docs/activation_load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from bench import procstat, wrk
from bench.images import load_images
from bench.rel.common import copy_store
from bench.servers import REPO, classmeans_oob_server

DEFAULT_MODEL = REPO / "model_store" / "cifar10-resnet56"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--activations", type=int, default=5)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "activation_load.json")
    args = ap.parse_args()
    if wrk.available() is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory(prefix="activation-load-") as tmp:
        work = Path(tmp)
        store = copy_store(args.model_dir, work)
        bodies, sizes = wrk.write_payload(load_images(2000).pngs, work / "payload")
        script = work / "classify.lua"
        script.write_text(wrk.lua_script(bodies, sizes, "/classify?top_k=1"))
        plan = wrk.WrkPlan(args.clients, 1, args.seconds)
        doc = {"model": args.model_dir.name, "clients": args.clients, "seconds": args.seconds,
               "loadavg_before": list(os.getloadavg())}
        with classmeans_oob_server(store, args.model_dir.name, work / "serve.log") as srv:
            with srv.client(timeout=120) as c:
                bundles = [b["id"] for b in c.get("/admin/bundles").json()["bundles"] if b.get("readable", True)]
                active = c.get("/profiles").json()["bundle"]
            time.sleep(30)  # the first background session builds after start are not a steady state
            wrk.run(srv.url, script, wrk.WrkPlan(args.clients, 1, 5))  # warm-up, excluded
            doc["steady"] = wrk.run(srv.url, script, plan)
            order = [b for b in bundles if b != active] + [active]
            swaps: list[dict] = []

            def activate() -> None:
                gap = args.seconds / (args.activations + 1)
                with srv.client(timeout=120) as c:
                    for i in range(args.activations):
                        time.sleep(gap)
                        bid = order[i % len(order)]
                        t0 = time.perf_counter()
                        r = c.post(f"/admin/bundles/{bid}/activate")
                        swaps.append({"bundle": bid, "status": r.status_code,
                                      "seconds": round(time.perf_counter() - t0, 3)})

            t = threading.Thread(target=activate)
            t.start()
            doc["during_activations"] = wrk.run(srv.url, script, plan)
            t.join()
            doc["activations"] = swaps
            doc["processes"] = procstat.per_process(srv.popen.pid)
        steady, during = doc["steady"]["latency_seconds"], doc["during_activations"]["latency_seconds"]
        doc["p99_ratio"] = during["p99"] / steady["p99"]
        doc["goal"] = "p99 during activations <= 2x steady p99"
        doc["met"] = doc["p99_ratio"] <= 2.0
        doc["loadavg_after"] = list(os.getloadavg())
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({"steady_p50_ms": steady["p50"] * 1e3, "steady_p99_ms": steady["p99"] * 1e3,
                      "steady_rps": doc["steady"]["ok_rps"], "during_p50_ms": during["p50"] * 1e3,
                      "during_p99_ms": during["p99"] * 1e3, "during_rps": doc["during_activations"]["ok_rps"],
                      "p99_ratio": doc["p99_ratio"], "met": doc["met"], "activations": doc["activations"],
                      "non2xx": [doc["steady"]["non2xx"], doc["during_activations"]["non2xx"]]}, indent=2))


if __name__ == "__main__":
    main()
