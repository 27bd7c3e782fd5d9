"""Loading the repository's models into the table, at start-up and while serving (the repository routes, SIGHUP).

A version is loaded and checked (manifest, hashes, known answers: `service.model.load_model`) and warmed up in a
worker thread, off the event loop; only the swap in the table happens on the loop (`service.model_table`). A version
that fails to load is reported (log, `index`, the load's error) and changes nothing: what served before serves on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from export.manifest import ManifestError
from export.providers import CUDA, CudaOptions
from service.errors import LoadFailedError, ModelLoadError, ModelNotFoundError, first_line
from service.metrics import Metrics
from service.model import OnnxModel, load_model, requested_providers, warm_up
from service.model_table import ModelTable
from service.model_version import ModelVersion, warm_batch_sizes
from service.repository import Repository, VersionFolder, fingerprint, version_order
from service.settings import Settings

logger = logging.getLogger(__name__)

BuildVersion = Callable[[VersionFolder, str | None, OnnxModel], ModelVersion]


def cuda_options(settings: Settings) -> CudaOptions:
    return CudaOptions(
        tf32=settings.cuda_tf32,
        conv_algo_search=settings.cuda_conv_algo_search,
        arena_extend_strategy=settings.cuda_arena_extend_strategy,
    )


def load_folder(settings: Settings, folder: Path) -> OnnxModel:
    """Load and check one model folder as ``settings`` say (every session shares the process-wide thread pool).

    Raises:
        ModelLoadError: the folder cannot be served.
    """
    return load_model(
        folder,
        provider=settings.provider,
        intra_op_threads=settings.threads_for(CUDA in requested_providers(settings.provider)),
        inter_op_threads=settings.inter_op_threads,
        cuda=cuda_options(settings),
        expected_digest=settings.model_sha256 if settings.model_repository is None else None,
        io_binding=settings.io_binding,
    )


@dataclass(frozen=True)
class LoadedFolder:
    """A version folder loaded (not yet serving)."""

    where: VersionFolder
    fingerprint: str | None
    model: OnnxModel


def load_initial(
    settings: Settings, repository: Repository, model: OnnxModel | None = None
) -> tuple[list[LoadedFolder], dict[tuple[str, str], str]]:
    """Every version the server starts with, and why each one that could not be loaded was not.

    One model folder (``RIDE_MODEL_DIR``, or ``model`` already loaded) must load. A repository starts with its
    valid versions and reports the others.

    Raises:
        ModelLoadError: the one model folder cannot be served, or the repository has no valid version at all.
    """
    if repository.folder is not None:
        if model is None:
            model = load_folder(settings, repository.folder)
        info = model.manifest.model
        where = VersionFolder(info.name, info.version, repository.folder)
        return [LoadedFolder(where, fingerprint(repository.folder), model)], {}
    try:
        found = repository.scan()
    except OSError as error:
        raise ModelLoadError(f"cannot list {repository.describe()}: {error}") from None
    loaded, failures, empty = [], {}, []
    for name, folders in found.items():
        if not folders:
            empty.append(repository.missing_versions(name))
            logger.error("not serving %s", empty[-1])
        for where in folders:
            try:
                loaded.append(LoadedFolder(where, fingerprint(where.folder), load_folder(settings, where.folder)))
            except ModelLoadError as error:
                failures[(where.name, where.version)] = first_line(error)
                logger.error("not serving %s version %s (%s): %s", where.name, where.version, where.folder, error)
    if not loaded:
        problems = [f"{n} {v}: {reason}" for (n, v), reason in failures.items()] + empty
        listed = "; ".join(problems) or "no <name>/<version>/ folder"
        raise ModelLoadError(f"{repository.describe()} has no model that can be served ({listed})")
    return loaded, failures


def choose_default(settings: Settings, names: list[str]) -> str:
    """The model the unnamed routes serve: ``RIDE_DEFAULT_MODEL``, else the only one loaded.

    Raises:
        ModelLoadError: the default named is not loaded, or several are loaded and none is named.
    """
    if settings.default_model is not None:
        if settings.default_model not in names:
            raise ModelLoadError(
                f"the default model {settings.default_model!r} (RIDE_DEFAULT_MODEL) is not among the models loaded: "
                f"{', '.join(sorted(names))}"
            )
        return settings.default_model
    if len(names) > 1:
        raise ModelLoadError(
            f"several models are loaded ({', '.join(sorted(names))}): name the one the unnamed routes (/classify, "
            "/models, the page) serve with RIDE_DEFAULT_MODEL (--default-model)"
        )
    return names[0]


IndexState = Literal["READY", "UNAVAILABLE"]


@dataclass(frozen=True)
class IndexEntry:
    """One model version of the repository index (the Open Inference Protocol's repository extension)."""

    name: str
    version: str | None  # None: a model folder without a version folder
    state: IndexState
    reason: str


class Loader:
    """Loads, reloads and unloads models of ``repository`` into ``table``, one operation at a time."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        table: ModelTable,
        metrics: Metrics,
        *,
        build: BuildVersion,
        on_swap: Callable[[], None],
        failures: dict[tuple[str, str], str],
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.table = table
        self.metrics = metrics
        self._build = build
        self._on_swap = on_swap
        self.failures = dict(failures)  # (name, version) -> why its last load failed
        self.unloaded: set[str] = set()  # unloaded by request: a rescan leaves them unloaded
        self._lock = asyncio.Lock()

    def _scan(self) -> dict[str, list[VersionFolder]]:
        try:
            return self.repository.scan()
        except (ManifestError, OSError) as error:
            raise LoadFailedError(f"cannot read {self.repository.describe()}: {first_line(error)}") from None

    async def load(self, name: str) -> None:
        """Load ``name``'s versions anew: new and changed folders are loaded, removed ones unloaded.

        Raises:
            ModelNotFoundError: the repository has no folder for ``name``.
            LoadFailedError: a version failed to load (the others were loaded; what served it before serves on).
        """
        async with self._lock:
            found = await asyncio.to_thread(self._scan)
            if name not in found:
                raise ModelNotFoundError(f"{self.repository.describe()} has no model {name!r}")
            self.unloaded.discard(name)
            problems = await self._sync(name, found[name])
        if problems:
            raise LoadFailedError("; ".join(problems))

    async def unload(self, name: str) -> None:
        """Stop serving ``name`` (every version; requests already running on it finish first).

        Raises:
            ModelNotFoundError: no such model is loaded.
        """
        async with self._lock:
            if not self.table.versions(name):
                raise ModelNotFoundError(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            await self._swap(name, {})
            logger.info("unloaded model %s", name)

    async def rescan(self) -> list[str]:
        """Load every model of the repository anew (but those unloaded by request) and unload the models whose folder
        is gone; returns the problems (also logged). A repository that cannot be read changes nothing."""
        async with self._lock:
            problems = await self._rescan()
        logger.info("rescan done: %s", "; ".join(problems) if problems else "every version loaded")
        return problems

    async def _rescan(self) -> list[str]:
        try:
            found = await asyncio.to_thread(self._scan)
        except LoadFailedError as error:
            logger.error("rescan: %s", error)
            return [str(error)]
        problems = []
        for name, folders in found.items():
            if name not in self.unloaded:
                problems += await self._sync(name, folders)
        for name in self.table.names():
            if name not in found:
                await self._swap(name, {})
                logger.info("rescan: unloaded model %s (its folder is gone)", name)
        return problems

    async def _sync(self, name: str, folders: list[VersionFolder]) -> list[str]:
        current = self.table.versions(name)
        serving: dict[str, ModelVersion] = {}
        problems = []
        for where in folders:
            old = current.get(where.version)
            digest = await asyncio.to_thread(fingerprint, where.folder)  # reads every manifest: not on the loop
            if old is not None and digest is not None and old.fingerprint == digest:
                serving[where.version] = old
                continue
            try:
                serving[where.version] = await self._load_version(where, digest)
            except Exception as error:  # any failure leaves what serves in place, and says why
                reason = first_line(error)
                self.failures[(name, where.version)] = reason
                problems.append(f"{name} version {where.version}: {reason}")
                logger.error("cannot load %s version %s (%s): %s", name, where.version, where.folder, reason)
                if old is not None:
                    serving[where.version] = old
                continue
            self.failures.pop((name, where.version), None)
            logger.info("loaded %s version %s from %s", name, where.version, where.folder)
        if not folders:
            problems.append(self.repository.missing_versions(name))
        await self._swap(name, serving)
        return problems

    async def _load_version(self, where: VersionFolder, digest: str | None) -> ModelVersion:
        model = await asyncio.to_thread(self._load_and_warm, where.folder)
        served = self._build(where, digest, model)
        await served.start()
        return served

    def _load_and_warm(self, folder: Path) -> OnnxModel:
        model = load_folder(self.settings, folder)
        warm_up(model, warm_batch_sizes(model, self.settings.max_batch_size))
        return model

    async def _swap(self, name: str, serving: dict[str, ModelVersion]) -> None:
        """Serve ``serving`` for ``name`` at once, then retire what it replaced once its requests are done."""
        removed = self.table.replace(name, serving)
        for old in removed:
            self.metrics.model_unloaded(old.name, old.version, old.model.provider)
        for served in serving.values():
            self.metrics.model_loaded(served.name, served.version, served.model.provider)
        self._on_swap()
        await asyncio.gather(*(old.retire(self.settings.shutdown_timeout_s) for old in removed))

    async def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every model version in the repository, and every one served, with its state and why. The folders are
        read in a worker thread (a repository on network storage must not stall the requests being served); the
        table is read on the event loop, where it changes."""
        try:
            found = await asyncio.to_thread(self._scan)
        except LoadFailedError as error:  # the index still lists what is served
            logger.warning("index: %s", error)
            found = {}
        entries = {}
        for name, folders in found.items():
            if not folders:
                entries[(name, None)] = IndexEntry(name, None, "UNAVAILABLE", self.repository.missing_versions(name))
            loaded = self.table.versions(name)
            for where in folders:
                key = (name, where.version)
                failure = self.failures.get(key)
                if where.version in loaded:
                    reason = ""
                    if failure:
                        reason = f"its folder changed and the reload failed ({failure}): the previous load serves"
                    entries[key] = IndexEntry(name, where.version, "READY", reason)
                elif name in self.unloaded:
                    entries[key] = IndexEntry(name, where.version, "UNAVAILABLE", "unloaded")
                elif failure is not None:
                    entries[key] = IndexEntry(name, where.version, "UNAVAILABLE", failure)
                else:
                    entries[key] = IndexEntry(
                        name, where.version, "UNAVAILABLE", "not loaded yet: load the model, or send the server SIGHUP"
                    )
        for served in self.table.all_versions():
            key = (served.name, served.version)
            if key not in entries:
                reason = "its folder is gone: served until the next load or rescan"
                entries[key] = IndexEntry(served.name, served.version, "READY", reason)
        listed = []
        for name in sorted({e.name for e in entries.values()}):
            listed += [e for e in entries.values() if e.name == name and e.version is None]
            versions = {e.version: e for e in entries.values() if e.name == name and e.version is not None}
            listed += [versions[v] for v in version_order(versions)]
        return [e for e in listed if e.state == "READY"] if ready_only else listed
