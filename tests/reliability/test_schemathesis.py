"""Schemathesis against the live server's OpenAPI spec: no 5xx, every response matches its schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rel import schema
from tests.reliability.conftest import assert_passed

pytest.importorskip("schemathesis", reason="schemathesis is in the 'test' extra: pip install -e '.[test]'")


def test_openapi_fuzzing_finds_no_5xx_and_no_schema_mismatch(tiny_model: Path, tmp_path: Path) -> None:
    res = schema.run(tiny_model, tmp_path, max_examples=10)
    assert_passed(res)
