"""Wall-time per phase (sampling, reward, update, evaluation) and counters of expensive calls.

Phases nest exclusively: time spent in an inner phase is not counted in the outer one, so the
phases add up to the total.

    clock = PhaseClock()
    with clock("sampling"):
        ...
        with clock("reward"):   # pauses "sampling"
            ...
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float]] = []

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
        self._stack.append((phase, now))
        try:
            yield
        finally:
            end = time.perf_counter()
            name, since = self._stack.pop()
            self.seconds[name] += end - since
            if self._stack:
                outer, _ = self._stack[-1]
                self._stack[-1] = (outer, end)

    def state_dict(self) -> dict[str, float]:
        return dict(self.seconds)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.seconds = defaultdict(float, state)


class CallCounter:
    """Counts rows passed through expensive calls, e.g. denoiser evaluations per item.

    `budget/denoiser_calls` counts one per item per network evaluation (a CFG call on a batch of B
    counts 2B), so methods are comparable at equal compute.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, n: int) -> None:
        self.counts[key] += int(n)

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = defaultdict(int, state)
