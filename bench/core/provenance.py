"""Provenance recorded with every result: code version, libraries, machine, device."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "numpy", "scipy", "diffusers", "transformers", "peft", "accelerate", "open_clip_torch", "scikit-learn", "submitit")


@lru_cache(maxsize=1)
def git_sha() -> str:
    """HEAD's sha, with "-dirty" if tracked files differ from it; "unknown" outside a checkout."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def snapshot(device: str = "cpu") -> dict[str, Any]:
    return {
        "git_sha": git_sha(),
        "versions": versions(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **device_info(device),
    }
