"""What the endpoints share, and the dependency that hands it to them: settings, the loaded models (one
`service.model_version.ModelVersion` per version, in a `service.model_table.ModelTable`), the loader, the decode
pool, metrics and readiness."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import Depends, Request

from service.decode_pool import DecodePool
from service.drain import Drain
from service.errors import ModelNotFoundError, NotReadyError
from service.loader import LoadedFolder, Loader, choose_default, load_initial
from service.metrics import Metrics
from service.model import OnnxModel
from service.model_table import ModelTable
from service.model_version import ModelVersion
from service.operating_points import ServingPoint
from service.repository import Repository
from service.settings import Settings

logger = logging.getLogger(__name__)


def repository_of(settings: Settings, model: OnnxModel | None = None) -> Repository:
    """The repository ``settings`` name (``model``'s folder when a loaded model is given)."""
    if model is not None:
        return Repository(folder=model.folder)
    if settings.model_repository is not None:
        return Repository(root=settings.model_repository)
    return Repository(folder=settings.model_dir)


class ServiceState:
    """One app's models and what they share; ``app.state.service`` holds it.

    Raises:
        ModelLoadError: no model can be served, or the default model cannot be chosen (before any socket opens).
    """

    def __init__(self, settings: Settings, *, model: OnnxModel | None = None) -> None:
        self.settings = settings
        repository = repository_of(settings, model)
        loaded, failures = load_initial(settings, repository, model)
        self.table = ModelTable()
        self.table.default_name = choose_default(settings, sorted({f.where.name for f in loaded}))
        self.decode_pool = DecodePool(threads=settings.decode_threads, queue_size=settings.decode_queue_size)
        self.metrics = Metrics(
            num_experts=max(f.model.num_experts for f in loaded),
            max_batch_size=settings.max_batch_size,
            groups=sorted({c.group for f in loaded for c in f.model.manifest.classes}),
        )
        by_name: dict[str, dict[str, ModelVersion]] = {}
        for folder in loaded:
            by_name.setdefault(folder.where.name, {})[folder.where.version] = self.build_version(folder)
        for name, versions in by_name.items():
            self.table.replace(name, versions)
            for served in versions.values():
                self.metrics.model_loaded(served.name, served.version, served.model.provider)
        self.loader = Loader(
            settings,
            repository,
            self.table,
            self.metrics,
            build=lambda where, digest, loaded_model: self.build_version(LoadedFolder(where, digest, loaded_model)),
            on_swap=self._report_serving_point,
            failures=failures,
        )
        self._report_serving_point()
        self.metrics.track_queue_depth(
            lambda: sum(v.batcher.pending for v in self.table.all_versions()), settings.max_queue_size
        )
        self.drain = Drain()
        self.metrics.track_readiness(lambda: self.is_ready)
        self.ready = False  # the models loaded at start-up are warm
        self.failure: str | None = None

    def build_version(self, folder: LoadedFolder) -> ModelVersion:
        return ModelVersion(
            self.settings,
            folder.model,
            name=folder.where.name,
            version=folder.where.version,
            fingerprint=folder.fingerprint,
            metrics=self.metrics,
            decode_pool=self.decode_pool,
            on_serving_point=self._serving_point_changed,
        )

    def _serving_point_changed(self, served: ModelVersion, serving: ServingPoint) -> None:
        # The operating-point gauges describe what the unnamed routes serve: the default model's latest version.
        if self.table.is_default_latest(served):
            self.metrics.observe_serving_point(serving)

    def _report_serving_point(self) -> None:
        with contextlib.suppress(NotReadyError):  # the default model was unloaded
            self.metrics.observe_serving_point(self.table.resolve(None).operating.serving)

    def default_model(self) -> ModelVersion:
        """What the unnamed routes serve now (the default model's latest version).

        Raises:
            DefaultModelUnloadedError: the default model is not loaded (it was unloaded).
        """
        return self.table.resolve(None)

    def check_admission(self, query: str) -> None:
        """The connection-level refusal's check (`service.admission.early_refusal`) of a /classify request with this
        query string: on the queue of the model version it names (by default, the default model's latest)."""
        params = parse_qs(query)
        name, version = params.get("model", [None])[-1], params.get("version", [None])[-1]
        try:
            served = self.table.resolve(name, version)
        except (ModelNotFoundError, NotReadyError):
            return  # the route answers 404, or 503 for an unloaded default model
        served.admission.check()

    async def start(self) -> None:
        for served in self.table.all_versions():
            await served.start()

    async def stop(self) -> None:
        for served in self.table.all_versions():
            await served.stop(self.settings.shutdown_timeout_s)

    async def warm_up(self) -> None:
        """Warm every model loaded at start-up, then report ready."""
        for served in self.table.all_versions():
            try:
                seconds = await served.warm_up()
            except Exception as error:
                self.failure = f"warm-up of {served.name} version {served.version} failed: {error}"
                logger.error("%s", self.failure)
                return
            logger.info("%s version %s warm after %.2f s", served.name, served.version, seconds)
        self.ready = True
        logger.info("ready")

    @property
    def is_ready(self) -> bool:
        """What /readyz answers: warm, not shutting down, and the default model loaded."""
        try:
            self.require_ready()
        except NotReadyError:
            return False
        return True

    def require_warm(self) -> None:
        """What a classification needs: the models loaded and warm (they are still served while draining)."""
        if not self.ready:
            raise NotReadyError(self.failure or "the model is still warming up")

    def require_ready(self, *, default_model: bool = True) -> None:
        """What the readiness endpoints report: warm, and not shutting down (load balancers then stop sending). The
        server's readiness also needs the default model loaded, since the unnamed routes serve it; a model's own
        readiness (``default_model=False``) does not."""
        if self.drain.draining:
            raise NotReadyError("the server is shutting down")
        self.require_warm()
        if default_model:
            self.table.require_default()


async def get_state(request: Request) -> ServiceState:
    """The state of the app that received ``request``. A coroutine on purpose: FastAPI runs a plain function
    dependency in a worker thread, a thread hop per request (measured a tenth of the event loop's time under
    overload)."""
    return request.app.state.service


StateDep = Annotated[ServiceState, Depends(get_state)]
