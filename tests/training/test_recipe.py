"""`python -m training.run recipe`: one command that starts, resumes and finishes stage 1, routers and export,
and says where it stands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import interrupted_at_epoch, tiny_config_dict
from training import recipe as recipe_module
from training import train as train_module
from training.checkpoint import load_meta
from training.config import config_from_dict
from training.run import main

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(data_dir: Path, tmp_path: Path):
    raw = tiny_config_dict(data_dir, tmp_path / "cache")
    raw["model"]["num_experts"] = 2
    raw["schedule"]["epochs"] = 2
    raw["runtime"]["checkpoint_every"] = 1
    return config_from_dict(raw)


def test_recipe_resumes_an_interrupted_stage_1_then_routes_and_exports(
    tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cfg = _config(tiny_data_dir, tmp_path)
    out = tmp_path / "runs" / "tiny"
    with interrupted_at_epoch(monkeypatch, 2):
        recipe_module.run_recipe(cfg, out=out)
    capsys.readouterr()

    recipe_module.run_recipe(cfg, out=out, status_only=True)
    status = capsys.readouterr().out
    assert "epoch 1/2 saved, resumable" in status and "routers" in status and "not done" in status

    folders = recipe_module.run_recipe(cfg, out=out, target_compute=0.9)
    assert load_meta(folders.experts).complete and load_meta(folders.experts).epoch == 2
    assert load_meta(folders.routers).stage == "routers"
    manifest = json.loads((folders.model / "manifest.json").read_text())
    assert manifest["cascade"]["num_experts"] == 2
    final = capsys.readouterr().out.split("recipe tiny")[-1]
    assert "complete (2 epochs)" in final and final.count("complete") == 3

    # Everything done: a second call re-runs nothing.
    def forbidden(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(train_module, "train", forbidden)
    monkeypatch.setattr(recipe_module, "_export", forbidden)
    recipe_module.run_recipe(cfg, out=out)


def test_recipe_cli_names_what_differs_from_the_run_in_the_folder(
    tiny_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = [f'data.root="{tiny_data_dir}"', f'data.cache_dir="{tmp_path / "cache"}"', "data.imbalance_factor=10"]
    small = ["schedule.epochs=1", "optim.batch_size=64", "runtime.num_threads=1"]
    base = ["recipe", "--config", str(REPO / "configs" / "cifar10_lt_ce.toml"), "--out", str(tmp_path / "ce")]
    sets = [arg for item in (*data, *small) for arg in ("--set", item)]
    assert main([*base, *sets]) == 0
    assert "no routers, no export" in capsys.readouterr().out
    assert main([*base, *sets, "--status"]) == 0
    assert "complete (1 epochs)" in capsys.readouterr().out

    assert main([*base, *sets, "--set", "optim.lr=0.3", "--set", "runtime.num_threads=2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "optim.lr: " in error and "-> 0.3" in error and "num_threads" not in error
