"""The Open Inference Protocol's binary tensor extension: parse a request body, encode a response body.

Wire format (KServe predict-api v2, Triton ``extension_binary_data``): the body is a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw bytes of every input whose
``parameters.binary_data_size`` is set, concatenated in the order the inputs are listed. Numeric tensors are
row-major little-endian; a ``BYTES`` tensor is its elements one after another, each a 4-byte little-endian
length followed by that many bytes. A response carries binary outputs the same way, with the response header
``Inference-Header-Content-Length`` and ``Content-Type: application/octet-stream``.

Pure functions over ``bytes`` and NumPy: no HTTP, no images. Every malformed input raises
:class:`OipInputError`, whose message says what is wrong (the route answers 400).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from service.errors import ServiceError

HEADER_LENGTH = "inference-header-content-length"

# Every datatype the protocol defines -> its little-endian NumPy dtype (None: no fixed-width NumPy form).
DATATYPES: dict[str, str | None] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "BF16": None, "BYTES": None,
}
# Largest tensor this parser will describe (elements); far above any body the size cap lets in.
MAX_ELEMENTS = 1 << 40
_LEN = struct.Struct("<I")


class OipInputError(ServiceError, ValueError):
    """A request the protocol cannot accept; ``str(exc)`` is the message for the client, ``code`` our stable
    error code (``invalid_input``; ``validation_error`` for a header that is not a JSON object; 400) or
    ``payload_too_large`` (a body that decompresses past the limit; 413)."""

    code, status = "invalid_input", 400
    STATUS_BY_CODE: ClassVar[dict[str, int]] = {"payload_too_large": 413}

    def __init__(self, message: str, code: str = "invalid_input") -> None:
        super().__init__(message, code)


@dataclass
class ParsedBody:
    """The JSON header of a request and the raw bytes of each binary input (by its index in ``inputs``)."""

    header: dict[str, Any]
    binary: dict[int, bytes] = field(default_factory=dict)


def header_length(value: str | None, body_size: int) -> int | None:
    """The declared JSON header length: None when absent; 400 when it is not a decimal integer in
    ``1..body_size``."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii():
        raise OipInputError(f"Inference-Header-Content-Length must be a non-negative decimal integer, got {value!r}")
    n = int(text)
    if n == 0:
        raise OipInputError("Inference-Header-Content-Length is 0: the JSON inference header is missing")
    if n > body_size:
        raise OipInputError(f"Inference-Header-Content-Length ({n}) is larger than the body ({body_size} bytes)")
    return n


def parse_json(data: bytes, binary_follows: bool) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        trailing = isinstance(exc, UnicodeDecodeError) or (isinstance(exc, json.JSONDecodeError)
                                                             and exc.msg == "Extra data")
        hint = (" (binary tensor data after the JSON needs the Inference-Header-Content-Length header)"
                if trailing and not binary_follows else "")
        raise OipInputError(f"the inference header is not valid JSON: {exc}{hint}", "validation_error") from None
    if not isinstance(obj, dict):
        raise OipInputError("the inference header must be a JSON object", "validation_error")
    return obj


def _binary_size(inp: Any, i: int) -> int | None:
    if not isinstance(inp, dict):
        return None  # the schema check names it
    params = inp.get("parameters")
    if not isinstance(params, dict):
        return None
    if "shared_memory_region" in params:
        raise OipInputError(f"input {i}: shared-memory tensors are not supported; send the data in the body")
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise OipInputError(f"input {i}: parameters.binary_data_size must be a non-negative integer")
    if "data" in inp:
        raise OipInputError(f"input {i}: give either 'data' or parameters.binary_data_size, not both")
    return size


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body after its ``Content-Encoding`` (``gzip`` or ``deflate``, as tritonclient's
    ``request_compression_algorithm`` sends), refusing to inflate past ``limit`` bytes."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in ("gzip", "deflate"):
        raise OipInputError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if name == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise OipInputError(f"the {name} body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise OipInputError(f"the decompressed body is larger than the limit of {limit} bytes", "payload_too_large")
    if not inflater.eof:
        raise OipInputError(f"the {name} body is truncated")
    return out


def split_body(body: bytes, declared: str | None) -> ParsedBody:
    """Split a request body into its JSON header and the raw bytes of each binary input.

    ``declared``: the ``Inference-Header-Content-Length`` header (None when absent: the whole body is JSON).
    Every byte after the header must belong to exactly one input.
    """
    n = header_length(declared, len(body))
    header = parse_json(body if n is None else body[:n], n is not None)
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        return ParsedBody(header)  # the schema check says what is missing
    binary: dict[int, bytes] = {}
    offset = len(body) if n is None else n
    for i, inp in enumerate(inputs):
        size = _binary_size(inp, i)
        if size is None:
            continue
        if offset + size > len(body):
            raise OipInputError(f"input {i}: binary_data_size is {size} bytes but only {len(body) - offset} "
                                "bytes of tensor data are left in the body")
        binary[i] = body[offset:offset + size]
        offset += size
    if offset != len(body):
        raise OipInputError(f"{len(body) - offset} bytes after the inference header belong to no input "
                            "(check parameters.binary_data_size)")
    return ParsedBody(header, binary)


def element_count(shape: list[int]) -> int:
    """Elements of a tensor of this shape; 400 on a negative dimension or an absurd size."""
    if any(d < 0 for d in shape):
        raise OipInputError(f"shape {shape} has a negative dimension")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise OipInputError(f"shape {shape} is too large")
    return count


def check_datatype(datatype: str) -> None:
    if datatype not in DATATYPES:
        raise OipInputError(f"unknown datatype {datatype!r} (the protocol defines: {', '.join(DATATYPES)})")


def bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """The elements of a binary ``BYTES`` tensor: ``count`` 4-byte-length-prefixed items, nothing left over."""
    out: list[bytes] = []
    offset, size = 0, len(raw)
    while offset < size:
        if len(out) == count:
            raise OipInputError(f"the BYTES tensor has data after its {count} elements")
        if offset + 4 > size:
            raise OipInputError(f"BYTES element {len(out)}: its 4-byte length prefix is cut off")
        (length,) = _LEN.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise OipInputError(f"BYTES element {len(out)}: its length prefix says {length} bytes but only "
                                f"{size - offset} are left")
        out.append(raw[offset:offset + length])
        offset += length
    if len(out) != count:
        raise OipInputError(f"the BYTES tensor has {len(out)} elements, its shape needs {count}")
    return out


def numeric_array(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """A binary numeric tensor as a NumPy array of ``shape`` (native byte order, a private copy)."""
    check_datatype(datatype)
    dtype = DATATYPES[datatype]
    if dtype is None:
        raise OipInputError(f"datatype {datatype} has no fixed-width binary form here")
    count = element_count(shape)
    width = np.dtype(dtype).itemsize
    if len(raw) != count * width:
        raise OipInputError(f"a {datatype} tensor of shape {shape} needs {count * width} bytes "
                            f"({count} x {width}); binary_data_size is {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="), copy=True).reshape(shape)


def serialize_bytes(items: list[bytes | str]) -> bytes:
    """The binary form of a ``BYTES`` tensor (strings as UTF-8)."""
    parts: list[bytes] = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else item
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def serialize_tensor(datatype: str, data: list[Any]) -> bytes:
    """The binary form of a flat list of tensor elements of ``datatype``."""
    if datatype == "BYTES":
        return serialize_bytes(data)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise ValueError(f"no binary form for {datatype}")
    return np.asarray(data, dtype=dtype).tobytes()


def encode_response(payload: dict[str, Any], binary: set[str]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header length when any output is binary (else None).

    Each output named in ``binary`` loses its ``data`` and gains ``parameters.binary_data_size``; its bytes
    follow the JSON header in the order of ``payload["outputs"]``.
    """
    blobs: list[bytes] = []
    for out in payload.get("outputs", []):
        if out["name"] not in binary:
            continue
        blob = serialize_tensor(out["datatype"], out.pop("data"))
        out["parameters"] = {**(out.get("parameters") or {}), "binary_data_size": len(blob)}
        blobs.append(blob)
    head = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
