"""Atomic writes: every file the harness writes for the user or for itself appears whole or not at all.

Each writer renders to a temporary file beside the target (same folder, so the final rename is
atomic on POSIX) and then `os.replace`s it; a crash or Ctrl-C leaves the previous file untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
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


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """Atomic `torch.save`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_figure(fig: Any, *paths: Path) -> list[Path]:
    """Write a matplotlib figure to each path (format from its suffix) atomically, then close it."""
    import matplotlib.pyplot as plt

    out = []
    for path in paths:
        fmt = Path(path).suffix.lstrip(".")
        out.append(atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format=fmt)))
    plt.close(fig)
    return out
