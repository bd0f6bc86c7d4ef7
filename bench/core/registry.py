"""Decorator registries for methods, rewards, metrics and tasks.

    @METHODS.register("sqdf")
    class SQDF(AlignmentMethod): ...

    METHODS.get("sqdf")      # -> SQDF
    METHODS.get("sqfd")      # UnknownNameError: unknown method 'sqfd'; known methods: draft, sqdf

Each entry may carry metadata (e.g. a metric's `direction`); `bench ls` prints the registries.
Modules register on import; `load_all()` imports every built-in module.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from bench.core.errors import BenchError, UnknownNameError

T = TypeVar("T")


@dataclass
class Entry(Generic[T]):
    name: str
    obj: T
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name -> object map filled by decorators; lookups of unknown names list the known ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = (), **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries or name in self._aliases:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = Entry(name, obj, dict(meta))
            for a in aliases:
                self._aliases[a] = name
            return obj

        return deco

    def canonical(self, name: str) -> str:
        load_all()
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        known = ", ".join(self.names())
        raise UnknownNameError(f"unknown {self.kind} {name!r}; known {self.kind}s: {known}")

    def get(self, name: str) -> T:
        return self._entries[self.canonical(name)].obj

    def entry(self, name: str) -> Entry[T]:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        load_all()
        return sorted(self._entries)

    def aliases(self) -> dict[str, str]:
        load_all()
        return dict(self._aliases)

    def __contains__(self, name: str) -> bool:
        load_all()
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[Entry[T]]:
        load_all()
        return iter(sorted(self._entries.values(), key=lambda e: e.name))


METHODS: Registry[Any] = Registry("method")
REWARDS: Registry[Any] = Registry("reward")
METRICS: Registry[Any] = Registry("metric")
TASKS: Registry[Any] = Registry("task")

_loaded = False

PLUGIN_ENV = "BENCH_PLUGINS"
ENTRY_POINT_GROUP = "diffusion_alignment_bench.plugins"


def load_all() -> None:
    """Import every module that registers entries, so that their decorators run (idempotent).

    The core names no module above it: the built-in tasks, methods, rewards and metrics are
    declared as entry points of the group "diffusion_alignment_bench.plugins" in pyproject.toml,
    exactly like a third-party plugin package. Modules named in $BENCH_PLUGINS (comma-separated;
    `bench --plugin` sets it) are imported after them.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    names = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]  # built-ins + installed plugin packages
    if not names:
        _loaded = False
        raise BenchError(
            "no tasks or methods are registered: the package's entry points are missing; "
            "install it with `bash scripts/bootstrap.sh` (or `pip install -e .`)"
        )
    for name in names:  # the package's own modules: a failure here is a bug, shown as such
        importlib.import_module(name)
    for name in [m.strip() for m in os.environ.get(PLUGIN_ENV, "").split(",") if m.strip()]:
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except BenchError:
            raise
        except Exception as e:
            raise BenchError(f"could not import plugin module {name!r} ({type(e).__name__}: {e}); check {PLUGIN_ENV} / PYTHONPATH") from None
