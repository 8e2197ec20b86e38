"""Open Inference Protocol v2 (JSON): metadata, readiness, infer with BYTES and FP32 inputs, the protocol's
error bodies."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from service.backbones.preprocess import Normalizer
from tests.api.conftest import MODEL, sample_images, sample_pngs
from tests.oip.helpers import assert_oip_error


def b64_input(blobs: list[bytes]) -> dict:
    return {"name": "image", "shape": [len(blobs)], "datatype": "BYTES",
            "data": [base64.b64encode(b).decode() for b in blobs]}


async def test_server_and_model_metadata(served):
    r = await served.client.get("/v2")
    assert r.status_code == 200 and r.json()["name"] == "classmeans-serve"
    r = await served.client.get(f"/v2/models/{MODEL}")
    assert r.status_code == 200
    meta = r.json()
    snap = served.state.engine.snapshot
    assert meta["name"] == MODEL and meta["versions"] == [snap.bundle_id]
    assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "FP32"}
    assert meta["parameters"]["num_layers"] == 11 and meta["parameters"]["max_batch_size"] == 32
    r = await served.client.get(f"/v2/models/{MODEL}/ready")
    assert r.status_code == 200 and r.json() == {"name": MODEL, "ready": True}
    for path in ("/v2/models/other", "/v2/models/other/ready"):
        assert_oip_error(await served.client.get(path), 404, "model_not_found")


async def test_infer_one_encoded_image(served):
    body = {"id": "req-1", "inputs": [b64_input(sample_pngs(1))]}
    r = await served.client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    snap = served.state.engine.snapshot
    assert out["id"] == "req-1" and out["model_name"] == MODEL and out["model_version"] == snap.bundle_id
    params = out["parameters"]
    assert {"exit_layer", "flops", "profile", "bundle", "version", "flops_full", "num_layers"} <= set(params)
    assert params["profile"] == snap.profile_name and 0 <= params["exit_layer"] <= 10
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["exit_layer"]["data"] == [params["exit_layer"]]
    assert outputs["flops"]["data"] == [pytest.approx(params["flops"])]
    assert outputs["label"]["datatype"] == "BYTES" and outputs["probabilities"]["shape"] == [1, 10]
    assert sum(outputs["probabilities"]["data"]) == pytest.approx(1.0, abs=1e-4)


async def test_infer_fp32_batch_matches_classify(served):
    images, _ = sample_images(3)
    spec = served.state.engine.spec
    x = Normalizer(spec.mean, spec.std)(images).numpy()
    body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()}],
            "parameters": {"exits": "off"},
            "outputs": [{"name": "class_index"}, {"name": "probabilities", "parameters": {"classification": 2}}]}
    r = await served.client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["parameters"]["profile"] == "full" and "exit_layer" not in out["parameters"]
    cls, top = out["outputs"]
    assert cls["shape"] == [3] and top["shape"] == [3, 2] and top["datatype"] == "BYTES"
    score, index, label = top["data"][0].split(":")
    assert int(index) == cls["data"][0] and label == spec.classes[int(index)] and 0 < float(score) <= 1


async def test_infer_per_request_profile(served):
    body = {"inputs": [b64_input(sample_pngs(2))], "parameters": {"profile": "full"}}
    out = (await served.client.post(f"/v2/models/{MODEL}/infer", json=body)).json()
    assert out["parameters"]["profile"] == "full"
    assert {o["name"]: o for o in out["outputs"]}["exit_layer"]["data"] == [10, 10]


def _fp32(shape, data=None):
    n = int(np.prod(shape))
    return {"name": "input", "shape": shape, "datatype": "FP32", "data": data if data is not None else [0.0] * n}


INFER_ERRORS = [
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["***"]}]}, 400, "invalid_input"),
    ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["aGVsbG8="]}]}, 400, "invalid_input"),
    ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}]}, 400, "not_an_image"),
    ({"inputs": [_fp32([1, 3, 8, 8])]}, 400, "invalid_input"),
    ({"inputs": [_fp32([1, 3, 32, 32], [0.0] * 10)]}, 400, "invalid_input"),
    ({"inputs": [_fp32([1, 3, 32, 32], ["x"] * 3072)]}, 400, "invalid_input"),
    ({"inputs": [{"name": "input", "shape": [1], "datatype": "INT8", "data": [1]}]}, 400, "invalid_input"),
    ({"inputs": [_fp32([1, 3, 32, 32]), _fp32([1, 3, 32, 32])]}, 400, "invalid_input"),
    ({"inputs": [_fp32([1, 3, 32, 32])], "outputs": [{"name": "nope"}]}, 400, "invalid_input"),
    ({"inputs": [_fp32([1, 3, 32, 32])], "parameters": {"profile": "nope"}}, 404, "profile_not_found"),
    ({"inputs": [_fp32([1, 3, 32, 32])], "parameters": {"exits": "sometimes"}}, 400, "invalid_input"),
    ({"inputs": [{"name": "image", "shape": [33], "datatype": "BYTES", "data": ["aGVsbG8="] * 33}]}, 413,
     "too_many_files"),
    ({"inputs": []}, 400, "validation_error"),
    ({"nothing": 1}, 400, "validation_error"),
]


@pytest.mark.parametrize(("body", "status", "code"), INFER_ERRORS)
async def test_infer_errors(served, body, status, code):
    r = await served.client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert_oip_error(r, status, code)


async def test_infer_unknown_model_and_bad_json(served):
    r = await served.client.post("/v2/models/other/infer", json={"inputs": [_fp32([1, 3, 32, 32])]})
    assert_oip_error(r, 404, "model_not_found")
    headers = {"content-type": "application/json"}
    r = await served.client.post(f"/v2/models/{MODEL}/infer", content=b"{", headers=headers)
    assert_oip_error(r, 400, "validation_error")
