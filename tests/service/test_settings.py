"""Settings from defaults, RIDE_* environment variables and CLI flags; start-up errors as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import main
from service.settings import DEFAULT_MODEL_DIR, Settings


def test_default_model_dir_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.model_dir == DEFAULT_MODEL_DIR
    assert settings.model_dir.is_absolute()
    assert settings.model_dir.parts[-2:] == ("models", "cifar10-lt-ride4")
    assert (settings.model_dir.parent.parent / "service" / "settings.py").is_file()


def test_defaults() -> None:
    settings = Settings()
    assert (settings.max_batch_size, settings.max_wait_ms, settings.max_body_bytes) == (32, 2.0, 8 * 1024 * 1024)
    assert (settings.max_pixels, settings.provider, settings.default_threshold) == (None, "auto", None)


def test_environment_then_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIDE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("RIDE_PORT", "9001")
    monkeypatch.setenv("RIDE_DEFAULT_THRESHOLD", "0.25")
    from_env = Settings()
    assert (from_env.max_batch_size, from_env.port, from_env.default_threshold) == (8, 9001, 0.25)
    from_cli = Settings.from_cli(["--max-batch-size", "16", "--model-dir", "/srv/model", "--access-log"])
    assert (from_cli.max_batch_size, from_cli.port) == (16, 9001)  # the flag wins, the environment fills in
    assert from_cli.model_dir == Path("/srv/model") and from_cli.access_log


@pytest.mark.parametrize(
    "flags", [["--max-batch-size", "0"], ["--default-threshold", "1.5"], ["--provider", "tpu"], ["--port", "70000"]]
)
def test_invalid_values_are_refused(flags: list[str]) -> None:
    with pytest.raises((ValidationError, SystemExit)):
        Settings.from_cli(flags)


def test_main_reports_invalid_settings_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-queue-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: invalid settings: max_queue_size (RIDE_MAX_QUEUE_SIZE)")
    assert "\n" not in err


def test_main_reports_a_missing_model_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "absent"
    assert main(["--model-dir", str(absent)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: model folder {absent} does not exist: export one with `python -m export`")
    assert "\n" not in err


def test_cuda_provider_options_are_set_deliberately(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.loader import cuda_options

    assert cuda_options(Settings()).provider_options() == {
        "use_tf32": "0",
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
    }
    monkeypatch.setenv("RIDE_CUDA_TF32", "true")
    monkeypatch.setenv("RIDE_CUDA_CONV_ALGO_SEARCH", "exhaustive")
    monkeypatch.setenv("RIDE_CUDA_ARENA_EXTEND_STRATEGY", "next_power_of_two")
    assert cuda_options(Settings()).provider_options() == {
        "use_tf32": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kNextPowerOfTwo",
    }
    with pytest.raises((ValidationError, SystemExit)):
        Settings.from_cli(["--cuda-conv-algo-search", "fastest"])


def test_onnxruntime_threads_default_to_one_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    assert settings.threads_for(cuda=True) == 1
    assert settings.threads_for(cuda=False) == settings.intra_op_threads
    monkeypatch.setenv("RIDE_INTRA_OP_THREADS", "3")  # given: obeyed on CUDA too
    assert Settings().threads_for(cuda=True) == 3


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`RIDE_{name.upper()}`" not in readme]
    assert missing == []
    limits = readme[readme.index("### Limits and hardening") :]
    for name in ("max_body_bytes", "max_pixels", "max_queue_wait_ms", "max_header_bytes", "max_connections"):
        assert f"`RIDE_{name.upper()}`" in limits, name


def test_a_batch_wait_at_or_above_the_queue_wait_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be below max_queue_wait_ms"):
        Settings(max_wait_ms=500.0, max_queue_wait_ms=500.0)
