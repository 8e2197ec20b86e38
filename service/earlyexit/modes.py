"""The decision modes as one table: what each mode reads, how its thresholds convert, what predicts.

Every module asks this table (:func:`get_mode`) instead of comparing mode names; a new decision mode is one
:func:`register` call (a test registers one and runs it through the policy, the runner and the offline
:class:`~service.earlyexit.cascade_table.CascadeTable`).

At a backbone exit a sample may consult two *heads*: the class-means head (Eq. 2-5, probabilities ``p_j``)
and an internal classifier (IC, softmax ``q_j``). Three *criterion slots* read them, each a score compared
with its own threshold, strictly (``score > T`` fires):

=====  =========  ===================  ===================  =====  ==========
slot   head       score                never fires when     sign   rule label
=====  =========  ===================  ===================  =====  ==========
0      ``cm``     ``max_k p_j``        ``T >= 1``           ``+``  ``cm``
1      ``ic``     ``max_k q_j``        ``T >= 1``           ``+``  ``ic``
2      ``ic``     ``-H(q_j)`` (nats)   ``T >= 0``           ``-``  ``ic``
=====  =========  ===================  ===================  =====  ==========

``sign`` converts a user-space threshold to score space (``score_T = sign * user_T``): an entropy threshold
``H < t`` is ``-H > -t``. A mode is an ordered tuple of slots (its user thresholds: ``(E,)`` for one slot,
``(C, E)`` rows in slot order for ``C`` slots), a predictor head (whose argmax a sample leaves with), whether
an IC set's profiles of it are served beside the bundle, and the keys of its stored thresholds
(``profiles.json``: a list for one slot, ``{key: [...]}`` per row otherwise).

================  ===========  =========  ==========  ===================  =================================
mode              slots        predictor  IC-served   stored thresholds    seeds of its offline search
================  ===========  =========  ==========  ===================  =================================
``cm``            (0,)         ``cm``     no [#b]_    list                 --
``ic_prob``       (1,)         ``ic``     yes         list                 --
``ic_entropy``    (2,)         ``ic``     yes         list (entropies)     --
``combined``      (1, 0)       ``ic``     yes         ``{"ic", "cm"}``     ``ic_prob`` and ``cm`` hulls
================  ===========  =========  ==========  ===================  =================================

.. [#b] ``cm`` is the mode of the bundle's own profiles (every exit); an IC set's ``cm`` profiles (the IC
   exits only) are kept for the report and to seed ``combined``, not served.

Cost at an exit where some criterion is enabled: the predictor head plus the head of every enabled criterion
(each head once); an exit with no enabled criterion costs nothing and computes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

HEADS = ("cm", "ic")  # the heads a criterion reads or a mode predicts with (ExitPolicy.head_cost rows)
CM_HEAD, IC_HEAD = HEADS
RULE_NAMES = ("ic", "cm", "ic+cm", "final")  # what fired, reported per prediction
FINAL_RULE = RULE_NAMES.index("final")


@dataclass(frozen=True)
class Criterion:
    """One criterion slot: the ``head`` it reads, its ``score`` (``top``: top probability; ``negent``: minus
    the entropy), the score-space threshold ``disabled`` at or above which it never fires, and ``sign``
    (score-space threshold = ``sign`` * user-space threshold)."""

    head: str
    score: str
    disabled: float
    sign: float


CRITERIA = (Criterion(CM_HEAD, "top", 1.0, 1.0), Criterion(IC_HEAD, "top", 1.0, 1.0),
            Criterion(IC_HEAD, "negent", 0.0, -1.0))
CM_SLOT, IC_TOP_SLOT, IC_NEGENT_SLOT = 0, 1, 2
DISABLED = tuple(c.disabled for c in CRITERIA)  # per slot, score space
SLOTS_OF_HEAD = {h: tuple(s for s, c in enumerate(CRITERIA) if c.head == h) for h in HEADS}


@dataclass(frozen=True)
class DecisionMode:
    """One decision mode (see the module docstring's table)."""

    name: str
    slots: tuple[int, ...]
    predictor: str
    ic_served: bool = False
    keys: tuple[str, ...] | None = None  # stored-threshold keys per slot row; None: a plain list (one slot)
    seeds: tuple[str, ...] = ()  # modes whose searched hulls seed this mode's offline search

    def __post_init__(self) -> None:
        if not self.slots or any(s not in range(len(CRITERIA)) for s in self.slots) or len(set(self.slots)) != len(
                self.slots):
            raise ValueError(f"mode {self.name!r}: slots must be distinct indices into CRITERIA")
        if self.predictor not in HEADS:
            raise ValueError(f"mode {self.name!r}: predictor must be one of {HEADS}")
        if (self.keys is None) != (len(self.slots) == 1) or (self.keys is not None and len(self.keys) != len(
                self.slots)):
            raise ValueError(f"mode {self.name!r}: one key per slot row when it has several slots")
        others = [CRITERIA[s].head for s in self.slots if CRITERIA[s].head != self.predictor]
        if len(others) != len(set(others)):  # the offline cost model pays a non-predictor head per criterion
            raise ValueError(f"mode {self.name!r}: at most one criterion per head other than the predictor")

    @property
    def num_criteria(self) -> int:
        return len(self.slots)

    @property
    def heads(self) -> tuple[str, ...]:
        """Every head the mode may compute (the predictor's and its criteria's), in :data:`HEADS` order."""
        used = {self.predictor, *(CRITERIA[s].head for s in self.slots)}
        return tuple(h for h in HEADS if h in used)

    @property
    def needs_cm(self) -> bool:
        """Whether it reads the class means (an IC table needs class-means columns, a served mode a bundle's)."""
        return CM_HEAD in self.heads

    @property
    def from_bundle(self) -> bool:
        """Whether the mode's served profiles are the bundle's own (class means at every exit)."""
        return self.name == BUNDLE_MODE

    @property
    def disabled_score(self) -> tuple[float, ...]:
        """Score-space thresholds that switch each of its criteria off (``CascadeTable.disable``)."""
        return tuple(CRITERIA[s].disabled for s in self.slots)

    @property
    def disabled_user(self) -> tuple[float, ...]:
        """User-space thresholds that switch each of its criteria off (1 for probabilities, 0 for entropy)."""
        return tuple(CRITERIA[s].disabled * CRITERIA[s].sign + 0.0 for s in self.slots)

    @property
    def threshold_shape(self) -> str:
        """Its user thresholds at ``E`` exits, for messages: ``(E,)`` or ``(C, E)``."""
        return "(E,)" if self.num_criteria == 1 else f"({self.num_criteria}, E)"

    def user_shape(self, e: int) -> tuple[int, ...]:
        return (e,) if self.num_criteria == 1 else (self.num_criteria, e)

    def to_score(self, t: torch.Tensor) -> torch.Tensor:
        """``(S, C, E)`` user-space -> score space (rows of negative ``sign`` negated)."""
        neg = [i for i, s in enumerate(self.slots) if CRITERIA[s].sign < 0]
        if not neg:
            return t
        if len(neg) == t.shape[1]:
            return -t
        t = t.clone()
        t[:, neg] = -t[:, neg]
        return t

    def from_score(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_score` (the sign is its own inverse)."""
        return self.to_score(t)

    def thresholds_json(self, t: torch.Tensor) -> list[float] | dict[str, list[float]]:
        """User-space ``(E,)`` / ``(C, E)`` -> the stored form (a list, or ``{key: [...]}`` per row)."""
        if self.keys is None:
            return t.tolist()
        return {k: t[i].tolist() for i, k in enumerate(self.keys)}

    def thresholds_tensor(self, raw: Any) -> torch.Tensor:
        """The stored form -> user-space ``(E,)`` / ``(C, E)`` float32 (``KeyError``/``TypeError`` if malformed)."""
        return torch.tensor(self.thresholds_rows(raw), dtype=torch.float32)

    def thresholds_rows(self, raw: Any) -> Any:
        """The stored form -> a list (one slot) or a list of rows (raises ``TypeError`` on the wrong form)."""
        if self.keys is None:
            return raw
        if not isinstance(raw, dict):
            raise TypeError(f"{self.name} thresholds must be {{{', '.join(repr(k) + ': [...]' for k in self.keys)}}}")
        return [raw[k] for k in self.keys]

    def rule_labels(self, fired: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` which of its criteria fired -> ``(N,)`` index into :data:`RULE_NAMES`."""
        by_head = {h: torch.zeros(fired.shape[0], dtype=torch.bool) for h in HEADS}
        for i, s in enumerate(self.slots):
            by_head[CRITERIA[s].head] = by_head[CRITERIA[s].head] | fired[:, i]
        fc, fi = by_head[CM_HEAD], by_head[IC_HEAD]
        rule = torch.full((fired.shape[0],), FINAL_RULE, dtype=torch.int64)
        rule[fi] = RULE_NAMES.index("ic")
        rule[fc] = RULE_NAMES.index("cm")
        rule[fc & fi] = RULE_NAMES.index("ic+cm")
        return rule


def rule_index(fired_cm: bool, fired_ic: bool) -> int:
    """Index into :data:`RULE_NAMES` of an exit whose class-means / IC criteria fired as given."""
    if fired_cm and fired_ic:
        return RULE_NAMES.index("ic+cm")
    if fired_ic:
        return RULE_NAMES.index("ic")
    if fired_cm:
        return RULE_NAMES.index("cm")
    return FINAL_RULE


BUNDLE_MODE = "cm"  # the mode of a bundle's profiles, and the default mode of a request or a target
_BUILTIN = (
    DecisionMode("cm", (CM_SLOT,), CM_HEAD),
    DecisionMode("ic_prob", (IC_TOP_SLOT,), IC_HEAD, ic_served=True),
    DecisionMode("ic_entropy", (IC_NEGENT_SLOT,), IC_HEAD, ic_served=True),
    DecisionMode("combined", (IC_TOP_SLOT, CM_SLOT), IC_HEAD, ic_served=True, keys=("ic", "cm"),
                 seeds=("ic_prob", "cm")),
)
MODES = tuple(m.name for m in _BUILTIN)  # the built-in modes, in the order /profiles lists them
SEARCH_ORDER = ("ic_prob", "cm", "ic_entropy", "combined")  # offline: seeds first (the profiles.json order)
_REGISTRY: dict[str, DecisionMode] = {m.name: m for m in _BUILTIN}
_SEARCH: list[str] = list(SEARCH_ORDER)


def get_mode(name: str) -> DecisionMode:
    """The mode called ``name``; ``ValueError`` for an unknown one."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown decision mode {name!r}; use one of {mode_names()}") from None


def is_mode(name: object) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def mode_names() -> tuple[str, ...]:
    """Every registered mode (the built-in :data:`MODES` first)."""
    return tuple(_REGISTRY)


def ic_served_modes() -> tuple[str, ...]:
    """The modes an IC set's profiles serve beside the bundle."""
    return tuple(m.name for m in _REGISTRY.values() if m.ic_served)


def search_order(names: Sequence[str] | None = None) -> list[str]:
    """The order the offline search runs modes in (a mode after those seeding it), restricted to ``names``."""
    return [m for m in _SEARCH if names is None or m in names]


@contextmanager
def registered(mode: DecisionMode) -> Iterator[DecisionMode]:
    """Register ``mode`` for the duration of a ``with`` block (a test's extra mode); see :func:`register`."""
    register(mode)
    try:
        yield mode
    finally:
        unregister(mode.name)


def register(mode: DecisionMode) -> DecisionMode:
    """Add a decision mode to the table (after the modes seeding it in the search order)."""
    if mode.name in _REGISTRY:
        raise ValueError(f"decision mode {mode.name!r} exists")
    missing = [s for s in mode.seeds if s not in _REGISTRY]
    if missing:
        raise ValueError(f"mode {mode.name!r} is seeded by unknown modes {missing}")
    _REGISTRY[mode.name] = mode
    _SEARCH.append(mode.name)
    return mode


def unregister(name: str) -> None:
    if name in MODES:
        raise ValueError(f"built-in decision mode {name!r} cannot be removed")
    _REGISTRY.pop(name, None)
    if name in _SEARCH:
        _SEARCH.remove(name)
