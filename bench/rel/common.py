"""What every reliability scenario shares: results with named checks, the store under test, probes.

A scenario works on a private copy of a model store (never the repository's), starts its server with
:func:`bench.servers.classmeans_server` (through ``bench.fault_server`` when it injects faults), and
records every check it makes, passed or not, so the report can show them all.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.images import ImageSet, load_images
from bench.servers import Server, copy_model

FAULT_MODULE = "bench.fault_server"


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    """Checks and figures of one scenario; ``passed`` when every check passed."""

    name: str
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def check(self, name: str, passed: bool, detail: object = "") -> bool:
        self.checks.append(Check(name, bool(passed), str(detail)))
        return bool(passed)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        out = [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]
        return out + ([f"error: {self.error}"] if self.error else [])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.seconds, 2),
                "checks": [asdict(c) for c in self.checks], "figures": self.figures, "error": self.error}


class Timer:
    def __init__(self, result: ScenarioResult) -> None:
        self.result = result

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.result.seconds = time.perf_counter() - self.t0


def copy_store(model_dir: Path, work: Path) -> Path:
    """A private store root holding a copy of ``model_dir`` (temporary leftovers dropped)."""
    root = work / "store"
    copy_model(model_dir, root)
    return root


def store_digest(model_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``model_dir``: equal digests mean the store did not change. Job records and
    lock files (``jobs/``, ``locks/``) are bookkeeping shared by the processes, not serving state: left out."""
    return {str(p.relative_to(model_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(model_dir.rglob("*"))
            if p.is_file() and p.relative_to(model_dir).parts[0] not in ("jobs", "locks")}


def tmp_leftovers(model_dir: Path) -> list[str]:
    return [str(p.relative_to(model_dir)) for p in model_dir.rglob("*.tmp")]


def read_active(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "active.json").read_text())


def metric_value(text: str, name: str) -> float:
    """Sum of every sample of ``name`` in a Prometheus text exposition (0 when absent)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M):
        total += float(m.group(1))
    return total


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy; bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


_IMAGES: dict[int, ImageSet] = {}


def images(n: int = 64) -> ImageSet:
    """Real CIFAR-10 test images (synthetic where absent), cached per size."""
    if n not in _IMAGES:
        _IMAGES[n] = load_images(n, offset=5000)
    return _IMAGES[n]


Fingerprint = tuple[int, int, float, float]  # (class, exit, FLOPs, confidence) of one image


def fingerprint(srv: Server, n: int = 16, profile: str | None = None) -> list[Fingerprint]:
    """(class, exit, FLOPs, confidence) of ``n`` fixed images sent as one request (one batch): the same
    state answers the same fingerprint (at a single profile; see :func:`served_answers` for a mix)."""
    return [a for _, a in served_answers(srv, n, profile)]


def served_answers(srv: Server, n: int = 16, profile: str | None = None) -> list[tuple[str, Fingerprint]]:
    """The fingerprint of each of ``n`` fixed images with the profile that served it (the answer's own
    ``profile``: one vertex of a time-shared mix, or the ``profile`` override when given)."""
    imgs = images()
    files = [("file", (f"{i}.png", imgs.pngs[i], "image/png")) for i in range(n)]
    params: dict[str, Any] = {"top_k": 1}
    if profile is not None:
        params["profile"] = profile
    with srv.client() as c:
        r = c.post("/classify", files=files, params=params)
    r.raise_for_status()
    return [(str(p["profile"]), (p["class_index"], p["exit_index"], p["flops"], round(p["confidence"], 5)))
            for p in r.json()["predictions"]]


def same_answer(a: Fingerprint, b: Fingerprint, conf_tol: float = 1e-4) -> bool:
    """Class, exit and FLOPs equal, confidence within ``conf_tol`` (a batch of another make-up may round the
    last digits differently: a time-shared point runs each vertex on its share of the batch)."""
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and abs(a[3] - b[3]) <= conf_tol


@dataclass
class ServingPoints:
    """What may answer now and each candidate's reference answers (one request per profile, with the
    ``profile`` override, so every image is answered by that profile alone).

    ``allowed``: the profiles an answer may come from. A single point: that profile; a time-shared mix
    ``a~b@lam``: its two vertices; with the autopilot engaged: every profile of the served hull (the
    controller may move between the checks, so the checkable claim is only: the answer is exactly what
    the profile that the answer names gives for that image, and that profile is a hull point)."""

    allowed: set[str]
    references: dict[str, list[Fingerprint]]
    autopilot: bool = False

    def describe(self) -> str:
        kind = "autopilot, any hull point" if self.autopilot else "operating point"
        return f"{kind}: {sorted(self.allowed)[:6]}{' ...' if len(self.allowed) > 6 else ''}"


def answer_problems(got: list[tuple[str, Fingerprint]], points: ServingPoints) -> list[str]:
    """Why ``got`` is not what ``points`` allows (empty: it is). Each answer must equal the reference
    answer, for that image, of one of the allowed profiles; when the answer names its profile, that
    profile must be allowed and the answer must equal that profile's reference (not just any vertex's)."""
    problems = []
    for i, (named, ans) in enumerate(got):
        matches = [p for p in sorted(points.allowed)
                   if p in points.references and i < len(points.references[p])
                   and same_answer(ans, points.references[p][i])]
        if not matches:
            problems.append(f"image {i}: {ans} (named {named!r}) equals no allowed profile's answer")
        elif named and named not in points.allowed:
            problems.append(f"image {i}: named {named!r}, not one of the allowed profiles")
        elif named and named not in matches:
            problems.append(f"image {i}: named {named!r} but equals {matches}'s answer")
    return problems


def serving_points(srv: Server, n: int = 16) -> ServingPoints:
    """The profiles that may answer now (from ``GET /profiles``) and the reference answers of each, asked
    now (so that a check after a fault compares with what this state answered before it)."""
    with srv.client() as c:
        body = c.get("/profiles").json()
    auto = body.get("autopilot") or {}
    if auto.get("enabled"):
        mode = auto.get("mode") or "cm"
        allowed = {str(p["name"]) for p in body.get("profiles", []) if p.get("mode", "cm") == mode}
    else:
        active = body["active"]
        allowed = {str(active["a"])} | ({str(active["b"])} if active.get("b") else set())
    points = ServingPoints(allowed, {}, bool(auto.get("enabled")))
    for name in sorted(allowed):
        points.references[name] = fingerprint(srv, n, profile=name)
    return points


def answers_match(srv: Server, points: ServingPoints, got: list[tuple[str, Fingerprint]] | None = None,
                  n: int = 16) -> list[str]:
    """Ask for the fingerprint now (unless ``got``) and check it against ``points`` (whose references were
    asked when ``points`` was made)."""
    return answer_problems(served_answers(srv, n) if got is None else got, points)


def serving_state(srv: Server) -> dict[str, Any]:
    """Bundle, version and the operating point; with the autopilot engaged, its configuration (target,
    floor, mode) instead of the point, which is the controller's to move (its moves bump no version)."""
    with srv.client() as c:
        body = c.get("/profiles").json()
    auto = body.get("autopilot") or {}
    if auto.get("enabled"):
        config = {k: auto.get(k) for k in ("latency_slo_ms", "target_ms", "min_accuracy", "mode") if k in auto}
        return {"bundle": body["bundle"], "version": body["version"], "autopilot": config}
    return {"bundle": body["bundle"], "version": body["version"], "active": body["active"]["name"]}


def dataset_zip(classes: list[str], per_class: int) -> bytes:
    """An ImageFolder zip (``class/i.png``) of real labelled images, ``per_class`` per class."""
    imgs = load_images(max(200, per_class * len(classes) * 12), offset=1000)
    counts: dict[int, int] = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for png, label in zip(imgs.pngs, imgs.labels, strict=True):
            k = int(label)
            if k >= len(classes) or counts.get(k, 0) >= per_class:
                continue
            zf.writestr(f"{classes[k]}/{counts.get(k, 0):03d}.png", png)
            counts[k] = counts.get(k, 0) + 1
    return buf.getvalue()


def upload(srv: Server, archive: bytes, **params: Any) -> httpx.Response:
    q = {"samples": 200, "holdout": 0.2, "search": "quantile", **params}
    with srv.client(timeout=120) as c:
        return c.post("/admin/class-means", content=archive, params=q, headers={"Content-Type": "application/zip"})


def wait_job(srv: Server, job_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
    with srv.client() as c:
        def done() -> dict[str, Any] | None:
            job = c.get(f"/admin/jobs/{job_id}").json()
            return job if job["state"] in ("succeeded", "failed") else None

        return wait_for(done, timeout_s, f"job {job_id}", interval_s=0.1)


def model_classes(model_dir: Path) -> list[str]:
    return list(json.loads((model_dir / "model.json").read_text())["classes"])
