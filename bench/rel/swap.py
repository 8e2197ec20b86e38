"""Profile switches and bundle activations under load (research 2g S3, 2f A16).

32 clients classify without pause while an admin client performs ``switches`` operating-point changes
(by name, and every 5th by a FLOPs target between two profiles, i.e. a time-shared mix) and
``activations`` bundle activations, spread evenly. Every admin answer publishes a state version; every
classify answer must name a version that was published, with exactly that version's bundle and operating
point, and each of its samples must be *consistent with exactly that state*: the sample's profile is the
operating point (or one of the mix's two vertices), its exit is enabled in that profile, and its FLOPs are
exactly what that bundle's cost table gives for that exit under that profile's thresholds. A mixed state
(thresholds of one profile, label of another; or one bundle's costs reported under another) fails it.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.rel.common import ScenarioResult, Timer, copy_store, images
from bench.servers import Server, classmeans_server


@dataclass(frozen=True)
class BundleTable:
    """What the checker needs of one bundle: cumulative backbone FLOPs, head FLOPs, thresholds; and for
    the internal-classifier profiles served with it, the FLOPs of leaving at each exit they can use."""

    backbone_cum: list[float]
    head_cost: list[float]
    thresholds: dict[str, list[float]]
    ic_flops: dict[str, dict[int, float]] = field(default_factory=dict)

    def expected_flops(self, profile: str, exit_index: int) -> float | None:
        """FLOPs of a sample leaving at ``exit_index`` under ``profile`` (None: it cannot leave there)."""
        t = self.thresholds.get(profile)
        if t is None:
            return self.ic_flops.get(profile, {}).get(exit_index)
        m = len(self.backbone_cum)
        if exit_index < m - 1 and t[exit_index] >= 1.0:
            return None
        consulted = 0.0
        for j in range(min(exit_index, m - 2) + 1):
            if t[j] < 1.0:
                consulted += self.head_cost[j]
        return self.backbone_cum[exit_index] + consulted


def load_tables(model_dir: Path) -> dict[str, BundleTable]:
    out = {}
    for d in sorted((model_dir / "bundles").iterdir()):
        if d.name.startswith(".") or not (d / "bundle.json").is_file():
            continue
        meta = json.loads((d / "bundle.json").read_text())
        profiles = json.loads((d / "profiles.json").read_text())
        exits = meta["exits"]
        t = {p["name"]: [float(v) for v in p["thresholds"]] for p in profiles["profiles"]}
        t.setdefault("full", [1.0] * (len(exits) - 1))
        out[d.name] = BundleTable([float(e["backbone_flops_cum"]) for e in exits],
                                  [float(e["head_flops"]) for e in exits[:-1]], t)
    for bid, per_profile in ic_flops_tables(model_dir, sorted(out)).items():
        out[bid].ic_flops.update(per_profile)
    return out


def ic_flops_tables(model_dir: Path, bundle_ids: list[str]) -> dict[str, dict[str, dict[int, float]]]:
    """Per bundle, the IC profiles the service would serve with it and their FLOPs at each exit (the
    offline cascade cost model of ``service/serving/ic_serving.py``); empty without ICs."""
    if not (model_dir / "ics").is_dir():
        return {}
    from service.serving.ic_serving import load_ic_store
    from service.store.active import resolve_bundle
    from service.store.model_dir import load_model

    spec, net = load_model(model_dir)
    store = load_ic_store(model_dir, spec, net)
    out: dict[str, dict[str, dict[int, float]]] = {}
    for bid in bundle_ids:
        serving = store.serving_for(net, resolve_bundle(model_dir, spec, net.num_exits, bid))
        if serving is None:
            continue
        out[bid] = {name: {j: f for j in range(net.num_exits)
                           if (f := serving.expected_flops(name, j)) is not None} for name in serving.profiles}
    return out


def ensure_bundles(model_dir: Path, n: int = 2) -> list[str]:
    """At least ``n`` bundles in the (private) store: copies of the first one under new ids if needed."""
    root = model_dir / "bundles"
    ids = sorted(d.name for d in root.iterdir() if not d.name.startswith("."))
    k = 0
    while len(ids) < n:
        new = f"{ids[0][:60]}-copy{k}"
        k += 1
        shutil.copytree(root / ids[0], root / new)
        meta = json.loads((root / new / "bundle.json").read_text())
        meta["id"] = new
        (root / new / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n")
        ids.append(new)
    return ids


@dataclass
class _State:
    bundle: str
    name: str
    a: str
    b: str | None


def _record(states: dict[int, _State], body: dict[str, Any]) -> None:
    act = body["active"]
    states[int(body["version"])] = _State(body["bundle"], act["name"], act["a"], act.get("b"))


class _Checker:
    def __init__(self, tables: dict[str, BundleTable]) -> None:
        self.tables = tables
        self.problems: list[str] = []
        self.responses = 0
        self.samples = 0
        self.per_state: dict[str, int] = {}

    def check(self, states: dict[int, _State], body: dict[str, Any], headers: httpx.Headers) -> None:
        self.responses += 1
        v = int(body["version"])
        st = states.get(v)
        key = f"{body['bundle']}|{body['profile']}|{v}"
        self.per_state[key] = self.per_state.get(key, 0) + 1
        if st is None:
            self.problems.append(f"version {v} was never published ({key})")
            return
        if (body["bundle"], body["profile"]) != (st.bundle, st.name):
            self.problems.append(f"version {v} is {st.bundle}|{st.name}, the answer says {key}")
        if (headers.get("x-classmeans-bundle"), headers.get("x-classmeans-profile"),
                headers.get("x-classmeans-version")) != (body["bundle"], body["profile"], str(v)):
            self.problems.append(f"headers disagree with the body ({key})")
        table = self.tables.get(body["bundle"])
        allowed = {st.a} | ({st.b} if st.b else set())
        for p in body["predictions"]:
            self.samples += 1
            if p["profile"] not in allowed:
                self.problems.append(f"sample served by {p['profile']} under state {st.name}")
                continue
            want = table.expected_flops(p["profile"], int(p["exit_index"])) if table else None
            if want is None or not math.isclose(want, float(p["flops"]), rel_tol=1e-9):
                self.problems.append(f"{key}: exit {p['exit_index']} with {p['flops']} FLOPs is impossible under "
                                     f"{body['bundle']}/{p['profile']} (expected {want})")


async def _run(srv: Server, tables: dict[str, BundleTable], switches: int, activations: int, clients: int,
               max_requests: int, time_limit_s: float) -> dict[str, Any]:
    states: dict[int, _State] = {}
    checker = _Checker(tables)
    errors: list[str] = []
    admin_done = asyncio.Event()
    answers: list[tuple[dict[str, Any], httpx.Headers]] = []
    counts = {"classify": 0, "switch": 0, "target_switch": 0, "activation": 0, "admin_errors": 0}
    imgs = images()
    auth = {"Authorization": f"Bearer {srv.token}"}
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    stop_at = time.monotonic() + time_limit_s
    async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits, trust_env=False) as c:
        _record(states, {**(await c.get("/profiles")).json()})

        async def client(k: int) -> None:
            i = k
            while not admin_done.is_set() and counts["classify"] < max_requests and time.monotonic() < stop_at:
                counts["classify"] += 1
                r = await c.post("/classify", content=imgs.pngs[i % len(imgs)], params={"top_k": 1},
                                 headers={"Content-Type": "image/png"})
                i += clients
                if r.status_code != 200:
                    errors.append(f"classify {r.status_code}: {r.text[:200]}")
                    continue
                answers.append((r.json(), r.headers))  # checked at the end: all versions known by then

        async def admin() -> None:
            try:
                bundle_ids = sorted(tables)
                every = max(1, switches // max(1, activations))
                listing = (await c.get("/profiles")).json()
                for i in range(switches):
                    if time.monotonic() > stop_at:
                        break
                    if activations and i % every == 0 and counts["activation"] < activations:
                        nxt = bundle_ids[(bundle_ids.index(listing["bundle"]) + 1) % len(bundle_ids)]
                        r = await c.post(f"/admin/bundles/{nxt}/activate", headers=auth)
                        if r.status_code != 200:
                            counts["admin_errors"] += 1
                            errors.append(f"activate {r.status_code}: {r.text[:200]}")
                        else:
                            _record(states, r.json())
                            counts["activation"] += 1
                            listing = (await c.get("/profiles")).json()
                    profiles = sorted(listing["profiles"], key=lambda p: p["flops_fraction"])
                    if i % 5 == 4 and len(profiles) >= 2:
                        lo, hi = profiles[(i // 5) % (len(profiles) - 1)], profiles[(i // 5) % (len(profiles) - 1) + 1]
                        body: dict[str, Any] = {"max_flops_fraction": (lo["flops_fraction"] + hi["flops_fraction"]) / 2}
                        counts["target_switch"] += 1
                    else:
                        body = {"name": profiles[i % len(profiles)]["name"]}
                    r = await c.post("/profiles", json=body, headers=auth)
                    if r.status_code != 200:
                        counts["admin_errors"] += 1
                        errors.append(f"switch {body} {r.status_code}: {r.text[:200]}")
                        continue
                    _record(states, r.json())
                    counts["switch"] += 1
            finally:
                admin_done.set()

        t0 = time.perf_counter()
        await asyncio.gather(admin(), *(client(k) for k in range(clients)))
        wall = time.perf_counter() - t0
    for body, headers in answers:
        checker.check(states, body, headers)
    return {"counts": counts, "errors": errors, "checker": checker, "wall": wall, "versions": len(states)}


def run(model_dir: Path, work: Path, switches: int = 1000, activations: int = 20, clients: int = 32,
        max_requests: int = 200_000, time_limit_s: float = 600.0) -> ScenarioResult:
    res = ScenarioResult(f"{switches} profile switches + {activations} bundle activations under {clients} clients")
    with Timer(res):
        store = copy_store(model_dir, work)
        mdir = store / model_dir.name
        ids = ensure_bundles(mdir, 2)
        tables = load_tables(mdir)
        with classmeans_server(store, model_dir.name, work / "swap.log", torch_threads=1) as srv:
            out = asyncio.run(_run(srv, tables, switches, activations, clients, max_requests, time_limit_s))
    ck: _Checker = out["checker"]
    counts = out["counts"]
    res.figures.update({"bundles": len(ids), "clients": clients, "classify_requests": counts["classify"],
                        "responses_checked": ck.responses, "samples_checked": ck.samples,
                        "profile_switches": counts["switch"], "of_which_time_shared_targets": counts["target_switch"],
                        "bundle_activations": counts["activation"], "versions_published": out["versions"],
                        "distinct_states_answered": len(ck.per_state), "inconsistent_findings": len(ck.problems),
                        "wall_seconds": round(out["wall"], 1),
                        "classify_per_second": round(ck.responses / out["wall"], 1) if out["wall"] else None})
    res.check(f"{switches} switches done", counts["switch"] == switches, counts["switch"])
    res.check(f"{activations} bundle activations done", counts["activation"] == activations, counts["activation"])
    res.check("zero errors (classify and admin)", not out["errors"], out["errors"][:3])
    res.check("every classify request answered", ck.responses == counts["classify"] - len(out["errors"]),
              f"{ck.responses} of {counts['classify']}")
    res.check("every response consistent with exactly one published (bundle, profile) state", not ck.problems,
              ck.problems[:3])
    return res
