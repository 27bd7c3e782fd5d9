"""Load-adaptive early exit (off by default): under load, spend less compute per image instead of answering 503.

With ``RIDE_ADAPTIVE_LATENCY_TARGET_MS`` set, every answered classification reports its queue wait, and every
`TICK_S` the controller looks at the 95th percentile of the waits of the last `WINDOW_S`:

- above the target, it steps to a cheaper rung of a ladder cut from the validation curve: one rung, and one more
  for each doubling of the target the p95 stands at (2x: two rungs, 4x: three), never below the floor (the
  cheapest point whose validation relative compute is at least ``RIDE_ADAPTIVE_MIN_COMPUTE``; default: the
  curve's cheapest point);
- on the floor, new requests are admitted only while their expected wait is within the target, and one still
  queued after the target is dropped (503 either way: the floor cannot keep up);
- below `STEP_BACK_FRACTION` of the target for `STEP_BACK_TICKS` ticks in a row, it steps one rung back, never
  above the point it started from (the operator's: the manifest's, ``RIDE_TARGET_COMPUTE``'s or the admin's).

The two bounds and the dwell time are the hysteresis: a rung that just keeps the wait under the target is kept,
not left and retaken. After a step the window starts afresh (the waits it held were the old rung's). Requests
that name their own threshold or compute budget are served as they ask. Above the floor the queue's own limits
apply (``RIDE_MAX_QUEUE_WAIT_MS``), which the controller's steps keep from being reached.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from export.manifest import OperatingCurve, OperatingPoint
from service.operating_points import OperatingPoints, ServingPoint

logger = logging.getLogger(__name__)

TICK_S = 0.25
WINDOW_S = 1.0
MIN_WAITS = 8  # fewer observations in the window say nothing about a percentile
STEP_BACK_FRACTION = 0.5
STEP_BACK_TICKS = 8  # 2 s below half the target before stepping back
# Rungs at least this far apart in validation relative compute: a step must change the cost noticeably.
RUNG_SPACING = 0.03
SOURCE = "adaptive"


def ladder(curve: OperatingCurve, start: OperatingPoint | float, min_compute: float | None) -> list[OperatingPoint]:
    """The rungs from the start point (first) down to the floor (last): the most accurate point at each level of
    compute, at least `RUNG_SPACING` apart. ``start`` is a curve point, or a threshold off the curve (the rungs
    then start at the first curve point at or above it)."""
    points = sorted(curve.points, key=lambda p: p.threshold)  # by non-increasing compute
    top = start if isinstance(start, OperatingPoint) else _at_or_above(points, start)
    cheapest = min(p.relative_compute for p in points)
    floor_compute = cheapest if min_compute is None else max(min_compute, cheapest)
    candidates = [p for p in points if floor_compute <= p.relative_compute <= top.relative_compute]
    rungs = [top]
    for point in candidates:
        if rungs[-1].relative_compute - point.relative_compute < RUNG_SPACING:
            continue
        # Among the points of about this compute, the most accurate one.
        level = [p for p in candidates if abs(p.relative_compute - point.relative_compute) < RUNG_SPACING / 2]
        best = max(level, key=lambda p: (p.accuracy, -p.relative_compute))
        if best.relative_compute < rungs[-1].relative_compute:
            rungs.append(best)
    floor = min(candidates, key=lambda p: (p.relative_compute, -p.accuracy), default=top)
    if floor.relative_compute < rungs[-1].relative_compute:
        rungs.append(floor)
    return rungs


def _at_or_above(points: list[OperatingPoint], threshold: float) -> OperatingPoint:
    """The first of ``points`` (by increasing threshold) at or above ``threshold``, else the last one."""
    return next((p for p in points if p.threshold >= threshold), points[-1])


class AdaptiveController:
    """Steps the serving operating point along the curve with the queue wait (see the module docstring)."""

    def __init__(
        self,
        operating: OperatingPoints,
        *,
        target_s: float,
        min_compute: float | None,
        on_step: Callable[[str], None],
        on_wait_p95: Callable[[float], None] | None = None,
        on_floor: Callable[[bool], None] | None = None,
    ) -> None:
        if operating.curve is None:
            raise ValueError("the model has no operating curve to step along")
        self._operating = operating
        self._target_s = target_s
        self._min_compute = min_compute
        self._on_step = on_step
        self._on_wait_p95 = on_wait_p95
        self._on_floor = on_floor
        self._waits: deque[tuple[float, float]] = deque()  # (time observed, seconds waited)
        self._calm_ticks = 0
        self._task: asyncio.Task[None] | None = None
        self._rebase(operating.serving)

    @property
    def rungs(self) -> list[OperatingPoint]:
        return self._rungs

    @property
    def rung(self) -> int:
        """The rung served now: 0 is the start point, the last one the floor."""
        return self._rung

    @property
    def at_floor(self) -> bool:
        return self._rung == len(self._rungs) - 1

    def _rebase(self, serving: ServingPoint) -> None:
        assert self._operating.curve is not None
        start = serving.point if serving.point is not None else serving.threshold
        self._rungs = ladder(self._operating.curve, start, self._min_compute)
        self._rung = 0
        self._base = serving
        self._report_floor()

    def _report_floor(self) -> None:
        # Above the floor a request may wait up to the queue's own bound, while the controller steps to cheaper
        # points; on the floor, admitting a request that would wait longer than the target only makes it late.
        if self._on_floor is not None:
            self._on_floor(self.at_floor)

    def observe_wait(self, seconds: float, now: float | None = None) -> None:
        """An answered classification waited ``seconds`` in the queue (observed at ``now``, default: now)."""
        self._waits.append((time.monotonic() if now is None else now, seconds))

    def wait_p95(self, now: float) -> float | None:
        """The 95th percentile of the waits of the last `WINDOW_S`, None with fewer than `MIN_WAITS` of them."""
        while self._waits and self._waits[0][0] < now - WINDOW_S:
            self._waits.popleft()
        if len(self._waits) < MIN_WAITS:
            return None
        return float(np.percentile([w for _, w in self._waits], 95))

    def tick(self, now: float | None = None) -> str | None:
        """One control decision; returns "cheaper", "back" or None."""
        now = time.monotonic() if now is None else now
        serving = self._operating.serving
        if serving.source != SOURCE and serving != self._base:  # the operator moved the point: start from there
            self._rebase(serving)
        p95 = self.wait_p95(now)
        if self._on_wait_p95 is not None and p95 is not None:
            self._on_wait_p95(p95)
        if p95 is not None and p95 > self._target_s:
            self._calm_ticks = 0
            # Far above the target, one rung per tick would leave the queue growing for several ticks.
            rungs = 1 + int(math.log2(p95 / self._target_s))
            return self._step(min(rungs, len(self._rungs) - 1 - self._rung)) if not self.at_floor else None
        calm = p95 is None or p95 < STEP_BACK_FRACTION * self._target_s
        self._calm_ticks = self._calm_ticks + 1 if calm else 0
        if self._calm_ticks >= STEP_BACK_TICKS and self._rung > 0:
            self._calm_ticks = 0
            return self._step(-1)
        return None

    def _step(self, rungs: int) -> str:
        """Move ``rungs`` rungs (positive: cheaper, negative: back)."""
        self._rung += rungs
        point = self._rungs[self._rung]
        if self._rung == 0:
            self._operating.serving = self._base  # back where the operator put it
            self._operating.notify()
        else:
            self._operating.set_point(point, SOURCE)
        self._waits.clear()
        self._report_floor()
        name = "cheaper" if rungs > 0 else "back"
        self._on_step(name)
        logger.info(
            "adaptive: %s to threshold %.4g (validation compute %.3f, accuracy %.3f)",
            name,
            point.threshold,
            point.relative_compute,
            point.accuracy,
        )
        return name

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="ride-adaptive")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()
