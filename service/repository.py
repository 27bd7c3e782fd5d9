"""Where the models come from: a model repository, ``<name>/<version>/`` folders (Triton's layout), or one model
folder, a repository of one (its name and version from its manifest).

Only the file system here: what is found, and in which order versions count. Loading is `service.loader`; what
is served is `service.model_table`.

Versions order numerically when every version of a model is an integer (``2`` < ``10``), else lexicographically
(as strings); the last is the latest, which a route without a version serves.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from export.manifest import MANIFEST_NAME, ManifestError, folder_digest, load_manifest


@dataclass(frozen=True)
class VersionFolder:
    """One version of one model, and the folder it is loaded from."""

    name: str
    version: str
    folder: Path


def version_order(versions: Iterable[str]) -> list[str]:
    """``versions`` oldest first: numerically when all are integers, else as strings."""
    versions = list(versions)
    if all(version.isdigit() for version in versions):
        return sorted(versions, key=int)
    return sorted(versions)


def fingerprint(folder: Path) -> str | None:
    """What tells a changed version from the one loaded: the folder's digest (`export.manifest.folder_digest`: the
    manifest holds every graph's sha256); None when there is no readable manifest."""
    try:
        return folder_digest(folder)
    except (ManifestError, OSError):
        return None


def _visible_folders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir() and not child.name.startswith("."))


class Repository:
    """The models a server may load: every ``<name>/<version>/`` folder of ``root``, or the one model ``folder``."""

    def __init__(self, *, root: Path | None = None, folder: Path | None = None) -> None:
        if (root is None) == (folder is None):
            raise ValueError("a repository is a root folder of models or one model folder")
        self.root = root
        self.folder = folder

    def describe(self) -> str:
        return f"model repository {self.root}" if self.root is not None else f"model folder {self.folder}"

    def missing_versions(self, name: str) -> str:
        """Why the model folder ``name`` of the repository has no version to load, and what to do about it."""
        assert self.root is not None
        if (self.root / name / MANIFEST_NAME).is_file():  # the commonest mistake: a model folder put in as a model
            return (
                f"{name}: the folder holds a model itself, not versions; a repository wants <name>/<version>/ "
                f"folders: move its files into {name}/1/"
            )
        return f"{name}: no <version>/ folder"

    def scan(self) -> dict[str, list[VersionFolder]]:
        """Every model and its versions, oldest first.

        Raises:
            ManifestError: the one model folder has no valid manifest (its name and version are unknown).
            OSError: the repository's root cannot be listed.
        """
        if self.folder is not None:
            manifest = load_manifest(self.folder, check_hashes=False)
            return {manifest.model.name: [VersionFolder(manifest.model.name, manifest.model.version, self.folder)]}
        assert self.root is not None
        found = {}
        for model in _visible_folders(self.root):
            versions = {path.name: path for path in _visible_folders(model)}
            found[model.name] = [VersionFolder(model.name, v, versions[v]) for v in version_order(versions)]
        return found
