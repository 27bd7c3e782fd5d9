"""Evaluated checkpoints side by side: one Markdown table, and optionally one bar chart.

    python -m training.run compare runs/ce runs/ldam-drw runs/ride4-routed [--baseline runs/ce] [--plot FILE.png]

Reads only what `python -m training.run evaluate` (or training and routing, which evaluate at the end) recorded
in each folder's checkpoint.json; it runs no model. A comparison is only honest on the same test images, so every
run must have the same classes and training counts (the same long-tailed split); otherwise it is refused with the
runs that differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.checkpoint import CheckpointError, CheckpointMeta, load_meta
from training.config import ConfigError
from training.metrics import AccuracyMetrics, CheckpointMetrics

GROUPS = ("many", "medium", "few")


@dataclass(frozen=True)
class Run:
    """One evaluated checkpoint folder."""

    folder: Path
    meta: CheckpointMeta
    metrics: CheckpointMetrics

    @property
    def label(self) -> str:
        return self.folder.name

    @property
    def best(self) -> AccuracyMetrics:
        """What the run serves: the routed cascade where it has routers, else every expert."""
        return self.metrics.routed or self.metrics.all_experts


def load_run(folder: Path) -> Run:
    """The checkpoint in ``folder`` with its evaluation.

    Raises:
        CheckpointError: no checkpoint, or one never evaluated.
    """
    meta = load_meta(folder)
    if meta.metrics is None:
        raise CheckpointError(
            f"{folder} has no evaluation: run `python -m training.run evaluate --checkpoint {folder}` first"
        )
    return Run(Path(folder), meta, meta.metrics)


def check_comparable(runs: list[Run]) -> None:
    """Refuse runs evaluated on different data: the class names and training counts must all be the first run's.

    Raises:
        CheckpointError: naming the runs that differ from the first.
    """
    first = runs[0]
    differing = [
        run.label
        for run in runs[1:]
        if (run.meta.class_names, run.meta.class_counts) != (first.meta.class_names, first.meta.class_counts)
    ]
    if differing:
        raise CheckpointError(
            f"not comparable: {', '.join(differing)} had other classes or training counts than {first.label} "
            "(another dataset or long-tailed split), so their test numbers are not on the same images"
        )


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _points(value: float | None, baseline: float | None) -> str:
    return "" if value is None or baseline is None else f" ({100 * (value - baseline):+.2f})"


def _model(meta: CheckpointMeta) -> str:
    experts = meta.model.num_experts
    return meta.model.arch + (f", {experts} experts" if experts > 1 else "")


def comparison_table(runs: list[Run], baseline: Run | None = None) -> str:
    """A Markdown table: accuracy (%) overall and per group of every expert and of the routed cascade, experts used
    and relative compute; with a ``baseline``, each accuracy's difference to its own in points."""
    header = ["run", "model", "epochs", "all experts", *GROUPS, "routed", "mean experts", "relative compute"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        base = baseline.best if baseline is not None and run is not baseline else None
        every, routed = run.metrics.all_experts, run.metrics.routed
        groups = [getattr(every.groups, group) for group in GROUPS]
        base_groups = [getattr(base.groups, group) if base else None for group in GROUPS]
        cells = [
            run.label,
            _model(run.meta),
            f"{run.meta.epoch}/{run.meta.epochs}",
            _pct(every.top1) + _points(every.top1, base.top1 if base else None),
            *(_pct(value) + _points(value, ref) for value, ref in zip(groups, base_groups, strict=True)),
            "-" if routed is None else _pct(routed.top1) + _points(routed.top1, base.top1 if base else None),
            "-" if routed is None else f"{routed.mean_experts_used:.2f}",
            "-" if routed is None else f"{routed.relative_compute:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        lines.append(
            f"\nIn brackets: points against {baseline.label} "
            f"({'routed' if baseline.metrics.routed else 'all experts'}, what it serves)."
        )
    return "\n".join(lines)


def plot_comparison(path: Path, runs: list[Run]) -> None:
    """Grouped bars: each run's accuracy overall and per group (every expert), with its routed accuracy beside."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    categories = ["overall", *GROUPS]
    present = [c for c in categories if c == "overall" or any(getattr(r.metrics.all_experts.groups, c) for r in runs)]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(present) + 0.6 * len(runs)), 4.5))
    for i, run in enumerate(runs):
        every = run.metrics.all_experts
        values = [every.top1 if c == "overall" else getattr(every.groups, c) or 0.0 for c in present]
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(present))]
        bars = ax.bar(xs, [100 * v for v in values], width, label=run.label)
        if run.metrics.routed is not None:
            ax.plot(xs[0], 100 * run.metrics.routed.top1, "v", color=bars.patches[0].get_facecolor(), markersize=9)
    ax.set_xticks(range(len(present)), present)
    ax.set_ylabel("test accuracy (%), every expert")
    ax.set_ylim(0, 100)
    ax.set_title("Runs compared (triangle: the routed cascade, overall)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as error:  # an unwritable place, or a suffix matplotlib has no format for
        raise ConfigError(f"cannot write the plot {path}: {error}") from None
    finally:
        plt.close(fig)


def compare(folders: list[Path], baseline: Path | None = None, plot: Path | None = None) -> str:
    """The comparison table of the runs in ``folders`` (and ``baseline``, listed first when not among them);
    writes the chart to ``plot`` when given.

    Raises:
        CheckpointError: a folder without an evaluated checkpoint, or runs not comparable.
        ConfigError: the plot cannot be written there.
    """
    runs = [load_run(folder) for folder in folders]
    base = None
    if baseline is not None:
        matches = [run for run in runs if run.folder.resolve() == Path(baseline).resolve()]
        base = matches[0] if matches else load_run(baseline)
        if not matches:
            runs.insert(0, base)
    check_comparable(runs)
    if plot is not None:
        plot_comparison(plot, runs)
    return comparison_table(runs, base)
