"""Replicas end to end, against real ``classmeans serve`` processes on 127.0.0.1 over copies of the tiny store:

* ``--workers 2``: a worker killed with SIGKILL is replaced by uvicorn, and no request on the other worker
  fails; one scrape of ``/metrics`` reports both workers (the dead one's counters included);
* two separate servers on one store converge after a switch on either, and after both switch at once (one
  consistent state, versions per server never go back);
* a read-only store serves; switches and jobs answer 409 ``store_read_only``.

Every wait is a bounded poll with a generous cap and a failure message; nothing asserts on speed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.servers import PYTHON, Server, classmeans_env, free_port, spawn
from tests.api.conftest import sample_pngs

MODEL = "tiny"
CAP_S = 120.0
TOKEN = "replica-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_for(cond: Callable[[], bool], what: str, cap_s: float = CAP_S) -> None:
    deadline = time.monotonic() + cap_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {cap_s:g} s waiting for: {what}")
        time.sleep(0.1)


@contextmanager
def serve(store: Path, log: Path, workers: int, wrap: list[str] | None = None) -> Iterator[Server]:
    port = free_port()
    env = classmeans_env(store, MODEL, port, TOKEN, workers=workers, torch_threads=1, warmup="false",
                         log_level="info", graceful_timeout_s=10)
    srv = spawn(f"serve --workers {workers}", [*(wrap or []), PYTHON, "-m", "service.cli.main", "serve"], log, env,
                port, TOKEN)
    try:
        srv.wait_ready("/v2/health/ready", 240.0)
        yield srv
    finally:
        srv.stop(30.0)


def fresh_get(srv: Server, path: str) -> httpx.Response:
    """One request on a new connection (so the kernel may hand it to any worker)."""
    with httpx.Client(base_url=srv.url, timeout=30, trust_env=False) as c:
        return c.get(path)


def state_of(srv: Server) -> tuple[int, dict]:
    body = fresh_get(srv, "/profiles").json()
    return int(body["version"]), body["active"]


@pytest.fixture()
def store(tiny_store_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(tiny_store_root, dst)
    return dst


# -- a worker killed with SIGKILL -------------------------------------------------------------------------------


class Client(threading.Thread):
    """One keep-alive connection posting images until told to stop; failures are attributed to the worker that
    answered this connection last (a fresh connection after an error has no worker yet: ``None``)."""

    def __init__(self, srv: Server, png: bytes, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.srv, self.png, self.stop_event = srv, png, stop
        self.worker: str | None = None
        self.ok: dict[str, int] = {}
        self.failed: dict[str | None, int] = {}
        self.reconnect = threading.Event()  # open a new connection (the kernel may hand it to another worker)

    def run(self) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        client = httpx.Client(base_url=self.srv.url, timeout=30, trust_env=False, limits=limits)
        for _ in range(100_000):
            if self.stop_event.is_set():
                break
            if self.reconnect.is_set():
                self.reconnect.clear()
                client.close()
                client = httpx.Client(base_url=self.srv.url, timeout=30, trust_env=False, limits=limits)
                self.worker = None
            try:
                r = client.post("/classify", content=self.png, headers={"content-type": "image/png"})
                r.raise_for_status()
            except httpx.HTTPError:
                self.failed[self.worker] = self.failed.get(self.worker, 0) + 1
                self.worker = None
                client.close()
                client = httpx.Client(base_url=self.srv.url, timeout=30, trust_env=False, limits=limits)
                continue
            self.worker = r.headers["x-classmeans-worker"]
            self.ok[self.worker] = self.ok.get(self.worker, 0) + 1
        client.close()


def _spread(clients: list[Client], workers: set[str]) -> bool:
    """Whether the clients' connections cover every worker; if not, one client on a shared worker reconnects (a
    worker busy when the connections were opened, e.g. building engine sessions, may have got none)."""
    on = [c.worker for c in clients]
    if all(on) and set(on) == workers:
        return True
    crowded = [c for c in clients if c.worker is not None and on.count(c.worker) > 1]
    if crowded and not any(c.reconnect.is_set() for c in clients):
        crowded[0].reconnect.set()
    time.sleep(0.2)
    return False


def classify_total(text: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "classmeans_requests_total" and s.labels.get("endpoint") == "/classify"
               and s.labels.get("status") == "200")


def test_sigkilled_worker_is_replaced_and_the_other_worker_loses_nothing(store: Path, tmp_path: Path):
    png = sample_pngs(1)[0]
    with serve(store, tmp_path / "serve.log", workers=2) as srv:
        seen: set[str] = set()
        wait_for(lambda: seen.add(fresh_get(srv, "/profiles").headers["x-classmeans-worker"]) or len(seen) == 2,
                 f"two workers answering (seen {seen})")
        stop = threading.Event()
        clients = [Client(srv, png, stop) for _ in range(4)]
        for c in clients:
            c.start()
        try:
            wait_for(lambda: _spread(clients, seen), "clients connected to both workers")
            victim = clients[0].worker
            assert victim is not None
            at_kill = [c.worker for c in clients]
            os.kill(int(victim), signal.SIGKILL)
            replaced: set[str] = set()
            wait_for(lambda: replaced.add(fresh_get(srv, "/profiles").headers["x-classmeans-worker"]) or
                     bool(replaced - seen), f"a replacement worker answering (old {seen}, seen {replaced})\n"
                     f"{srv.log_tail()}")
            survivor = (seen - {victim}).pop()
            after = {c.name: dict(c.ok) for c in clients}
            wait_for(lambda: all(sum(c.ok.values()) > sum(after[c.name].values()) for c in clients),
                     "every client served again after the kill")
        finally:
            stop.set()
            for c in clients:
                c.join(60)
        failures = {w: n for c in clients for w, n in c.failed.items()}
        assert set(failures) <= {victim}, f"requests failed outside the killed worker {victim}: {failures}"
        on_survivor = [c for c, w in zip(clients, at_kill, strict=True) if w == survivor]
        assert on_survivor, "some client was on the surviving worker when the other was killed"
        assert all(not c.failed for c in on_survivor), [c.failed for c in on_survivor]
        ok_elsewhere = sum(n for c in clients for w, n in c.ok.items() if w != victim)
        text = fresh_get(srv, "/metrics").text
        assert classify_total(text) >= ok_elsewhere, "one scrape counts every worker's requests"
        assert f"Child process [{victim}] died" in srv.log.read_text(errors="replace")
        if shutil.which("promtool"):
            check = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True,
                                   timeout=60)
            assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    log = srv.log.read_text(errors="replace")  # stopped with SIGTERM: every worker flips readiness, then drains
    drained = {line.split()[3] for line in log.splitlines() if "not ready any more, draining" in line}
    assert len(drained) >= 2, log[-3000:]


# -- two separate servers on one store ----------------------------------------------------------------------------


def switch(srv: Server, name: str) -> httpx.Response:
    with httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c:
        return c.post("/profiles", json={"name": name}, headers=AUTH)


def test_two_servers_on_one_store_converge_after_switches_on_either_and_both(store: Path, tmp_path: Path):
    with serve(store, tmp_path / "a.log", workers=1) as a, serve(store, tmp_path / "b.log", workers=1) as b:
        names = [p["name"] for p in fresh_get(a, "/profiles").json()["profiles"]]
        assert len(names) >= 2
        history: dict[str, list[int]] = {"a": [], "b": []}
        stop = threading.Event()

        def watch() -> None:
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                for key, srv in (("a", a), ("b", b)):
                    history[key].append(state_of(srv)[0])
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            for i, (here, there) in enumerate(((a, b), (b, a), (a, b))):
                r = switch(here, names[i % len(names)])
                assert r.status_code == 200, r.text
                v = r.json()["version"]
                wait_for(lambda there=there, v=v: state_of(there)[0] >= v, f"the other server reaching version {v}")
            errors: list[str] = []

            def admin(srv: Server, k: int) -> None:
                for i in range(8):
                    r = switch(srv, names[(i + k) % len(names)])
                    if r.status_code != 200:
                        errors.append(r.text)

            admins = [threading.Thread(target=admin, args=(s, k)) for k, s in enumerate((a, b))]
            for t in admins:
                t.start()
            for t in admins:
                t.join(300)
            assert not errors, errors
            stored = __import__("json").loads((store / MODEL / "active.json").read_text())
            wait_for(lambda: state_of(a)[0] == state_of(b)[0] == stored["version"],
                     f"both servers at the stored version {stored['version']}")
            assert state_of(a)[1] == state_of(b)[1]
        finally:
            stop.set()
            watcher.join(60)
        for key, seq in history.items():
            assert seq and all(x <= y for x, y in itertools.pairwise(seq)), f"server {key} went back"


# -- a read-only store --------------------------------------------------------------------------------------------


def read_only_wrap(path: Path) -> list[str] | None:
    """argv prefix that serves with ``path`` mounted read-only (root: a private mount namespace), or None."""
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None:
        return None
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift 0 && exec "$@"'
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(path), "true"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        return None
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(path)]


def test_read_only_store_serves_and_switches_answer_store_read_only(store: Path, tmp_path: Path):
    wrap = read_only_wrap(store)
    if wrap is None:
        pytest.skip("cannot make a read-only store here (root without a private mount namespace)")
    if not wrap:
        for p in [store, *store.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        with serve(store, tmp_path / "ro.log", workers=1, wrap=wrap) as srv, \
                httpx.Client(base_url=srv.url, timeout=60, trust_env=False) as c:
            r = c.post("/classify", content=sample_pngs(1)[0], headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            bid = r.headers["x-classmeans-bundle"]
            for resp in (c.post("/profiles", json={"name": "full"}, headers=AUTH),
                         c.post(f"/admin/bundles/{bid}/activate", headers=AUTH),
                         c.post("/admin/class-means", content=b"x", headers={**AUTH,
                                                                             "content-type": "application/zip"})):
                assert resp.status_code in (409, 503), resp.text
                assert resp.json()["error"]["code"] == "store_read_only", resp.text
            assert c.get("/v2/health/ready").status_code == 200
            assert c.post("/classify", content=sample_pngs(1)[0],
                          headers={"content-type": "image/png"}).status_code == 200
    finally:
        if not wrap:
            for p in [store, *store.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
