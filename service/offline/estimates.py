"""Does a calibration's selection split overlap the data that trained the backbone?

``model.json``'s ``extra.training_data`` (written by ``classmeans train --holdout`` and ``classmeans import
--trained-on``) says ``{source, images, held_out, split: "stratified split_holdout", seed}``. The selection split
is disjoint from training when it comes from another source, or when it is exactly the held-out split: the same
source, the same number of images, ``--holdout`` equal to ``held_out`` and the same seed (``split_holdout`` is
deterministic in those). Otherwise it overlaps, and the accuracies it measures are optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.errors import ServiceError

UNKNOWN = "training data unknown"


class SelectionOverlapError(ServiceError, ValueError):
    """Calibration was asked to refuse a selection split that overlaps the backbone's training data (422)."""

    code, status = "selection_overlaps_training", 422


@dataclass(frozen=True)
class SelectionSplit:
    """What calibration selects thresholds on: ``source`` (a file/folder name) of ``images`` samples, split
    with ``holdout`` held out (``split_holdout``, ``seed``); ``selection`` is ``holdout`` or ``means``."""

    source: str | None
    images: int
    holdout: int
    seed: int
    selection: str
    samples: int


def provenance(training_data: dict[str, Any] | None, split: SelectionSplit) -> dict[str, Any]:
    """``{samples, source, selection, overlaps_training: True/False/None, label}`` for the bundle."""
    base = {"samples": split.samples, "source": split.source, "selection": split.selection}
    td = training_data or {}
    if not td.get("source"):
        return {**base, "overlaps_training": None, "label": UNKNOWN}
    if split.source is None:
        return {**base, "overlaps_training": None, "label": "calibration data source unknown"}
    if str(td["source"]) != split.source:
        return {**base, "overlaps_training": False,
                "label": f"disjoint from the backbone's training data ({td['source']})"}
    held_out_exactly = (split.selection == "holdout" and int(td.get("held_out") or 0) > 0
                        and split.holdout == int(td["held_out"]) and split.seed == int(td.get("seed", -1))
                        and split.images == td.get("images"))
    if held_out_exactly:
        return {**base, "overlaps_training": False,
                "label": f"the backbone's held-out split of {split.source} ({split.holdout} images)"}
    return {**base, "overlaps_training": True,
            "label": f"OVERLAPS the backbone's training data ({split.source}): optimistic"}


def overlap_message(training_data: dict[str, Any], split: SelectionSplit) -> str:
    td = training_data
    held = int(td.get("held_out") or 0)
    fix = (f"calibrate on all of {td['source']} ({td.get('images')} images) with --holdout {held} --seed "
           f"{td.get('seed', 0)} (exactly the held-out split)" if held else
           f"the backbone was trained on all of {td['source']}: calibrate on data it never saw, or take the "
           "means from it and the thresholds from unseen data with --select-on FILE")
    return (f"the selection split ({split.samples} samples of {split.source}) overlaps the data that trained "
            f"the backbone (model.json: {td.get('trained_on')} of {td.get('images')} images of {td['source']}, "
            f"{held} held out, seed {td.get('seed')}), so its accuracy estimates would be optimistic. Fix: {fix}; "
            "or pass --allow-overlap to write the bundle labelled as overlapping.")
