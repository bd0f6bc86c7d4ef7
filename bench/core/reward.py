"""The reward contract and the query-counting wrapper every run goes through.

A reward maps decoded samples and their prompts to one score per sample, higher is better:

    reward(x: Tensor [N, ...], prompts: list[str]) -> Tensor [N]

Vector tasks pass points [N, d]; image tasks pass images [N, 3, H, W] in [0, 1]. A reward declares
`differentiable = True` only when its score is differentiable in x (no `no_grad`, quantization or
PIL round trip on the path). Methods that need the reward's gradient refuse a non-differentiable
reward at build time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Sequence

from torch import Tensor

from bench.core.clock import PhaseClock
from bench.core.errors import BenchError


class Reward(ABC):
    """A scalar score per sample. Subclasses set the class attributes and implement `score`."""

    name: ClassVar[str] = "reward"
    version: ClassVar[int] = 1
    differentiable: ClassVar[bool] = True
    higher_is_better: ClassVar[bool] = True

    @abstractmethod
    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores [N] for samples x [N, ...] and their prompts."""

    def __call__(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        if len(prompts) != x.shape[0]:
            raise ValueError(f"{self.name}: {x.shape[0]} samples but {len(prompts)} prompts")
        return self.score(x, prompts)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "differentiable": self.differentiable}


class RewardWrapper(Reward):
    """A reward that delegates to `inner`: same name, version and differentiability. Subclasses
    change how it is called (counting, device placement, ...), never what it scores."""

    def __init__(self, inner: Reward) -> None:
        self.inner = inner

    @property  # type: ignore[override]
    def name(self) -> str:
        return self.inner.name

    @property  # type: ignore[override]
    def version(self) -> int:
        return self.inner.version

    @property  # type: ignore[override]
    def differentiable(self) -> bool:
        return self.inner.differentiable


class BudgetExhausted(BenchError):
    """A method asked for more reward (oracle) queries than its budget allows."""


class CountingReward(RewardWrapper):
    """Wraps a reward: counts queries (one per sample), times them under the "reward" phase and
    enforces an optional query budget. Every method's training reward goes through one, so query
    counts are comparable across methods."""

    def __init__(self, inner: Reward, clock: PhaseClock | None = None, budget: int | None = None) -> None:
        super().__init__(inner)
        self.clock = clock or PhaseClock()
        self.budget = budget
        self.queries = 0


    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        n = int(x.shape[0])
        if self.budget is not None and self.queries + n > self.budget:
            raise BudgetExhausted(
                f"reward {self.inner.name!r}: {n} more queries would exceed the budget of {self.budget} "
                f"({self.queries} used)"
            )
        self.queries += n
        with self.clock("reward"):
            return self.inner.score(x, prompts)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()
