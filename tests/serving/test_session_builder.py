"""The background session builder stops cleanly: a build under way finishes, queued keys are dropped, and no
daemon thread is left inside the exporter when the interpreter exits (it would abort the process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

from service.serving.compiled.segments import SegmentKey
from service.serving.compiled.sessions import BackgroundBuilder, SessionCache, stop_builders
from tests.factories import REPO


def _keys(n: int) -> list[SegmentKey]:
    return [SegmentKey("main", i, i, ("cm",)) for i in range(n)]


class _SlowBuild:
    """A build function that blocks until released, recording which keys it built."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.built: list[SegmentKey] = []

    def __call__(self, key: SegmentKey) -> object:
        self.started.set()
        assert self.release.wait(30)
        self.built.append(key)
        return object()


def test_stop_waits_for_the_build_under_way_and_drops_the_queue():
    build = _SlowBuild()
    builder = BackgroundBuilder(SessionCache(build))  # type: ignore[arg-type]
    keys = _keys(3)
    builder.request(keys)
    assert build.started.wait(30)
    threading.Timer(0.2, build.release.set).start()
    assert builder.stop(timeout=30)  # returned only after the first build ended
    assert build.built == keys[:1]
    assert builder.pending == 0 and builder.wait_idle(0)
    builder.request(_keys(5))  # a stopped builder takes nothing more and starts no thread
    assert builder._thread is None and builder.pending == 0


def test_stop_without_a_thread_and_stop_builders_report_nothing_left():
    # (never stop_builders() without a list here: it would stop the builders of this test session's engines)
    builder = BackgroundBuilder(SessionCache(_SlowBuild()))  # type: ignore[arg-type]
    assert builder.stop(timeout=0)
    assert stop_builders(timeout=1, builders=[builder]) == 0


def test_stop_builders_says_which_did_not_end_in_time():
    build = _SlowBuild()
    builder = BackgroundBuilder(SessionCache(build))  # type: ignore[arg-type]
    builder.request(_keys(1))
    assert build.started.wait(30)
    try:
        assert not builder.stop(timeout=0.05)
        assert stop_builders(timeout=0.05, builders=[builder]) == 1
    finally:
        build.release.set()
    assert builder.stop(timeout=30)


def test_exit_during_a_background_build_is_clean(tmp_path):
    """The interpreter exits while the builder is inside torch's exporter / ONNX Runtime: the exit handler
    waits for that build, so the process ends with 0 (without it: ``terminate called without an active
    exception`` and SIGABRT, seen when a server was stopped seconds after it started)."""
    script = textwrap.dedent("""
        import sys, time
        import torch
        from torch import nn
        from service.serving.compiled.sessions import BackgroundBuilder, SessionCache
        from service.serving.compiled.segments import SegmentKey

        def build(key):
            import onnxruntime as ort
            net = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(12)]).eval()
            path = sys.argv[1] + f"/{key.start}.onnx"
            for _ in range(3):
                torch.onnx.export(net, torch.zeros(1, 16, 32, 32), path, dynamo=False)
                ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            return object()

        builder = BackgroundBuilder(SessionCache(build))
        builder.request([SegmentKey("main", i, i, ("cm",)) for i in range(50)])
        time.sleep(1.0)
        print("exiting", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=REPO)
    assert "exiting" in out.stdout, out.stderr[-2000:]
    assert "terminate called" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 0, (out.returncode, -signal.SIGABRT, out.stderr[-2000:])
