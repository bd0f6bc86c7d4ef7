"""The one abstract base every alignment method implements, and what the runner hands it.

A method is one file in `methods/`: a frozen config dataclass (help text under each field), and an
`AlignmentMethod` subclass registered with `@METHODS.register("name")`. The runner owns the outer
loop, evaluation, checkpoints and budgets; a method owns one outer iteration (`train_step`) and
its state.

    @METHODS.register("mymethod")
    class MyMethod(AlignmentMethod):
        name = "mymethod"
        paper = "Author et al. 2025, arXiv:XXXX.XXXXX"
        Config = MyConfig
        needs_reward_grad = True

        def __init__(self, cfg: MyConfig, ctx: TrainContext) -> None: ...
        def train_step(self) -> dict[str, float]: ...   # keys under "train/"
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bench.core.clock import PhaseClock
from bench.core.diffusion import SamplerGrid
from bench.core.task import Backbone, SamplerConfig
from bench.core.reward import CountingReward


@dataclass
class TrainContext:
    """Everything a method may use. Only the runner builds one.

    Attributes:
        backbone: ε_θ (trainable), ε_ref (frozen), decode, counters.
        reward: the training reward behind a query counter (and budget, where one is set).
        prompts: the training prompts (methods draw from them with their own generator).
        alpha: the run's KL weight α in nats (objective E[r] − α·KL(P_θ‖P_pre)). Methods
            without a KL term ignore it, and are still judged against the α-target.
        sampler: T, η, guidance of training rollouts.
        seed: the run seed; methods derive every random stream from it.
        clock: phase timer ("sampling", "reward", "update").
        task: the task object (for methods that need task-specific pieces, e.g. an oracle).
    """

    backbone: Backbone
    reward: CountingReward
    prompts: list[str]
    alpha: float
    sampler: SamplerConfig
    seed: int
    clock: PhaseClock = field(default_factory=PhaseClock)
    task: Any = None

    @property
    def grid(self) -> SamplerGrid:
        return self.backbone.schedule.grid(self.sampler.steps)


class AlignmentMethod(ABC):
    """One reward fine-tuning method.

    Class attributes:
        name: registry key. paper: citation. version: bump when numerics change (it goes into
        every result). Config: the frozen config dataclass. needs_reward_grad: whether the method
        differentiates the reward (a non-differentiable reward is refused at build time).
        uses_alpha: whether its objective has the KL weight α.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type]
    needs_reward_grad: ClassVar[bool] = True
    uses_alpha: ClassVar[bool] = True

    def __init__(self, cfg: Any, ctx: TrainContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.generator = torch.Generator().manual_seed(ctx.seed)
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def train_step(self) -> dict[str, float]:
        """One outer iteration: collect, score, update. Returns floats keyed "train/...". """

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.ctx.backbone.trainable_parameters()

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state beyond parameters, optimizer and RNG (buffers, trackers...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.ctx.backbone.trainable_state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ctx.backbone.load_trainable_state_dict(state["params"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.load_extra_state(state.get("extra", {}))

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {"name": cls.name, "version": cls.version, "paper": cls.paper}
