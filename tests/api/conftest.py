"""Shared fixtures of the API tests: an app over a private copy of the tiny store, an httpx client over
ASGI (lifespan run by asgi-lifespan), real images (CIFAR-10 test images when ../shared has them, synthetic
otherwise), and builders for good and hostile archives."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zipfile
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from PIL import Image

from service.api import create_app
from service.api.settings import Settings
from service.api.state import AppState
from tests.factories import CIFAR_DIR, CLASSES, synthetic_images

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny"


def make_settings(store: Path, **overrides: Any) -> Settings:
    """Settings for a test app: the tiny model, a fixed token, no warm-up (fast start), 1 torch thread, no
    freezing of the heap (every test app shares this process: frozen, their garbage would never go)."""
    values: dict[str, Any] = {"store": store, "model": MODEL, "admin_token": TOKEN, "warmup": False,
                              "torch_threads": 1, "max_delay_ms": 1.0, "gc_freeze": False}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Served:
    app: FastAPI
    client: httpx.AsyncClient
    store: Path

    @property
    def state(self) -> AppState:
        return self.app.state.classmeans

    @property
    def model_dir(self) -> Path:
        return self.store / MODEL


@asynccontextmanager
async def serve(settings: Settings, raise_app_exceptions: bool = True) -> AsyncIterator[Served]:
    """Run ``create_app(settings)`` with its lifespan and yield a client bound to it."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=raise_app_exceptions)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield Served(app, client, Path(settings.store))


@pytest.fixture()
async def served(tiny_store: Path) -> AsyncIterator[Served]:
    """The app serving a private copy of the tiny store."""
    async with serve(make_settings(tiny_store)) as s:
        yield s


# -- images --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _cifar_test() -> tuple[np.ndarray, np.ndarray] | None:
    path = CIFAR_DIR / "test.npz"
    if not path.is_file():
        return None
    with np.load(path) as d:
        return d["images"][:2000].copy(), d["labels"][:2000].copy()


def sample_images(n: int, per_class: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` real images (CIFAR-10 test set) when available, else synthetic ones: ``(images, labels)``.

    With ``per_class``, ``n`` images of *each* class, labels in ``CLASSES`` order.
    """
    real = _cifar_test()
    if real is None:
        data = synthetic_images(n * len(CLASSES) if per_class else n, seed=7)
        images, labels = data.images, data.labels
    else:
        images, labels = real
    if not per_class:
        return images[:n], labels[:n]
    idx = np.concatenate([np.nonzero(labels == k)[0][:n] for k in range(len(CLASSES))])
    return images[idx], labels[idx]


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def sample_pngs(n: int) -> list[bytes]:
    images, _ = sample_images(n)
    return [png_bytes(im) for im in images]


def truncated_png() -> bytes:
    data = sample_pngs(1)[0]
    return data[: len(data) // 2]


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny PNG whose header declares ``side x side`` pixels (a decompression bomb)."""
    data = bytearray(png_bytes(np.zeros((4, 4, 3), dtype=np.uint8)))
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="TIFF")
    return buf.getvalue()


# -- archives ------------------------------------------------------------------------------------------

def dataset_members(per_class: int, classes: list[str] | None = None) -> dict[str, bytes]:
    """``class/i.png`` members from real images, ``per_class`` per class."""
    images, labels = sample_images(per_class, per_class=True)
    names = classes or CLASSES
    counters: dict[int, int] = {}
    out = {}
    for im, y in zip(images, labels, strict=True):
        k = int(y)
        if k >= len(names):
            continue
        i = counters.get(k, 0)
        counters[k] = i + 1
        out[f"{names[k]}/{i:03d}.png"] = png_bytes(im)
    return out


def make_zip(members: dict[str, bytes], symlinks: dict[str, str] | None = None, dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK
            zf.writestr(info, target)
    return buf.getvalue()


def make_targz(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def zip_bomb(member_bytes: int = 64 << 20) -> bytes:
    """A zip whose one image member inflates to ``member_bytes`` zeros (ratio ~1000:1)."""
    members = dict(dataset_members(1))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{CLASSES[0]}/bomb.png", b"\0" * member_bytes)
    return buf.getvalue()


# -- store checks --------------------------------------------------------------------------------------

def store_digest(store: Path) -> dict[str, str]:
    """Every file under the store with its sha256: equal before and after means 'the store is unchanged'.
    Job records and lock files (``<model>/jobs``, ``<model>/locks``) are bookkeeping, not state, and left out."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*"))
            if p.is_file() and not {"jobs", "locks"} & set(p.relative_to(store).parts[1:2])}


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the error envelope with this status and code, and leaks no traceback."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) >= {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body
