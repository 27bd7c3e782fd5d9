"""Packaging: the project builds as a wheel with a pinned build backend and no deprecated metadata."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression() -> None:
    # The `{ text = ... }` table is deprecated by setuptools, which will refuse it (announced for 2027-02-18).
    assert PYPROJECT["project"]["license"] == "MIT"


def test_build_backend_is_bounded() -> None:
    """Build isolation installs the newest release allowed: without an upper bound, a future setuptools that
    refuses today's metadata would break every `pip install .` (and every image build) at once."""
    (requirement,) = PYPROJECT["build-system"]["requires"]
    match = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*,<(\d+)", requirement.replace(" ", ""))
    assert match, f"pin setuptools to a range with both bounds, not {requirement!r}"
    assert int(match.group(1)) >= 77, "the SPDX `license` string needs setuptools 77 or newer"


@pytest.mark.slow
def test_wheel_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """What `pip install .` does in the Dockerfile: an isolated build with the declared backend."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--verbose", "--wheel-dir", str(tmp_path), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    warnings = [line.strip() for line in output.splitlines() if re.search(r"deprecat", line, re.IGNORECASE)]
    assert warnings == [], "\n".join(warnings)
    assert len(list(tmp_path.glob("ride_serve-*.whl"))) == 1
