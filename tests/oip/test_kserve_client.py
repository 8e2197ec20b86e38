"""Conformance with KServe's Python client (``kserve.InferenceRESTClient``, protocol v2), unchanged, against a
real server: health, model readiness, infer with JSON and binary BYTES images and FP32 tensors, requested
binary outputs, and an error whose message the client shows. Each prediction is checked against ``/classify``.

``kserve`` is in the ``test`` extra (it brings the Kubernetes client, pandas, grpcio and more, about 280 MB), so
CI runs this module; an environment without it skips the module with that reason.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import pytest

from service.backbones.preprocess import Normalizer
from tests.api.conftest import MODEL
from tests.api.test_e2e import Server
from tests.oip.helpers import N_IMAGES

kserve = pytest.importorskip("kserve", reason="kserve (test extra) is not installed")
from kserve.protocol.infer_type import RequestedOutput  # noqa: E402

N = N_IMAGES


def new_client() -> Any:
    return kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=120, verbose=False))


def request(inp: Any, binary_outputs: bool = False, **params: Any) -> Any:
    outputs = [RequestedOutput(name, parameters={"binary_data": binary_outputs})
               for name in ("label", "exit_layer", "flops")]
    return kserve.InferRequest(model_name=MODEL, infer_inputs=[inp], request_outputs=outputs,
                               parameters=params or None)


def check(response: Any, reference: list[dict[str, Any]]) -> None:
    outs = {o.name: o for o in response.outputs}
    labels = [b.decode() if isinstance(b, bytes) else b for b in outs["label"].as_numpy().ravel()]
    assert labels == [r["label"] for r in reference]
    assert outs["exit_layer"].as_numpy().ravel().tolist() == [r["exit_index"] for r in reference]
    assert outs["flops"].as_numpy().ravel().tolist() == pytest.approx([r["flops"] for r in reference])


async def test_health(live_server: Server):
    c = new_client()
    try:
        assert await c.is_server_live(live_server.url) is True
        assert await c.is_server_ready(live_server.url) is True
        assert await c.is_model_ready(live_server.url, MODEL) is True
    finally:
        await c.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_infer_images(live_server: Server, images, reference, binary):
    inp = kserve.InferInput("image", [N], "BYTES")
    data = images[1] if binary else [base64.b64encode(p) for p in images[1]]
    inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    c = new_client()
    try:
        res = await c.infer(live_server.url, request(inp, binary_outputs=binary), model_name=MODEL)
    finally:
        await c.close()
    check(res, reference)
    assert res.parameters["rules"] and len(res.parameters["rules"]) == N


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_infer_fp32(live_server: Server, images, reference, binary):
    with live_server.client() as h:
        meta = h.get(f"/v2/models/{MODEL}").json()["parameters"]
    x = Normalizer(meta["mean"], meta["std"])(images[0]).numpy().astype(np.float32)
    inp = kserve.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    c = new_client()
    try:
        res = await c.infer(live_server.url, request(inp, binary_outputs=binary), model_name=MODEL)
    finally:
        await c.close()
    check(res, reference)


async def test_error_message_reaches_the_user(live_server: Server, images):
    inp = kserve.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([b"definitely not a png"], dtype=np.object_), binary_data=True)
    c = new_client()
    try:
        with pytest.raises(httpx.HTTPStatusError) as err:
            await c.infer(live_server.url, request(inp), model_name=MODEL)
        assert err.value.response.status_code == 400
        assert "element 0" in str(err.value) and "image" in str(err.value), str(err.value)
        inp2 = kserve.InferInput("image", [1], "BYTES")
        inp2.set_data_from_numpy(np.array([images[1][0]], dtype=np.object_), binary_data=True)
        with pytest.raises(httpx.HTTPStatusError) as err:
            await c.infer(live_server.url, request(inp2, profile="nope"), model_name=MODEL)
        assert err.value.response.status_code == 404 and "profile 'nope'" in str(err.value)
    finally:
        await c.close()
