"""The runtime pieces under the API, without HTTP: snapshots and swaps, settings, the serve command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.api.settings import Settings
from service.cli.main import build_parser
from service.control.jobs import JobInProgress, JobManager
from service.serving.engine import Engine
from service.serving.metrics import Metrics
from service.serving.snapshot import InferenceRequest
from tests.api.conftest import MODEL, sample_images


def test_requests_admitted_under_different_snapshots_share_a_batch_but_not_a_state(tiny_store):
    engine = Engine.load(tiny_store / MODEL, Metrics(MODEL))
    images, _ = sample_images(3)
    before = engine.snapshot
    after = engine.writer.switch_profile("full")
    assert after.version == before.version + 1 and before.profile_name != "full"
    reqs = [InferenceRequest(before, pixels=images[:2]), InferenceRequest(after, pixels=images[2:])]
    out = engine.run_batch(reqs)
    assert [p.profile for p in out[0].predictions] == [before.profile_name] * 2
    assert [p.profile for p in out[1].predictions] == ["full"]
    assert out[1].predictions[0].exit_index == 10


def test_switches_persist_and_bump_the_version(tiny_store):
    model_dir = tiny_store / MODEL
    engine = Engine.load(model_dir)
    v = engine.snapshot.version
    snap = engine.writer.switch_target(max_flops_fraction=0.5)
    on_disk = json.loads((model_dir / "active.json").read_text())
    assert on_disk["version"] == v + 1 and on_disk["operating"] == snap.operating_json()
    assert Engine.load(model_dir).snapshot.operating == snap.operating  # read back after a "restart"


def test_malformed_active_json_values_fall_back_instead_of_crashing(tiny_store):
    model_dir = tiny_store / MODEL
    active = json.loads((model_dir / "active.json").read_text())
    active.update({"version": "seven", "operating": {"a": "full", "b": "full", "lam": "x"}})
    (model_dir / "active.json").write_text(json.dumps(active))
    engine = Engine.load(model_dir)
    assert engine.snapshot.version == 0 and engine.snapshot.bundle_id == active["bundle"]
    assert engine.snapshot.profile_name == engine.snapshot.bundle.default_profile


def test_jobs_are_single_flight():
    jobs = JobManager()
    first = jobs.reserve("class_means")
    with pytest.raises(JobInProgress) as err:
        jobs.reserve("class_means")
    assert err.value.job_id == first.id
    jobs.start(first, lambda job: {"ok": np.int64(1).item()})
    assert jobs.wait(first.id, 10).state == "succeeded"
    second = jobs.reserve("class_means")
    jobs.start(second, lambda job: 1 / 0)
    done = jobs.wait(second.id, 10)
    assert done.state == "failed" and done.error["code"] == "internal_error"
    assert "division" not in done.error["message"]


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CLASSMEANS_STORE", str(tmp_path))
    monkeypatch.setenv("CLASSMEANS_MODEL", "m1")
    monkeypatch.setenv("CLASSMEANS_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("CLASSMEANS_ADMIN_TOKEN", "from-the-environment-123")
    s = Settings()
    assert s.model_dir == tmp_path / "m1" and s.max_batch_size == 16
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "from-the-environment-123"
    assert "from-the-environment" not in repr(s)
    with pytest.raises(ValueError):
        Settings(queue_size=4, max_files=8)


def test_serve_command_is_registered():
    args = build_parser().parse_args(["serve", "--store", "s", "--model", "m", "--host", "0.0.0.0", "--port", "9"])
    assert (args.store, args.model, args.host, args.port) == ("s", "m", "0.0.0.0", 9)
    assert args.func.__module__ == "service.cli.serve_cmd"
