"""What the endpoints share, and the dependency that hands it to them: settings, model, decoder, batcher, metrics
and readiness."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from cascade import CascadeResult, check_max_experts, run_cascade
from service.adaptive import AdaptiveController
from service.admission import Admission
from service.batcher import Batcher, batch_buckets
from service.decode_pool import DecodePool
from service.drain import Drain
from service.errors import InvalidParameterError, ModelLoadError, NotReadyError
from service.images import ImageDecoder, default_max_pixels
from service.metrics import Metrics
from service.model import CUDA, OnnxModel, warm_up
from service.operating_points import BudgetError, OperatingPoints
from service.schemas import ClassifyParams
from service.settings import Settings
from service.shadow import Shadow

logger = logging.getLogger(__name__)


class ServiceState:
    """One app's model and the machinery around it; ``app.state.service`` holds it."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.model = model
        manifest = model.manifest
        self.labels = [c.name for c in manifest.classes]
        max_pixels = settings.max_pixels if settings.max_pixels is not None else default_max_pixels(manifest.input)
        self.decoder = ImageDecoder(manifest.input, max_pixels=max_pixels)
        self.decode_pool = DecodePool(threads=settings.decode_threads, queue_size=settings.decode_queue_size)
        self.metrics = Metrics(
            num_experts=model.num_experts,
            max_batch_size=settings.max_batch_size,
            model_name=manifest.model.name,
            model_version=manifest.model.version,
            provider=model.provider,
            groups=sorted({c.group for c in manifest.classes}),
        )
        self.groups = [c.group for c in manifest.classes]
        try:
            self.operating = OperatingPoints(
                manifest,
                default_threshold=settings.default_threshold,
                target_compute=settings.target_compute,
                on_change=self.metrics.observe_serving_point,
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
            on_batch=self.metrics.observe_batch,
            # On CUDA every new batch shape costs kernel selection and memory: batches are padded to the warmed sizes.
            buckets=batch_buckets(settings.max_batch_size) if model.provider == CUDA else (),
        )
        self.shadow = Shadow(
            rate=settings.shadow_rate if model.has_routers else 0.0,  # without routers every answer is the full one
            queue_size=settings.shadow_queue_size,
            full_run=self._full_run,
            run_in_worker=self.batcher.run_in_worker,
            is_idle=lambda: self.batcher.idle,
            observe=self.metrics.observe_shadow,
            on_dropped=self.metrics.shadow_dropped.inc,
        )
        self.admission = Admission(
            self.batcher, max_queue_size=settings.max_queue_size, max_queue_wait_s=settings.max_queue_wait_ms / 1000.0
        )
        self.adaptive = self._adaptive_controller(settings)  # after the admission, whose bound it may lower
        self.metrics.track_queue_depth(lambda: self.batcher.pending, settings.max_queue_size)
        self.drain = Drain()
        self.metrics.track_readiness(lambda: self.is_ready)
        # A request's rows are queued together: more than the queue holds could never run.
        self.max_request_rows = min(settings.max_request_rows, settings.max_queue_size)
        self.ready = False  # loaded and warm
        self.failure: str | None = None

    def _infer(self, images: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray) -> CascadeResult:
        return run_cascade(self.model, images, thresholds=thresholds, max_experts=max_experts)

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

    def observe_wait(self, seconds: float) -> None:
        """A classification served at the serving point waited ``seconds`` in the queue (for the adaptive
        controller, when there is one)."""
        if self.adaptive is not None:
            self.adaptive.observe_wait(seconds)

    def _full_run(self, images: np.ndarray) -> CascadeResult:
        return run_cascade(self.model, images, thresholds=0.0, max_experts=self.model.num_experts)

    @property
    def default_threshold(self) -> float:
        """The threshold of a request that names neither a threshold nor a compute budget."""
        return self.operating.threshold

    @property
    def is_ready(self) -> bool:
        """What /readyz answers: warm, and not shutting down."""
        return self.ready and not self.drain.draining

    def require_warm(self) -> None:
        """What a classification needs: the model loaded and warm (it is still served while draining)."""
        if not self.ready:
            raise NotReadyError(self.failure or "the model is still warming up")

    def require_ready(self) -> None:
        """What the readiness endpoints report: warm, and not shutting down (load balancers then stop sending)."""
        if self.drain.draining:
            raise NotReadyError("the server is shutting down")
        self.require_warm()

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

    async def warm_up(self) -> None:
        """Warm every graph at the batch sizes it will see, then report ready."""
        largest = self.settings.max_batch_size
        # CUDA picks kernels per input shape, so every size the batcher pads to is warmed; on CPU the extremes suffice.
        sizes = batch_buckets(largest) if self.model.provider == CUDA else sorted({1, largest})
        started = time.perf_counter()
        try:
            await self.batcher.run_in_worker(warm_up, self.model, sizes)
        except Exception as error:
            self.failure = f"warm-up failed: {error}"
            logger.error("%s", self.failure)
            return
        self.ready = True
        logger.info("model warm after %.2f s (batch sizes %s): ready", time.perf_counter() - started, sizes)


async def get_state(request: Request) -> ServiceState:
    """The state of the app that received ``request``. A coroutine on purpose: FastAPI runs a plain function
    dependency in a worker thread, a thread hop per request (measured a tenth of the event loop's time under
    overload)."""
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
