"""End to end against a real ``classmeans serve`` (uvicorn, one worker) on 127.0.0.1: classify real images,
switch profile, upload a dataset archive, watch the job, see the new bundle serve and the metrics move;
resident memory; graceful SIGTERM with a request in flight."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import AUTH, MODEL, TOKEN, dataset_members, make_zip, sample_pngs

START_TIMEOUT_S = 180.0
GiB = 1 << 30


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    store: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, trust_env=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_argv(store: Path, port: int, model: str = MODEL) -> list[str]:
    script = Path(sys.executable).parent / "classmeans"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "service.cli.main"]
    return [*head, "serve", "--store", str(store), "--model", model, "--host", "127.0.0.1", "--port", str(port)]


def start(store: Path, log: Path, workers: int = 1, env_extra: dict[str, str] | None = None,
          model: str = MODEL) -> Server:
    """``classmeans serve`` on a free port of 127.0.0.1 with ``workers`` processes (several: metrics in a
    fresh PROMETHEUS_MULTIPROC_DIR that serve makes), ready when this returns."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMEANS_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"CLASSMEANS_ADMIN_TOKEN": TOKEN, "CLASSMEANS_TORCH_THREADS": "1", "CLASSMEANS_GRACEFUL_TIMEOUT_S": "20",
                "CLASSMEANS_WORKERS": str(workers),
                "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **(env_extra or {})})
    fh = open(log, "wb")  # noqa: SIM115 - owned by the process for its lifetime
    proc = subprocess.Popen(serve_argv(store, port, model), stdout=fh, stderr=subprocess.STDOUT, env=env,
                            cwd=store.parent)
    fh.close()
    server = Server(proc, f"http://127.0.0.1:{port}", log, store)
    deadline = time.monotonic() + START_TIMEOUT_S
    with server.client() as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{server.log_text()[-3000:]}")
            try:
                if c.get("/readyz").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    stop(server)
    raise AssertionError(f"server not ready in {START_TIMEOUT_S} s:\n{server.log_text()[-3000:]}")


def stop(server: Server) -> int | None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(40)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)
    return server.proc.returncode


def serve_copy(tiny_store_root: Path, tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Server]:
    """A server over a private copy of the tiny store, stopped when the generator closes (module fixtures)."""
    work = tmp_path_factory.mktemp(name)
    store = work / "store"
    shutil.copytree(tiny_store_root, store)
    srv = start(store, work / "serve.log")
    try:
        yield srv
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def server(tiny_store_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve_copy(tiny_store_root, tmp_path_factory, "e2e")


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def test_resident_memory_under_load_stays_below_1_gib(server: Server):
    pngs = sample_pngs(32)

    def client_loop(n: int) -> None:
        with server.client() as c:
            for i in range(n):
                r = c.post("/classify", files=[("file", (f"{i}.png", pngs[i % 32], "image/png"))])
                assert r.status_code in (200, 503)

    threads = [threading.Thread(target=client_loop, args=(10,)) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    rss, peak = rss_bytes(server.proc.pid)
    print(f"\nserve RSS under load {rss / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB")
    assert peak < GiB  # the serving process with the model loaded, after 160 requests from 16 clients


def test_classify_switch_upload_and_metrics(server: Server):
    pngs = sample_pngs(8)
    with server.client() as c:
        assert c.get("/livez").json() == {"live": True}
        before = c.get("/metrics").text
        r = c.post("/classify", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)])
        assert r.status_code == 200, r.text
        first = r.json()
        assert len(first["predictions"]) == 8 and first["bundle"] and first["profile"]

        r = c.post("/profiles", json={"name": "full"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert c.post("/classify", content=pngs[0], headers={"content-type": "image/png"}).json()["profile"] == "full"
        assert c.post("/profiles", json={"name": "full"}).status_code == 401

        r = c.post("/admin/class-means", content=make_zip(dataset_members(20)), params={"samples": 200},
                   headers={**AUTH, "content-type": "application/zip"})
        assert r.status_code == 202, r.text
        job_url = r.headers["Location"]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            job = c.get(job_url, headers=AUTH).json()
            if job["state"] in ("succeeded", "failed"):
                break
            time.sleep(0.25)
        assert job["state"] == "succeeded", job
        new_id = job["result"]["bundle"]
        assert new_id != first["bundle"]
        after_upload = c.post("/classify", files=[("file", ("a.png", pngs[1], "image/png"))]).json()
        assert after_upload["bundle"] == new_id and after_upload["version"] > first["version"]
        bundles = c.get("/admin/bundles", headers=AUTH).json()["bundles"]
        assert [b["id"] for b in bundles if b["active"]] == [new_id]

        image = {"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(pngs[2]).decode()]}
        r = c.post(f"/v2/models/{MODEL}/infer", json={"inputs": [image]})
        assert r.status_code == 200 and r.json()["model_version"] == new_id

        after = c.get("/metrics").text
    assert metric(after, "classmeans_samples_total") - metric(before, "classmeans_samples_total") == 11
    assert metric(after, "classmeans_bundle_activations_total") == 1
    assert metric(after, "classmeans_admin_jobs_total", kind="class_means", outcome="succeeded") == 1
    assert metric(after, "classmeans_active_info", bundle=new_id) == 1
    assert metric(after, "classmeans_profile_switches_total") == 1
    assert metric(after, "classmeans_flops_spent_total") > metric(before, "classmeans_flops_spent_total")
    assert (metric(after, "classmeans_requests_total", endpoint="/classify", status="200")
            - metric(before, "classmeans_requests_total", endpoint="/classify", status="200")) == 3


def test_sigterm_finishes_in_flight_requests_then_exits_0(server: Server):
    """Runs last: stops the module's server. A request in flight when SIGTERM arrives still gets its 200;
    readiness flips at once (logged); the process exits 0 after the drain."""
    body = sample_pngs(1)[0]
    result: dict[str, object] = {}

    def slow_body() -> Iterator[bytes]:
        yield body[:10]
        time.sleep(1.5)  # the server has the request in flight while it gets SIGTERM
        yield body[10:]

    def in_flight() -> None:
        with server.client() as c:
            r = c.post("/classify", content=slow_body(), headers={"content-type": "image/png"})
            result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=in_flight)
    t.start()
    with server.client() as c:
        deadline = time.monotonic() + 30
        while metric(c.get("/metrics").text, "classmeans_inflight_requests") < 1:
            assert time.monotonic() < deadline, "the slow request never arrived"
            time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result.get("status") == 200, result
    assert server.proc.wait(40) == 0
    log = server.log_text()
    assert "not ready any more" in log and "Traceback" not in log
