"""Progress on stderr: the one home of progress bars and of the lines printed while they run.

A bar and a message never share a line: messages go through `say` (above any open bar) or, at the
very end, `final_line` (after closing every bar); log records are redirected above a bar while it
is open. Whether a bar shows: True, False (`--quiet`), or None = only when stderr is a terminal.
`announcing(flag)` sets, for a block, whether library code (e.g. the cache) announces long builds.
"""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_announce: contextvars.ContextVar[bool | None] = contextvars.ContextVar("bench_announce", default=None)


def _shown(enabled: bool | None) -> bool:
    return sys.stderr.isatty() if enabled is None else bool(enabled)


@contextmanager
def bar(desc: str, total: int | None, enabled: bool | None = True, start: int = 0, leave: bool = False,
        mininterval: float = 1.0) -> Iterator[Any]:
    """A tqdm bar on stderr, or None when not shown; closed however the block ends, and log records
    written above it meanwhile."""
    if not _shown(enabled):
        yield None
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    b = tqdm(desc=desc, total=total, initial=start, leave=leave, dynamic_ncols=True, mininterval=mininterval, file=sys.stderr)
    try:
        with logging_redirect_tqdm():
            yield b
    finally:
        b.close()


@contextmanager
def ticks(desc: str, total: int | None, enabled: bool | None = True, mininterval: float = 1.0) -> Iterator[Callable[[int], Any]]:
    """`bar`, yielding its update function (a no-op when the bar is not shown)."""
    with bar(desc, total, enabled, mininterval=mininterval) as b:
        yield b.update if b is not None else (lambda n=1: None)


def say(line: str, file: Any = None) -> None:
    """One line (stderr by default) above any open bar."""
    from tqdm import tqdm

    tqdm.write(line, file=file or sys.stderr)


def one_line(text: object, limit: int | None = None) -> str:
    """`text` with its whitespace folded to single spaces (cut at `limit` characters, if given)."""
    return " ".join(str(text).split())[:limit]


def final_line(line: str) -> None:
    """A last line on stderr (an error, "interrupted"): every open bar is closed first."""
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is not None:
        for b in list(getattr(tqdm_mod.tqdm, "_instances", ())):
            try:
                b.close()
            except Exception:
                pass
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


@contextmanager
def announcing(enabled: bool | None) -> Iterator[None]:
    """Within this block, `announce` prints (True), stays silent (False), or prints only on a terminal (None)."""
    token = _announce.set(enabled)
    try:
        yield
    finally:
        _announce.reset(token)


def announce(line: str) -> None:
    """A line about a long step (e.g. building a cache entry), as `announcing` allows."""
    if _shown(_announce.get()):
        say(line)
