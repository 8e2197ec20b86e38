"""The binary tensor codec on its own: round trips, and Hypothesis throwing arbitrary bodies, header lengths
and shapes at the parser, which may only ever answer with data or an :class:`OipInputError` (a 400)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.oip.binary import (
    OipInputError,
    bytes_elements,
    encode_response,
    numeric_array,
    serialize_bytes,
    split_body,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

blobs = st.lists(st.binary(max_size=64), max_size=8)


@FUZZ
@given(items=blobs)
def test_bytes_round_trip(items):
    raw = serialize_bytes(items)
    assert len(raw) == sum(4 + len(b) for b in items)
    assert bytes_elements(raw, len(items)) == items


@FUZZ
@given(raw=st.binary(max_size=200), count=st.integers(0, 10))
def test_bytes_parser_never_fails_otherwise(raw, count):
    try:
        out = bytes_elements(raw, count)
    except OipInputError as exc:
        assert str(exc)
    else:
        assert len(out) == count and serialize_bytes(out) == raw


@FUZZ
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4), data=st.data())
def test_split_body_hands_each_input_its_bytes(sizes, data):
    payloads = [data.draw(st.binary(min_size=s, max_size=s)) for s in sizes]
    header = {"inputs": [{"name": f"in{i}", "shape": [s], "datatype": "UINT8",
                          "parameters": {"binary_data_size": s}} for i, s in enumerate(sizes)]}
    head = json.dumps(header).encode()
    parsed = split_body(head + b"".join(payloads), str(len(head)))
    assert parsed.header == header
    assert [parsed.binary[i] for i in range(len(sizes))] == payloads


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5),
                           lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=5), v, max_size=3),
                           max_leaves=10)
inputs = st.lists(st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=4), "shape": st.lists(st.integers(-3, 2**40), max_size=4),
    "datatype": st.sampled_from(["BYTES", "FP32", "INT8", "FP128", ""]),
    "data": json_values,
    "parameters": st.fixed_dictionaries({}, optional={
        "binary_data_size": st.integers(-5, 300) | st.booleans() | st.text(max_size=3) | st.none(),
        "shared_memory_region": st.text(max_size=3)}),
}) | json_values, max_size=3)


@FUZZ
@given(inp=inputs, tail=st.binary(max_size=120), garble=st.booleans(),
       declared=st.none() | st.just("exact") | st.integers(-10, 2**70).map(str) | st.text(max_size=6))
def test_split_body_answers_data_or_a_400(inp, tail, declared, garble):
    head = json.dumps({"inputs": inp}).encode()
    if garble:
        head = head[: len(head) // 2]
    body = head + tail
    if declared == "exact":
        declared = str(len(head))
    try:
        parsed = split_body(body, declared)
    except OipInputError as exc:
        assert str(exc)
        return
    assert isinstance(parsed.header, dict)
    assert sum(len(b) for b in parsed.binary.values()) <= len(body)


@FUZZ
@given(shape=st.lists(st.integers(-2, 6), max_size=4), size=st.integers(0, 400),
       datatype=st.sampled_from(["FP32", "FP64", "INT64", "UINT8", "BOOL", "BF16", "BYTES", "FP128"]))
def test_numeric_array_checks_the_byte_count(shape, size, datatype):
    raw = bytes(range(256)) * 2
    try:
        arr = numeric_array(raw[:size], datatype, shape)
    except OipInputError as exc:
        assert str(exc)
    else:
        assert list(arr.shape) == shape and arr.nbytes == size


@FUZZ
@given(inp=inputs.filter(lambda v: len(v) == 1 and isinstance(v[0], dict)), raw=st.none() | st.binary(max_size=64))
def test_tensor_conversion_answers_data_or_a_400(inp, raw):
    """From a schema-valid input to images or an FP32 batch: data, or a 400, nothing else."""
    from pydantic import ValidationError

    from service.api import schemas
    from service.api.oip import tensors

    try:
        model = schemas.InferInput.model_validate(inp[0])
    except ValidationError:
        return  # the route answers 400 validation_error for these
    try:
        n = tensors.sample_count(model, (2, 2))
        if model.datatype == "BYTES":
            assert len(tensors.image_blobs(model, raw, n)) == n
        else:
            assert tuple(tensors.fp32_batch(model, raw, n).shape) == (n, 3, 2, 2)
    except OipInputError as exc:
        assert str(exc)


def test_numeric_array_reads_little_endian():
    x = np.arange(6, dtype="<f4").reshape(2, 3) / 7
    assert np.array_equal(numeric_array(x.tobytes(), "FP32", [2, 3]), x)
    big = np.arange(3, dtype=">i8")
    assert numeric_array(big.astype("<i8").tobytes(), "INT64", [3]).tolist() == [0, 1, 2]


def test_encode_response_appends_binary_outputs_in_order():
    payload = {"model_name": "m", "outputs": [
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["cat", "dög"]},
        {"name": "flops", "datatype": "FP64", "shape": [2], "data": [1.5, 2.0]},
        {"name": "exit_layer", "datatype": "INT64", "shape": [2], "data": [3, 4]}]}
    body, n = encode_response(payload, {"label", "exit_layer"})
    head = json.loads(body[:n])
    outs = {o["name"]: o for o in head["outputs"]}
    assert "data" not in outs["label"] and outs["flops"]["data"] == [1.5, 2.0]
    label_size = outs["label"]["parameters"]["binary_data_size"]
    assert label_size == 4 + 3 + 4 + len("dög".encode())
    rest = body[n:]
    assert bytes_elements(rest[:label_size], 2) == [b"cat", "dög".encode()]
    assert struct.unpack("<2q", rest[label_size:]) == (3, 4)
    plain, none = encode_response({"outputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
                                  set())
    assert none is None and json.loads(plain)["outputs"][0]["data"] == [1.0]


@pytest.mark.parametrize("declared", ["-1", "1e3", " ", "0x10", "١٢"])
def test_odd_header_lengths(declared):
    with pytest.raises(OipInputError):
        split_body(b'{"inputs": []}', declared)
