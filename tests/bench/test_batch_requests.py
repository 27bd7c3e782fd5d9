"""The batch-requests benchmark (bench/batch_requests.py) gives no ratio that its load generator set: a form whose
rounds kept the client's one thread busy is marked client-bound. Its numbers are never asserted."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.server_process import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "batch_requests.py"


@pytest.fixture(scope="module")
def batch_requests() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_requests", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_requests"] = module
    spec.loader.exec_module(module)
    return module


def _row(lines: list[str], form: str) -> str:
    (line,) = [line for line in lines if line.startswith(form)]
    return line


def test_a_form_that_kept_the_client_busy_gets_no_ratio(batch_requests: ModuleType) -> None:
    # 10 rounds each; 1 s of wall per round for the singles (32 rows), 0.25 s for the batch.
    seconds = {"classify batch": [0.25] * 10, "singles, sequential": [1.0] * 10, "singles, concurrent": [0.5] * 10}
    client_cpu_s = {"classify batch": 0.1, "singles, sequential": 2.0, "singles, concurrent": 4.8}  # 96 % of 5 s
    lines = batch_requests.forms_table(seconds, client_cpu_s, rows=32)
    assert _row(lines, "classify batch").endswith("4.00x")
    assert _row(lines, "singles, sequential").endswith("1.00x")
    assert _row(lines, "singles, concurrent").endswith("client-bound")
    assert " 96%" in _row(lines, "singles, concurrent")
    assert lines[-1].startswith("client-bound: singles, concurrent kept the client's CPU busy 90 %")


def test_a_client_bound_baseline_leaves_every_ratio_out(batch_requests: ModuleType) -> None:
    seconds = {"classify batch": [0.25] * 10, "singles, sequential": [1.0] * 10}
    client_cpu_s = {"classify batch": 0.1, "singles, sequential": 9.5}
    lines = batch_requests.forms_table(seconds, client_cpu_s, rows=32)
    assert _row(lines, "classify batch").endswith("client-bound")
    assert _row(lines, "singles, sequential").endswith("client-bound")
    assert not any(line.endswith("x") for line in lines)
