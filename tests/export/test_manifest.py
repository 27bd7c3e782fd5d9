"""The model-folder manifest (`export.manifest`): the shipped JSON schema is the pydantic models'."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from export.manifest import MANIFEST_NAME, json_schema, shipped_schema

pytestmark = pytest.mark.usefixtures("one_thread")


def test_manifest_matches_the_shipped_schema(model_dir: Path) -> None:
    assert json_schema() == shipped_schema()
    jsonschema.validate(json.loads((model_dir / MANIFEST_NAME).read_text()), shipped_schema())
