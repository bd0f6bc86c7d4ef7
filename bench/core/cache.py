"""On-disk cache of artifacts that are expensive to rebuild (pretrained bases, fitted judges).

Entries are keyed by a hash of the config that produced them, so a changed config rebuilds. Writes
are atomic (temporary file + rename) and hold only tensors and plain values; reads use the safe
loader (`bench.core.io.safe_torch_load`), so an entry never runs code. A file that fails to load
(corrupt, foreign, or holding other objects) is reported and rebuilt, never a crash deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from bench.core import progress
from bench.core.errors import BenchError
from bench.core.io import atomic_torch_save, safe_torch_load, unsafe_globals

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
        config: everything the artifact depends on (hashed; stored beside it, as JSON values, for inspection).
        build: returns a dict of tensors and plain values (no other objects: see bench.core.io.check_plain).
    """
    h = config_hash(config)
    path = cache_folder(kind) / f"{h}.pt"
    if path.exists():
        try:
            obj = safe_torch_load(path)
            if not isinstance(obj, dict) or obj.get("__config_hash__") != h:
                raise ValueError("content does not match its key")
            return obj
        except Exception as e:  # corrupt, foreign or unsafe file: rebuild (never unpickled beyond tensors and plain values)
            unsafe = unsafe_globals(path)
            why = f"holds objects that are not loaded: {', '.join(unsafe[:3])}" if unsafe else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("cache file %s is unreadable (%s); rebuilding it", path, why)
    progress.announce(f"bench: building the {kind} cache entry once (stored in {path})")
    obj = dict(build())
    obj["__config_hash__"] = h
    obj["__config__"] = json.loads(json.dumps(config, sort_keys=True, default=str))
    atomic_torch_save(obj, path)
    return obj


def cache_path(kind: str, config: dict[str, Any]) -> Path:
    """Where the entry for (kind, config) lives (nothing is created)."""
    return cache_dir() / kind / f"{config_hash(config)}.pt"


def cache_folder(kind: str) -> Path:
    """The folder of `kind`'s entries, created; BenchError (one line) if it cannot be, before any build."""
    folder = cache_dir() / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"cache folder {folder} cannot be created ({type(e).__name__}: {e.strerror or e}); "
                         f"set BENCH_CACHE_DIR to a writable folder") from None
    return folder
