"""``/metrics``: the documented families with their labels, exit-depth buckets, and a clean promtool lint."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import AUTH, MODEL, sample_pngs

REQUIRED = {
    "classmeans_requests": ("counter", {"model", "endpoint", "status"}),
    "classmeans_request_latency_seconds": ("histogram", {"model", "endpoint"}),
    "classmeans_queue_wait_seconds": ("histogram", {"model"}),
    "classmeans_inference_seconds": ("histogram", {"model"}),
    "classmeans_batch_size": ("histogram", {"model"}),
    "classmeans_exit_depth": ("histogram", {"model", "profile"}),
    "classmeans_samples": ("counter", {"model", "profile", "exit", "rule"}),
    "classmeans_flops_per_sample": ("histogram", {"model", "profile"}),
    "classmeans_flops_spent": ("counter", {"model"}),
    "classmeans_flops_full": ("counter", {"model"}),
    "classmeans_flops_saved": ("counter", {"model"}),
    "classmeans_rejected": ("counter", {"model", "reason"}),
    "classmeans_inflight_requests": ("gauge", {"model"}),
    "classmeans_queue_depth": ("gauge", {"model"}),
    "classmeans_active_info": ("gauge", {"model", "bundle", "profile"}),
    "classmeans_active_version": ("gauge", {"model"}),
    "classmeans_profile_switches": ("counter", {"model"}),
    "classmeans_bundle_activations": ("counter", {"model"}),
    "classmeans_admin_jobs": ("counter", {"kind", "outcome"}),
    "classmeans_admin_job_duration_seconds": ("histogram", {"kind"}),
    "classmeans_up": ("gauge", {"model"}),
}


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str, **labels: str) -> float:
    return sum(s.value for s in fams[name].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_families_labels_and_movement(served):
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(sample_pngs(6))]
    assert (await served.client.post("/classify", files=files)).status_code == 200
    assert (await served.client.post("/classify?exits=off", files=files[:2])).status_code == 200
    assert (await served.client.post("/profiles", json={"name": "full"}, headers=AUTH)).status_code == 200
    r = await served.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = families(r.text)
    for name, (kind, labels) in REQUIRED.items():
        assert name in fams, name
        assert fams[name].type == kind, name
        assert fams[name].documentation, name
        sample_labels = {k for s in fams[name].samples for k in s.labels} - {"le"}
        if fams[name].samples:
            assert sample_labels == labels, (name, sample_labels)
    assert all(name.startswith("classmeans_") for name in fams)

    assert value(fams, "classmeans_requests", "classmeans_requests_total", endpoint="/classify", status="200") == 2
    assert value(fams, "classmeans_samples", "classmeans_samples_total") == 8
    assert value(fams, "classmeans_samples", "classmeans_samples_total", profile="full", exit="10") >= 2
    assert value(fams, "classmeans_batch_size", "classmeans_batch_size_count") >= 2
    spent = value(fams, "classmeans_flops_spent", "classmeans_flops_spent_total")
    full = value(fams, "classmeans_flops_full", "classmeans_flops_full_total")
    saved = value(fams, "classmeans_flops_saved", "classmeans_flops_saved_total")
    overhead = value(fams, "classmeans_flops_overhead", "classmeans_flops_overhead_total")
    assert full == pytest.approx(8 * served.state.engine.snapshot.bundle.costs.full)
    assert full - spent == pytest.approx(saved - overhead)

    buckets = [s for s in fams["classmeans_exit_depth"].samples
               if s.name.endswith("_bucket") and s.labels["profile"] == "full"]
    assert [float(s.labels["le"]) for s in buckets] == [*map(float, range(11)), float("inf")]
    assert buckets[-2].value == buckets[-1].value == 2 and buckets[9].value == 0  # all left at the head

    active = [s for s in fams["classmeans_active_info"].samples]
    assert len(active) == 1 and active[0].labels["profile"] == "full" and active[0].value == 1
    assert value(fams, "classmeans_profile_switches", "classmeans_profile_switches_total") == 1
    assert value(fams, "classmeans_up", "classmeans_up", model=MODEL) == 1
    reasons = {s.labels["reason"] for s in fams["classmeans_rejected"].samples}
    assert reasons == {"overloaded", "queue_timeout", "deadline", "shed"}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_promtool_check_metrics_is_clean(served):
    await served.client.post("/classify", files=[("file", ("a.png", sample_pngs(1)[0], "image/png"))])
    await served.client.get("/nope")
    text = (await served.client.get("/metrics")).text
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr
