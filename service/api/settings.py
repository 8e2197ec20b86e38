"""Settings of the serving process, read from ``CLASSMEANS_*`` environment variables (pydantic-settings).

Every field can be set as ``CLASSMEANS_<FIELD>`` (e.g. ``CLASSMEANS_MAX_BATCH_SIZE=16``) or passed to
``Settings(...)``; ``classmeans serve`` flags override both. Sizes are bytes, times seconds unless the name
says otherwise (``max_delay_ms``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
ADMIN_TOKEN_FILE = ".admin_token"
DEFAULT_MODEL = "cifar10-cascade"  # the embedded default under model_store/ (a cascade of the two networks there)
MIN_TOKEN_CHARS = 16


class Settings(BaseSettings):
    """Everything the HTTP layer, the batcher and the admin jobs are configured with."""

    model_config = SettingsConfigDict(env_prefix="CLASSMEANS_", extra="ignore", frozen=True)

    store: Path = Field(Path("model_store"), description="model store root (one folder per model)")
    model: str = Field(DEFAULT_MODEL, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$",
                       description="the model folder under the store that this process serves")
    host: str = Field("127.0.0.1", description="bind address of `classmeans serve`")
    port: int = Field(8000, ge=0, le=65535, description="bind port of `classmeans serve` (0: any free)")

    max_body_bytes: int = Field(8 * MiB, gt=0, description="largest request body on the data plane")
    max_file_bytes: int = Field(4 * MiB, gt=0, description="largest single image (multipart part or raw body)")
    max_upload_bytes: int = Field(256 * MiB, gt=0, description="largest dataset archive upload")
    max_files: int = Field(32, ge=1, description="most images in one /classify or /infer request")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="largest width*height of one image")

    max_batch_size: int = Field(32, ge=1, description="most samples the batcher runs through the network at once")
    max_delay_ms: float = Field(2.0, ge=0, description="longest wait for more requests before a batch runs")
    queue_size: int = Field(256, ge=1, description="most samples waiting for the network; more -> 503")
    request_deadline_s: float = Field(10.0, gt=0, description="deadline of one inference request")
    decode_threads: int = Field(2, ge=1, description="threads decoding images off the event loop")
    engine: str = Field("auto", pattern=r"^(auto|onnx|torch)$",
                        description="what runs the cascade: auto (the compiled ONNX Runtime engine on CPU, torch if "
                                    "the network cannot be compiled), onnx (compiled or fail at start), torch "
                                    "(the eager reference engine)")
    engine_prebuild: str = Field("served", pattern=r"^(served|all)$",
                                 description="compiled engine: build the serving point's sessions at start and "
                                             "activation and the rest when first needed (served), or every "
                                             "class-means profile's in the background right away (all)")
    measure_time: bool = Field(False, description="re-measure the active bundle's time axis at start with the "
                               "serving engine on this machine (its profiles' ms re-costed from the stored exit "
                               "shares; needs a timing.json from `classmeans timing`)")
    torch_threads: int = Field(0, ge=0, le=256, description="intra-op threads of each serving process (0: its "
                               "share of the usable cores, see service/serving/cpu_budget.py)")

    admin_token: SecretStr | None = Field(None, description="admin bearer token; generated and stored if unset")
    graceful_timeout_s: float = Field(30.0, ge=0, description="how long shutdown waits for in-flight requests")
    keep_alive_s: int = Field(65, ge=1, description="idle keep-alive timeout; above a proxy's (often 60 s)")
    warmup: bool = Field(True, description="run the network once per exit mode before reporting ready")
    gc_freeze: bool = Field(True, description="freeze the start-up heap out of the garbage collector's full "
                            "collections once ready (100-160 ms pauses otherwise; service/serving/gc_pauses.py). "
                            "Off only where many apps share one process (tests)")
    log_level: str = Field("info", description="log level of `classmeans serve`")
    workers: int = Field(0, ge=0, le=256, description="worker processes of `classmeans serve`, each a replica "
                         "of the store (0: one per CPU core this process may use)")
    follow_interval_s: float = Field(0.2, ge=0, description="how often every process polls active.json for "
                                     "switches made elsewhere (0: do not follow)")

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_TOKEN_CHARS:
            raise ValueError(f"admin_token must have at least {MIN_TOKEN_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.queue_size < self.max_files:
            raise ValueError("queue_size must be at least max_files (a full request must fit the queue)")
        if self.max_file_bytes > self.max_body_bytes:
            raise ValueError("max_file_bytes must not exceed max_body_bytes")
        return self

    @property
    def model_dir(self) -> Path:
        return Path(self.store) / self.model

    @property
    def token_file(self) -> Path:
        return Path(self.store) / ADMIN_TOKEN_FILE

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0
