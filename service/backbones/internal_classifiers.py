"""SDN-style internal classifiers (ICs): mixed max/average pooling to 4x4, then one linear layer.

Kaya et al., "Shallow-Deep Networks" (ICML 2019), ``aux_funcs.InternalClassifier``: for an input map of
spatial size ``H >= 4`` the reduction kernel is ``H // 4`` (so the map becomes ``4 x 4``) and the pooled
map is ``alpha * maxpool(x) + (1 - alpha) * avgpool(x)`` with a learnable scalar ``alpha`` (initialised
``U[0, 1)``); smaller maps are flattened as they are. One ``Linear(C * 4 * 4 -> K)`` follows.

Differences from the SDN code, on purpose: an IC here reads the *stage output* of a
:class:`~service.backbones.staged.StagedNetwork` (after the block's final ReLU: the same feature the class
means see), while SDN's ResNet reads the block output before that ReLU.

Placement: SDN puts six ICs at 15/30/45/60/75/90 % of the backbone's FLOPs. :func:`place_ics` picks, for
each target, the early exit whose cumulative backbone FLOPs (from :func:`profile_stages`) is nearest, one
distinct exit per target.

FLOPs of an IC for one sample (the project's unit: 2 per multiply-add):

* the linear layer as ``FlopCounterMode`` counts it: ``2 * (C * 16) * K``;
* pooling, which ``FlopCounterMode`` counts as 0, stated explicitly: one comparison (max) and one addition
  (average) per input element, ``2 * C * H * W``, plus ``3 * C * 16`` for the mix (two products, one sum);
  none when the map is already ``<= 4 x 4`` (no pooling, no mix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from service.backbones.flops import StageProfile

IC_GRID = 4
SDN_TARGETS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


def pooling_kernel(shape: Sequence[int], grid: int = IC_GRID) -> int:
    """SDN's reduction kernel for a ``(C, H, W)`` map: ``H // grid`` when ``H >= grid``, else 1 (no pooling)."""
    h = int(shape[1])
    return h // grid if h >= grid else 1


def pool_pair(x: torch.Tensor, kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, H, W)`` -> (max-pooled, average-pooled), each ``(B, C, H / k, W / k)``; ``k = 1``: ``(x, x)``.

    Kept apart so the pooled pair can be cached once and the learnable mix applied later: the mix is
    linear in the two pooled maps, so ``IC(x) == IC.forward_pooled(*pool_pair(x, k))`` exactly.
    """
    if kernel <= 1:
        return x, x
    return F.max_pool2d(x, kernel), F.avg_pool2d(x, kernel)


class InternalClassifier(nn.Module):
    """Mixed pooling to ``4 x 4`` (learnable ``alpha``) + ``Linear(C * 4 * 4 -> K)``.

    Args:
        in_shape: ``(C, H, W)`` of the stage output it reads.
        num_classes: ``K``.
    Shapes: ``forward((B, C, H, W)) -> (B, K)`` logits.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        c, h, w = (int(v) for v in in_shape)
        self.in_shape = (c, h, w)
        self.num_classes = int(num_classes)
        self.kernel = pooling_kernel(self.in_shape)
        self.mixed = self.kernel > 1
        oh, ow = h // self.kernel, w // self.kernel
        self.feature_dim = c * oh * ow
        # SDN: alpha = nn.Parameter(torch.rand(1)); it exists (and is saved) even when unused.
        self.alpha = nn.Parameter(torch.rand(1, generator=generator))
        self.linear = nn.Linear(self.feature_dim, self.num_classes)
        if generator is not None:
            bound = 1.0 / self.feature_dim ** 0.5
            with torch.no_grad():
                self.linear.weight.uniform_(-bound, bound, generator=generator)
                self.linear.bias.uniform_(-bound, bound, generator=generator)

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> the (max, avg) pooled pair the mix reads."""
        return pool_pair(x, self.kernel)

    def forward_pooled(self, pooled_max: torch.Tensor, pooled_avg: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` from the pooled pair (``(B, C, 4, 4)`` or already flat ``(B, C * 16)``)."""
        z = self.alpha * pooled_max + (1.0 - self.alpha) * pooled_avg if self.mixed else pooled_avg
        return self.linear(torch.flatten(z, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(*self.pool(x))

    def flops(self) -> int:
        """FLOPs for one sample: the linear layer (counted by ``FlopCounterMode``) plus the pooling count."""
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            self.linear(torch.zeros(1, self.feature_dim))
        return int(counter.get_total_flops()) + self.pooling_flops()

    def pooling_flops(self) -> int:
        """``2 C H W`` (max compare + average add per element) + ``3 C 16`` (the mix); 0 without pooling."""
        if not self.mixed:
            return 0
        c, h, w = self.in_shape
        return 2 * c * h * w + 3 * self.feature_dim


@dataclass(frozen=True)
class Placement:
    """Where the ICs sit: ``exits[i]`` is the backbone exit (stage index) of IC ``i``, in increasing order.

    ``targets[i]``: the FLOPs fraction asked for; ``fractions[i]``: the cumulative backbone FLOPs fraction of
    the chosen exit.
    """

    exits: tuple[int, ...]
    targets: tuple[float, ...]
    fractions: tuple[float, ...]


def place_ics(profile: StageProfile, targets: Sequence[float] = SDN_TARGETS) -> Placement:
    """One distinct early exit per target, nearest in cumulative backbone FLOPs fraction.

    Targets are served in increasing order; an exit already taken is skipped (the next nearest wins),
    so the result is strictly increasing. Exits are stage outputs ``0 .. M-2`` (the head is not an IC
    position). Raises ``ValueError`` when there are fewer early exits than targets.
    """
    cum = profile.cumulative
    total = float(profile.total)
    early = list(range(len(cum) - 1))  # the last entry is the head
    if len(targets) > len(early):
        raise ValueError(f"{len(targets)} IC targets but only {len(early)} early exits")
    frac = [cum[j] / total for j in early]
    taken: list[int] = []
    for t in sorted(float(v) for v in targets):
        lower = taken[-1] + 1 if taken else 0
        # Leave room for the remaining targets.
        upper = len(early) - (len(targets) - len(taken))
        choices = list(range(lower, upper + 1))
        taken.append(min(choices, key=lambda j: (abs(frac[j] - t), j)))
    return Placement(tuple(taken), tuple(sorted(float(v) for v in targets)), tuple(frac[j] for j in taken))


class ICSet(nn.Module):
    """The ICs of one backbone: ``ics[i]`` reads backbone exit ``exits[i]``.

    ``forward`` is not defined; use ``ics[i](stage_feature)`` at the right stage.
    """

    def __init__(self, exits: Sequence[int], shapes: Sequence[Sequence[int]], num_classes: int,
                 seed: int | None = 0) -> None:
        super().__init__()
        if list(exits) != sorted(set(int(e) for e in exits)):
            raise ValueError("IC exits must be strictly increasing")
        if len(exits) != len(shapes):
            raise ValueError("one input shape per IC")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.exits = tuple(int(e) for e in exits)
        self.ics = nn.ModuleList(InternalClassifier(s, num_classes, gen) for s in shapes)

    def __len__(self) -> int:
        return len(self.ics)

    def __getitem__(self, i: int) -> InternalClassifier:
        return self.ics[i]  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return self.ics[0].num_classes  # type: ignore[return-value]

    def flops(self) -> list[int]:
        """FLOPs of consulting each IC once (see the module docstring)."""
        return [ic.flops() for ic in self.ics]  # type: ignore[union-attr]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{"ic{i}.alpha", "ic{i}.linear.weight", "ic{i}.linear.bias"}`` float32 tensors."""
        out = {}
        for i, ic in enumerate(self.ics):
            for k, v in ic.state_dict().items():
                out[f"ic{i}.{k}"] = v.detach().to(torch.float32).contiguous().clone()
        return out


def ics_for(profile: StageProfile, num_classes: int, targets: Sequence[float] = SDN_TARGETS,
            seed: int | None = 0) -> ICSet:
    """Freshly initialised ICs placed at ``targets`` of the backbone's FLOPs (seeded)."""
    placement = place_ics(profile, targets)
    return ICSet(placement.exits, [profile.shapes[j] for j in placement.exits], num_classes, seed)
