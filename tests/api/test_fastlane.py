"""The lean lane for raw-body ``POST /classify`` answers exactly as the FastAPI route does, and only
takes the requests it may take."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from service.api import schemas
from service.api.fastlane import ClassifyFastLane, plain_options
from service.api.inference import INLINE_DECODE_PIXELS
from tests.api.conftest import MODEL, assert_envelope, bomb_png, make_settings, sample_pngs, serve, tiff_bytes

TIMING = ("latency_seconds", "queue_seconds", "inference_seconds", "batch_samples")
RAW = {"content-type": "image/png"}


@pytest.fixture()
def lane_calls(monkeypatch):
    """Counts the requests the lane served itself."""
    calls: list[int] = []
    real = ClassifyFastLane._serve

    async def counting(self, *args, **kwargs):
        calls.append(1)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(ClassifyFastLane, "_serve", counting)
    return calls


def _untimed(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in TIMING}


def _scope(query: bytes = b"", ctype: bytes = b"image/png") -> dict:
    return {"type": "http", "headers": [(b"content-type", ctype)], "query_string": query}


@pytest.mark.parametrize("query", [b"top_k=0", b"top_k=1001", b"top_k=05", b"top_k=%2B5", b"top_k=x",
                                   b"exits=maybe", b"profile=", b"top_k=1&top_k=2", b"other=1",
                                   b"profile=" + b"p" * 201])
def test_anything_unusual_goes_to_fastapi(query):
    assert plain_options(_scope(query)) is None


def test_plain_options_are_parsed():
    assert plain_options(_scope()) == (None, 5, False)
    assert plain_options(_scope(b"top_k=3&exits=off&profile=hull-1")) == ("hull-1", 3, True)
    assert plain_options(_scope(b"top_k=1000", b"Image/PNG; x=y")) == (None, 1000, False)
    assert plain_options(_scope(ctype=b"multipart/form-data; boundary=x")) is None
    assert plain_options(_scope(ctype=b"application/json")) is None


async def test_lane_answers_as_the_route_does(served, lane_calls):
    png = sample_pngs(3)[2]
    fast = await served.client.post("/classify", params={"top_k": "3"}, content=png, headers=RAW)
    assert len(lane_calls) == 1
    slow = await served.client.post("/classify", params={"top_k": "03"}, content=png, headers=RAW)
    assert len(lane_calls) == 1  # a zero-padded top_k is FastAPI's to validate
    assert fast.status_code == slow.status_code == 200
    body = fast.json()
    assert _untimed(body) == _untimed(slow.json())
    assert len(body["predictions"][0]["top_k"]) == 3
    assert schemas.ClassifyResponse.model_validate(body).model_dump() == body
    for name in ("X-Classmeans-Bundle", "X-Classmeans-Profile", "X-Classmeans-Version", "content-type"):
        assert fast.headers[name] == slow.headers[name]
    m = served.state.metrics
    assert m.requests.labels(MODEL, "/classify", "200")._value.get() == 2
    assert m.inflight.labels(MODEL)._value.get() == 0


async def test_lane_overrides_match_the_route(served, lane_calls):
    png = sample_pngs(1)[0]
    profile = served.state.engine.snapshot.bundle.profiles[0].name
    for params in ({"exits": "off"}, {"profile": profile}):
        fast = await served.client.post("/classify", params=params, content=png, headers=RAW)
        slow = await served.client.post("/classify", params={**params, "top_k": "005"}, content=png, headers=RAW)
        assert _untimed(fast.json()) == _untimed(slow.json())
    assert len(lane_calls) == 2


@pytest.mark.parametrize(("content", "params", "status", "code"), [
    (b"", {}, 400, "empty_image"),
    (b"not an image at all", {}, 415, "not_an_image"),
    ("TIFF", {}, 415, "unsupported_image_format"),
    ("BOMB", {}, 413, "image_too_large"),
    ("TRUNC", {}, 422, "truncated_image"),
    ("PNG", {"profile": "nope"}, 404, "profile_not_found"),
])
async def test_lane_errors_match_the_route(served, lane_calls, content, params, status, code):
    png = sample_pngs(1)[0]
    data = {"TIFF": tiff_bytes(), "BOMB": bomb_png(), "TRUNC": png[: len(png) // 2], "PNG": png}.get(content, content)
    fast = await served.client.post("/classify", params=params, content=data, headers=RAW)
    slow = await served.client.post("/classify", params={**params, "top_k": "05"}, content=data, headers=RAW)
    assert len(lane_calls) == 1
    assert assert_envelope(fast, status, code) == assert_envelope(slow, status, code)


async def test_lane_overload_and_deadline(tiny_store, lane_calls, monkeypatch):
    async with serve(make_settings(tiny_store, request_deadline_s=0.2)) as s:
        s.state.batcher._queued = s.state.batcher.queue_size
        r = await s.client.post("/classify", content=sample_pngs(1)[0], headers=RAW)
        assert_envelope(r, 503, "overloaded")
        assert r.headers["Retry-After"] == "1"
        s.state.batcher._queued = 0
        real = s.state.engine._run_group

        def slow(requests):
            time.sleep(0.5)
            return real(requests)

        monkeypatch.setattr(s.state.engine, "_run_group", slow)
        assert_envelope(await s.client.post("/classify", content=sample_pngs(1)[0], headers=RAW), 504,
                        "deadline_exceeded")
        assert len(lane_calls) == 2


async def test_images_above_the_inline_cap_are_decoded_off_the_loop(served, lane_calls):
    side = int(INLINE_DECODE_PIXELS ** 0.5) * 2
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 200, dtype=np.uint8)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 64 * 1024
    r = await served.client.post("/classify", content=buf.getvalue(), headers=RAW)
    assert r.status_code == 200, r.text
    assert len(lane_calls) == 1


async def test_not_ready_goes_to_fastapi(served, lane_calls):
    engine = served.state.engine
    served.state.engine = None
    try:
        r = await served.client.post("/classify", content=sample_pngs(1)[0], headers=RAW)
    finally:
        served.state.engine = engine
    assert_envelope(r, 503, "not_ready")
    assert lane_calls == []
