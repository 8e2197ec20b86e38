"""The admin plane: token handling, class-means uploads (good and hostile), jobs, bundles and roll-back."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import time

import pytest

from service.store.bundles import list_bundle_ids
from tests.api.conftest import (
    AUTH,
    MODEL,
    TOKEN,
    assert_envelope,
    dataset_members,
    make_settings,
    make_targz,
    make_zip,
    sample_pngs,
    serve,
    store_digest,
    zip_bomb,
)

FAST = {"samples": 200}  # a small threshold search keeps the jobs quick


async def wait_job(client, job_id: str, timeout_s: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = await client.get(f"/admin/jobs/{job_id}", headers=AUTH)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["state"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


async def upload(client, archive: bytes, ctype: str = "application/zip", **params) -> object:
    return await client.post("/admin/class-means", content=archive, params={**FAST, **params},
                             headers={**AUTH, "content-type": ctype})


async def test_upload_computes_and_activates_a_new_bundle(served):
    old = served.state.engine.snapshot
    r = await upload(served.client, make_zip(dataset_members(20)), filename="cifar-small.zip")
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/admin/jobs/{job['id']}" and job["state"] in ("running", "succeeded")
    job = await wait_job(served.client, job["id"])
    assert job["state"] == "succeeded", job
    new_id = job["result"]["bundle"]
    assert job["result"]["activated"] is True and job["result"]["num_images"] == 200
    assert job["result"]["heads"]["reduction"] == old.bundle.config["heads"][0]["reduction"]
    snap = served.state.engine.snapshot
    assert snap.bundle_id == new_id != old.bundle_id and snap.version == old.version + 1
    assert json.loads((served.model_dir / "active.json").read_text())["bundle"] == new_id
    listing = (await served.client.get("/admin/bundles", headers=AUTH)).json()
    assert [b["id"] for b in listing["bundles"] if b["active"]] == [new_id]
    assert {b["id"] for b in listing["bundles"]} == {old.bundle_id, new_id}
    c = (await served.client.post("/classify", files=[("file", ("a.png", sample_pngs(1)[0], "image/png"))])).json()
    assert c["bundle"] == new_id
    m = served.state.metrics
    assert m.jobs.labels("class_means", "succeeded")._value.get() == 1
    assert m.bundle_activations.labels(MODEL)._value.get() == 1
    assert m.active_info.labels(MODEL, new_id, snap.profile_name)._value.get() == 1
    assert (MODEL, old.bundle_id, old.profile_name) not in {
        tuple(s.labels.values()) for s in m.active_info.collect()[0].samples}

    # Roll back to the old bundle, then forward again with a named profile.
    r = await served.client.post(f"/admin/bundles/{old.bundle_id}/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["bundle"] == old.bundle_id and r.json()["previous"]["bundle"] == new_id
    r = await served.client.post(f"/admin/bundles/{new_id}/activate", params={"profile": "full"}, headers=AUTH)
    assert r.json()["active"]["name"] == "full"


async def test_stage_only_multipart_tar_gz(served):
    old = served.state.engine.snapshot
    archive = make_targz(dataset_members(10))
    r = await served.client.post("/admin/class-means", params={**FAST, "activate": "false", "holdout": 0.2},
                                 files={"file": ("data.tar.gz", archive, "application/gzip")}, headers=AUTH)
    assert r.status_code == 202, r.text
    job = await wait_job(served.client, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["result"]["activated"] is False and job["options"]["filename"] == "data.tar.gz"
    assert job["result"]["num_selection"] == 20 and job["result"]["num_means"] == 80
    assert served.state.engine.snapshot is old
    assert job["result"]["bundle"] in list_bundle_ids(served.model_dir)


async def test_a_class_too_small_for_the_holdout_fails_the_job_and_changes_nothing(served):
    before, snap = store_digest(served.store), served.state.engine.snapshot
    r = await upload(served.client, make_zip(dataset_members(1)))
    assert r.status_code == 202
    job = await wait_job(served.client, r.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "too_few_samples", job
    assert "holdout" in job["error"]["message"]
    assert store_digest(served.store) == before and served.state.engine.snapshot is snap
    assert served.state.metrics.jobs.labels("class_means", "failed")._value.get() == 1


async def test_a_job_failing_late_removes_its_bundle(served, monkeypatch):
    before, snap = store_digest(served.store), served.state.engine.snapshot
    engine = served.state.engine

    def broken_activation(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine.writer, "activate_bundle", broken_activation)
    r = await upload(served.client, make_zip(dataset_members(5)), holdout=0.2)
    job = await wait_job(served.client, r.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "internal_error"
    assert "fire" not in json.dumps(job)
    assert store_digest(served.store) == before and served.state.engine.snapshot is snap


def _bad_archives() -> list[tuple[str, bytes, str, int, str]]:
    good = dataset_members(2)
    one = {k: v for k, v in list(good.items())[:1]}
    png = next(iter(good.values()))
    return [
        ("dot-dot member", make_zip({**good, "../evil.png": png}), "application/zip", 422, "unsafe_archive_member"),
        ("absolute member", make_zip({**good, "/etc/evil.png": png}), "application/zip", 422,
         "unsafe_archive_member"),
        ("zip symlink", make_zip(good, symlinks={"cat/link.png": "/etc/passwd"}), "application/zip", 422,
         "unsafe_archive_member"),
        ("tar symlink", make_targz(good, symlinks={"cat/link.png": "../../etc/passwd"}), "application/gzip", 422,
         "unsafe_archive_member"),
        ("zip bomb", zip_bomb(), "application/zip", 413, "archive_bomb"),
        ("classes not the model's", make_zip(dataset_members(2, classes=["cat", "dog", "zebra"])), "application/zip",
         422, "class_set_mismatch"),
        ("a class with no images", make_zip({k: v for k, v in good.items() if not k.startswith("truck/")},
                                            dirs=("truck/",)), "application/zip", 422, "invalid_dataset_layout"),
        ("bad image inside", make_zip({**good, "cat/bad.png": b"not an image"}), "application/zip", 422,
         "invalid_dataset_image"),
        ("not an archive", b"this is not an archive at all", "application/zip", 415, "unsupported_archive"),
        ("wrong content type", make_zip(one), "text/plain", 415, "unsupported_media_type"),
    ]


BAD = _bad_archives()


@pytest.mark.parametrize(("name", "archive", "ctype", "status", "code"), BAD, ids=[b[0] for b in BAD])
async def test_bad_archive_is_refused_and_changes_nothing(served, name, archive, ctype, status, code):
    before, snap = store_digest(served.store), served.state.engine.snapshot
    r = await upload(served.client, archive, ctype=ctype)
    assert_envelope(r, status, code)
    assert store_digest(served.store) == before and served.state.engine.snapshot is snap
    assert served.state.jobs.active is None  # the slot is free again
    jobs = (await served.client.get("/admin/jobs", headers=AUTH)).json()["jobs"]
    assert jobs[-1]["state"] == "failed" and jobs[-1]["error"]["code"] == code


async def test_upload_over_the_cap_is_413_before_parsing(tiny_store):
    async with serve(make_settings(tiny_store, max_upload_bytes=50_000)) as s:
        before = store_digest(s.store)
        archive = make_zip(dataset_members(20))
        assert len(archive) > 50_000
        r = await upload(s.client, archive)
        assert_envelope(r, 413, "payload_too_large")

        async def chunks():
            for i in range(0, len(archive), 16384):
                yield archive[i:i + 16384]
        r = await s.client.post("/admin/class-means", content=chunks(),
                                headers={**AUTH, "content-type": "application/zip"})
        assert_envelope(r, 413, "payload_too_large")
        assert store_digest(s.store) == before and s.state.jobs.active is None


async def test_one_job_at_a_time(served):
    running = served.state.jobs.reserve("class_means")  # as if an upload were in progress
    r = await upload(served.client, make_zip(dataset_members(2)))
    body = assert_envelope(r, 409, "job_in_progress")
    assert r.headers["Location"] == f"/admin/jobs/{running.id}" and body["error"]["job_id"] == running.id
    served.state.jobs.fail(running, "cancelled", "test")
    r = await served.client.get(f"/admin/jobs/{running.id}", headers=AUTH)
    assert r.json()["state"] == "failed"


async def test_admin_lookups_and_validation(served):
    assert_envelope(await served.client.get("/admin/jobs/nope", headers=AUTH), 404, "job_not_found")
    assert_envelope(await served.client.post("/admin/bundles/20990101T000000-ffffff/activate", headers=AUTH), 404,
                    "bundle_not_found")
    assert_envelope(await served.client.post("/admin/bundles/..%2Fetc/activate", headers=AUTH), 404, "not_found")
    assert_envelope(await served.client.post("/admin/bundles/.hidden/activate", headers=AUTH), 404,
                    "bundle_not_found")
    bid = served.state.engine.snapshot.bundle_id
    assert_envelope(await served.client.post(f"/admin/bundles/{bid}/activate", params={"profile": "x"},
                                             headers=AUTH), 404, "profile_not_found")
    for params in ({"holdout": 1.5}, {"search": "magic"}, {"metric": "cosine"}, {"reduction": "../x"}):
        r = await upload(served.client, b"", **params)
        assert_envelope(r, 422, "validation_error")


async def test_activating_a_corrupt_bundle_is_refused(served):
    bid = served.state.engine.snapshot.bundle_id
    other = "20000101T000000-bbbbbb"
    import shutil

    shutil.copytree(served.model_dir / "bundles" / bid, served.model_dir / "bundles" / other)
    (served.model_dir / "bundles" / other / "tensors.safetensors").write_bytes(b"junk")
    before, snap = store_digest(served.store), served.state.engine.snapshot
    assert_envelope(await served.client.post(f"/admin/bundles/{other}/activate", headers=AUTH), 422,
                    "invalid_bundle")
    assert store_digest(served.store) == before and served.state.engine.snapshot is snap
    listing = (await served.client.get("/admin/bundles", headers=AUTH)).json()
    assert {b["id"] for b in listing["bundles"]} == {bid, other}


@pytest.mark.parametrize("path", ["/admin/bundles", "/admin/jobs", "/admin/jobs/x"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-token-at-all"},
                                     {"Authorization": f"Basic {TOKEN}"}], ids=["missing", "wrong", "basic"])
async def test_admin_routes_need_the_token(served, path, headers):
    r = await served.client.get(path, headers=headers)
    assert_envelope(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"


async def test_upload_needs_the_token_before_anything_is_read(served):
    before = store_digest(served.store)
    r = await served.client.post("/admin/class-means", content=make_zip(dataset_members(2)),
                                 headers={"content-type": "application/zip"})
    assert_envelope(r, 401, "unauthorized")
    assert store_digest(served.store) == before and served.state.jobs.list() == []


async def test_generated_token_is_stored_0600_logged_once_and_reused(tiny_store, caplog):
    settings = make_settings(tiny_store, admin_token=None)
    with caplog.at_level(logging.WARNING, logger="classmeans.auth"):
        async with serve(settings) as s:
            token = s.state.token
            assert len(token) >= 32
            path = tiny_store / ".admin_token"
            assert path.read_text().strip() == token
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert (await s.client.get("/admin/bundles")).status_code == 401
            r = await s.client.get("/admin/bundles", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
    assert sum(token in rec.getMessage() for rec in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="classmeans.auth"):
        async with serve(settings) as s:
            assert s.state.token == token
    assert not any(token in rec.getMessage() for rec in caplog.records)


def test_weak_configured_token_is_refused(tiny_store):
    with pytest.raises(ValueError):
        make_settings(tiny_store, admin_token="short")
    assert make_settings(tiny_store, admin_token="   ").admin_token is None



async def test_an_upload_of_the_backbones_training_data_is_refused_unless_allowed(tiny_store):
    """The archive's name is checked against model.json's training record, as `classmeans calibrate` does: the
    same data fails the job and changes nothing; ``allow_overlap=true`` calibrates and labels the bundle."""
    spec_path = tiny_store / MODEL / "model.json"
    spec = json.loads(spec_path.read_text())
    spec.setdefault("extra", {})["training_data"] = {
        "source": "trained-on.zip", "images": 200, "held_out": 0, "split": "stratified split_holdout", "seed": 0}
    spec_path.write_text(json.dumps(spec))
    async with serve(make_settings(tiny_store)) as s:
        before, snap = store_digest(s.store), s.state.engine.snapshot
        archive = make_zip(dataset_members(20))
        job = await wait_job(s.client, (await upload(s.client, archive, filename="trained-on.zip")).json()["id"])
        assert job["state"] == "failed" and job["error"]["code"] == "selection_overlaps_training", job
        assert store_digest(s.store) == before and s.state.engine.snapshot is snap

        r = await upload(s.client, archive, filename="trained-on.zip", allow_overlap="true", activate="false")
        job = await wait_job(s.client, r.json()["id"])
        assert job["state"] == "succeeded", job
        assert job["result"]["estimate"]["overlaps_training"] is True and job["result"]["warnings"]
        meta = json.loads((s.model_dir / "bundles" / job["result"]["bundle"] / "bundle.json").read_text())
        assert meta["estimate"]["overlaps_training"] is True and "OVERLAPS" in meta["estimate"]["label"]

        # another archive is disjoint; an unnamed upload is "source unknown", never called disjoint
        job = await wait_job(s.client, (await upload(s.client, archive, filename="other.zip",
                                                     activate="false")).json()["id"])
        assert job["result"]["estimate"]["overlaps_training"] is False, job
        job = await wait_job(s.client, (await upload(s.client, archive, activate="false")).json()["id"])
        assert job["result"]["estimate"]["overlaps_training"] is None, job
