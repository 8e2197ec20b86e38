from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import CIFAR_DIR, make_tiny_store


def pytest_collection_modifyitems(config, items):
    if (CIFAR_DIR / "test.npz").is_file():
        return
    skip = pytest.mark.skip(reason=f"CIFAR-10 not found at {CIFAR_DIR} (it lives in ../shared, absent on "
                                   "a user's machine)")
    for item in items:
        if "cifar" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_store_root(tmp_path_factory) -> Path:
    """A model store with one tiny calibrated model (``tiny``); copy it before mutating."""
    root = tmp_path_factory.mktemp("store")
    make_tiny_store(root)
    return root


def _private_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture()
def tiny_store(tiny_store_root, tmp_path) -> Path:
    """A private, mutable copy of the tiny model store; returns the store root."""
    return _private_copy(tiny_store_root, tmp_path / "store")


@pytest.fixture(scope="session")
def tiny_ic_store_root(tiny_store_root, tmp_path_factory) -> Path:
    """The tiny store plus trained internal classifiers and their profiles; copy it before mutating."""
    import shutil

    from tests.factories import add_tiny_ics

    root = tmp_path_factory.mktemp("ic-store")
    shutil.copytree(tiny_store_root, root, dirs_exist_ok=True)
    add_tiny_ics(root / "tiny")
    return root


@pytest.fixture()
def tiny_ic_store(tiny_ic_store_root, tmp_path) -> Path:
    """A private, mutable copy of the tiny store with ICs; returns the store root."""
    return _private_copy(tiny_ic_store_root, tmp_path / "ic-store")
