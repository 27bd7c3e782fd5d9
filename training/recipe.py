"""The whole recipe as one resumable command: stage 1 (experts), stage 2 (routers), export.

``python -m training.run recipe --config FILE --out DIR`` looks at what the folders already hold, says where
the recipe stands, and carries on from there: it resumes an interrupted stage 1 from its last checkpoint, skips
every stage that is complete, and re-runs stage 2 or the export from the start if they were cut off (both take
minutes, and both write their folder only when they finish). Run it again after any interruption.

Folders: stage 1 in ``DIR``, the routed checkpoint in ``DIR-routers``, the exported model in ``DIR-model``
(or ``--export``). One-expert models (the baselines) have no routers and are not exported.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from training.checkpoint import META_FILE, CheckpointError, load_meta
from training.config import TrainConfig, require_same_recipe
from training.run_folder import LOG_FILE

MANIFEST_FILE = "manifest.json"  # written by the exporter, last, when the model folder is complete


@dataclass(frozen=True)
class RecipeFolders:
    experts: Path
    routers: Path
    model: Path

    @classmethod
    def for_run(cls, out: Path, export_to: Path | None = None) -> RecipeFolders:
        out = Path(out)
        return cls(
            out,
            out.with_name(f"{out.name}-routers"),
            Path(export_to) if export_to else out.with_name(f"{out.name}-model"),
        )


def _seconds_per_epoch(folder: Path) -> float | None:
    path = folder / LOG_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    recent = [r["seconds"] for r in records[-5:] if "seconds" in r]
    return statistics.median(recent) if recent else None


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def stage1_status(folder: Path, epochs: int) -> tuple[bool, str]:
    """``(complete, one line)`` for the stage-1 folder."""
    if not (folder / META_FILE).is_file():
        return False, "not started"
    meta = load_meta(folder)
    if meta.complete:
        return True, f"complete ({meta.epoch} epochs)"
    line = f"epoch {meta.epoch}/{epochs} saved, resumable"
    pace = _seconds_per_epoch(folder)
    if pace is not None:
        line += f" ({pace:.0f} s/epoch lately, about {_duration(pace * (epochs - meta.epoch))} to go)"
    return False, line


def stage_done(folder: Path, marker: str) -> bool:
    return (folder / marker).is_file() and (marker != META_FILE or load_meta(folder).complete)


def describe(cfg: TrainConfig, folders: RecipeFolders, epochs: int) -> str:
    """Where the recipe stands, one line per stage."""
    _, stage1 = stage1_status(folders.experts, epochs)
    lines = [f"recipe {cfg.name} ({cfg.model.arch} x{cfg.model.num_experts}, {epochs} epochs)"]
    lines.append(f"  stage 1, experts  {folders.experts}: {stage1}")
    if cfg.model.num_experts > 1:
        routed = "complete" if stage_done(folders.routers, META_FILE) else "not done"
        exported = "complete" if stage_done(folders.model, MANIFEST_FILE) else "not done"
        lines.append(f"  stage 2, routers  {folders.routers}: {routed}")
        lines.append(f"  export            {folders.model}: {exported}")
    else:
        lines.append("  (one expert: no routers, no export)")
    return "\n".join(lines)


def run_recipe(
    cfg: TrainConfig,
    *,
    out: Path,
    data_dir: Path | None = None,
    target_compute: float | None = None,
    export_to: Path | None = None,
    status_only: bool = False,
) -> RecipeFolders:
    """Start or continue the recipe in ``out``; print where it stands before and after."""
    from training.route import route_checkpoint
    from training.train import train

    folders = RecipeFolders.for_run(out, export_to)
    epochs = cfg.schedule.epochs
    print(describe(cfg, folders, epochs), flush=True)
    if status_only:
        return folders
    _check_same_recipe(cfg, folders.experts)
    done, _ = stage1_status(folders.experts, epochs)
    if not done:
        train(cfg, out=folders.experts, data_dir=data_dir, resume=(folders.experts / META_FILE).is_file())
    if cfg.model.num_experts > 1:
        if not stage_done(folders.routers, META_FILE):
            route_checkpoint(folders.experts, out=folders.routers, data_dir=data_dir, target_compute=target_compute)
        if not stage_done(folders.model, MANIFEST_FILE):
            _export(folders.routers, folders.model, data_dir)
    print(describe(cfg, folders, epochs), flush=True)
    return folders


def _check_same_recipe(cfg: TrainConfig, folder: Path) -> None:
    """A finished stage 1 is never taken for another recipe's: the same check as ``train --resume``."""
    if not (folder / META_FILE).is_file():
        return
    require_same_recipe(load_meta(folder).config, cfg, where=f"{folder} holds a run of another recipe")


def _export(checkpoint: Path, model_dir: Path, data_dir: Path | None) -> None:
    # A separate process: the exporter is its own stage (and package), and it leaves nothing behind on failure.
    command = [sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--out", str(model_dir)]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise CheckpointError(f"export of {checkpoint} failed (exit {result.returncode}); see the lines above")
