"""Read a checkpoint written by the official RIDE trainer without running any code from it.

The official trainer (``base/base_trainer.py``) saves ``torch.save({"arch", "epoch", "state_dict", "optimizer",
"monitor_best", "config", "criterion"})``. Besides tensors and plain containers, that pickle holds objects of
classes from the official code base: ``config`` is its ``parse_config.ConfigParser`` (with ``pathlib`` paths
inside), and ``monitor_best`` is usually a NumPy scalar (its metric tracker is a pandas frame).

Why ``torch.load(weights_only=True)`` alone is not enough: it refuses these files outright, at the first global it
does not know (``parse_config.ConfigParser``). The ways around that are both wrong here:
``weights_only=False`` runs whatever the pickle says (a crafted file runs ``os.system`` on load), and
``torch.serialization.add_safe_globals([ConfigParser])`` needs the official code importable and then calls the
real class (its ``__setstate__`` or constructor) while loading. We want to read the tensors and the plain config
values anyway, without importing or calling anything from the file.

So this module runs torch's own weights-only unpickler (tensor and storage rebuilds and plain containers only),
and gives it, for this one load, an inert stand-in under the name of every other global the file names
(listed beforehand by ``torch.serialization.get_unsafe_globals_in_checkpoint``, which reads the pickle's opcodes
without running them):

- A stand-in is a fresh empty class. Creating an instance of it (NEWOBJ, how pickle rebuilds an ordinary object)
  and restoring its state (BUILD) only record the arguments and the state: the official ``ConfigParser`` comes
  back as a stand-in whose ``state`` is its ``__dict__`` (``_config`` is the plain config dictionary).
- Calling a global (REDUCE) is what a pickle does to run code. A stand-in refuses to be called, except for the
  few names that official checkpoints call to rebuild plain values (``pathlib`` paths, NumPy scalars and
  dtypes); those calls are recorded, never made.
- A file that names a global of a module whose functions run code or reach the system (``os.system``,
  ``builtins.eval``, ``subprocess``, ...) is refused before loading starts, naming it. Safety does not depend on
  that list (nothing from the file is ever imported or called); it makes such a file fail loudly instead of
  loading into harmless stand-ins.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from training.checkpoint import CheckpointError


class UnsafePickleError(CheckpointError):
    """A checkpoint whose pickle tries to run code, or that cannot be read without running code."""


# Modules whose globals run code, import modules, reach the file system, processes or the network, or get at
# arbitrary attributes. A file naming any of them is refused with its name.
REFUSED_MODULES = frozenset(
    {
        "__builtin__",
        "builtins",
        "code",
        "codeop",
        "ctypes",
        "functools",
        "importlib",
        "io",
        "marshal",
        "multiprocessing",
        "nt",
        "operator",
        "os",
        "pdb",
        "pickle",
        "posix",
        "pty",
        "runpy",
        "shutil",
        "socket",
        "subprocess",
        "sys",
        "threading",
        "timeit",
        "types",
        "webbrowser",
        "_io",
        "_pickle",
        "_posixsubprocess",
    }
)

# Globals that official checkpoints call (REDUCE) to rebuild plain values. The call is recorded, never made.
DATA_CONSTRUCTORS = frozenset(
    {
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.PurePosixPath",
        "pathlib.WindowsPath",
        "pathlib.PureWindowsPath",
        "pathlib._local.PosixPath",
        "pathlib._local.WindowsPath",
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
)


class StandIn:
    """An object of a class the loader did not import: the global's name and what the pickle gave it.

    ``args`` are the arguments of its creation (or of the recorded call, for a data constructor); ``state`` is
    what BUILD restored (for an ordinary object, its ``__dict__``).
    """

    global_name: ClassVar[str] = ""
    data_constructor: ClassVar[bool] = False

    def __new__(cls, *args: Any) -> StandIn:
        # NEWOBJ: cls.__new__(cls, *args). Only records; the real class is never imported.
        instance = super().__new__(cls)
        instance.args = args
        instance.state = None
        return instance

    def __init__(self, *args: Any) -> None:
        # Only reached when the pickle calls the global (REDUCE): that is running code, unless it is one of the
        # plain-value constructors official checkpoints use, whose call is merely recorded by __new__.
        if not self.data_constructor:
            raise UnsafePickleError(
                f"the pickle calls {self.global_name}(...) while loading; an official RIDE checkpoint never does "
                "that (it only rebuilds tensors, plain values and its config object), so the file is refused"
            )

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {self.global_name}>"


def stand_in_class(global_name: str) -> type[StandIn]:
    """A new StandIn subclass for one global. One class per name, because torch's unpickler recognises allowed
    globals by identity and the instances must say which global they stand for."""
    attributes = {"global_name": global_name, "data_constructor": global_name in DATA_CONSTRUCTORS}
    return type(f"StandIn[{global_name}]", (StandIn,), attributes)


@dataclass
class OfficialFile:
    """What was read from an official checkpoint: the top-level object and the globals that became stand-ins."""

    path: Path
    content: Any
    stand_ins: list[str] = field(default_factory=list)


def _globals_in(path: Path) -> list[str]:
    """Globals of the file's pickle that torch's weights-only unpickler does not allow by default."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except pickle.UnpicklingError as error:
        # Its opcode reader knows the opcodes of torch.save's default pickle protocol (2), which the official
        # trainer uses; anything else is refused rather than interpreted.
        raise UnsafePickleError(
            f"refused {path}: its pickle uses an instruction that torch.save's default protocol never writes ({error})"
        ) from None
    except (ValueError, RuntimeError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path} is not a checkpoint written by torch.save (a zip archive with data.pkl): {error}. Files from "
            "torch < 1.6 (the legacy format) are not supported: re-save them with a newer torch where you trust them"
        ) from None


def refused_globals(names: list[str]) -> list[str]:
    """The names whose module is one of REFUSED_MODULES (or a submodule of one)."""
    return [name for name in names if name.split(".")[0] in REFUSED_MODULES]


def load_official_file(path: Path) -> OfficialFile:
    """Load ``path`` (a ``torch.save`` archive) on the CPU without importing or calling anything it names.

    Raises CheckpointError when the file is missing or not a torch.save archive, and UnsafePickleError when its
    pickle names a refused global, calls a global, or uses anything torch's weights-only unpickler rejects.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"official checkpoint not found: {path}")
    names = _globals_in(path)
    refused = refused_globals(names)
    if refused:
        raise UnsafePickleError(
            f"refused {path}: its pickle refers to {', '.join(refused)}, which would run code or reach the "
            "system when loaded. An official RIDE checkpoint holds only tensors, plain values and its config object"
        )
    stand_ins = [(stand_in_class(name), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message ends with advice to load with weights_only=False: exactly what must not be done here.
        reason = str(error).split("\n")[0].removeprefix("Weights only load failed. ")
        raise UnsafePickleError(
            f"refused {path}: its pickle does something a plain checkpoint never does ({reason})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path} is truncated or corrupt: {error}") from None
    return OfficialFile(path, content, names)


def plain(value: Any) -> Any:
    """``value`` as JSON-compatible data: dicts (keys as strings), lists, strings, numbers, booleans, None; a
    tensor or stand-in becomes a short description."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)}>"
    return repr(value)
