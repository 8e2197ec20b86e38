"""The runner of a cascade of networks: each member's own runner, one after another, in one batch.

A batch enters member 0 (its own :class:`~service.serving.cascade.CascadeRunner` or compiled runner, with the
part of each row's policy that falls on its exits: :func:`~service.earlyexit.model_cascade.member_policy`).
Rows that leave at one of its early exits are answered; rows that reach its classifier leave there when the
softmax top probability is ``> T`` (the boundary threshold of their policy), otherwise they go on, with the
same decoded pixels (re-normalised for the next member only when its normalisation differs), into the next
member, which runs them from the input; the FLOPs each member spent on a row are added. A member none of
whose exits a row's policy enables is not run for that row (it could answer nothing). The last member's
classifier always accepts. Rows keep their own policies throughout, so time sharing and per-request profiles
mix in one batch as for one network.

Exits are reported on the cascade's sequence (member offset + the member's exit), so the offline decision
table (:func:`~service.earlyexit.model_cascade.join_tables`) gives the same exits, predictions and FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from service.backbones.cascade_network import CascadeNetwork
from service.earlyexit.model_cascade import member_enabled, member_policy
from service.earlyexit.modes import CM_SLOT
from service.earlyexit.policy import ExitPolicy
from service.serving.cascade import ExitResult, distinct_policies


class MemberRunner(Protocol):
    def run(self, x: torch.Tensor, policies: ExitPolicy | Sequence[ExitPolicy]) -> ExitResult: ...


class _Split:
    """One cascade policy cut into its members: their policies, boundary thresholds and which ones run."""

    def __init__(self, policy: ExitPolicy, net: CascadeNetwork) -> None:
        self.policy = policy
        last = net.num_members - 1
        self.members = [member_policy(policy, off, m.num_exits)
                        for off, m in zip(net.offsets, net.members, strict=True)]
        self.boundary = [float(policy.thresholds[CM_SLOT, off + m.num_exits - 1]) if i < last else 1.0
                         for i, (off, m) in enumerate(zip(net.offsets, net.members, strict=True))]
        self.runs = [member_enabled(policy, off, m.num_exits, i == last)
                     for i, (off, m) in enumerate(zip(net.offsets, net.members, strict=True))]


class ModelCascadeRunner:
    """``run(x, policies) -> ExitResult`` over a :class:`CascadeNetwork`; ``x (B, 3, H, W)`` normalised as member
    0 normalises. ``runners``: one per member, built on the member's own heads and exits."""

    def __init__(self, net: CascadeNetwork, runners: Sequence[MemberRunner] = ()) -> None:
        self.net = net
        self.runners = list(runners)  # set later when the member runners need this runner's member policies
        self.num_exits = net.num_exits
        self._splits: dict[int, _Split] = {}

    def split(self, policy: ExitPolicy) -> _Split:
        """The member policies of ``policy`` (cached per policy object, so each member sees stable policies)."""
        got = self._splits.get(id(policy))
        if got is not None and got.policy is policy:
            return got
        if policy.num_exits != self.num_exits:
            raise ValueError(f"policy {policy.name!r} has {policy.num_exits} exits, the cascade {self.num_exits}")
        s = _Split(policy, self.net)
        if len(self._splits) >= 512:
            self._splits.clear()
        self._splits[id(policy)] = s
        return s

    def member_policies(self, policies: Sequence[ExitPolicy], member: int) -> list[ExitPolicy]:
        """The policies member ``member`` runs for ``policies`` (those that run it at all)."""
        out = []
        for p in policies:
            s = self.split(p)
            if s.runs[member]:
                out.append(s.members[member])
        return out

    def info(self) -> dict[str, Any]:
        """Each member runner's engine state (when it reports one)."""
        return {"members": {m.name: (r.info() if hasattr(r, "info") else {"engine": "torch"})  # type: ignore[attr-defined]
                            for m, r in zip(self.net.members, self.runners, strict=True)}}

    @torch.inference_mode()
    def run(self, x: torch.Tensor, policies: ExitPolicy | Sequence[ExitPolicy]) -> ExitResult:
        if len(self.runners) != self.net.num_members:
            raise ValueError(f"{len(self.runners)} runners for {self.net.num_members} members")
        b = x.shape[0]
        distinct, rows = distinct_policies(policies, b)
        splits = [self.split(p) for p in distinct]
        if b == 1 and len(splits) == 1:
            return self._run_one(x, splits[0])
        return self._run_rows(x, splits, rows)

    def _run_rows(self, x: torch.Tensor, splits: list[_Split], rows: list[int] | None) -> ExitResult:
        """Any batch: ``rows[r]`` the index into ``splits`` of row ``r``'s policy (None: all the first).

        The per-row bookkeeping is on NumPy arrays (a small NumPy operation costs about a tenth of a torch one;
        at batches of 2-16 this loop was a third of a millisecond a batch): the same comparisons on the same
        dtypes (float32 confidence ``>`` float32 boundary; FLOPs summed in float64), tensors only at the end."""
        b = x.shape[0]
        index = np.asarray(rows, dtype=np.int64) if rows is not None else np.zeros(b, dtype=np.int64)
        runs = np.array([s.runs for s in splits], dtype=bool)  # (P, members)
        boundary = np.array([s.boundary for s in splits], dtype=np.float32)  # (P, members)
        exit_index = np.zeros(b, dtype=np.int64)
        pred = np.zeros(b, dtype=np.int64)
        conf = np.zeros(b, dtype=np.float32)
        flops = np.zeros(b, dtype=np.float64)
        rule = np.zeros(b, dtype=np.int64)
        probs: np.ndarray | None = None
        spent = np.zeros(b, dtype=np.float64)
        alive = np.arange(b)
        last = self.net.num_members - 1
        for i, (member, runner) in enumerate(zip(self.net.members, self.runners, strict=True)):
            if alive.size == 0:
                break
            pol = index[alive]
            here = runs[pol, i]
            rows_i = alive[here]
            if rows_i.size == 0:
                continue
            xs = x if rows_i.size == b else x[torch.from_numpy(rows_i).to(x.device)]  # all rows in order: as is
            xi = self.net.renormalise(xs, 0, i)
            pol_i = pol[here]
            if len(splits) == 1:
                res = runner.run(xi, splits[0].members[i])
            else:
                res = runner.run(xi, [splits[p].members[i] for p in pol_i.tolist()])
            r_exit, r_conf, r_flops = _np(res.exit_index), _np(res.confidence), _np(res.flops)
            if i < last:
                go_on = (r_exit == member.num_exits - 1) & ~(r_conf > boundary[pol_i, i])
            else:
                go_on = np.zeros(rows_i.size, dtype=bool)
            done = ~go_on
            out = rows_i[done]
            exit_index[out] = self.net.offsets[i] + r_exit[done]
            pred[out], conf[out], rule[out] = _np(res.pred)[done], r_conf[done], _np(res.rule)[done]
            flops[out] = spent[out] + r_flops[done]
            r_probs = _np(res.probs)
            if probs is None:
                probs = np.zeros((b, r_probs.shape[1]), dtype=np.float32)
            probs[out] = r_probs[done]
            spent[rows_i[go_on]] += r_flops[go_on]
            alive = np.concatenate([alive[~here], rows_i[go_on]])
        assert probs is not None and alive.size == 0, "the last member answers every row it is given"
        return ExitResult(torch.from_numpy(exit_index), torch.from_numpy(pred), torch.from_numpy(conf),
                          torch.from_numpy(probs), torch.from_numpy(flops), torch.from_numpy(rule))

    def _run_one(self, x: torch.Tensor, split: _Split) -> ExitResult:
        """One row (the latency case): the members in turn on Python scalars, as :meth:`run` decides for a row
        (the boundary compared as float32 values, exactly), without :meth:`_run_rows`'s per-row bookkeeping arrays
        (about 40 small operations a member; as torch tensors they cost a fifth of a millisecond a request at
        batch 1, measured)."""
        last = self.net.num_members - 1
        spent = 0.0
        for i, (member, runner) in enumerate(zip(self.net.members, self.runners, strict=True)):
            if not split.runs[i]:
                continue
            res = runner.run(self.net.renormalise(x, 0, i), split.members[i])
            if (i < last and int(res.exit_index[0]) == member.num_exits - 1
                    and not float(res.confidence[0]) > split.boundary[i]):
                spent += float(res.flops[0])
                continue
            return ExitResult(res.exit_index + self.net.offsets[i], res.pred, res.confidence, res.probs,
                              res.flops.to(torch.float64) + spent, res.rule)
        raise AssertionError("the last member answers every row it is given")


def _np(t: torch.Tensor) -> np.ndarray:
    """A member's result as NumPy (no copy on the CPU; a GPU member's row values come to the CPU)."""
    return t.cpu().numpy()
