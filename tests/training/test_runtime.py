"""Where and how a run executes: precision chosen from what the CPU really has, fp32 heads under bf16
autocast, and the config rules that decide what a resumed run may change."""

from __future__ import annotations

import pytest
import torch

from training import runtime
from training.config import RESUMABLE_CHANGES, RuntimeConfig, TrainConfig, config_differences, config_from_dict
from training.models import CosineClassifier

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool, expected) -> None:
    monkeypatch.setattr(runtime, "cpu_runs_bf16_natively", lambda: native)
    assert runtime.resolve_precision("auto", CPU) == expected
    # An explicit choice is obeyed whatever the CPU has.
    assert runtime.resolve_precision("fp32", CPU) == torch.float32
    assert runtime.resolve_precision("bf16", CPU) == torch.bfloat16
    described = runtime.describe_execution(RuntimeConfig(), CPU)
    assert described.startswith("bf16 autocast (CPU has native bf16)" if native else "fp32 (no native bf16")


def test_native_bf16_is_read_from_cpuinfo_without_torch_capabilities(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(runtime, "Path", lambda _: cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    assert not runtime.cpu_runs_bf16_natively()
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512bw\n")
    assert runtime.cpu_runs_bf16_natively()


def test_cosine_head_stays_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    head = CosineClassifier(48, 10, scale=30.0)
    features = torch.randn(64, 48).bfloat16()
    reference = head(features.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(features)
    assert logits.dtype == torch.float32
    # A bf16 matmul moves scaled logits by up to ~0.1; in fp32 they agree to rounding.
    assert (logits - reference).abs().max() < 1e-5


def test_checkpoints_written_with_the_old_amp_switch_still_load() -> None:
    assert config_from_dict({"runtime": {"amp": True}}).runtime.precision == "bf16"
    assert config_from_dict({"runtime": {"amp": False}}).runtime.precision == "fp32"


def test_config_differences_name_each_changed_key() -> None:
    base = TrainConfig()
    other = config_from_dict({"optim": {"lr": 0.2}, "schedule": {"milestones": [10, 20]}, "runtime": {"compile": True}})
    assert config_differences(base, other, ignore=RESUMABLE_CHANGES) == [
        "optim.lr: 0.1 -> 0.2",
        "schedule.milestones: None -> [10, 20]",
    ]
    assert config_differences(base, other)[-1] == "schedule.milestones: None -> [10, 20]"
    assert config_differences(base, base) == []
