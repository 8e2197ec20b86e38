"""With the queue full, exactly the surplus requests get 503 ``overloaded`` with ``Retry-After``."""

from __future__ import annotations

from pathlib import Path

from bench.rel import overload
from tests.reliability.conftest import assert_passed


def test_exactly_the_surplus_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    res = overload.run(tiny_model, tmp_path, queue_size=8, surplus=24)
    assert_passed(res)
    assert res.figures["overloaded_503"] == 24 and res.figures["ok_200"] == 8
