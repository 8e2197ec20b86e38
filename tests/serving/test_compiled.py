"""The compiled (ONNX Runtime) cascade engine gives the reference engine's answers: every decision mode, batch 1,
uniform and mixed-policy batches; the torch fallback; build and run-time failures; the default model on CIFAR-10."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from service.backbones import StagedNetwork, profile_stages
from service.backbones.internal_classifiers import ics_for
from service.backbones.preprocess import Normalizer
from service.earlyexit import ExitHead
from service.earlyexit.ic_rules import entropy
from service.earlyexit.policy import ExitPolicy, class_means_policy, ic_policy
from service.serving.cascade import CascadeRunner
from service.serving.compiled import (
    CompiledCascadeRunner,
    EngineBuildError,
    EngineFailed,
    SegmentKey,
    build_runner,
    measure_segment_times,
    plan_for,
)
from service.serving.compiled.fused_heads import FusedClassMeans, FusedIC
from service.serving.compiled.sessions import build_cpu_seconds
from service.store.bundle_model import load_bundle
from service.store.bundles import read_active
from service.store.ic_sets import ic_costs
from service.store.model_dir import load_model
from tests.factories import CIFAR_DIR, REPO, RESNET56, synthetic_images
from tests.serving.compiled_checks import ClassMeansTable, differing_rows, near_ties

MODES = ("cm", "ic_prob", "ic_entropy", "combined")


@pytest.fixture(scope="module")
def setup(tiny_store_root):
    """A random ResNet-20 with its calibrated class means, random ICs (sharpened), 48 normalised images, and a
    policy per decision mode with thresholds at quantiles of the reference scores (every exit family fires)."""
    model_dir = tiny_store_root / "tiny"
    spec, net = load_model(model_dir)
    bundle = load_bundle(model_dir, read_active(model_dir)["bundle"], spec, net.num_exits)
    profile = profile_stages(net)
    ics = ics_for(profile, len(spec.classes), seed=0)
    with torch.no_grad():
        for ic in ics.ics:
            ic.linear.weight.mul_(8.0)
    x = Normalizer(spec.mean, spec.std)(synthetic_images(48, seed=5).images)
    ref = CascadeRunner(net, bundle.heads, ics)
    with torch.inference_mode():
        feats = net.run_stages(x)
        cm_top = torch.stack([bundle.heads[j].probabilities(feats[j]).max(1).values for j in range(net.num_exits - 1)])
        qs = [torch.softmax(ics[i](feats[e]), 1) for i, e in enumerate(ics.exits)]
    ic_top = torch.stack([q.max(1).values for q in qs])
    ic_ent = torch.stack([entropy(q) for q in qs])
    t_cm = torch.full((net.num_exits - 1,), 1.0)
    t_cm[1::3] = cm_top[1::3].quantile(0.8, dim=1)
    costs = ic_costs(profile, ics, {e: bundle.heads[e] for e in ics.exits})
    cum = bundle.costs.backbone_cum
    policies = {
        "cm": class_means_policy("cm-q", t_cm, bundle.costs),
        "ic_prob": ic_policy("ic-q", "ic_prob", ic_top.quantile(0.8, dim=1), ics.exits, costs, cum),
        "ic_entropy": ic_policy("ent-q", "ic_entropy", ic_ent.quantile(0.2, dim=1), ics.exits, costs, cum),
        "combined": ic_policy("comb-q", "combined", torch.stack([ic_top.quantile(0.9, dim=1),
                                                                  cm_top[list(ics.exits)].quantile(0.9, dim=1)]),
                              ics.exits, costs, cum),
    }
    return {"net": net, "bundle": bundle, "ics": ics, "x": x, "ref": ref, "policies": policies}


@pytest.fixture(scope="module")
def compiled(setup):
    runner = CompiledCascadeRunner(setup["net"], setup["bundle"].heads, setup["ics"])
    runner.prepare(list(setup["policies"].values()))
    return runner


def test_plan_is_one_segment_per_enabled_exit(setup):
    policy = setup["policies"]["cm"]
    plan = plan_for(policy)
    enabled = [j for j, s in enumerate(policy.plan) if s is not None]
    assert [s.exit_index for s in plan.stops] == [*enabled, policy.num_exits - 1]
    assert plan.stops[0].key == SegmentKey("main", 0, enabled[0], ("cm",))
    assert all(a.key.end + 1 == b.key.start for a, b in zip(plan.stops, plan.stops[1:], strict=False))
    assert plan.stops[-1].key.final
    comb = plan_for(setup["policies"]["combined"])
    assert {s.key.heads for s in comb.stops[:-1]} == {("cm", "ic")}
    off = class_means_policy("off", [1.0] * (policy.num_exits - 1), setup["bundle"].costs)
    assert plan_for(off).segment_keys() == [SegmentKey("main", 0, policy.num_exits - 1, ("final",))]


@pytest.mark.parametrize("metric", ["euclidean", "diag", "lda"])
def test_fused_class_means_head_equals_eager(metric):
    g = torch.Generator().manual_seed(1)
    d, k = 32 * 4 * 4, 10
    p = k - 1 if metric == "lda" else d
    head = ExitHead("pool4", metric, torch.randn(k, p, generator=g), torch.rand(k, generator=g) + 0.5,
                    scale=torch.rand(d, generator=g) + 0.5 if metric == "diag" else None,
                    projection=torch.randn(d, p, generator=g) / 10 if metric == "lda" else None, temperature=0.25)
    x = torch.randn(5, 32, 16, 16, generator=g)
    with torch.inference_mode():
        assert torch.allclose(FusedClassMeans(head, (32, 16, 16))(x), head.probabilities(x), atol=1e-5, rtol=0)


def test_fused_ic_equals_eager(setup):
    ics = setup["ics"]
    feats = setup["net"].run_stages(setup["x"][:4])
    with torch.inference_mode():
        for i, e in enumerate(ics.exits):
            want = torch.softmax(ics[i](feats[e]), 1)
            assert torch.allclose(FusedIC(ics[i])(feats[e]), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_served_equals_reference(setup, compiled, mode):
    policy, ref, x = setup["policies"][mode], setup["ref"], setup["x"]
    near = near_ties(ref, policy, x)
    batch = compiled.run(x, policy)
    want = ref.run(x, policy)
    assert differing_rows(batch, want, near) <= 1
    exits = set(want.exit_index.tolist())
    assert len(exits) >= 3, f"thresholds should make rows leave at several exits: {exits}"
    for i in range(12):  # batch 1: the reference's scalar path
        one, ref_one = compiled.run(x[i:i + 1], policy), ref.run(x[i:i + 1], policy)
        assert differing_rows(one, ref_one, near[i:i + 1]) == 0 or bool(near[i])
    assert compiled.failures == 0


def test_mixed_policy_batch(setup, compiled):
    ref, x = setup["ref"], setup["x"]
    full = class_means_policy("full", [1.0] * (setup["net"].num_exits - 1), setup["bundle"].costs)
    compiled.prepare([full])
    choice: list[ExitPolicy] = [*setup["policies"].values(), full]
    rows = [choice[i % len(choice)] for i in range(x.shape[0])]
    near = torch.zeros(x.shape[0], dtype=torch.bool)
    for p in choice:
        mine = torch.tensor([r is p for r in rows])
        near[mine] = near_ties(ref, p, x[mine])
    builds = compiled.sessions.builds
    got, want = compiled.run(x, rows), ref.run(x, rows)
    assert differing_rows(got, want, near) <= 1
    assert compiled.sessions.builds == builds, "prepared sessions only"
    assert (got.exit_index[len(choice) - 1::len(choice)] == setup["net"].num_exits - 1).all()


def test_sessions_are_lazy_and_bounded(setup):
    runner = CompiledCascadeRunner(setup["net"], setup["bundle"].heads, setup["ics"], max_sessions=2)
    policy = setup["policies"]["cm"]
    assert len(runner.sessions) == 0
    want = setup["ref"].run(setup["x"][:8], policy)
    differing_rows(runner.run(setup["x"][:8], policy), want, near_ties(setup["ref"], policy, setup["x"][:8]))
    assert len(runner.sessions) <= 2 and runner.sessions.evictions >= 1
    with pytest.raises(ValueError, match="no internal classifier"):
        CompiledCascadeRunner(setup["net"], setup["bundle"].heads).run(setup["x"][:2], setup["policies"]["ic_prob"])


def test_missing_sessions_never_stall_a_batch(setup):
    """missing="reference": a batch whose sessions are not built is answered by the reference engine at once
    while a background thread builds them; once built, the compiled engine serves, with the same answers."""
    runner = CompiledCascadeRunner(setup["net"], setup["bundle"].heads, setup["ics"], missing="reference")
    policy, x = setup["policies"]["cm"], setup["x"][:8]
    want = setup["ref"].run(x, policy)
    build_cpu = build_cpu_seconds()
    first = runner.run(x, policy)
    assert runner.reference_batches == 1
    assert torch.equal(first.exit_index, want.exit_index) and torch.equal(first.pred, want.pred)
    assert runner.builder.wait_idle(timeout=600)
    assert build_cpu_seconds() > build_cpu  # the builds' CPU is counted apart (the autopilot leaves it out)
    assert all(k in runner.sessions for k in runner.plan(policy).segment_keys())
    again = runner.run(x, policy)
    assert runner.reference_batches == 1  # served compiled now
    differing_rows(again, want, near_ties(setup["ref"], policy, x))
    assert runner.info()["building"] == 0 and runner.info()["uncompilable_segments"] == {}


def test_injected_run_time_failure_reruns_on_reference(setup, compiled, monkeypatch, caplog):
    policy, x = setup["policies"]["combined"], setup["x"]
    key = plan_for(policy).stops[1].key
    session = compiled.sessions.get(key)

    def boom(*args, **kwargs):
        raise RuntimeError("injected ORT failure")

    monkeypatch.setattr(session, "run", boom)
    before = compiled.failures
    got, want = compiled.run(x, policy), setup["ref"].run(x, policy)
    for name in ("exit_index", "pred", "confidence", "probs", "flops", "rule"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert compiled.failures == before + 1 and "injected" in (compiled.last_failure or "")
    assert "re-run on the reference engine" in caplog.text
    monkeypatch.setattr(compiled, "on_failure", "raise")
    with pytest.raises(EngineFailed) as err:
        compiled.run(x, policy)
    assert err.value.code == "engine_failed" and err.value.status == 503


def test_lazy_build_failure_at_run_time_reruns_on_reference(setup, monkeypatch):
    runner = CompiledCascadeRunner(setup["net"], setup["bundle"].heads, setup["ics"])

    def broken(key):
        raise EngineBuildError(f"cannot compile segment {key.label()}", segment=key.label())

    monkeypatch.setattr(runner.sessions, "_build", broken)
    policy, x = setup["policies"]["ic_entropy"], setup["x"][:6]
    got, want = runner.run(x, policy), setup["ref"].run(x, policy)
    assert torch.equal(got.exit_index, want.exit_index) and torch.equal(got.pred, want.pred)
    assert runner.failures == 1


class _NumpyStage(nn.Module):
    """A stage that leaves torch (same values: ReLU of a ReLU), which tracing would bake in as a constant."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return torch.from_numpy(np.maximum(y.detach().numpy(), 0.0))


@torch.library.custom_op("classmeans_test::double_relu", mutates_args=())
def _double_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(torch.relu(x))


@_double_relu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOpStage(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _double_relu(self.inner(x))


@pytest.mark.parametrize("wrapper", [_NumpyStage, _CustomOpStage])
def test_unexportable_stage_falls_back_or_fails_naming_it(setup, wrapper):
    net: StagedNetwork = setup["net"]
    stages = list(net.stages)
    stages[3] = wrapper(stages[3])
    bad = StagedNetwork(net.module, stages, list(net.stage_names), net.head, net.input_size)
    heads = setup["bundle"].heads
    runner, info = build_runner("auto", bad, heads, None, threads=1)
    assert isinstance(runner, CascadeRunner) and info["engine"] == "torch" and info["requested"] == "auto"
    assert net.stage_names[3] in info["reason"] and info["failed_stage"] == net.stage_names[3]
    with pytest.raises(EngineBuildError) as err:
        build_runner("onnx", bad, heads, None, threads=1)
    assert err.value.stage == net.stage_names[3] and net.stage_names[3] in str(err.value)
    assert err.value.code == "engine_build_failed"
    good, info = build_runner("auto", net, heads, None, threads=1, policies=[setup["policies"]["cm"]])
    assert isinstance(good, CompiledCascadeRunner) and info["engine"] == "onnx" and info["reason"] is None
    assert build_runner("torch", net, heads)[1]["engine"] == "torch"


def test_measure_segment_times(setup, compiled):
    policy = setup["policies"]["cm"]
    out = measure_segment_times(compiled, [policy], batch_sizes=(1, 4), repeats=3, include_bare=True)
    labels = [k.label() for k in plan_for(policy).segment_keys()]
    assert all(lab in out["segments"] for lab in labels)
    assert len(out["segments"]) == 2 * len(labels) - 1
    for row in out["segments"].values():
        assert set(row["seconds"]) == {1, 4} and all(v > 0 for v in row["seconds"].values())


@pytest.mark.cifar
def test_default_model_served_equals_reference_on_cifar10():
    """Every profile of the default model's active bundle, first 500 CIFAR-10 test images: the same exit and
    prediction for >= 99.9 % of the rows, every difference a threshold (or argmax) tie. The reference decisions
    come from one eager pass (:class:`ClassMeansTable`); the runner itself is compared at two profiles."""
    from service.ingest.npz import load_npz
    from service.store.active import resolve_bundle

    model_dir = REPO / "model_store" / RESNET56
    spec, net = load_model(model_dir)
    bundle = resolve_bundle(model_dir, spec, net.num_exits, None)
    test = load_npz(CIFAR_DIR / "test.npz", limit=500)
    x = Normalizer(spec.mean, spec.std)(test.images)
    ref = CascadeRunner(net, bundle.heads)
    table = ClassMeansTable(ref, x)
    runner = CompiledCascadeRunner(net, bundle.heads)
    policies = [class_means_policy(p.name, p.thresholds, bundle.costs) for p in bundle.profiles]
    runner.prepare(policies)
    differ = ties = rows = 0
    for policy in policies:
        got = runner.run(x, policy)
        exit_index, pred, near = table.decide(policy)
        bad = (got.exit_index != exit_index) | (got.pred != pred)
        assert not bool((bad & ~near).any()), f"{policy.name}: rows {torch.nonzero(bad & ~near).flatten().tolist()}"
        differ += int(bad.sum())
        ties += int(near.sum())
        rows += x.shape[0]
    assert differ <= 0.001 * rows, f"{differ} of {rows} rows differ ({ties} near a tie)"
    active = read_active(model_dir)["operating"]["a"]
    for policy in (p for p in policies if p.name in (active, "full")):
        differing_rows(runner.run(x, policy), ref.run(x, policy), table.decide(policy)[2])
    assert runner.failures == 0


def test_the_engine_writes_nothing_outside_its_store(tmp_path):
    """ONNX Runtime's telemetry writes a device id under ~/.cache when imported; the package turns it off first."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    code = ("import service.serving.compiled as c, onnxruntime, os; "
            "assert os.environ['ORT_DISABLE_TELEMETRY'] == '1'")
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=300)
    assert list(home.rglob("*")) == []
