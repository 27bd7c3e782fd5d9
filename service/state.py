"""What the endpoints share, and the dependency that hands it to them: settings, model, decoder, batcher, metrics
and readiness."""

from __future__ import annotations

import logging
import time
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from cascade import CascadeResult, check_max_experts, run_cascade
from service.admission import Admission
from service.batcher import Batcher, batch_buckets
from service.decode_pool import DecodePool
from service.drain import Drain
from service.errors import InvalidParameterError, NotReadyError
from service.images import ImageDecoder, default_max_pixels
from service.metrics import Metrics
from service.model import CUDA, OnnxModel, warm_up
from service.schemas import ClassifyParams
from service.settings import Settings

logger = logging.getLogger(__name__)


class ServiceState:
    """One app's model and the machinery around it; ``app.state.service`` holds it."""

    def __init__(self, settings: Settings, model: OnnxModel) -> None:
        self.settings = settings
        self.model = model
        manifest = model.manifest
        self.default_threshold = (
            settings.default_threshold if settings.default_threshold is not None else manifest.cascade.default_threshold
        )
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
        )
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
        self.admission = Admission(
            self.batcher, max_queue_size=settings.max_queue_size, max_queue_wait_s=settings.max_queue_wait_ms / 1000.0
        )
        self.metrics.track_queue_depth(lambda: self.batcher.pending, settings.max_queue_size)
        self.drain = Drain()
        self.metrics.track_readiness(lambda: self.is_ready)
        # A request's rows are queued together: more than the queue holds could never run.
        self.max_request_rows = min(settings.max_request_rows, settings.max_queue_size)
        self.ready = False  # loaded and warm
        self.failure: str | None = None

    def _infer(self, images: np.ndarray, thresholds: np.ndarray, max_experts: np.ndarray) -> CascadeResult:
        return run_cascade(self.model, images, thresholds=thresholds, max_experts=max_experts)

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
        """The threshold and expert limit a request runs with: its own, else the server's defaults.

        Raises:
            InvalidParameterError: an expert limit outside 1..E (the schema cannot know E).
        """
        max_experts = params.max_experts if params.max_experts is not None else self.model.num_experts
        try:
            check_max_experts(max_experts, self.model.num_experts)
        except ValueError as error:
            raise InvalidParameterError(str(error)) from None
        threshold = params.threshold if params.threshold is not None else self.default_threshold
        return threshold, max_experts

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
