"""``POST /classify``: good requests, per-request overrides, and every bad input with its status and code."""

from __future__ import annotations

import pytest

from tests.api.conftest import (
    MODEL,
    assert_envelope,
    bomb_png,
    make_settings,
    sample_pngs,
    serve,
    store_digest,
    tiff_bytes,
    truncated_png,
)

PREDICTION_KEYS = {"filename", "label", "class_index", "confidence", "top_k", "exit_index", "exit_name",
                   "num_exits", "flops", "flops_full", "flops_fraction", "profile", "mode", "rule", "member"}


def files(blobs: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"img{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


async def test_multipart_images_each_leave_at_their_exit(served):
    snap = served.state.engine.snapshot
    r = await served.client.post("/classify", files=files(sample_pngs(4)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["bundle"], body["profile"], body["version"]) == (
        MODEL, snap.bundle_id, snap.profile_name, snap.version)
    assert body["exits"] == "on" and body["operating"] is None
    assert body["latency_seconds"] > 0 and body["batch_samples"] >= 4
    assert r.headers["X-Classmeans-Bundle"] == snap.bundle_id
    preds = body["predictions"]
    assert [p["filename"] for p in preds] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    full = snap.bundle.costs.full
    for p in preds:
        assert set(p) == PREDICTION_KEYS
        assert p["num_exits"] == 11 and 0 <= p["exit_index"] <= 10
        assert p["exit_name"] == snap.bundle.exit_names[p["exit_index"]]
        assert p["flops_full"] == pytest.approx(full)
        assert p["flops_fraction"] == pytest.approx(p["flops"] / full)
        assert len(p["top_k"]) == 5 and p["top_k"][0]["index"] == p["class_index"]
        assert p["top_k"][0]["label"] == p["label"] and p["profile"] == snap.profile_name
        assert p["mode"] == "cm" and p["rule"] == ("final" if p["exit_index"] == 10 else "cm")


async def test_raw_image_body_and_top_k(served):
    r = await served.client.post("/classify?top_k=3", content=sample_pngs(1)[0],
                                 headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    (p,) = r.json()["predictions"]
    assert p["filename"] is None and len(p["top_k"]) == 3
    probs = [t["probability"] for t in p["top_k"]]
    assert probs == sorted(probs, reverse=True)


async def test_exits_off_runs_the_full_network(served):
    r = await served.client.post("/classify?exits=off", files=files(sample_pngs(3)))
    body = r.json()
    assert body["exits"] == "off" and body["profile"] == "full"
    for p in body["predictions"]:
        assert p["exit_index"] == 10 and p["exit_name"] == "head"
        assert p["flops"] == p["flops_full"] and p["profile"] == "full"


async def test_per_request_profile_override_in_query_or_form(served):
    r = await served.client.post("/classify?profile=full", files=files(sample_pngs(2)))
    assert r.json()["profile"] == "full"
    r = await served.client.post("/classify", files=files(sample_pngs(2)), data={"profile": "full", "top_k": "2"})
    body = r.json()
    assert body["profile"] == "full" and all(len(p["top_k"]) == 2 for p in body["predictions"])
    assert served.state.engine.snapshot.profile_name != "full"  # the override changed nothing


async def test_same_image_same_answer(served):
    img = sample_pngs(1)[0]
    a = (await served.client.post("/classify", files=files([img]))).json()["predictions"][0]
    b = (await served.client.post("/classify", content=img, headers={"content-type": "image/png"})).json()
    b = b["predictions"][0]
    for key in ("class_index", "exit_index", "flops"):
        assert a[key] == b[key]
    assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)


BAD_INPUTS = [
    # name, request kwargs, status, code
    ("not an image", {"files": [("file", ("x.png", b"hello, this is text", "image/png"))]}, 415, "not_an_image"),
    ("truncated png", {"files": [("file", ("t.png", "TRUNC", "image/png"))]}, 422, "truncated_image"),
    ("decompression bomb", {"files": [("file", ("b.png", "BOMB", "image/png"))]}, 413, "image_too_large"),
    ("tiff refused", {"content": "TIFF", "headers": {"content-type": "image/tiff"}}, 415,
     "unsupported_image_format"),
    ("empty raw body", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_image"),
    ("empty file part", {"files": [("file", ("e.png", b"", "image/png"))]}, 400, "empty_image"),
    ("json body", {"json": {"image": "abc"}}, 415, "unsupported_media_type"),
    ("text body", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("no content type", {"content": b"abc"}, 415, "unsupported_media_type"),
    ("no file part", {"files": [("other", ("x.png", "PNG", "image/png"))]}, 422, "validation_error"),
    ("only fields", {"data": {"profile": "full"}, "files": []}, 415, "unsupported_media_type"),
    ("no boundary", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400,
     "invalid_form"),
    ("unknown profile", {"params": {"profile": "nope"}, "files": [("file", ("x.png", "PNG", "image/png"))]}, 404,
     "profile_not_found"),
    ("bad top_k", {"params": {"top_k": 0}, "files": [("file", ("x.png", "PNG", "image/png"))]}, 422,
     "validation_error"),
    ("bad exits", {"params": {"exits": "maybe"}, "files": [("file", ("x.png", "PNG", "image/png"))]}, 422,
     "validation_error"),
]


def _materialise(kwargs: dict) -> dict:
    subst = {"TRUNC": truncated_png(), "BOMB": bomb_png(), "TIFF": tiff_bytes(), "PNG": sample_pngs(1)[0]}
    out = dict(kwargs)
    if "files" in out:
        out["files"] = [(k, (n, subst.get(d, d) if isinstance(d, str) else d, t)) for k, (n, d, t) in out["files"]]
        if not out["files"]:
            del out["files"]
    if isinstance(out.get("content"), str):
        out["content"] = subst[out["content"]]
    return out


@pytest.mark.parametrize(("name", "kwargs", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input(served, name, kwargs, status, code):
    before = store_digest(served.store)
    r = await served.client.post("/classify", **_materialise(kwargs))
    assert_envelope(r, status, code)
    assert store_digest(served.store) == before
    ok = await served.client.post("/classify", files=files(sample_pngs(1)))  # still serving
    assert ok.status_code == 200
    assert served.state.metrics.inflight.labels(MODEL)._value.get() == 0  # every request finished


async def test_oversized_bodies_and_too_many_files(tiny_store):
    settings = make_settings(tiny_store, max_body_bytes=64 * 1024, max_file_bytes=32 * 1024, max_files=3,
                             queue_size=8)
    async with serve(settings) as s:
        big = b"\x89PNG\r\n\x1a\n" + b"\0" * (100 * 1024)
        # Declared Content-Length over the cap: refused before the body is read.
        r = await s.client.post("/classify", content=big, headers={"content-type": "image/png"})
        assert_envelope(r, 413, "payload_too_large")

        # Chunked (no Content-Length): refused once the stream passes the cap.
        async def chunks():
            for _ in range(20):
                yield b"\0" * 8192
        r = await s.client.post("/classify", content=chunks(), headers={"content-type": "image/png"})
        assert "content-length" not in r.request.headers
        assert_envelope(r, 413, "payload_too_large")

        # One part over the per-file cap, total under the body cap.
        r = await s.client.post("/classify", files=files([b"\x89PNG" + b"\0" * (40 * 1024)]))
        assert_envelope(r, 413, "payload_too_large")

        r = await s.client.post("/classify", files=files(sample_pngs(4)))
        body = assert_envelope(r, 413, "too_many_files")
        assert "3" in body["error"]["message"]

        assert (await s.client.post("/classify", files=files(sample_pngs(3)))).status_code == 200


async def test_framework_errors_use_the_envelope(served):
    assert_envelope(await served.client.get("/classify"), 405, "method_not_allowed")
    assert_envelope(await served.client.get("/no/such/route"), 404, "not_found")
    r = await served.client.post("/classify", files=files(sample_pngs(1)), headers={"content-length": "abc"})
    assert r.status_code in (400, 413, 422) and "error" in r.json()


async def test_unexpected_exception_is_a_500_without_internals(tiny_store, monkeypatch):
    async with serve(make_settings(tiny_store), raise_app_exceptions=False) as s:
        def explode(*a, **k):
            raise RuntimeError("secret internal detail /etc/passwd")

        monkeypatch.setattr(s.state.engine, "_run_group", explode)
        r = await s.client.post("/classify", files=files(sample_pngs(1)))
        body = assert_envelope(r, 500, "internal_error")
        assert "secret" not in r.text and "RuntimeError" not in r.text
        assert body["error"]["message"]
        monkeypatch.undo()
        assert (await s.client.post("/classify", files=files(sample_pngs(1)))).status_code == 200


async def test_overload_is_a_fast_503_with_retry_after(tiny_store):
    settings = make_settings(tiny_store, queue_size=2, max_files=2, max_batch_size=1)
    async with serve(settings) as s:
        s.state.batcher._queued = 2  # the queue is full (as if two requests were waiting)
        r = await s.client.post("/classify", files=files(sample_pngs(1)))
        assert_envelope(r, 503, "overloaded")
        assert r.headers["Retry-After"] == "1"
        s.state.batcher._queued = 0
        m = s.state.metrics
        assert m.rejected.labels(MODEL, "overloaded")._value.get() == 1
        assert (await s.client.post("/classify", files=files(sample_pngs(1)))).status_code == 200


async def test_deadline_exceeded_is_504(tiny_store, monkeypatch):
    import time as _time

    async with serve(make_settings(tiny_store, request_deadline_s=0.2)) as s:
        engine = s.state.engine
        real = engine._run_group

        def slow(requests):
            _time.sleep(0.5)
            return real(requests)

        monkeypatch.setattr(engine, "_run_group", slow)
        r = await s.client.post("/classify", files=files(sample_pngs(1)))
        assert_envelope(r, 504, "deadline_exceeded")
        assert s.state.metrics.rejected.labels(MODEL, "deadline")._value.get() == 1


async def test_concurrent_requests_are_batched(served):
    import asyncio

    blobs = sample_pngs(8)
    rs = await asyncio.gather(*(served.client.post("/classify", files=files([b])) for b in blobs))
    assert all(r.status_code == 200 for r in rs)
    assert sum(served.state.batcher.stats.history) == 8

