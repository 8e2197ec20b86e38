"""Multipart bodies parsed with explicit limits (files, fields, part sizes), errors in the envelope."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from service.api.errors import ApiError

MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024


@dataclass
class ParsedForm:
    files: list[UploadFile] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)

    async def close(self) -> None:
        for f in self.files:
            await f.close()


async def parse_multipart(request: Request, max_files: int, file_fields: tuple[str, ...]) -> ParsedForm:
    """Parse ``multipart/form-data`` with at most ``max_files`` file parts, named one of ``file_fields``.

    Errors: 413 ``too_many_files``; 400 ``invalid_form`` (malformed body, oversized or too many fields);
    422 ``validation_error`` (a file part under another name). The caller closes the result.
    """
    parser = MultiPartParser(request.headers, request.stream(), max_files=max_files, max_fields=MAX_FIELDS,
                             max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith("Too many files"):
            raise ApiError(413, "too_many_files", f"at most {max_files} file(s) per request") from None
        raise ApiError(400, "invalid_form", f"malformed multipart body: {exc.message}") from None
    out = ParsedForm()
    bad: list[str] = []
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            out.files.append(value)
            if key not in file_fields:
                bad.append(key)
        else:
            out.fields[key] = value
    if bad:
        await out.close()
        raise ApiError(422, "validation_error", f"unexpected file field(s) {', '.join(sorted(set(bad)))}; "
                       f"use {' or '.join(repr(f) for f in file_fields)}")
    return out


async def read_upload(upload: UploadFile, limit: int, index: int) -> bytes:
    """The bytes of one file part, refused (413) when over ``limit``."""
    size = upload.size
    if size is not None and size > limit:
        name = f" ({upload.filename!r})" if upload.filename else ""
        raise ApiError(413, "payload_too_large", f"file {index}{name} is larger than the limit of {limit} bytes")
    return await upload.read()
