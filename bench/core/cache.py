"""On-disk cache of artifacts that are expensive to rebuild (pretrained bases, fitted judges).

Entries are keyed by a hash of the config that produced them, so a changed config rebuilds. Writes
are atomic (temporary file + rename); a file that fails to load is reported and rebuilt, never a
crash deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from bench.core.io import atomic_torch_save

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$BENCH_CACHE_DIR, else ~/.cache/diffusion-alignment-bench."""
    return Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "diffusion-alignment-bench"))


def config_hash(config: dict[str, Any]) -> str:
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached(kind: str, config: dict[str, Any], build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Load the artifact for (kind, config) from the cache, or build and store it.

    Args:
        kind: a folder name, e.g. "digits-base".
        config: everything the artifact depends on (hashed; stored beside it for inspection).
        build: returns a dict of tensors/plain values (saved with torch.save).
    """
    h = config_hash(config)
    path = cache_dir() / kind / f"{h}.pt"
    if path.exists():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(obj, dict) or obj.get("__config_hash__") != h:
                raise ValueError("content does not match its key")
            return obj
        except Exception as e:  # corrupt or foreign file: rebuild
            log.warning("cache file %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e)
    obj = dict(build())
    obj["__config_hash__"] = h
    obj["__config__"] = config
    atomic_torch_save(obj, path)
    return obj


def cache_path(kind: str, config: dict[str, Any]) -> Path:
    return cache_dir() / kind / f"{config_hash(config)}.pt"
