"""What is served: model name -> loaded versions, and which model the unnamed routes serve.

The table is read and changed only on the event loop, so a swap (`replace`) is atomic for every request: a request
resolves its version once (`use`) and holds it until its response is built; a version taken out of the table is
retired (`service.model_version.ModelVersion.retire`) only when the last request holding it is done.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import DefaultModelUnloadedError, ModelNotFoundError, NotReadyError
from service.model_version import ModelVersion
from service.repository import version_order


class ModelTable:
    """The loaded versions of every model, and the default model's name."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, ModelVersion]] = {}
        self.default_name: str | None = None

    def names(self) -> list[str]:
        """The loaded models' names, the default first, then alphabetically."""
        return sorted(self._models, key=lambda name: (name != self.default_name, name))

    def versions(self, name: str) -> dict[str, ModelVersion]:
        """The loaded versions of ``name`` (empty when none), oldest first."""
        loaded = self._models.get(name, {})
        return {version: loaded[version] for version in version_order(loaded)}

    def all_versions(self) -> list[ModelVersion]:
        """Every loaded version of every model (default model first, each model's versions latest first)."""
        return [v for name in self.names() for v in reversed(self.versions(name).values())]

    def replace(self, name: str, versions: dict[str, ModelVersion]) -> list[ModelVersion]:
        """Serve ``versions`` of ``name`` from now on (none: unload it); returns the versions taken out."""
        previous = self._models.pop(name, {})
        if versions:
            self._models[name] = dict(versions)
        kept = {id(v) for v in versions.values()}
        return [v for v in previous.values() if id(v) not in kept]

    def resolve(self, name: str | None, version: str | None = None) -> ModelVersion:
        """The version a request for ``name`` (None: the default model) and ``version`` (None: the latest) runs on.

        Raises:
            ModelNotFoundError: no such model loaded, or no such version of it.
            DefaultModelUnloadedError: ``name`` is None and the default model is not loaded (it was unloaded).
        """
        if name is None:
            self.require_default()
            name = self.default_name
        loaded = self._models.get(name)
        if not loaded:
            raise ModelNotFoundError(f"unknown model {name!r}: loaded models: {self._listing()}")
        if version is None:
            return loaded[version_order(loaded)[-1]]
        if version not in loaded:
            raise ModelNotFoundError(
                f"model {name!r} has no version {version!r} loaded: loaded versions: {', '.join(version_order(loaded))}"
            )
        return loaded[version]

    def require_default(self) -> None:
        """Raises `DefaultModelUnloadedError` when the model the unnamed routes serve is not loaded."""
        name = self.default_name
        if name is None or name not in self._models:
            raise DefaultModelUnloadedError(
                f"the default model {name!r} is not loaded (it was unloaded): load it with "
                f"POST /v2/repository/models/{name}/load, or name a loaded model; loaded models: {self._listing()}"
            )

    @contextmanager
    def use(self, name: str | None, version: str | None = None) -> Iterator[ModelVersion]:
        """Resolve a request's version (`resolve`) and hold it until the block ends, so that a reload retires it
        only afterwards."""
        served = self.resolve(name, version)
        served.hold()
        try:
            yield served
        finally:
            served.release()

    def is_default_latest(self, served: ModelVersion) -> bool:
        """Whether ``served`` is what the unnamed routes serve."""
        try:
            return self.resolve(None) is served
        except NotReadyError:
            return False

    def _listing(self) -> str:
        return ", ".join(f"{n} (versions {', '.join(self.versions(n))})" for n in self.names()) or "none"
