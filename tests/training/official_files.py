"""Checkpoint files in the official RIDE trainer's format, for the import tests (no official checkpoint can be
downloaded here). They are built the way ``base/base_trainer.py`` builds them: ``torch.save`` of a dict with
``arch``, ``epoch``, ``state_dict`` (official parameter names, made from our weights by the inverse mapping),
``optimizer``, ``monitor_best`` (a NumPy float64, as the official metric tracker gives), ``config`` (an object of
``parse_config.ConfigParser``: a class that exists only while the file is written, so the loader cannot import
it) and ``criterion``. A plain module, so that any test package can import it."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PosixPath
from typing import Any

import numpy as np
import torch


@contextmanager
def module_while_saving(name: str, **attributes: Any) -> Iterator[None]:
    """``name`` importable (with ``attributes``) inside the block only: pickle needs it to name the globals."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    try:
        yield
    finally:
        del sys.modules[name]


def official_config(arch: str, args: dict[str, Any], loader: str = "ImbalanceCIFAR10DataLoader", **top: Any) -> dict:
    """The values of an official config (``configs/*.json``) for ``arch`` with ``arch.args`` = ``args``."""
    return {
        "name": "Imbalance_CIFAR10_LT_RIDE",
        "n_gpu": 1,
        "arch": {"type": arch, "args": args},
        "data_loader": {"type": loader, "args": {"data_dir": "data", "batch_size": 128, "shuffle": True}},
        "optimizer": {"type": "SGD", "args": {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "nesterov": True}},
        "trainer": {"epochs": 200, "save_dir": "saved/", "monitor": "max val_accuracy"},
        **top,
    }


def optimizer_state(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """An SGD state dict with a momentum buffer per floating-point tensor, as the official file holds."""
    tensors = [t for t in state_dict.values() if t.is_floating_point()]
    return {
        "state": {i: {"momentum_buffer": torch.zeros_like(t)} for i, t in enumerate(tensors)},
        "param_groups": [{"lr": 0.1, "momentum": 0.9, "nesterov": True, "params": list(range(len(tensors)))}],
    }


def save_official_checkpoint(
    path: Path,
    state_dict: dict[str, torch.Tensor],
    *,
    arch: str,
    config: dict[str, Any] | None,
    epoch: int = 200,
    **extra: Any,
) -> Path:
    """Write ``path`` as the official trainer does; ``extra`` adds or replaces top-level entries."""
    config_parser = type("ConfigParser", (), {"__module__": "parse_config"})
    with module_while_saving("parse_config", ConfigParser=config_parser):
        parser = config_parser()
        parser._config = config
        parser.resume = PosixPath("saved/models/run/checkpoint-epoch100.pth")
        parser._save_dir = PosixPath("saved/models/run")
        parser.log_levels = {0: 30, 1: 20, 2: 10}
        content = {
            "arch": arch,
            "epoch": epoch,
            "state_dict": OrderedDict(state_dict),
            "optimizer": optimizer_state(state_dict),
            "monitor_best": np.float64(0.4321),
            "config": parser,
            "criterion": OrderedDict(),
            **extra,
        }
        torch.save(content, path)
    return path


class Call:
    """Pickles as a call of ``function(*args)``: what a malicious checkpoint does to run code on load."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function = function
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.function, self.args
