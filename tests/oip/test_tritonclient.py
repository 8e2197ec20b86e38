"""Conformance with NVIDIA's ``tritonclient[http]`` from PyPI, unchanged, against a real server: health,
metadata, model config, statistics, infer with JSON and binary data (BYTES images and FP32 tensors, requested
outputs, classification), versioned calls, and errors whose message the client shows. Every prediction is
checked against ``/classify`` on the same image: same label, exit and FLOPs."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from service.backbones.preprocess import Normalizer
from tests.api.conftest import MODEL
from tests.api.test_e2e import Server
from tests.factories import CLASSES
from tests.oip.helpers import N_IMAGES

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the 'test' extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

N = N_IMAGES


@pytest.fixture(scope="module")
def client(live_server: Server) -> Any:
    c = httpclient.InferenceServerClient(live_server.url.removeprefix("http://"), network_timeout=120.0)
    yield c
    c.close()


def image_input(pngs: list[bytes], binary: bool) -> Any:
    inp = httpclient.InferInput("image", [len(pngs)], "BYTES")
    data = pngs if binary else [base64.b64encode(p) for p in pngs]  # JSON BYTES carry base64 text
    inp.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
    return inp


def check_against_classify(result: Any, reference: list[dict[str, Any]]) -> None:
    # BYTES outputs: bytes in binary form, str when they came as JSON (the client's own behaviour)
    labels = [b.decode() if isinstance(b, bytes) else b for b in result.as_numpy("label").ravel()]
    exits = result.as_numpy("exit_layer").ravel().tolist()
    flops = result.as_numpy("flops").ravel().tolist()
    assert labels == [r["label"] for r in reference]
    assert exits == [r["exit_index"] for r in reference]
    assert flops == pytest.approx([r["flops"] for r in reference])


def test_health_and_metadata(client, live_server: Server):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    server = client.get_server_metadata()
    assert server["name"] == "classmeans-serve" and "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL)
    bundle = meta["versions"][0]
    assert meta["name"] == MODEL and {i["name"] for i in meta["inputs"]} == {"image", "input"}
    assert client.is_model_ready(MODEL, model_version=bundle)
    assert not client.is_model_ready(MODEL, model_version="1")
    assert client.get_model_metadata(MODEL, model_version=bundle)["versions"] == [bundle]
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] == 32 and "dynamic_batching" in config


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_images(client, images, reference, binary):
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("label", "exit_layer", "flops")]
    result = client.infer(MODEL, [image_input(images[1], binary)], outputs=outputs, request_id="r1")
    check_against_classify(result, reference)
    response = result.get_response()
    assert response["id"] == "r1" and response["parameters"]["rules"]  # several samples: one rule each


def test_infer_images_default_outputs_all_binary(client, images, reference):
    """No outputs named: the client asks for every output in binary form."""
    result = client.infer(MODEL, [image_input(images[1][:1], True)])
    check_against_classify(result, reference[:1])
    params = result.get_response()["parameters"]
    assert params["exit_layer"] == reference[0]["exit_index"] and params["flops"] == pytest.approx(
        reference[0]["flops"])
    probs = result.as_numpy("probabilities")
    assert probs.shape == (1, 10) and probs.sum() == pytest.approx(1.0, abs=1e-4)
    assert result.as_numpy("class_index")[0] == reference[0]["class_index"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fp32(client, live_server: Server, images, reference, binary):
    meta = client.get_model_metadata(MODEL)["parameters"]
    x = Normalizer(meta["mean"], meta["std"])(images[0]).numpy().astype(np.float32)
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("label", "exit_layer", "flops")]
    check_against_classify(client.infer(MODEL, [inp], outputs=outputs), reference)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_infer_compressed(client, images, reference, algorithm):
    outputs = [httpclient.InferRequestedOutput(name) for name in ("label", "exit_layer", "flops")]
    result = client.infer(MODEL, [image_input(images[1], True)], outputs=outputs,
                          request_compression_algorithm=algorithm, response_compression_algorithm=algorithm)
    check_against_classify(result, reference)


def test_classification_output_and_parameters(client, images, reference):
    out = httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    result = client.infer(MODEL, [image_input(images[1][:1], True)], outputs=[out],
                          parameters={"profile": "full"})
    top = [s.decode() for s in result.as_numpy("probabilities").ravel()]
    assert len(top) == 3
    score, index, label = top[0].split(":")
    assert 0 < float(score) <= 1 and label == CLASSES[int(index)]
    params = result.get_response()["parameters"]
    assert params["profile"] == "full" and params["exit_layer"] == params["num_layers"] - 1
    assert params["rule"] == "final"


def test_versioned_infer(client, images, reference):
    bundle = client.get_model_metadata(MODEL)["versions"][0]
    result = client.infer(MODEL, [image_input(images[1][:1], True)], model_version=bundle)
    check_against_classify(result, reference[:1])
    assert result.get_response()["model_version"] == bundle
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [image_input(images[1][:1], True)], model_version="7")
    assert err.value.status() == "404" and "version '7'" in str(err.value)


def test_statistics(client):
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_count"] > 0
    assert sum(e["count"] for e in stats["exit_stats"]) == stats["inference_count"]
    assert stats["inference_stats"]["success"]["count"] > 0


def test_errors_reach_the_user_as_messages(client, images):
    bad = httpclient.InferInput("image", [2], "BYTES")
    bad.set_data_from_numpy(np.array([images[1][0], b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [bad])
    text = str(err.value)  # formatting the exception must work (it used to raise TypeError)
    assert err.value.status() == "400" and "element 1" in text and "image" in text, text
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404" and "'nope' is not served" in str(err.value)
    wrong = httpclient.InferInput("input", [1, 3, 8, 8], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 8, 8), dtype=np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [wrong])
    assert err.value.status() == "400" and "must have shape" in str(err.value)
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [image_input(images[1][:1], True)], parameters={"profile": "nope"})
    assert err.value.status() == "404" and "profile 'nope'" in str(err.value)


async def test_asyncio_client(live_server: Server, images, reference):
    """``tritonclient.http.aio`` (aiohttp underneath): binary images in, binary outputs back."""
    from tritonclient.http import aio

    client = aio.InferenceServerClient(live_server.url.removeprefix("http://"))
    try:
        assert await client.is_model_ready(MODEL)
        outputs = [aio.InferRequestedOutput(name) for name in ("label", "exit_layer", "flops")]
        result = await client.infer(MODEL, [image_input(images[1], True)], outputs=outputs)
        check_against_classify(result, reference)
        with pytest.raises(InferenceServerException) as err:
            await client.infer(MODEL, [image_input([b"nope"], True)])
        assert err.value.status() == "400" and "element 0" in str(err.value)
    finally:
        await client.close()
