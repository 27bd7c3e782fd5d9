"""Reading deploy/k8s for the tests: rendering kustomizations, and validating objects offline.

- Rendering: `kubectl kustomize` (kubectl embeds kustomize). Skipped, with the reason, where kubectl is absent:
  Debian 12 packages only kubectl 1.20 (`kubernetes-client`), whose kustomize predates components.
- Kubernetes' own kinds: `kubernetes-validate` (dev extra), which bundles the API's JSON schemas for 1.25-1.37,
  in strict mode (unknown fields are errors, as `kubectl apply --validate=strict` makes them).
- Custom resources (KEDA, the Prometheus operator, KServe): the `openAPIV3Schema` of each project's published
  CRD, made strict the same way. deploy/k8s/schemas/sources.yaml pins each CRD file (source, release, sha256); the
  files are looked up in deploy/k8s/schemas/, in ``$RIDE_SHARED_DIR/schemas/k8s`` (``../shared`` by default)
  and in ``$RIDE_K8S_SCHEMA_DIR``. A file whose sha256 is not the pinned one is an error, not a fallback.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from . import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
SCHEMA_DIR = K8S_DIR / "schemas"
SOURCES_FILE = SCHEMA_DIR / "sources.yaml"
SHARED_DIR = Path(os.environ.get("RIDE_SHARED_DIR", REPO_ROOT.parent / "shared"))
# Every kustomization a user applies, and what each must contain.
KUSTOMIZATIONS = ("overlays/cpu", "overlays/cpu-hpa", "overlays/gpu", "kserve")
# The oldest Kubernetes release these manifests are for (preStop `sleep` is on by default from 1.30) and the
# newest that kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip(
            "kubectl not found: `kubectl kustomize` renders the kustomizations (Debian 12's kubernetes-client 1.20 "
            "is too old for kustomize components); install kubectl 1.27 or newer"
        )
    return found


@cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S_DIR / path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {path}:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(path: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize deploy/k8s/PATH` prints (deep copies: change them freely)."""
    return copy.deepcopy(list(_render(path)))


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``) in ``objects``."""
    (found,) = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    return found


def core_kind(obj: dict[str, Any]) -> bool:
    """True for the Kubernetes API's own kinds (no dot in the API group), which kubernetes-validate knows."""
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def validate_core(obj: dict[str, Any], version: str) -> None:
    """Raise `kubernetes_validate.ValidationError` unless ``obj`` is valid for Kubernetes ``version``, strictly."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Custom resources against their CRDs
# --------------------------------------------------------------------------------------------------------------


def crd_sources() -> list[dict[str, Any]]:
    """The pinned CRD files: file name, group, kind, versions, source repository, release, path, sha256."""
    return read_sources()["crds"]


def read_sources() -> dict[str, Any]:
    return yaml.safe_load(SOURCES_FILE.read_text())


def schema_dirs() -> list[Path]:
    dirs = [SCHEMA_DIR, SHARED_DIR / "schemas" / "k8s"]
    if os.environ.get("RIDE_K8S_SCHEMA_DIR"):
        dirs.append(Path(os.environ["RIDE_K8S_SCHEMA_DIR"]))
    return dirs


def crd_file(source: dict[str, Any]) -> Path | None:
    """Where the pinned CRD file is, or None; fails the test if a file of that name has another sha256."""
    for folder in schema_dirs():
        path = folder / source["file"]
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == source["sha256"], (
                f"{path}: sha256 {digest}, not the pinned {source['repository']} {source['release']} "
                f"({source['sha256']}); see {SOURCES_FILE.relative_to(REPO_ROOT)}"
            )
            return path
    return None


def crd_source(group: str, kind: str) -> dict[str, Any]:
    (source,) = [s for s in crd_sources() if s["group"] == group and s["kind"] == kind]
    return source


def require_crd(group: str, kind: str) -> dict[str, Any]:
    """The CRD document of ``group``/``kind``; skips the test, naming what to put where, when it is absent."""
    source = crd_source(group, kind)
    path = crd_file(source)
    if path is None:
        pytest.skip(
            f"CRD schema {source['file']} ({source['repository']} {source['release']}, {source['path']}) not found "
            f"in {', '.join(str(d) for d in schema_dirs())}: see {SOURCES_FILE.relative_to(REPO_ROOT)}"
        )
    return yaml.safe_load(path.read_text())


def strict_json_schema(node: Any) -> Any:
    """A CRD's OpenAPI v3 (structural) schema as a JSON Schema that refuses unknown fields.

    Objects that list ``properties`` get ``additionalProperties: false`` unless they preserve unknown fields;
    ``nullable`` admits null; ``x-kubernetes-int-or-string`` admits both types (v1 CRDs also spell it out as
    ``anyOf``); the other ``x-kubernetes-*`` extensions and descriptions carry no validation and are dropped.
    """
    if isinstance(node, list):
        return [strict_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    schema: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            schema[key] = {name: strict_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            schema[key] = strict_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            schema[key] = [strict_json_schema(sub) for sub in value]
        elif key == "pattern":
            schema[key] = python_pattern(value)
        else:
            schema[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        schema["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in schema:
        schema["type"] = [schema["type"], "null"]
    preserves = node.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and "additionalProperties" not in schema and not preserves:
        schema["additionalProperties"] = False
    return schema


def python_pattern(pattern: str) -> str:
    """A Go (RE2) ``pattern`` as Python's ``re`` reads it: Go allows a flag group such as ``(?i)`` after ``^``,
    Python only at the very start, where it means the same for these anchored patterns."""
    flags = re.match(r"^\^(\(\?[a-z]+\))", pattern)
    return f"{flags.group(1)}^{pattern[flags.end() :]}" if flags else pattern


def crd_validator(crd: dict[str, Any], version: str) -> jsonschema.Draft7Validator:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert served.get("served", True), f"{crd['metadata']['name']} does not serve {version}"
    schema = strict_json_schema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def custom_resource_errors(obj: dict[str, Any]) -> list[str]:
    """Every way ``obj`` breaks its CRD's schema (its metadata is checked as Kubernetes' ObjectMeta)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    crd = require_crd(group, obj["kind"])
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in crd_validator(crd, version).iter_errors(obj)
    ]
    import kubernetes_validate

    holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
    for kubernetes in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(holder, kubernetes, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"metadata ({kubernetes}): {error.message}")
    return errors
