"""The compiled cascade runner: the reference :class:`~service.serving.cascade.CascadeRunner`'s interface and
answers, computed by ONNX Runtime one segment per enabled exit.

For one policy (:meth:`CompiledCascadeRunner.run`): the batch enters the first segment of the policy's
:class:`~service.serving.compiled.segments.SegmentPlan`; at each stop the heads' probabilities come back with
the feature, the exit rule (Eq. 6-7: ``score > T``, strictly; ``T >= 1`` -- ``>= 0`` for the negative
entropy -- disables) is applied in torch exactly as the reference engine applies it (same comparisons, same
``entropy``), rows that fire leave with their predictor's argmax, and only the rows that go on are fed to the
next segment (compaction). Rows that reach the end take the network head's softmax. FLOPs are the policy's
table (backbone plus every head consulted), summed in the reference engine's order, so they are identical.

A batch that mixes policies is split by policy and each group runs its own plan (every session it needs was
built by :meth:`~CompiledCascadeRunner.prepare`); the answers are put back in row order.

Failure at run time never returns a wrong answer: when a session call (or a lazy session build) raises, the
whole batch is re-run on the reference engine with a logged warning and ``failures`` counted
(``on_failure="reference"``, the default), or :class:`~service.serving.compiled.errors.EngineFailed`
(``engine_failed``, 503) is raised (``on_failure="raise"``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from service.backbones import StagedNetwork
from service.backbones.internal_classifiers import ICSet
from service.earlyexit import ExitHead
from service.earlyexit.ic_rules import RULE_NAMES, entropy
from service.earlyexit.modes import CM_HEAD, IC_HEAD
from service.earlyexit.policy import FINAL_RULE, ExitPolicy, rule_index
from service.serving.cascade import CascadeRunner, ExitResult, distinct_policies
from service.serving.compiled.errors import EngineBuildError, EngineFailed
from service.serving.compiled.export import OPSET, SegmentModule, SessionConfig, build_segment
from service.serving.compiled.fused_heads import FinalSoftmax, FusedClassMeans, FusedIC
from service.serving.compiled.segments import DEFAULT_NETWORK, SegmentKey, SegmentPlan, plan_for
from service.serving.compiled.sessions import BackgroundBuilder, SessionCache

log = logging.getLogger("classmeans.engine")

_IC, _CM, _BOTH = (RULE_NAMES.index(r) for r in ("ic", "cm", "ic+cm"))
ON_FAILURE = ("reference", "raise")
MISSING = ("build", "reference")


class _RunFailure(Exception):
    """An ONNX Runtime call (or a lazy build) failed for segment ``key``."""

    def __init__(self, key: SegmentKey, exc: BaseException) -> None:
        super().__init__(f"segment {key.label()}: {type(exc).__name__}: {exc}")
        self.key = key


class CompiledCascadeRunner:
    """``CascadeRunner(net, cm_heads, ics)`` compiled to ONNX Runtime segments; same ``run`` and results.

    Keyword options: ``threads`` (ORT intra-op threads per call, default 1), ``max_sessions`` (LRU bound of
    the session cache), ``on_failure`` (``"reference"``: re-run a failed batch on the torch engine;
    ``"raise"``: :class:`EngineFailed`), ``network`` (this network's id in segment keys), ``optimization``
    (ORT graph optimisation level: ``all``, ``basic``, ``none``), ``policies`` (:meth:`prepare` them now, so
    that ``Catalog.build`` can build every session when a bundle is activated, off the hot path), ``missing``
    (what a batch does when a session it needs is not built yet: ``"build"`` builds it there, on the hot
    path; ``"reference"`` serves the batch on the reference engine and has a background thread build it, so
    that no request ever waits for an export: the serving default).
    """

    engine = "onnx"

    def __init__(self, net: StagedNetwork, cm_heads: dict[int, ExitHead], ics: ICSet | None = None, *,
                 threads: int = 1, max_sessions: int = 256, on_failure: str = "reference",
                 network: str = DEFAULT_NETWORK, optimization: str = "all",
                 policies: Sequence[ExitPolicy] | None = None, missing: str = "build") -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {ON_FAILURE}")
        if missing not in MISSING:
            raise ValueError(f"missing must be one of {MISSING}")
        if net.device.type != "cpu":
            raise EngineBuildError(f"the ONNX Runtime engine serves on the CPU; the network is on {net.device}")
        self.reference = CascadeRunner(net, cm_heads, ics)
        self.net = self.reference.net
        self.num_exits = net.num_exits
        self.cm_heads = self.reference.cm_heads
        self.ics = self.reference.ics
        self.ic_heads = self.reference.ic_heads
        self.network = network
        self.on_failure = on_failure
        self.config = SessionConfig(int(threads), optimization)
        self.failures = 0  # batches re-run on the reference engine after a run-time failure
        self.last_failure: str | None = None
        self._shapes = self._stage_input_shapes()
        self.sessions = SessionCache(self._build, max_sessions)
        self.missing = missing
        self.builder = BackgroundBuilder(self.sessions)
        self.reference_batches = 0  # batches served by the reference engine while their sessions were built
        self._plans: dict[int, tuple[ExitPolicy, SegmentPlan]] = {}
        if policies:
            self.prepare(policies)

    # -- shapes and sessions -------------------------------------------------------------------------

    @torch.inference_mode()
    def _stage_input_shapes(self) -> list[tuple[int, ...]]:
        """``(C, H, W)`` entering each stage, then the last stage's output (the head's input): ``M`` shapes."""
        h, w = self.net.input_size
        x = torch.zeros(1, 3, h, w)
        shapes = [tuple(x.shape[1:])]
        for stage in self.net.stages:
            x = stage(x)
            shapes.append(tuple(x.shape[1:]))
        return shapes

    def input_shape(self, key: SegmentKey) -> tuple[int, ...]:
        """``(C, H, W)`` of what segment ``key`` reads (without the batch axis)."""
        return self._shapes[key.start]

    def segment_module(self, key: SegmentKey) -> SegmentModule:
        """The eager module segment ``key`` compiles (the network's stages, fused heads)."""
        if key.network != self.network:
            raise ValueError(f"segment {key.label()} is not of network {self.network!r}")
        last = self.num_exits - 2 if key.final else key.end
        stages = list(self.net.stages[key.start: last + 1])
        if key.final:
            return SegmentModule(stages, final=FinalSoftmax(self.net.head), owner=self.net.module).eval()
        heads: list[torch.nn.Module] = []
        for h in key.heads:
            if h == CM_HEAD:
                heads.append(FusedClassMeans(self.cm_heads[key.end], self._shapes[key.end + 1]))
            elif h == IC_HEAD:
                heads.append(FusedIC(self.ic_heads[key.end]))  # type: ignore[arg-type]
            else:
                raise ValueError(f"unknown head {h!r}")
        return SegmentModule(stages, heads, owner=self.net.module).eval()

    def _build(self, key: SegmentKey) -> ort.InferenceSession:
        last = self.num_exits - 2 if key.final else key.end
        names = list(self.net.stage_names[key.start: last + 1])
        shapes = self._shapes[key.start: last + 1]
        with torch.inference_mode():
            module = self.segment_module(key)
        return build_segment(key, module, self.input_shape(key), names, shapes, self.config)

    def plan(self, policy: ExitPolicy) -> SegmentPlan:
        """The segments ``policy`` runs (checked against the heads this runner has; cached per policy)."""
        got = self._plans.get(id(policy))
        if got is not None and got[0] is policy:
            return got[1]
        self.reference.check(policy)
        plan = plan_for(policy, self.network)
        if len(self._plans) >= 256:
            self._plans.clear()
        self._plans[id(policy)] = (policy, plan)
        return plan

    def check(self, policy: ExitPolicy) -> ExitPolicy:
        """Raise ``ValueError`` when ``policy`` needs a head this runner does not have."""
        self.plan(policy)
        return policy

    def prepare(self, policies: Sequence[ExitPolicy]) -> list[SegmentKey]:
        """Build (export, load, validate) every session ``policies`` need, ahead of serving them; returns the
        keys in first-use order. Raises :class:`EngineBuildError` naming the segment and stage that failed."""
        keys: list[SegmentKey] = []
        for p in policies:
            for k in self.plan(p).segment_keys():
                if k not in keys:
                    keys.append(k)
        if len(keys) > self.sessions.capacity:
            log.warning("%d segments needed but the session cache holds %d: some will be rebuilt on demand",
                        len(keys), self.sessions.capacity)
        for k in keys:
            self.sessions.get(k)
        return keys

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine, "threads": self.config.intra_op_threads, "exporter":
                f"torch.onnx.export(dynamo=False), opset {OPSET}", "onnxruntime": ort.__version__,
                "sessions": len(self.sessions), "builds": self.sessions.builds, "failures": self.failures,
                "last_failure": self.last_failure,
                "on_failure": self.on_failure, "missing": self.missing, "building": self.builder.pending,
                "reference_batches": self.reference_batches,
                "uncompilable_segments": {k.label(): why for k, why in self.builder.failed.items()}}

    # -- running -------------------------------------------------------------------------------------

    def _call(self, key: SegmentKey, feat: np.ndarray) -> list[np.ndarray]:
        try:
            return self.sessions.get(key).run(None, {"x": feat})
        except Exception as exc:  # ORT error, or a lazy build that failed
            raise _RunFailure(key, exc) from exc

    @torch.inference_mode()
    def run(self, x: torch.Tensor, policies: ExitPolicy | Sequence[ExitPolicy]) -> ExitResult:
        """``x (B, 3, H, W)`` normalised images; one policy for every row, or one per row (as the reference)."""
        b = x.shape[0]
        distinct, rows = distinct_policies(policies, b)
        index = np.asarray(rows, dtype=np.int64) if rows is not None else None
        plans = [self.plan(p) for p in distinct]
        if self.missing == "reference":
            lacking = [k for plan in plans for k in plan.segment_keys() if k not in self.sessions]
            if lacking:
                self.builder.request(lacking)
                self.reference_batches += 1
                return self.reference.run(x, policies)
        xn = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        try:
            if index is None:
                if b == 1:
                    return self._run_one(xn, distinct[0], plans[0])
                return self._run_plan(xn, distinct[0], plans[0])
            return self._run_groups(xn, distinct, plans, index)
        except _RunFailure as exc:
            self.last_failure = str(exc)
            if self.on_failure == "raise":
                log.error("compiled engine failed (%s); batch of %d refused", exc, b)
                raise EngineFailed("the inference engine failed on this batch; retry") from exc
            self.failures += 1
            log.warning("compiled engine failed (%s); batch of %d re-run on the reference engine (%d so far)",
                        exc, b, self.failures)
            return self.reference.run(x, policies)

    def _run_groups(self, xn: np.ndarray, distinct: list[ExitPolicy], plans: list[SegmentPlan],
                    index: np.ndarray) -> ExitResult:
        """A mixed batch: each policy's rows run its own plan; the answers go back to their rows."""
        b = xn.shape[0]
        parts = []
        for g, (policy, plan) in enumerate(zip(distinct, plans, strict=True)):
            sel = np.flatnonzero(index == g)
            parts.append((torch.from_numpy(sel), self._run_plan(np.ascontiguousarray(xn[sel]), policy, plan)))
        k = parts[0][1].probs.shape[1]
        out = ExitResult(torch.zeros(b, dtype=torch.int64), torch.zeros(b, dtype=torch.int64),
                         torch.zeros(b, dtype=torch.float32), torch.zeros(b, k, dtype=torch.float32),
                         torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.int64))
        for sel, r in parts:
            for name in ("exit_index", "pred", "confidence", "probs", "flops", "rule"):
                getattr(out, name)[sel] = getattr(r, name)
        return out

    def _run_one(self, xn: np.ndarray, policy: ExitPolicy, plan: SegmentPlan) -> ExitResult:
        """One row (the latency case) on Python scalars, as the reference's batch-1 path: float32 scores
        compared with the float32 thresholds as doubles (exactly), tensors built only for the answer."""
        feat = xn
        for stop in plan.stops:
            outs = self._call(stop.key, feat)
            if stop.key.final:
                out = torch.from_numpy(outs[0])
                c, pr = out.max(1)
                return ExitResult(torch.tensor([stop.exit_index]), pr, c, out,
                                  torch.tensor([policy.cum[-1] + stop.consulted], dtype=torch.float64),
                                  torch.tensor([FINAL_RULE]))
            tc, ti, tn = stop.thresholds
            pc = outs[1] if stop.need_cm else None
            q = outs[2 if stop.need_cm else 1] if stop.need_ic else None
            fire_cm = tc < 1.0 and float(pc.max()) > tc  # type: ignore[union-attr]
            fire_ic = q is not None and ((ti < 1.0 and float(q.max()) > ti)
                                         or (tn < 0.0 and -float(entropy(torch.from_numpy(q))[0]) > tn))
            if fire_cm or fire_ic:
                out = torch.from_numpy(pc if plan.by_cm else q)  # type: ignore[arg-type]
                c, pr = out.max(1)
                return ExitResult(torch.tensor([stop.exit_index]), pr, c, out,
                                  torch.tensor([policy.cum[stop.exit_index] + stop.consulted], dtype=torch.float64),
                                  torch.tensor([rule_index(fire_cm, fire_ic)]))
            feat = outs[0]
        raise AssertionError("a plan ends with the network head")

    def _run_plan(self, xn: np.ndarray, policy: ExitPolicy, plan: SegmentPlan) -> ExitResult:
        """Every row under one policy: one session call per stop, compaction between stops. The per-row
        bookkeeping is on NumPy arrays (about a tenth of the cost of torch's small operations), with the
        reference engine's comparisons; tensors are made once, for the answer."""
        b = xn.shape[0]
        exit_index = np.full(b, self.num_exits - 1, dtype=np.int64)
        pred = np.zeros(b, dtype=np.int64)
        conf = np.zeros(b, dtype=np.float32)
        rule = np.full(b, FINAL_RULE, dtype=np.int64)
        probs: np.ndarray | None = None
        rows = np.arange(b)
        feat = xn
        for stop in plan.stops:
            outs = self._call(stop.key, feat)
            if stop.key.final:
                p = outs[0]
                c, pr = p.max(1), p.argmax(1)
                if probs is None:  # no row left early: the head's outputs are the answers as they are
                    pred, conf, probs = pr.astype(np.int64, copy=False), c, p
                else:
                    pred[rows], conf[rows], probs[rows] = pr, c, p
                break
            pc = outs[1] if stop.need_cm else None
            q = outs[2 if stop.need_cm else 1] if stop.need_ic else None
            fire, fired_cm, fired_ic, top, top_pred, out_p = _decide(pc, q, plan.by_cm, *stop.thresholds)
            if fire.any():
                leave = rows[fire]
                exit_index[leave] = stop.exit_index
                if fired_cm is None:
                    rule[leave] = _IC
                elif fired_ic is None:
                    rule[leave] = _CM
                else:
                    fc, fi = fired_cm[fire], fired_ic[fire]
                    rule[leave] = np.where(fi & fc, _BOTH, np.where(fi, _IC, _CM))
                if probs is None:
                    probs = np.zeros((b, out_p.shape[1]), dtype=np.float32)
                pred[leave], conf[leave], probs[leave] = top_pred[fire], top[fire], out_p[fire]
                keep = ~fire
                rows = rows[keep]
                if rows.size == 0:
                    break
                feat = np.ascontiguousarray(outs[0][keep])
            else:
                feat = outs[0]
        assert probs is not None
        at = torch.from_numpy(exit_index)
        flops = policy.backbone_cum[at] + plan.consulted_table[at]
        return ExitResult(at, torch.from_numpy(pred), torch.from_numpy(conf), torch.from_numpy(probs), flops,
                          torch.from_numpy(rule))


def _decide(pc: np.ndarray | None, q: np.ndarray | None, by_cm: bool, tc: float, ti: float, tn: float
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 6-7 at one stop for rows sharing thresholds: ``(fire, fired_cm | None, fired_ic | None, top, pred,
    probs)`` of the predictor head. The comparisons are the reference engine's: float32 scores against the
    threshold as float32 (what torch does with a Python float beside a float32 tensor), strict ``>``; the
    top class is the first maximal one (``argmax``, as ``torch.max``); the entropy is torch's own."""
    fired_cm = fired_ic = None
    cm_top = cm_pred = ic_top = ic_pred = None
    if pc is not None:
        cm_top, cm_pred = pc.max(1), pc.argmax(1)
        if tc < 1.0:
            fired_cm = cm_top > np.float32(tc)
    if q is not None:
        ic_top, ic_pred = q.max(1), q.argmax(1)
        if ti < 1.0:
            fired_ic = ic_top > np.float32(ti)
        if tn < 0.0:
            by_entropy = -entropy(torch.from_numpy(q)).numpy() > np.float32(tn)
            fired_ic = by_entropy if fired_ic is None else fired_ic | by_entropy
    fire = fired_cm if fired_ic is None else (fired_ic if fired_cm is None else fired_cm | fired_ic)
    assert fire is not None
    if by_cm:
        assert pc is not None and cm_top is not None and cm_pred is not None
        return fire, fired_cm, fired_ic, cm_top, cm_pred, pc
    assert q is not None and ic_top is not None and ic_pred is not None
    return fire, fired_cm, fired_ic, ic_top, ic_pred, q
