"""Pydantic models of every JSON body the API reads or writes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code")
    message: str = Field(description="what went wrong, for humans")


class ErrorBody(BaseModel):
    error: ErrorDetail


# -- health and index ----------------------------------------------------------------------------------

class Live(BaseModel):
    live: bool = True


class Ready(BaseModel):
    ready: bool


class Index(BaseModel):
    service: str
    version: str
    model: str
    ready: bool
    reason: str | None = None
    endpoints: dict[str, str]


# -- profiles ------------------------------------------------------------------------------------------

class Operating(BaseModel):
    """The operating point: one profile (``b`` null), or profile ``a`` with probability ``lam`` else ``b``."""

    name: str
    a: str
    b: str | None = None
    lam: float = 1.0
    flops_fraction: float
    accuracy: float
    ms: float | None = Field(None, description="expected ms per sample at batch 1 on this machine (measured by "
                                               "`classmeans timing`; null: not timed)")


class MeasuredInfo(BaseModel):
    accuracy: float = Field(description="accuracy measured by `classmeans evaluate --attach`")
    flops_fraction: float
    interval95: list[float] | None = Field(description="95 % Wilson interval over the measured samples")
    samples: int
    source: str | None = Field(description="the evaluation data's file/folder name")


class EstimateInfo(BaseModel):
    accuracy: float = Field(description="the estimate: accuracy on the calibration selection split")
    interval95: list[float] | None = Field(description="95 % Wilson interval over the selection samples")
    samples: int | None = Field(description="selection samples the estimate is measured on")
    overlaps_training: bool | None = Field(description="whether the selection split overlaps the data that "
                                                       "trained the backbone (null: unknown)")
    data: str = Field(description="what the estimate rests on, in words")
    measured: MeasuredInfo | None = Field(description="test accuracy attached to the bundle, if any")


class ProfileInfo(BaseModel):
    name: str
    mode: str = Field("cm", description="decision mode: cm (class means), ic_prob (SDN: IC top probability), "
                                        "ic_entropy (BranchyNet: IC entropy), combined (IC and class means)")
    accuracy: float = Field(description="held-out accuracy on the calibration selection split")
    flops: float = Field(description="mean FLOPs per sample (2 per multiply-add), IC costs included")
    flops_fraction: float = Field(description="flops / FLOPs of the full network")
    thresholds: list[float] | dict[str, list[float]] = Field(
        description="one per exit (cm: every early exit; IC modes: the IC exits in 'exits'); combined: "
                    "{'ic': [...], 'cm': [...]}")
    exits: list[int] | None = Field(None, description="IC modes: the backbone exit index of each threshold")
    default: bool
    active: bool = Field(description="serves now (alone or as one side of a time-shared mix)")
    share: float = Field(description="fraction of traffic this profile gets under the active operating point")
    estimate: EstimateInfo | None = Field(None, description="class-means profiles: the estimate's data, its 95 % "
                                                            "interval and any measured test accuracy")
    ms: float | None = Field(None, description="expected milliseconds per sample at batch 1 on the machine and "
                                               "engine `classmeans timing` measured (null: not timed)")
    ms_batch: dict[str, float] | None = Field(None, description="expected ms per sample by batch size")
    time_fraction: float | None = Field(None, description="ms / the full network's ms at batch 1")


class CascadeMemberCurve(BaseModel):
    name: str
    curve: list[tuple[float, float]] = Field(description="(FLOPs fraction of the last member, accuracy) vertices")


class ProfilesResponse(BaseModel):
    model: str
    bundle: str
    version: int
    active: Operating
    default_profile: str
    modes: list[str] = Field(description="decision modes that can be served now")
    internal_classifiers: dict[str, Any] = Field(
        description="the IC set: status (absent, loaded, failed), id, exits, modes, and why a mode is unavailable")
    profiles: list[ProfileInfo]
    autopilot: AutopilotInfo = Field(default_factory=lambda: AutopilotInfo(enabled=False))
    members: list[CascadeMemberCurve] | None = Field(
        None, description="a cascade of models: each member alone on the selection split (its own class-means "
                          "hull, FLOPs as fractions of the last member's), to draw beside the cascade's curve")



class ProfileSwitch(BaseModel):
    """Exactly one of: a profile ``name``; ``min_accuracy`` (cheapest point at least this accurate);
    ``max_flops_fraction`` (most accurate point at most this costly); ``latency_slo_ms`` (the latency
    autopilot: hold this p99, never below ``min_accuracy`` when given). ``mode`` picks the decision mode
    whose hull a target is chosen on (default ``cm``); with a ``name`` it must be that profile's mode.
    Any switch without ``latency_slo_ms`` turns the autopilot off."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200)
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_flops_fraction: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    max_latency_ms: float | None = Field(None, gt=0.0, le=60_000.0, allow_inf_nan=False,
                                         description="most accurate point whose expected time per sample at "
                                                     "batch 1 (measured: `classmeans timing`) is at most this")
    max_time_fraction: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                            description="the same as a fraction of the full network's time")
    latency_slo_ms: float | None = Field(None, ge=1.0, le=60_000.0, allow_inf_nan=False,
                                         description="autopilot: p99 latency target in ms (1 .. 60000); "
                                                     "min_accuracy is then its floor")
    mode: str | None = Field(None, min_length=1, max_length=40,
                             description="cm, ic_prob, ic_entropy or combined")

    @model_validator(mode="after")
    def _exactly_one(self) -> ProfileSwitch:
        if self.latency_slo_ms is not None:
            if any(v is not None for v in (self.name, self.max_flops_fraction, self.max_latency_ms,
                                           self.max_time_fraction)):
                raise ValueError("latency_slo_ms takes only min_accuracy (the floor) and mode")
            return self
        given = [k for k in ("name", "min_accuracy", "max_flops_fraction", "max_latency_ms", "max_time_fraction")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of name, min_accuracy, max_flops_fraction, max_latency_ms, "
                             "max_time_fraction, latency_slo_ms")
        if given[0] in ("max_latency_ms", "max_time_fraction") and self.mode is not None:
            raise ValueError(f"{given[0]} chooses among the bundle's class-means profiles (the timed ones): no mode")
        return self


class AutopilotInfo(BaseModel):
    """The latency autopilot of the process that answered (each process steers on its own load)."""

    enabled: bool
    latency_slo_ms: float | None = Field(None, description="the p99 target (as POST /profiles sets it)")
    target_ms: float | None = Field(None, description="the p99 target (same as latency_slo_ms)")
    min_accuracy: float | None = Field(None, description="the floor asked for (estimated accuracy)")
    mode: str | None = None
    axis: Literal["time", "flops"] | None = Field(
        None, description="what the budget measures: time (a fraction of the full network's measured time per "
                          "sample at batch 1; the bundle is timed) or flops (an untimed bundle, an IC mode)")
    floor: float | None = Field(None, description="the cheapest allowed point's cost on the axis")
    ceiling: float | None = Field(None, description="the costliest point meeting the floor, on the axis")
    budget: float | None = Field(None, description="the controller's budget now, on the axis")
    budget_ms: float | None = Field(None, description="time axis: the budget in ms per sample at batch 1")
    floor_flops_fraction: float | None = Field(None, description="FLOPs fraction of the cheapest allowed point")
    ceiling_flops_fraction: float | None = Field(None, description="FLOPs fraction of the costliest point meeting "
                                                                   "the floor (1: the full network)")
    budget_flops_fraction: float | None = Field(None, description="FLOPs fraction of the point held now")
    reachable_ms: float | None = Field(None, description="time axis: the smallest target accepted (the floor "
                                                         "point's ms per sample at batch 1 + HTTP overhead)")
    operating: str | None = Field(None, description="name of the point it holds now (maybe a mix a~b@lam)")
    operating_point: Operating | None = Field(None, description="the point it holds now")
    accuracy: float | None = Field(None, description="estimated accuracy of the point it holds now")
    floor_point: str | None = Field(None, description="name of the cheapest allowed point")
    reason: str | None = Field(None, description="reason of the last decision (why it moved or held)")
    why: str | None = Field(None, description="same as reason")
    pressure: float | None = Field(None, description="max(p99 / target, queue delay / (q target), refusals); >1 is "
                                                    "over (q = 0.5, or 1 while the load model plans)")
    moves: int | None = None
    p99_ms: float | None = Field(None, description="p99 of recent answers (None: too few)")
    queue_delay_ms: float = Field(0.0, description="expected queue wait of a request arriving now")
    window_samples: int = 0
    shed_rate: float = Field(0.0, description="share of inference requests refused by admission control (503 "
                                              "shed) over the last few seconds")
    shed_total: int = Field(0, description="requests shed since this process started")
    shed_by_queue: int = Field(0, description="of them, refused because their expected answer time passed 0.8 of "
                                              "the target")
    shed_by_rate: int = Field(0, description="of them, refused by the token bucket (the admitted rate)")
    relief_moves: int = Field(0, description="requests that would have been refused and moved the point to a "
                                             "cheaper one at once (between ticks) instead")
    relieved_admitted: int = Field(0, description="of them, admitted at the cheaper point")
    tail_admitted: int = Field(0, description="requests past 0.8 of the target but expected within it, admitted on "
                                              "the tail allowance (at most 0.5 % of the answered) instead of refused")
    per_sample_ms: float | None = Field(None, description="measured ms per sample of the point held now at the "
                                                          "batch size in use")
    capacity_rps: float | None = Field(None, description="samples per second this process sustains at the point "
                                                         "held now (1000 / per_sample_ms)")
    floor_capacity_rps: float | None = Field(None, description="the same at the cheapest allowed point")
    queue_bound: int | None = Field(None, description="samples that may wait before a request is shed (from the "
                                                      "target and the measured throughput)")
    batch_in_use: float | None = Field(None, description="recent mean batch size (picks the timed batch size)")
    planned: bool | None = Field(None, description="whether the budget follows the load model (arrival rate x "
                                                   "measured CPU per sample); false: AIMD on the pressure alone")
    util_cap: float | None = Field(None, description="the share of this process's CPU the load model may fill "
                                                     "(adapted: cut when p99 is over the band, raised under it)")
    predicted_util: float | None = Field(None, description="the load model's utilisation at the point held")
    demand_sps: float | None = Field(None, description="samples per second arriving (admitted or shed; EWMA)")
    cores: float | None = Field(None, description="CPU cores this process counts on (its share)")
    overhead_ms: float | None = Field(None, description="marginal CPU ms per sample beyond the network's time "
                                                        "(HTTP parsing, decoding, encoding)")
    fixed_cores: float | None = Field(None, description="measured CPU (cores) beyond rate x unit cost: per-batch "
                                                        "work a light load pays per request")
    unit_cost_ms: float | None = Field(None, description="marginal CPU ms per sample at the point held: overhead + "
                                                         "network")
    cpu_util: float | None = Field(None, description="the serving work's measured CPU (cores; background builds "
                                                     "left out)")
    loop_lag_ms: float | None = Field(None, description="how late the event loop fired the autopilot's last tick "
                                                        "(a busy loop reads requests late: they wait in the sockets)")
    bucket_scale: float | None = Field(None, description="share of the model's admitted rate (cut while the CPU "
                                                         "is saturated and requests are refused)")
    admit_rate_sps: float | None = Field(None, description="admission's token-bucket rate (samples/s): scale x "
                                                           "(util x cores - fixed) / unit cost, util = min(0.95, "
                                                           "cap + 0.1)")


class ActiveState(BaseModel):
    bundle: str
    profile: str
    version: int


class SwitchResponse(BaseModel):
    model: str
    bundle: str
    version: int
    active: Operating
    previous: ActiveState
    autopilot: AutopilotInfo | None = None


# -- classify ------------------------------------------------------------------------------------------

class TopK(BaseModel):
    index: int
    label: str
    probability: float


class Prediction(BaseModel):
    filename: str | None = None
    label: str
    class_index: int
    confidence: float
    top_k: list[TopK]
    exit_index: int
    exit_name: str
    num_exits: int
    flops: float = Field(description="FLOPs spent on this sample: backbone up to the exit plus every head "
                                     "consulted (class means and internal classifiers)")
    flops_full: float
    flops_fraction: float
    profile: str = Field(description="the profile that served this sample (a mix's vertex, or the override)")
    mode: str = Field("cm", description="the decision mode of that profile")
    rule: str = Field(description="what let the sample out: cm (class means), ic (internal classifier), "
                                  "ic+cm (both, combined mode), final (the network's own classifier)")
    member: str | None = Field(None, description="a cascade of models: the member that answered (its exits "
                                                 "are named '<member>/<exit>'); null for one network")


class ClassifyResponse(BaseModel):
    model: str
    bundle: str
    profile: str = Field(description="the operating point, per-request override, or 'full' with exits=off")
    version: int
    operating: Operating | None = Field(None, description="the time-shared mix, when one served")
    exits: Literal["on", "off"]
    predictions: list[Prediction]
    latency_seconds: float
    queue_seconds: float
    inference_seconds: float
    batch_samples: int = Field(description="samples in the network batch this request ran in")


# -- admin ---------------------------------------------------------------------------------------------

class JobInfo(BaseModel):
    id: str
    kind: str
    state: Literal["receiving", "running", "succeeded", "failed"]
    options: dict[str, Any]
    created: str | None
    started: str | None
    finished: str | None
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, str] | None


class JobList(BaseModel):
    jobs: list[JobInfo]


class BundleInfo(BaseModel):
    id: str
    active: bool
    readable: bool = True
    default_profile: str | None = None
    profiles: list[str] = []
    heads: dict[str, Any] | None = None
    num_means: int | None = None
    num_selection: int | None = None
    headline: dict[str, Any] | None = None


class BundlesResponse(BaseModel):
    model: str
    active: ActiveState
    bundles: list[BundleInfo]


# -- Open Inference Protocol v2 ------------------------------------------------------------------------

class OipError(BaseModel):
    """The Open Inference Protocol's error body, with this service's stable code beside the message."""

    error: str = Field(description="what went wrong, for humans (the protocol's field)")
    code: str = Field(description="stable machine-readable code (also in the X-Classmeans-Error-Code header)")


class InferInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the input's bytes follow the JSON header (binary tensor extension)")
    data: Any = Field(None, description="the tensor's elements (row-major, may be nested); BYTES images as "
                                        "base64 strings. Absent when parameters.binary_data_size is given")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: true for raw bytes after the JSON; classification: k for the top k")


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInput] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="absent for a binary output (parameters.binary_data_size)")


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[InferOutput]


class TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]
    parameters: dict[str, Any]


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class CascadeCreate(BaseModel):
    """A cascade of the store's models, cheapest first (``POST /admin/cascades``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
    members: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")]] = Field(
        min_length=2, max_length=8)
    replace: bool = False


class CascadeInfo(BaseModel):
    model: str
    members: list[str]
    classes: list[str]
