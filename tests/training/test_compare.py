"""`python -m training.run compare`: evaluated checkpoints side by side, from what their evaluation recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.checkpoint import load_meta, save_meta
from training.run import main


def _copy(folder: Path, target: Path, **changes) -> Path:
    """A copy of a checkpoint folder whose checkpoint.json has ``changes``."""
    shutil.copytree(folder, target)
    save_meta(target, load_meta(target).model_copy(update=changes))
    return target


def _row(table: str, label: str) -> list[str]:
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_table_holds_each_runs_recorded_numbers_and_the_difference_to_the_baseline(
    tiny_checkpoint: Path, early_exit_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = _copy(tiny_checkpoint, tmp_path / "plain")
    routed = _copy(early_exit_checkpoint, tmp_path / "routed")
    plot = tmp_path / "plots" / "compare.png"
    assert main(["compare", str(routed), "--baseline", str(plain), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out

    plain_metrics, routed_metrics = load_meta(plain).metrics, load_meta(routed).metrics
    base = plain_metrics.all_experts.top1  # no routers: what it serves is every expert
    header = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    assert header[:4] == ["run", "model", "epochs", "all experts"]

    first = _row(table, "plain")  # the baseline comes first, without differences
    assert first[1:4] == ["ride_resnet32, 3 experts", "1/1", f"{100 * base:.2f}"]
    assert first[7:] == ["-", "-", "-"]

    second = _row(table, "routed")
    every = routed_metrics.all_experts.top1
    assert second[3] == f"{100 * every:.2f} ({100 * (every - base):+.2f})"
    cascade = routed_metrics.routed
    assert second[7] == f"{100 * cascade.top1:.2f} ({100 * (cascade.top1 - base):+.2f})"
    assert second[8:] == [f"{cascade.mean_experts_used:.2f}", f"{cascade.relative_compute:.3f}"]
    assert "points against plain" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_never_evaluated_is_refused_with_the_command_that_evaluates_it(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = _copy(tiny_checkpoint, tmp_path / "bare", metrics=None)
    assert main(["compare", str(tiny_checkpoint), str(bare)]) == 2
    assert f"python -m training.run evaluate --checkpoint {bare}" in capsys.readouterr().err


def test_runs_on_other_data_are_not_compared(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    counts = load_meta(tiny_checkpoint).class_counts
    other = _copy(tiny_checkpoint, tmp_path / "other-split", class_counts=[c + 1 for c in counts])
    plot = tmp_path / "never.png"
    assert main(["compare", str(tiny_checkpoint), str(other), "--plot", str(plot)]) == 2
    error = capsys.readouterr().err
    assert "not comparable: other-split" in error
    assert not plot.exists()


def test_a_plot_that_cannot_be_written_is_one_error_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    for plot in (tmp_path / "a-file" / "compare.png", tmp_path / "compare.unknown-format"):
        assert main(["compare", str(tiny_checkpoint), "--plot", str(plot)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: cannot write the plot {plot}:") and "Traceback" not in error
