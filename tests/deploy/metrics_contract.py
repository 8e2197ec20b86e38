"""The metrics the service promises to export (the dashboard and docs are built on exactly these), and the
set it really exports, taken from the running service's /metrics when possible."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Family:
    name: str            # family name as exposed in # TYPE (counters without the _total suffix)
    type: str            # counter | gauge | histogram
    labels: frozenset[str]

    def series_names(self) -> set[str]:
        """Names of the sample series a PromQL query may use."""
        if self.type == "counter":
            return {f"{self.name}_total"}
        if self.type == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}

    def series_labels(self, series: str) -> frozenset[str]:
        return self.labels | {"le"} if series.endswith("_bucket") else self.labels


def _f(name: str, kind: str, *labels: str) -> Family:
    base = name.removesuffix("_total") if kind == "counter" else name
    return Family(base, kind, frozenset(labels))


DOCUMENTED: dict[str, Family] = {f.name: f for f in (
    _f("classmeans_requests_total", "counter", "model", "endpoint", "status"),
    _f("classmeans_request_latency_seconds", "histogram", "model", "endpoint"),
    _f("classmeans_queue_wait_seconds", "histogram", "model"),
    _f("classmeans_inference_seconds", "histogram", "model"),
    _f("classmeans_batch_size", "histogram", "model"),
    _f("classmeans_exit_depth", "histogram", "model", "profile"),
    _f("classmeans_samples_total", "counter", "model", "profile", "exit", "rule"),
    _f("classmeans_flops_per_sample", "histogram", "model", "profile"),
    _f("classmeans_flops_spent_total", "counter", "model"),
    _f("classmeans_flops_full_total", "counter", "model"),
    _f("classmeans_flops_saved_total", "counter", "model"),
    _f("classmeans_rejected_total", "counter", "model", "reason"),
    _f("classmeans_shed_requests_total", "counter", "model"),
    _f("classmeans_gc_pause_seconds", "histogram", "model", "generation"),
    _f("classmeans_inflight_requests", "gauge", "model"),
    _f("classmeans_queue_depth", "gauge", "model"),
    _f("classmeans_active_info", "gauge", "model", "bundle", "profile"),
    _f("classmeans_active_version", "gauge", "model"),
    _f("classmeans_profile_switches_total", "counter", "model"),
    _f("classmeans_bundle_activations_total", "counter", "model"),
    _f("classmeans_admin_jobs_total", "counter", "kind", "outcome"),
    _f("classmeans_admin_job_duration_seconds", "histogram", "kind"),
    _f("classmeans_up", "gauge", "model"),
)}


def families_from_text(text: str) -> dict[str, tuple[str, set[frozenset[str]]]]:
    """Family name -> (type, the label-name sets seen on its samples) of a Prometheus text exposition.
    A labelled family with no child yet still shows up (HELP/TYPE), with no label sets."""
    out: dict[str, tuple[str, set[frozenset[str]]]] = {}
    for fam in text_string_to_metric_families(text):
        label_sets = {frozenset(s.labels) - {"le"} for s in fam.samples}
        out[fam.name] = (fam.type, label_sets)
    return out


def series_index(families: dict[str, Family]) -> dict[str, Family]:
    """Series name (e.g. ``x_bucket``, ``y_total``) -> its family."""
    return {series: fam for fam in families.values() for series in fam.series_names()}


def exported_from_text(text: str) -> dict[str, Family]:
    """The families of a /metrics text, with label names from its samples (or, for a family with no sample
    yet, from the documented contract when it documents that family)."""
    out: dict[str, Family] = {}
    for name, (kind, label_sets) in families_from_text(text).items():
        if label_sets:
            labels = frozenset().union(*label_sets)
        elif name in DOCUMENTED:
            labels = DOCUMENTED[name].labels
        else:
            labels = frozenset()
        out[name] = Family(name, kind, labels)
    return out
