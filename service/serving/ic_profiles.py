"""An IC set's ``profiles.json``, validated: the servable hull vertices of each IC decision mode.

Only the modes served beside the bundle are kept (:data:`IC_SERVED_MODES`, from the decision-mode table
:mod:`service.earlyexit.modes`); the IC set's ``cm`` profiles
(class means at the six IC exits only, kept for the report and to seed ``combined``) are not served: the
bundle's own profiles (every exit) are at least as good. Each mode's ``full`` entry is the bundle's ``full``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from service.earlyexit import Operating, Profile
from service.earlyexit.modes import get_mode, ic_served_modes, is_mode
from service.serving.snapshot import FULL
from service.store.ic_sets import ICError

IC_SERVED_MODES = ic_served_modes()  # the built-in ones; the parser asks the table
PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,79}$")


@dataclass(frozen=True)
class ICProfile:
    """One servable IC hull vertex. ``thresholds``: ``E`` values (``{"ic": [...], "cm": [...]}`` for
    ``combined``) at the IC exits, as stored; ``tensor``: the same as ``(E,)`` (``(2, E)`` for ``combined``;
    :meth:`~service.earlyexit.modes.DecisionMode.thresholds_tensor`)."""

    name: str
    mode: str
    thresholds: list[float] | dict[str, list[float]]
    tensor: torch.Tensor = field(repr=False)
    flops: float
    flops_fraction: float
    accuracy: float

    def as_profile(self) -> Profile:
        """A :class:`Profile` for :func:`~service.earlyexit.select_by_target` (thresholds are not read)."""
        return Profile(self.name, [], self.flops, self.flops_fraction, self.accuracy, {"mode": self.mode})

    def operating(self) -> Operating:
        return Operating(self.name, flops_fraction=self.flops_fraction, accuracy=self.accuracy)


def _floats(values: Any, n: int, what: str) -> list[float]:
    if not isinstance(values, list) or len(values) != n:
        raise ICError(f"{what}: needs {n} thresholds")
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ICError(f"{what}: non-finite threshold")
    return out


def parse_ic_profiles(stored: Any, num_ic: int, flops_full: float) -> tuple[str | None, dict[str, list[ICProfile]]]:
    """Validate an IC set's ``profiles.json`` -> (the bundle its class-means modes used, servable profiles
    per IC mode). Raises :class:`ICError` on anything malformed."""
    if not isinstance(stored, dict) or not isinstance(stored.get("modes"), dict):
        raise ICError("profiles.json must be an object with 'modes'")
    bundle = stored.get("bundle")
    if bundle is not None and not isinstance(bundle, str):
        raise ICError("profiles.json: 'bundle' must be a bundle id or null")
    out: dict[str, list[ICProfile]] = {}
    seen: set[str] = set()
    for mode, entries in stored["modes"].items():
        if not is_mode(mode):
            raise ICError(f"profiles.json: unknown mode {mode!r}")
        if not isinstance(entries, list):
            raise ICError(f"profiles.json: mode {mode} must list profiles")
        dm = get_mode(mode)
        if not dm.ic_served:
            continue
        plist = []
        for p in entries:
            try:
                name, pmode = str(p["name"]), str(p["mode"])
                what = f"profiles.json: {mode} profile {name!r}"
                if pmode != mode:
                    raise ICError(f"{what} says mode {pmode!r}")
                if not PROFILE_NAME_RE.match(name):
                    raise ICError(f"{what}: invalid name")
                flops, frac, acc = float(p["flops"]), float(p["flops_fraction"]), float(p["accuracy"])
                if not (math.isfinite(flops) and flops > 0 and 0.0 <= acc <= 1.0
                        and abs(frac - flops / flops_full) <= 1e-6 * max(1.0, frac)):
                    raise ICError(f"{what}: FLOPs or accuracy out of range")
                raw = p["thresholds"]
                thr: list[float] | dict[str, list[float]]
                if dm.keys is not None:
                    if not isinstance(raw, dict):
                        form = ", ".join(f"'{k}': [...]" for k in dm.keys)
                        raise ICError(f"{what}: {mode} thresholds must be {{{form}}}")
                    thr = {k: _floats(raw.get(k), num_ic, what) for k in dm.keys}
                else:
                    thr = _floats(raw, num_ic, what)
                t = dm.thresholds_tensor(thr)
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, ICError):
                    raise
                raise ICError(f"profiles.json: malformed {mode} profile: {exc!r}") from exc
            if name == FULL:
                continue  # the plain network: served as the bundle's "full"
            if name in seen:
                raise ICError(f"profiles.json: profile name {name!r} appears twice")
            seen.add(name)
            plist.append(ICProfile(name, mode, thr, t, flops, frac, acc))
        out[mode] = sorted(plist, key=lambda q: q.flops)
    return bundle, out
