"""One loaded version of one model and the machinery that serves it: its sessions, decoder, operating points,
batcher, admission, shadow and load-adaptive controller.

What a server shares across models (settings, the decode pool, the metrics registry, the drain, readiness) is
`service.state.ServiceState`; a request resolves its version once (`service.model_table.ModelTable.use`) and holds
it to the end, so that a reload never changes the version under a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from cascade import CascadeResult, check_max_experts, run_cascade
from service.adaptive import AdaptiveController
from service.admission import Admission
from service.batcher import Batcher, batch_buckets
from service.decode_pool import DecodePool
from service.errors import InvalidParameterError, ModelLoadError
from service.images import ImageDecoder, default_max_pixels
from service.metrics import Metrics
from service.model import CUDA, OnnxModel, warm_up
from service.operating_points import BudgetError, OperatingPoints, ServingPoint
from service.schemas import ClassifyParams
from service.settings import Settings
from service.shadow import Shadow

logger = logging.getLogger(__name__)


def warm_batch_sizes(model: OnnxModel, largest: int) -> list[int]:
    """The batch sizes warm-up runs: CUDA picks kernels per input shape, so every size the batcher pads to; on CPU
    the extremes suffice."""
    return batch_buckets(largest) if model.provider == CUDA else sorted({1, largest})


class ModelVersion:
    """One loaded model version, served under ``name`` and ``version`` (the repository's folder names)."""

    def __init__(
        self,
        settings: Settings,
        model: OnnxModel,
        *,
        name: str,
        version: str,
        fingerprint: str | None,
        metrics: Metrics,
        decode_pool: DecodePool,
        on_serving_point: Callable[[ModelVersion, ServingPoint], None] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.name = name
        self.version = version
        self.fingerprint = fingerprint
        self.metrics = metrics
        self.decode_pool = decode_pool
        manifest = model.manifest
        self.labels = [c.name for c in manifest.classes]
        self.groups = [c.group for c in manifest.classes]
        max_pixels = settings.max_pixels if settings.max_pixels is not None else default_max_pixels(manifest.input)
        self.decoder = ImageDecoder(manifest.input, max_pixels=max_pixels)
        report = on_serving_point
        try:
            self.operating = OperatingPoints(
                manifest,
                default_threshold=settings.default_threshold,
                target_compute=settings.target_compute,
                on_change=(lambda serving: report(self, serving)) if report is not None else None,
            )
        except BudgetError as error:
            raise ModelLoadError(f"RIDE_TARGET_COMPUTE: {error}") from None
        self.batcher = Batcher(
            self._infer,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue_size=settings.max_queue_size,
            max_queue_wait_s=settings.max_queue_wait_ms / 1000.0,
            wait_when_idle=settings.wait_when_idle,
            on_batch=metrics.observe_batch,
            # On CUDA every new batch shape costs kernel selection and memory: batches are padded to the warmed sizes.
            buckets=batch_buckets(settings.max_batch_size) if model.provider == CUDA else (),
        )
        self.shadow = Shadow(
            rate=settings.shadow_rate if model.has_routers else 0.0,  # without routers every answer is the full one
            queue_size=settings.shadow_queue_size,
            full_run=self._full_run,
            run_in_worker=self.batcher.run_in_worker,
            is_idle=lambda: self.batcher.idle,
            observe=metrics.observe_shadow,
            on_dropped=metrics.shadow_dropped.inc,
        )
        self.admission = Admission(
            self.batcher, max_queue_size=settings.max_queue_size, max_queue_wait_s=settings.max_queue_wait_ms / 1000.0
        )
        self.adaptive = self._adaptive_controller(settings)  # after the admission, whose bound it may lower
        # A request's rows are queued together: more than the queue holds could never run.
        self.max_request_rows = min(settings.max_request_rows, settings.max_queue_size)
        self.in_flight = 0  # requests holding this version (`service.model_table.ModelTable.use`)
        self._released = asyncio.Event()  # set whenever in_flight falls to 0
        self._released.set()
        self._started = False

    def __repr__(self) -> str:
        return f"ModelVersion({self.name!r}, {self.version!r})"

    def _infer(self, images: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray) -> CascadeResult:
        return run_cascade(self.model, images, thresholds=thresholds, max_experts=max_experts)

    def _full_run(self, images: np.ndarray) -> CascadeResult:
        return run_cascade(self.model, images, thresholds=0.0, max_experts=self.model.num_experts)

    def _adaptive_controller(self, settings: Settings) -> AdaptiveController | None:
        if settings.adaptive_latency_target_ms is None:
            return None
        if self.operating.curve is None:
            raise ModelLoadError(
                "RIDE_ADAPTIVE_LATENCY_TARGET_MS steps along the manifest's operating curve, and this model has none "
                "(manifest format 2, or no routers): add one with `python -m export curve`"
            )
        return AdaptiveController(
            self.operating,
            target_s=settings.adaptive_latency_target_ms / 1000.0,
            min_compute=settings.adaptive_min_compute,
            on_step=lambda direction: self.metrics.adaptive_steps.labels(direction=direction).inc(),
            on_wait_p95=self.metrics.adaptive_wait_p95.set,
            on_floor=self._bound_wait_at_floor,
        )

    def _bound_wait_at_floor(self, at_floor: bool) -> None:
        target_ms = self.settings.adaptive_latency_target_ms
        if target_ms is not None:
            bound = target_ms / 1000.0 if at_floor else None
            self.admission.bound_wait(bound)
            self.batcher.bound_queue_wait(bound)

    async def start(self) -> None:
        """Start the batcher, the shadow and the adaptive controller (on the event loop that will serve)."""
        await self.batcher.start()
        await self.shadow.start()
        if self.adaptive is not None:
            await self.adaptive.start()
        self._started = True

    async def stop(self, timeout_s: float) -> None:
        """Stop serving: the shadow and the controller at once, the batcher after its accepted requests."""
        if not self._started:
            return
        self._started = False
        await self.shadow.stop()
        if self.adaptive is not None:
            await self.adaptive.stop()
        await self.batcher.stop(timeout_s)

    async def retire(self, timeout_s: float) -> None:
        """Wait until no request holds this version (it is no longer in the table, so none can start on it), then
        stop it."""
        await self._released.wait()
        await self.stop(timeout_s)

    def hold(self) -> None:
        self.in_flight += 1
        self._released.clear()

    def release(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._released.set()

    async def warm_up(self) -> float:
        """Warm every graph at the batch sizes it will see, on the inference thread; returns the seconds taken."""
        sizes = warm_batch_sizes(self.model, self.settings.max_batch_size)
        started = time.perf_counter()
        await self.batcher.run_in_worker(warm_up, self.model, sizes)
        return time.perf_counter() - started

    def observe_wait(self, seconds: float) -> None:
        """A classification served at the serving point waited ``seconds`` in the queue (for the adaptive
        controller, when there is one)."""
        if self.adaptive is not None:
            self.adaptive.observe_wait(seconds)

    @property
    def default_threshold(self) -> float:
        """The threshold of a request that names neither a threshold nor a compute budget."""
        return self.operating.threshold

    def cascade_settings(self, params: ClassifyParams) -> tuple[float, int]:
        """The threshold and expert limit a request runs with (see `cascade_choice`)."""
        threshold, max_experts, _ = self.cascade_choice(params)
        return threshold, max_experts

    def cascade_choice(self, params: ClassifyParams) -> tuple[float, int, str | None]:
        """The threshold and expert limit a request runs with (its own, else its compute budget's point, else the
        server's; `service.operating_points`), and a warning about its budget, if any.

        Raises:
            InvalidParameterError: an expert limit outside 1..E (the schema cannot know E), or a compute budget for
                a model without a curve.
        """
        max_experts = params.max_experts if params.max_experts is not None else self.model.num_experts
        try:
            check_max_experts(max_experts, self.model.num_experts)
            threshold, warning = self.operating.request_threshold(params.threshold, params.target_compute)
        except ValueError as error:
            raise InvalidParameterError(str(error)) from None
        return threshold, max_experts, warning
