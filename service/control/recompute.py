"""The class-means recompute job: an uploaded ImageFolder archive -> a new bundle, activated or staged.

This module owns a recompute's whole life. :func:`submit_recompute` reserves the job (one at a time: 409
``job_in_progress`` before anything is uploaded), receives the archive through the caller's ``receive``
(the HTTP route streams the body to a temporary file), reads and checks it off the event loop
(:func:`read_dataset_upload`: bad uploads are refused before any job runs, the job failed with the error's
code), then starts :func:`recompute_class_means` in the background: it calibrates with the network that is
already loaded and, when asked, activates the new bundle through the state writer (an atomic snapshot swap).
A failure at any point removes the bundle it wrote, so the store and the serving state are as before; a job
whose process died is cleaned up by the next process (:func:`abandoned_cleanup`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from service.control.jobs import Job, JobFailure, JobManager
from service.errors import ServiceError
from service.ingest.archives import ArchiveLimits, read_image_folder_archive
from service.ingest.labelled import LabelledImages
from service.offline.calibration import CalibrationConfig, HeadConfig
from service.serving.engine import Engine
from service.store.active import read_active_or_none
from service.store.bundle_model import load_bundle
from service.store.bundles import bundle_path, list_bundle_ids

log = logging.getLogger("classmeans.recompute")

KIND = "class_means"


@dataclass(frozen=True)
class ClassMeansOptions:
    """How to calibrate: held-out fraction for threshold selection, search mode and size, and whether
    to activate the new bundle or only stage it. Head settings default to the active bundle's."""

    holdout: float = 0.1
    search: str = "quantile"
    samples: int = 10_000
    seed: int = 0
    activate: bool = True
    reduction: str | None = None
    metric: str | None = None
    temperature: float | None = None
    tag: str = "upload"
    allow_overlap: bool = False  # label, not refuse, a selection split the backbone was trained on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Receive = Callable[[], AbstractAsyncContextManager[tuple[BinaryIO, str | None]]]


async def submit_recompute(jobs: JobManager, engine: Engine, opts: ClassMeansOptions, receive: Receive) -> Job:
    """Reserve a recompute job, receive and check its archive, start it; returns the running job.

    ``receive()`` is entered after the reservation and yields ``(file, name or None)``; it closes what it
    opened on exit (before the job starts). Any failure on the way (the reservation's :class:`JobInProgress`
    aside) fails the job, with a :class:`ServiceError`'s code and message (``upload_failed`` for anything
    else, e.g. a client that went away), and propagates."""
    # The job record lives in the store (a lock and an fsync): off the event loop, as every file access here.
    job = await asyncio.to_thread(jobs.reserve, KIND, opts.to_json())  # JobInProgress (409) while one is active
    try:
        async with receive() as (fileobj, source):
            job.set_progress("validating")
            name = source or "upload"
            data = await asyncio.to_thread(read_dataset_upload, fileobj, name, engine)
    except BaseException as exc:  # the job must not stay reserved, whatever happened
        if isinstance(exc, ServiceError):
            jobs.fail(job, exc.code, exc.message)
        else:
            jobs.fail(job, "upload_failed", "the upload did not complete")
        raise
    job.options["filename"] = name
    job.options["num_images"] = len(data)
    await asyncio.to_thread(jobs.start, job, lambda j: recompute_class_means(engine, data, opts, j, source=source))
    return job


def read_dataset_upload(fileobj: BinaryIO, filename: str, engine: Engine,
                        limits: ArchiveLimits | None = None) -> LabelledImages:
    """Read an uploaded archive into memory, resized to the model's input, with exactly its classes.

    Raises :class:`~service.ingest.labelled.DatasetError` (with its ``code``) for any bad archive.
    """
    return read_image_folder_archive(fileobj, filename, image_size=engine.spec.preprocessing,
                                     limits=limits or ArchiveLimits.for_upload(),
                                     allowed_classes=list(engine.spec.classes))


def check_split(data: LabelledImages, holdout: float) -> None:
    """Refuse (``too_few_samples``) a dataset whose stratified split would leave a class without
    class-means samples, or select thresholds on no sample at all (same arithmetic as ``split_holdout``)."""
    n = len(data)
    counts = np.bincount(data.labels, minlength=len(data.classes))
    n_hold = round(holdout * n)
    take = [round(n_hold * int(c) / n) for c in counts] if n else []
    starved = [data.classes[k] for k, c in enumerate(counts) if int(c) - take[k] < 1]
    if starved:
        raise JobFailure(f"too few images for the held-out split: class(es) {', '.join(starved)} would keep "
                         "no image for the class means; upload more images or lower holdout",
                         code="too_few_samples")
    if sum(take) < 1:
        raise JobFailure(f"holdout {holdout} of {n} images selects no image for threshold selection; upload "
                         "more images or raise holdout", code="too_few_samples")


def head_config(engine: Engine, opts: ClassMeansOptions) -> HeadConfig:
    """The options' head settings, defaulting to those of the bundle that serves now."""
    heads = engine.snapshot.bundle.config.get("heads") or [{}]
    base = heads[0] if isinstance(heads[0], dict) else {}
    return HeadConfig(opts.reduction or str(base.get("reduction", "full")),
                      opts.metric or str(base.get("metric", "euclidean")),
                      float(opts.temperature if opts.temperature is not None else base.get("temperature", 1.0)))


def recompute_class_means(engine: Engine, data: LabelledImages, opts: ClassMeansOptions, job: Job,
                          source: str | None = None) -> dict[str, Any]:
    """Calibrate a new bundle from ``data``; activate it if asked. Leaves no trace when it fails.

    ``source`` (the archive's file name, when the client gave one) is checked against ``model.json``'s
    ``extra.training_data``, as ``classmeans calibrate`` does: a selection split the backbone was trained on
    fails the job (``selection_overlaps_training``) unless ``opts.allow_overlap``, which labels the bundle."""
    from service.offline.operations import calibrate_model  # report and plot code: jobs only

    check_split(data, opts.holdout)
    head = head_config(engine, opts)
    cfg = CalibrationConfig(heads=[head], search=opts.search, samples=opts.samples, seed=opts.seed,
                            batch_size=100)
    before = set(list_bundle_ids(engine.model_dir))
    try:
        ids, summary = calibrate_model(engine.model_dir, data, cfg, holdout=opts.holdout, activate=False,
                                       status=job.set_progress, tag=opts.tag,
                                       loaded=(engine.spec, engine.net), source=source,
                                       on_overlap="label" if opts.allow_overlap else "refuse")
        if not ids:
            raise JobFailure("calibration produced no bundle", code="calibration_failed")
        bid = ids[0]
        job.set_progress("activating" if opts.activate else "validating")
        if opts.activate:
            snap = engine.writer.activate_bundle(bid)
            active = {"bundle": snap.bundle_id, "profile": snap.profile_name, "version": snap.version}
        else:
            load_bundle(engine.model_dir, bid, engine.spec, engine.net.num_exits)
            active = None
    except BaseException:
        _remove_new_bundles(engine, before)
        raise
    headline = (summary.get("bundles") or [{}])[0]
    return {"bundle": bid, "activated": opts.activate, "active": active, "heads": asdict(head),
            "num_images": len(data), "num_means": summary.get("num_means"),
            "num_selection": summary.get("num_selection"), "seconds": summary.get("seconds"),
            "headline": headline, "estimate": summary.get("estimate"), "warnings": summary.get("warnings", [])}


def _remove_new_bundles(engine: Engine, before: set[str]) -> None:
    for bid in set(list_bundle_ids(engine.model_dir)) - before:
        if bid == engine.snapshot.bundle_id:  # pragma: no cover - activation is the last step
            continue
        log.warning("removing bundle %s written by a failed job", bid)
        shutil.rmtree(bundle_path(engine.model_dir, bid), ignore_errors=True)


def abandoned_cleanup(model_dir: Path) -> Callable[[dict[str, Any]], None]:
    """What :meth:`~service.control.jobs.JobManager.recover` calls for a recompute job whose process died:
    remove the bundle it may have published (its tag, written after it started, not the active one).
    Half-written bundles are ``.tmp`` directories, which the next engine load sweeps anyway."""

    def cleanup(record: dict[str, Any]) -> None:
        if record.get("kind") != KIND:
            return
        tag = str((record.get("options") or {}).get("tag") or "")
        since = float((record.get("times") or {}).get("created") or 0.0)
        active = str((read_active_or_none(model_dir) or {}).get("bundle", ""))
        for bid in list_bundle_ids(model_dir):
            path = bundle_path(model_dir, bid)
            if tag and bid.endswith(f"-{tag}") and bid != active and path.stat().st_mtime >= since - 1.0:
                log.warning("removing bundle %s published by abandoned job %s", bid, record.get("id"))
                shutil.rmtree(path, ignore_errors=True)

    return cleanup
