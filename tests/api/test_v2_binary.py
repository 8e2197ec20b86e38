"""OIP v2 beyond plain JSON: bodies without a Content-Type, the binary tensor extension both ways (built here
byte by byte, independently of the server's codec), versioned paths, model config and statistics, and every
malformed binary request answered 400 with a clear message."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.backbones.preprocess import Normalizer
from tests.api.conftest import MODEL, sample_images, sample_pngs
from tests.oip.helpers import assert_oip_error

INFER = f"/v2/models/{MODEL}/infer"


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def image_header(n: int, size: int, **extra) -> dict:
    return {"inputs": [{"name": "image", "shape": [n], "datatype": "BYTES",
                        "parameters": {"binary_data_size": size}}], **extra}


def read_binary_response(r) -> tuple[dict, dict[str, bytes]]:
    """Split a binary response by hand: the JSON header, then each output's bytes in order."""
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    blobs, offset = {}, n
    for out in head["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = r.content[offset:offset + size]
            offset += size
    assert offset == len(r.content)
    return head, blobs


def unprefix(raw: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


async def _classify(client, png: bytes) -> dict:
    r = await client.post("/classify", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


async def test_json_body_without_content_type(served):
    """tritonclient sends its JSON without a Content-Type header."""
    import base64

    png = sample_pngs(1)[0]
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "data": [base64.b64encode(png).decode()]}]}).encode()
    r = await served.client.post(INFER, content=body)
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    ref = await _classify(served.client, png)
    assert r.json()["parameters"]["exit_layer"] == ref["exit_index"]
    assert r.json()["parameters"]["flops"] == pytest.approx(ref["flops"])


async def test_binary_images_in_binary_outputs_out(served):
    pngs = sample_pngs(3)
    raw = length_prefixed(pngs)
    header = image_header(3, len(raw), outputs=[{"name": "label", "parameters": {"binary_data": True}},
                                                {"name": "exit_layer", "parameters": {"binary_data": True}},
                                                {"name": "flops", "parameters": {"binary_data": True}},
                                                {"name": "probabilities"}])
    content, headers = binary_body(header, raw)
    headers["content-type"] = "application/octet-stream"  # as KServe's client sends it
    r = await served.client.post(INFER, content=content, headers=headers)
    assert r.status_code == 200, r.text
    head, blobs = read_binary_response(r)
    labels = [b.decode() for b in unprefix(blobs["label"])]
    exits = np.frombuffer(blobs["exit_layer"], dtype="<i8").tolist()
    flops = np.frombuffer(blobs["flops"], dtype="<f8").tolist()
    probs = {o["name"]: o for o in head["outputs"]}["probabilities"]
    assert "data" in probs and probs["shape"] == [3, 10]  # not asked for in binary: plain JSON data
    for png, label, exit_layer, f in zip(pngs, labels, exits, flops, strict=True):
        ref = await _classify(served.client, png)
        assert (label, exit_layer, f) == (ref["label"], ref["exit_index"], pytest.approx(ref["flops"]))


async def test_binary_output_default_for_all_outputs(served):
    """No outputs requested and ``binary_data_output: true`` (tritonclient's default): every output binary."""
    raw = length_prefixed(sample_pngs(1))
    content, headers = binary_body(image_header(1, len(raw), parameters={"binary_data_output": True}), raw)
    r = await served.client.post(INFER, content=content, headers=headers)
    assert r.status_code == 200, r.text
    head, blobs = read_binary_response(r)
    assert set(blobs) == {"label", "class_index", "confidence", "exit_layer", "flops", "probabilities", "rule"}
    assert np.frombuffer(blobs["probabilities"], dtype="<f4").sum() == pytest.approx(1.0, abs=1e-4)
    assert np.frombuffer(blobs["exit_layer"], dtype="<i8")[0] == head["parameters"]["exit_layer"]


async def test_binary_fp32_matches_json_fp32(served):
    images, _ = sample_images(2)
    spec = served.state.engine.spec
    x = Normalizer(spec.mean, spec.std)(images).numpy().astype("<f4")
    header = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": x.nbytes}}],
              "outputs": [{"name": "class_index"}, {"name": "exit_layer"}]}
    content, headers = binary_body(header, x.tobytes())
    r = await served.client.post(INFER, content=content, headers=headers)
    assert r.status_code == 200, r.text
    as_json = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                           "data": x.flatten().tolist()}], "outputs": header["outputs"]}
    r2 = await served.client.post(INFER, json=as_json)
    assert r.headers["content-type"] == "application/json"
    assert r.json()["outputs"] == r2.json()["outputs"]


async def test_versioned_paths(served):
    bundle = served.state.engine.snapshot.bundle_id
    base = f"/v2/models/{MODEL}/versions/{bundle}"
    assert (await served.client.get(base)).json()["versions"] == [bundle]
    assert (await served.client.get(f"{base}/ready")).status_code == 200
    assert (await served.client.get(f"{base}/config")).json()["name"] == MODEL
    r = await served.client.post(f"{base}/infer", json={"inputs": [{"name": "image", "shape": [1],
                                                                     "datatype": "BYTES", "data": ["x"]}]})
    assert_oip_error(r, 400, "invalid_input")  # reached the infer route
    raw = length_prefixed(sample_pngs(1))
    content, headers = binary_body(image_header(1, len(raw)), raw)
    r = await served.client.post(f"{base}/infer", content=content, headers=headers)
    assert r.status_code == 200 and r.json()["model_version"] == bundle
    for path in ("", "/ready", "/config", "/stats"):
        body = assert_oip_error(await served.client.get(f"/v2/models/{MODEL}/versions/1{path}"), 404,
                                "version_not_found")
        assert bundle in body["error"]
    r = await served.client.post(f"/v2/models/{MODEL}/versions/1/infer", content=content, headers=headers)
    assert_oip_error(r, 404, "version_not_found")


async def test_config_and_stats_tell_the_truth(served):
    s = served.state.settings
    cfg = (await served.client.get(f"/v2/models/{MODEL}/config")).json()
    assert cfg["max_batch_size"] == s.max_files
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == round(s.max_delay_ms * 1000)
    assert [i["name"] for i in cfg["input"]] == ["image", "input"]
    assert {o["name"] for o in cfg["output"]} >= {"label", "exit_layer", "flops"}
    pngs = sample_pngs(3)
    raw = length_prefixed(pngs)
    content, headers = binary_body(image_header(3, len(raw)), raw)
    out = (await served.client.post(INFER, content=content, headers=headers)).json()
    exits = {o["name"]: o for o in out["outputs"]}["exit_layer"]["data"]
    await served.client.post(INFER, content=b"{")  # one failed request
    stats = (await served.client.get(f"/v2/models/{MODEL}/stats")).json()["model_stats"][0]
    assert stats["inference_count"] == 3 and stats["execution_count"] >= 1
    assert stats["inference_stats"]["success"]["count"] == 1
    assert stats["inference_stats"]["fail"]["count"] == 1
    per_exit: dict[int, int] = {}
    for e in stats["exit_stats"]:
        per_exit[e["exit"]] = per_exit.get(e["exit"], 0) + e["count"]
    assert per_exit == {j: exits.count(j) for j in set(exits)}
    assert (await served.client.get("/v2/models/stats")).json() == {"model_stats": [stats]}


async def test_unmatched_v2_paths_use_the_protocol_error(served):
    assert_oip_error(await served.client.get("/v2/repository/index"), 404, "not_found")
    assert_oip_error(await served.client.get(INFER), 405, "method_not_allowed")
    assert_oip_error(await served.client.get("/v2/models/other/config"), 404, "model_not_found")
    r = await served.client.post("/classify", content=b"", headers={"content-type": "text/plain"})
    assert isinstance(r.json()["error"], dict)  # our own routes keep the envelope


def _raw_image(n: int = 1) -> bytes:
    return length_prefixed(sample_pngs(n))


def _bad_cases() -> list[tuple[str, bytes, dict[str, str], str]]:
    png = _raw_image()
    good, hdr = binary_body(image_header(1, len(png)), png)
    n = hdr["Inference-Header-Content-Length"]
    fp32 = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                        "parameters": {"binary_data_size": 100}}]}
    cases = [
        ("header length larger than the body", good, {"Inference-Header-Content-Length": str(len(good) + 1)},
         "larger than the body"),
        ("negative header length", good, {"Inference-Header-Content-Length": "-5"}, "non-negative"),
        ("overflowing header length", good, {"Inference-Header-Content-Length": "9" * 40}, "larger than the body"),
        ("non-numeric header length", good, {"Inference-Header-Content-Length": "12abc"}, "decimal"),
        ("zero header length", good, {"Inference-Header-Content-Length": "0"}, "missing"),
        ("header length cuts the JSON", good, {"Inference-Header-Content-Length": str(int(n) - 3)}, "JSON"),
        ("binary size past the end", *binary_body(image_header(1, len(png) + 10), png), "left in the body"),
        ("bytes nobody claims", *binary_body(image_header(1, len(png)), png, b"xx"), "belong to no input"),
        ("negative binary size", *binary_body(image_header(1, -1), png), "binary_data_size"),
        ("binary size not an integer", *binary_body(image_header(1, "12"), png), "binary_data_size"),  # type: ignore[arg-type]
        ("FP32 shape does not match the bytes", *binary_body(fp32, b"\0" * 100), "needs 12288 bytes"),
        ("FP32 wrong shape", *binary_body({"inputs": [{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 768}}]}, b"\0" * 768),
         "must have shape"),
        ("unknown datatype", *binary_body({"inputs": [{"name": "x", "shape": [1], "datatype": "FP128",
                                                       "parameters": {"binary_data_size": 4}}]}, b"\0" * 4),
         "unknown datatype"),
        ("datatype not accepted", *binary_body({"inputs": [{"name": "x", "shape": [4], "datatype": "INT8",
                                                            "parameters": {"binary_data_size": 4}}]}, b"\0" * 4),
         "not accepted"),
        ("BYTES count short", *binary_body(image_header(2, len(png)), png), "needs 2"),
        ("BYTES prefix cut", *binary_body(image_header(1, 2), b"\1\0"), "cut off"),
        ("BYTES element too long", *binary_body(image_header(1, 5), struct.pack("<I", 99) + b"x"), "only 1"),
        ("BYTES element empty", *binary_body(image_header(1, 4), struct.pack("<I", 0)), "empty"),
        ("BYTES negative shape", *binary_body(image_header(1, len(png)) | {"inputs": [{
            "name": "image", "shape": [-1], "datatype": "BYTES", "parameters": {"binary_data_size": len(png)}}]},
            png), "negative"),
        ("data and binary both", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                           "data": ["x"], "parameters": {"binary_data_size": 4}}]},
                                              b"\0" * 4), "not both"),
        ("shared memory", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                    "parameters": {"shared_memory_region": "r"}}]}), "shared"),
        ("binary after JSON without the header", good, {}, "Inference-Header-Content-Length"),
    ]
    return cases


NOT_JSON = ("header length cuts the JSON", "binary after JSON without the header")


@pytest.mark.parametrize(("what", "content", "headers", "says"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
async def test_malformed_binary_requests_are_400(served, what, content, headers, says):
    r = await served.client.post(INFER, content=content, headers=headers)
    code = "validation_error" if what in NOT_JSON else "invalid_input"
    body = assert_oip_error(r, 400, code)
    assert says in body["error"], body


async def test_bytes_elements_that_are_not_images_are_400(served):
    raw = length_prefixed([sample_pngs(1)[0], b"this is not an image"])
    content, headers = binary_body(image_header(2, len(raw)), raw)
    body = assert_oip_error(await served.client.post(INFER, content=content, headers=headers), 400, "not_an_image")
    assert "element 1" in body["error"]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_request_bodies(served, encoding):
    """tritonclient's request_compression_algorithm: the body arrives gzip- or zlib-compressed."""
    import gzip
    import zlib

    raw = length_prefixed(sample_pngs(1))
    content, headers = binary_body(image_header(1, len(raw)), raw)
    packed = gzip.compress(content) if encoding == "gzip" else zlib.compress(content)
    r = await served.client.post(INFER, content=packed, headers={**headers, "Content-Encoding": encoding})
    assert r.status_code == 200, r.text
    assert_oip_error(await served.client.post(INFER, content=packed[:-8], headers={
        **headers, "Content-Encoding": encoding}), 400, "invalid_input")


async def test_compression_bombs_and_unknown_encodings(served):
    import gzip

    bomb = gzip.compress(b" " * (served.state.settings.max_body_bytes + 1))
    r = await served.client.post(INFER, content=bomb, headers={"Content-Encoding": "gzip"})
    assert_oip_error(r, 413, "payload_too_large")
    r = await served.client.post(INFER, content=b"{}", headers={"Content-Encoding": "br"})
    assert "not supported" in assert_oip_error(r, 400, "invalid_input")["error"]


async def test_body_cap_answers_with_the_protocol_error(served):
    """The size cap answers before any route runs (a middleware); on /v2 its body is the protocol's too."""
    too_big = b"{" + b" " * served.state.settings.max_body_bytes
    assert_oip_error(await served.client.post(INFER, content=too_big), 413, "payload_too_large")
