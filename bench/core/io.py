"""Atomic writes: every file the harness writes for the user or for itself appears whole or not at all.

Each writer renders to a temporary file beside the target (same folder, so the final rename is
atomic on POSIX) and then `os.replace`s it; a crash or Ctrl-C leaves the previous file untouched.

Tensor files the harness reads back (checkpoints, cache entries, evaluation grids) hold only
tensors and plain values: `atomic_torch_save` refuses anything else when writing, and
`safe_torch_load` reads with torch's weights-only unpickler, which rebuilds tensors, numbers,
strings and containers and refuses every other object, so a crafted file cannot run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp) on a temporary sibling of `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomic text write (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def dump_json(obj: Any, path: Path) -> Path:
    """Atomic JSON write; dataclasses, paths and tensors/arrays are converted."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


SAFE_GLOBALS: tuple[Any, ...] = ()
"""Types beyond torch's weights-only set (tensors, storages, dtypes, torch.Size, OrderedDict, plain
Python values) that harness files may hold. Empty: every method's state (parameters, optimizer
states, generator states, buffers, proxy models) is tensors and plain values, which `check_plain`
enforces at save time. Add a type here only if it is safe to rebuild from a file."""

_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype)  # exact types (np.float64 is a float subclass)


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the first value `safe_torch_load` could not read back (e.g. a numpy
    array or a dataclass in a method's `extra_state`), so that it fails when written, not on resume."""
    if type(obj) in _PLAIN_TYPES or isinstance(obj, torch.Tensor) or type(obj) in SAFE_GLOBALS:
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            check_plain(k, f"{where} (a key)")
            check_plain(v, f"{where}.{k}")
    elif type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: files the harness reads back hold only "
                        "tensors, numbers, strings, None and dicts/lists/tuples of them; convert it (e.g. in state_dict())")


def read_json(path: Path, what: str, fix: str) -> Any:
    """Parse a JSON file the harness wrote; a missing, unreadable or corrupt one is a BenchError of
    one line: "<path>: no such file; <fix>" or "<path>: corrupt <what> (<why>); <fix>"."""
    from bench.core.errors import BenchError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"{path}: no such file; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BenchError(f"{path}: corrupt {what} ({type(e).__name__}); {fix}") from None


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """Atomic `torch.save` of tensors and plain values (checked first: see `check_plain`)."""
    check_plain(obj)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: Path) -> Any:
    """`torch.load` that never runs code from the file: the weights-only unpickler with the
    `SAFE_GLOBALS` allow-list, onto the CPU. A file holding other objects raises
    `pickle.UnpicklingError` (see `unsafe_globals`); torch's advice to retry with
    weights_only=False is not followed."""
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error, if any, is what counts
        warnings.simplefilter("ignore")
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)


def unsafe_globals(path: Path) -> list[str]:
    """The importable names a torch file would need that the safe loader refuses (read without
    unpickling); [] when there are none or the file is not a torch zip archive."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return []


def save_figure(fig: Any, *paths: Path) -> list[Path]:
    """Write a matplotlib figure to each path (format from its suffix) atomically, then close it."""
    import matplotlib.pyplot as plt

    out = []
    for path in paths:
        fmt = Path(path).suffix.lstrip(".")
        out.append(atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format=fmt)))
    plt.close(fig)
    return out
