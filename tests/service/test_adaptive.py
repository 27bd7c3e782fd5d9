"""Load-adaptive early exit: the ladder cut from the bundled model's validation curve, and the controller's steps
(cheaper above the target, back after a calm spell, nothing in between), driven with explicit waits and clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.adaptive import MIN_WAITS, STEP_BACK_TICKS, TICK_S, WINDOW_S, ladder
from service.api import create_app
from service.errors import ModelLoadError
from service.model import OnnxModel, load_model
from service.operating_points import point_at
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "models" / "cifar10-lt-ride4"
TARGET_MS = 20.0


@pytest.fixture(scope="module")
def bundled() -> OnnxModel:
    return load_model(DEFAULT_MODEL, provider="cpu", shared_thread_pool=False)


def test_the_ladder_runs_from_the_serving_point_down_to_the_floor(bundled: OnnxModel) -> None:
    curve = bundled.manifest.operating_curve
    start = point_at(curve, bundled.manifest.cascade.default_threshold)
    rungs = ladder(curve, start, None)
    computes = [p.relative_compute for p in rungs]
    assert rungs[0] == start and computes == sorted(computes, reverse=True) and len(set(computes)) == len(rungs)
    assert computes[-1] == min(p.relative_compute for p in curve.points)
    floored = ladder(curve, start, 0.45)
    assert floored[-1].relative_compute == min(p.relative_compute for p in curve.points if p.relative_compute >= 0.45)
    assert floored[:-1] == [p for p in rungs if p.relative_compute >= 0.45][: len(floored) - 1]


def controller_state(bundled: OnnxModel, **settings):
    app = create_app(Settings(model_dir=DEFAULT_MODEL, adaptive_latency_target_ms=TARGET_MS, **settings), model=bundled)
    return app.state.service.default_model()


def feed(controller, wait_ms: float, now: float) -> str | None:
    for _ in range(MIN_WAITS):
        controller.observe_wait(wait_ms / 1000.0, now)
    return controller.tick(now)


def test_the_controller_steps_down_to_the_floor_and_back_with_hysteresis(bundled: OnnxModel) -> None:
    state = controller_state(bundled)
    controller, operating = state.adaptive, state.operating
    start = operating.serving
    now = 1000.0
    steps = []
    for _ in range(len(controller.rungs) + 2):  # more ticks than rungs: it stops at the floor
        now += TICK_S
        steps.append(feed(controller, 1.5 * TARGET_MS, now))  # under twice the target: one rung per tick
    assert steps.count("cheaper") == len(controller.rungs) - 1 and steps[-1] is None
    assert operating.serving.point == controller.rungs[-1] and operating.serving.source == "adaptive"
    # On the floor, a request expected to wait longer than the target is refused at once (the floor cannot keep up).
    assert state.admission.wait_bound_s == state.batcher.queue_wait_bound_s == TARGET_MS / 1000.0
    # Between half the target and the target: no step either way, however long.
    for _ in range(3 * STEP_BACK_TICKS):
        now += TICK_S
        assert feed(controller, 0.75 * TARGET_MS, now) is None
    # Calm (below half the target) for STEP_BACK_TICKS ticks: one rung back, not before (the window of the
    # waits first forgets the earlier ones).
    now += WINDOW_S
    backs = []
    for _ in range(STEP_BACK_TICKS):
        now += TICK_S
        backs.append(feed(controller, 0.1 * TARGET_MS, now))
    assert backs == [None] * (STEP_BACK_TICKS - 1) + ["back"]
    assert operating.serving.point == controller.rungs[-2]
    assert state.admission.wait_bound_s == state.batcher.queue_wait_bound_s == state.settings.max_queue_wait_ms / 1000
    # All the way back: the operator's point, as it was.
    for _ in range(STEP_BACK_TICKS * len(controller.rungs)):
        now += TICK_S
        feed(controller, 0.1 * TARGET_MS, now)
    assert operating.serving == start and controller.rung == 0
    text = state.metrics.exposition().decode()
    assert f'ride_adaptive_steps_total{{direction="cheaper"}} {float(len(controller.rungs) - 1)}' in text
    assert f'ride_adaptive_steps_total{{direction="back"}} {float(len(controller.rungs) - 1)}' in text
    assert f"ride_operating_threshold {start.threshold!r}" in text


def test_far_above_the_target_it_steps_several_rungs_at_once(bundled: OnnxModel) -> None:
    state = controller_state(bundled)
    assert len(state.adaptive.rungs) > 3
    feed(state.adaptive, 4.5 * TARGET_MS, 1000.0)  # above 4x the target: three rungs
    assert state.adaptive.rung == 3
    assert 'ride_adaptive_steps_total{direction="cheaper"} 1.0' in state.metrics.exposition().decode()


def test_too_few_waits_say_nothing(bundled: OnnxModel) -> None:
    state = controller_state(bundled)
    state.adaptive.observe_wait(10.0, 1000.0)
    assert state.adaptive.tick(1000.0) is None and state.adaptive.rung == 0


def test_the_floor_setting_and_an_admin_move_rebase_the_ladder(bundled: OnnxModel) -> None:
    curve = bundled.manifest.operating_curve
    serving = point_at(curve, bundled.manifest.cascade.default_threshold).relative_compute
    floor = (serving + min(p.relative_compute for p in curve.points)) / 2  # below the serving point, above the cheapest
    state = controller_state(bundled, adaptive_min_compute=floor, admin_routes=True)
    controller, operating = state.adaptive, state.operating
    assert len(controller.rungs) > 1 and controller.rungs[-1].relative_compute >= floor
    now = 1000.0
    feed(controller, 1.5 * TARGET_MS, now)
    assert controller.rung == 1
    operating.set_budget(0.9)  # what the admin route does
    feed(controller, 0.1 * TARGET_MS, now + TICK_S)
    assert controller.rung == 0 and controller.rungs[0] == operating.serving.point
    assert operating.serving.point.relative_compute <= 0.9


def test_adaptive_and_a_fixed_threshold_exclude_each_other() -> None:
    with pytest.raises(ValidationError, match="RIDE_DEFAULT_THRESHOLD"):
        Settings(adaptive_latency_target_ms=50, default_threshold=0.5)
    with pytest.raises(ValidationError):
        Settings(adaptive_min_compute=0)


def test_adaptive_needs_a_curve(bundled: OnnxModel, tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(DEFAULT_MODEL, folder)
    data = json.loads((folder / "manifest.json").read_text())
    del data["operating_curve"]
    (folder / "manifest.json").write_text(json.dumps({**data, "format_version": 2}))
    model = load_model(folder, provider="cpu", shared_thread_pool=False)
    with pytest.raises(ModelLoadError, match=r"no operating curve|has none"):
        create_app(Settings(model_dir=folder, adaptive_latency_target_ms=50), model=model)
