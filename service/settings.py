"""Service settings: one pydantic-settings class, read from ``RIDE_*`` environment variables and CLI flags.

Every field is both an environment variable (``RIDE_`` + the field name in upper case, e.g. ``RIDE_MAX_BATCH_SIZE``)
and a flag of ``python -m service`` (dash-case, e.g. ``--max-batch-size``); a flag wins over the environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cascade import Threshold
from service.cpu_quota import available_cpus

# Resolved from this file, not from the working directory, so that the default works wherever the server starts.
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "cifar10-lt-ride4"
# Decoding beyond a few threads only takes CPU from inference; the queue absorbs a burst of large images.
MAX_DEFAULT_DECODE_THREADS = 4


def default_decode_threads() -> int:
    """The CPUs this process may use, at most 4."""
    return min(MAX_DEFAULT_DECODE_THREADS, available_cpus())


class Settings(BaseSettings):
    """Everything the server can be told at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="RIDE_",
        extra="forbid",
        protected_namespaces=(),
        cli_prog_name="python -m service",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    model_dir: Path = Field(
        DEFAULT_MODEL_DIR,
        description="Model folder written by `python -m export`, served as a repository of one (its name and version "
        "from its manifest). Not with model_repository.",
    )
    model_repository: Path | None = Field(
        None,
        description="A folder of models laid out as <name>/<version>/ (Triton's layout), each version folder a model "
        "folder written by `python -m export`; every valid version is loaded. Not with model_dir.",
    )
    default_model: str | None = Field(
        None,
        description="The model the unnamed routes (/classify, /models, the page) serve; default: the only one loaded "
        "(required when the repository holds several).",
    )
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when it really runs, else CPU; cuda: refuse to start without CUDA."
    )
    intra_op_threads: int = Field(
        default_factory=available_cpus,
        ge=0,
        description=(
            "Threads of the process-wide onnxruntime pool on CPU (0: onnxruntime's choice, one per physical core of "
            "the host). Default: the CPUs this process may use: its CPU affinity (taskset, a cpuset), fewer when the "
            "cgroup CPU quota (a container's `cpus:`, a Kubernetes CPU limit) allows less."
        ),
    )
    inter_op_threads: int = Field(1, ge=0, description="Inter-op threads of that pool (0: onnxruntime's default).")
    cuda_tf32: bool = Field(
        False, description="Let CUDA use TF32 (about 1e-3 on fp32 logits: off, so served logits match the export's)."
    )
    cuda_conv_algo_search: Literal["heuristic", "exhaustive", "default"] = Field(
        "heuristic",
        description="How cuDNN picks convolution algorithms: heuristic (no timing, fast start-up), exhaustive "
        "(times every algorithm per input shape at the first run), default (one fixed algorithm).",
    )
    cuda_arena_extend_strategy: Literal["same_as_requested", "next_power_of_two"] = Field(
        "same_as_requested", description="How onnxruntime's CUDA memory arena grows."
    )
    io_binding: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Keep the trunk's output on the device between graph calls (onnxruntime I/O binding); auto: "
        "with CUDA only.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="Largest batch the dynamic batcher forms.")
    wait_when_idle: bool = Field(
        False,
        description="A request that finds no other waiting also waits max_wait_ms for company (off: it runs at once; "
        "on suits a GPU, where a batch of several costs what one image costs).",
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0.0,
        le=10_000.0,
        description="How long a batch formed while another ran waits for more requests after its first one (a "
        "request that finds none waiting runs at once).",
    )
    max_queue_size: int = Field(
        256, ge=1, description="Requests waiting for inference beyond which new ones get 503 + Retry-After."
    )
    max_queue_wait_ms: float = Field(
        500.0,
        gt=0.0,
        description=(
            "Longest wait in the queue: a request is refused (503 + Retry-After) before its body is read when the "
            "queue's expected wait is above it, and dropped (503) when it has waited that long."
        ),
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) sent with 503 replies.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Largest request body (413 above).")
    max_request_rows: int = Field(
        64,
        ge=1,
        le=4096,
        description=(
            "Most images (rows) one request may carry: files of /classify, instances of KServe v1, rows of a v2 "
            "input (413 above; the queue size bounds it too)."
        ),
    )
    max_pixels: int | None = Field(
        None,
        ge=1,
        description=(
            "Largest image decoded (width x height; for a baseline JPEG, at the reduced scale it decodes at), "
            "refused from its header (413). Default: 64 x the model's input pixels, at least 2 MiP (2,097,152), at "
            "most 25 MP."
        ),
    )
    decode_threads: int = Field(
        default_factory=default_decode_threads,
        ge=1,
        description="Threads decoding large images (default: the CPUs this process may use, at most 4).",
    )
    decode_queue_size: int = Field(
        16, ge=0, description="Images waiting for a decoding thread beyond which new ones get 503 + Retry-After."
    )
    default_threshold: Threshold | None = Field(
        None,
        description="Router threshold when a request gives none (default: the manifest's). Fixes the serving "
        "threshold: it overrides target_compute (the setting and the request parameter) and the admin route.",
    )
    target_compute: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Compute budget in (0, 1] (fraction of the full ensemble): serve the threshold whose validation "
        "relative compute (the manifest's curve) is the largest not above it; below the cheapest point, the "
        "cheapest point, with a warning. Default: the manifest's threshold.",
    )
    adaptive_latency_target_ms: float | None = Field(
        None,
        gt=0.0,
        description="Load-adaptive early exit: when the moving p95 of the queue wait goes above this, step to cheaper "
        "operating points along the manifest's curve (back when it falls). Off when unset.",
    )
    adaptive_min_compute: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="The floor of load-adaptive early exit: the cheapest point used has at least this validation "
        "relative compute (default: the curve's cheapest point).",
    )
    shadow_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of classifications also run through every expert after they are answered, off the hot "
        "path, to measure how often early exit changes the answer (ride_shadow_total). 0: off.",
    )
    shadow_queue_size: int = Field(
        64, ge=1, description="Shadow samples waiting at most; a sample that finds the queue full is dropped."
    )
    admin_routes: bool = Field(
        False,
        description="Enable the admin routes (PUT /v2/models/{name}/operating-point, the model repository's "
        "/v2/repository/...); off: they answer 404.",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token the admin routes require (Authorization: Bearer <token>) when set; 401 without it.",
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0.0,
        description=(
            "On SIGTERM, how long to keep serving (with /readyz 503 and `Connection: close`) before the listening "
            "socket closes, so that load balancers notice first."
        ),
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description=(
            "After that delay, how long in-flight requests may take; those still unanswered then get 503 and the "
            "process exits with status 3."
        ),
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description=(
            "Open connections at most (kept below the file-descriptor limit); beyond it the oldest connection still "
            "waiting for its request headers is closed, else the new one."
        ),
    )
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="Largest request line plus headers (431 above).")
    header_timeout_s: float = Field(
        10.0, gt=0.0, description="Time from connecting (or sending a request line) to the end of its headers (408)."
    )
    body_timeout_s: float = Field(
        30.0, gt=0.0, description="Longest pause in the middle of a request body before the connection is closed."
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0.0, description="How long an idle keep-alive connection stays open.")
    model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description=(
            "The model folder's digest (`python -m export verify` prints it): the server refuses any other folder."
        ),
    )
    cors_origins: str = Field(
        "",
        description=(
            "Origins allowed to call the API from a browser (CORS), comma-separated, or * for any; empty: no CORS "
            "headers (browsers allow only the server's own pages)."
        ),
    )
    api_key: SecretStr | None = Field(
        None,
        description=(
            "Bearer token the inference routes require (Authorization: Bearer <token>); unset: no token needed. "
            "Probes, metadata, /metrics and the docs stay open."
        ),
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level.")
    access_log: bool = Field(False, description="Log every request (costs throughput).")

    @field_validator("admin_token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("an empty admin token would let anyone in: unset RIDE_ADMIN_TOKEN or give a token")
        return value

    @field_validator("model_dir", "model_repository")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @property
    def cors_origin_list(self) -> list[str]:
        """`cors_origins` as a list."""
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def threads_for(self, cuda: bool) -> int:
        """The intra-op threads to use: the setting when one was given; 1 when CUDA runs the graphs (the CPU only
        feeds the GPU and computes shapes, and one spinning thread per core would compete with the server for
        nothing); else the default."""
        if cuda and "intra_op_threads" not in self.model_fields_set:
            return 1
        return self.intra_op_threads

    @model_validator(mode="after")
    def _batch_wait_within_queue_wait(self) -> Settings:
        # The wait for a batch's company is time in the queue: above the bound, unfilled batches would all expire.
        if self.max_wait_ms >= self.max_queue_wait_ms:
            raise ValueError(
                f"max_wait_ms ({self.max_wait_ms:g}) must be below max_queue_wait_ms ({self.max_queue_wait_ms:g}): "
                "a request waits for its batch in the queue"
            )
        return self

    @model_validator(mode="after")
    def _one_model_source(self) -> Settings:
        if self.model_repository is None:
            return self
        if "model_dir" in self.model_fields_set:
            raise ValueError(
                "model_dir and model_repository are both set: serve one folder (RIDE_MODEL_DIR / --model-dir) or a "
                "repository of models (RIDE_MODEL_REPOSITORY / --model-repository), not both"
            )
        if self.model_sha256 is not None:
            raise ValueError(
                "model_sha256 pins one model folder (RIDE_MODEL_DIR): it cannot pin a repository of several"
            )
        return self

    @model_validator(mode="after")
    def _adaptive_needs_a_movable_threshold(self) -> Settings:
        if self.adaptive_latency_target_ms is not None and self.default_threshold is not None:
            raise ValueError(
                "adaptive_latency_target_ms steps the threshold along the curve, and default_threshold fixes it: "
                "set one of RIDE_ADAPTIVE_LATENCY_TARGET_MS and RIDE_DEFAULT_THRESHOLD"
            )
        return self

    @classmethod
    def from_cli(cls, argv: Sequence[str]) -> Settings:
        """Settings from CLI flags, then ``RIDE_*`` environment variables, then the defaults."""
        return cls(_cli_parse_args=list(argv))
