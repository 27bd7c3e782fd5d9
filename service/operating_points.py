"""Operating points: which threshold the server runs, chosen from the model's validation curve.

The manifest (format 3) carries the accuracy/compute curve measured on the validation split
(`export.manifest.OperatingCurve`). A compute budget picks the point whose validation relative compute is the
largest not above it (ties: the more accurate, then the cheaper on unseen images, i.e. the larger threshold); a
budget below the cheapest point gets the cheapest point, with a warning. The serving point starts as:

1. ``RIDE_DEFAULT_THRESHOLD``: a fixed threshold. It pins the server: ``RIDE_TARGET_COMPUTE``, a request's
   ``target_compute`` and the admin route cannot move it (a request's own ``threshold`` still can, as before).
2. ``RIDE_TARGET_COMPUTE``: the curve's point for that budget.
3. The manifest's default threshold.

An admin can move an unpinned serving point at run time (`set_threshold`, `set_budget`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from export.manifest import Manifest, OperatingCurve, OperatingPoint

logger = logging.getLogger(__name__)


class BudgetError(ValueError):
    """A compute budget that cannot be served: outside (0, 1], or a model without a curve."""


class PinnedError(RuntimeError):
    """The serving threshold is fixed by ``RIDE_DEFAULT_THRESHOLD``."""


@dataclass(frozen=True)
class BudgetChoice:
    """The point a compute budget picked; ``warning`` says why it is not within the budget, if it is not."""

    point: OperatingPoint
    warning: str | None = None


@dataclass(frozen=True)
class ServingPoint:
    """The threshold the server runs when a request names none, where it came from, and its curve point (None
    when the threshold is not on the curve)."""

    threshold: float
    source: str  # "default_threshold", "target_compute", "manifest", "admin", "adaptive"
    point: OperatingPoint | None


def check_budget(target_compute: float, name: str = "target_compute") -> float:
    """``target_compute`` if it is a fraction of the full ensemble's compute in (0, 1], else BudgetError."""
    if not 0.0 < target_compute <= 1.0:
        raise BudgetError(f"{name} must be in (0, 1] (a fraction of the full ensemble's compute), got {target_compute}")
    return target_compute


def choose_by_budget(curve: OperatingCurve, target_compute: float) -> BudgetChoice:
    """The curve's point for ``target_compute``: the largest validation relative compute not above it."""
    check_budget(target_compute)
    within = [p for p in curve.points if p.relative_compute <= target_compute]
    if not within:
        cheapest = min(curve.points, key=lambda p: (p.relative_compute, -p.accuracy, -p.threshold))
        return BudgetChoice(
            cheapest,
            f"compute budget {target_compute:g} is below the cheapest operating point "
            f"({cheapest.relative_compute:.3f} of the full ensemble on validation): serving the cheapest point",
        )
    return BudgetChoice(max(within, key=lambda p: (p.relative_compute, p.accuracy, p.threshold)))


def point_at(curve: OperatingCurve | None, threshold: float) -> OperatingPoint | None:
    """The curve's point with exactly ``threshold``, if it has one."""
    if curve is None:
        return None
    return next((p for p in curve.points if p.threshold == threshold), None)


class OperatingPoints:
    """A model's curve and the serving point (one per app; changed only from the event loop)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        default_threshold: float | None = None,
        target_compute: float | None = None,
        on_change: Callable[[ServingPoint], None] | None = None,
    ) -> None:
        self.curve = manifest.operating_curve
        self.pinned = default_threshold is not None
        self._on_change = on_change
        if default_threshold is not None:
            if target_compute is not None:
                logger.warning(
                    "RIDE_DEFAULT_THRESHOLD=%g overrides RIDE_TARGET_COMPUTE=%g", default_threshold, target_compute
                )
            self.serving = ServingPoint(default_threshold, "default_threshold", point_at(self.curve, default_threshold))
        elif target_compute is not None:
            choice = self.for_budget(target_compute)
            if choice.warning:
                logger.warning("RIDE_TARGET_COMPUTE: %s", choice.warning)
            self.serving = ServingPoint(choice.point.threshold, "target_compute", choice.point)
        else:
            threshold = manifest.cascade.default_threshold
            self.serving = ServingPoint(threshold, "manifest", point_at(self.curve, threshold))
        self.notify()

    @property
    def threshold(self) -> float:
        """The threshold of a request that names neither a threshold nor a budget."""
        return self.serving.threshold

    def for_budget(self, target_compute: float) -> BudgetChoice:
        """The curve's point for ``target_compute``. Raises BudgetError outside (0, 1] or without a curve."""
        check_budget(target_compute)
        if self.curve is None:
            raise BudgetError(
                "this model's manifest carries no operating curve (manifest format 2, or no routers): a compute "
                "budget cannot be served; add one with `python -m export curve`"
            )
        return choose_by_budget(self.curve, target_compute)

    def request_threshold(self, threshold: float | None, target_compute: float | None) -> tuple[float, str | None]:
        """A request's threshold, and a warning for it: its own threshold, else the pinned one, else its budget's
        point, else the serving point."""
        if threshold is not None:
            return threshold, None
        if self.pinned or target_compute is None:
            return self.serving.threshold, None
        choice = self.for_budget(target_compute)
        return choice.point.threshold, choice.warning

    def set_threshold(self, threshold: float, source: str = "admin") -> ServingPoint:
        """Serve ``threshold`` (on the curve or not) from now on."""
        self._require_unpinned()
        self.serving = ServingPoint(threshold, source, point_at(self.curve, threshold))
        self.notify()
        return self.serving

    def set_point(self, point: OperatingPoint, source: str) -> ServingPoint:
        """Serve the curve's ``point`` from now on."""
        self._require_unpinned()
        self.serving = ServingPoint(point.threshold, source, point)
        self.notify()
        return self.serving

    def set_budget(self, target_compute: float, source: str = "admin") -> BudgetChoice:
        """Serve the curve's point for ``target_compute`` from now on."""
        self._require_unpinned()
        choice = self.for_budget(target_compute)
        self.set_point(choice.point, source)
        return choice

    def _require_unpinned(self) -> None:
        if self.pinned:
            raise PinnedError(
                f"RIDE_DEFAULT_THRESHOLD={self.serving.threshold:g} fixes the serving threshold: unset it to choose "
                "operating points at run time"
            )

    def notify(self) -> None:
        """Tell the observer (the metrics) the serving point."""
        if self._on_change is not None:
            self._on_change(self.serving)
