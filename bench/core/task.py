"""The `Backbone` (denoiser + frozen reference + trainable parameters) and `Task` interfaces.

A task bundles what a run needs besides the method: a backbone factory, prompts, rewards, the
held-out metrics it is judged by and, where it has one, the exact KL-regularized target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from bench.core.clock import CallCounter
from bench.core.diffusion import NoiseSchedule
from bench.core.errors import BenchError


class Backbone(nn.Module, ABC):
    """A denoiser ε_θ with its frozen reference ε_ref.

    `policy(x, t, cond)` and `reference(x, t, cond)` are the denoiser functions the shared
    rollouts call; both count their rows in `counter` ("policy" / "reference"), so every method's
    denoiser calls are accounted for the same way. At initialization ε_θ ≡ ε_ref exactly (a
    zero-initialized residual or LoRA), so every KL term starts at exactly 0.
    """

    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]

    def __init__(self) -> None:
        super().__init__()
        self.counter = CallCounter()

    # ---- what subclasses implement -------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Conditions [B, ...] for a list of prompts (no gradient)."""

    @abstractmethod
    def policy_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """ε_θ(x, t, c) of the model being fine-tuned."""

    @abstractmethod
    def reference_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """ε_ref(x, t, c) of the frozen pretrained model."""

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a method optimizes."""

    def null_cond(self, cond: Tensor) -> Tensor | None:
        """The unconditional condition for classifier-free guidance, or None if the backbone has
        none (then guidance is ignored)."""
        return None

    def decode(self, x0: Tensor) -> Tensor:
        """What rewards and metrics see (identity for vector tasks, VAE decode for latents)."""
        return x0

    def consistency_x0(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x̂0 of a frozen consistency model at (x, t), differentiable in x (SQDF's f_ψ)."""
        raise BenchError(f"{type(self).__name__} has no consistency model; use x0_predictor=tweedie or ddim")

    @property
    def has_consistency_model(self) -> bool:
        return type(self).consistency_x0 is not Backbone.consistency_x0

    # ---- shared ----------------------------------------------------------------------------------

    def policy(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.counter.add("policy", x.shape[0])
        return self.policy_eps(x, t, cond)

    def reference(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.counter.add("reference", x.shape[0])
        return self.reference_eps(x, t, cond)  # frozen weights: a graph only through x, if x has one

    @property
    def dim(self) -> int:
        n = 1
        for s in self.sample_shape:
            n *= s
        return n

    def trainable_state_dict(self) -> dict[str, Tensor]:
        ids = {id(p) for p in self.trainable_parameters()}
        return {k: v.detach().clone() for k, v in self.named_parameters() if id(v) in ids}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        ids = {id(p) for p in self.trainable_parameters()}
        missing = [k for k, p in params.items() if id(p) in ids and k not in state]
        if missing:
            raise BenchError(f"checkpoint lacks trainable parameters {missing[:3]}...")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def describe(self) -> dict[str, Any]:
        n_train = sum(p.numel() for p in self.trainable_parameters())
        return {"type": type(self).__name__, "sample_shape": list(self.sample_shape), "trainable_params": n_train}


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings shared by training rollouts and evaluation."""

    steps: int = 50
    "number of DDIM sampling steps T"
    eta: float = 1.0
    "DDIM stochasticity η (1 = DDPM-like; the KL-regularized target needs η = 1, docs/tasks/mixtures.md §4)"
    guidance: float = 1.0
    "classifier-free guidance scale w (1 = conditional only)"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise BenchError(f"sampler.steps must be >= 1, got {self.steps}")
        if self.eta < 0:
            raise BenchError(f"sampler.eta must be >= 0, got {self.eta}")


class Task(ABC):
    """A benchmark task: backbone, prompts, rewards, metrics and (optionally) the exact target."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    Config: ClassVar[type]
    modality: ClassVar[str] = "vector"  # "vector" or "image"
    default_reward: ClassVar[str]
    default_alpha: ClassVar[float] = 1.0
    "α of a run that names none"
    default_alphas: ClassVar[tuple[float, ...]] = (1.0,)
    "the α values the paper-style grids use"
    rewards: ClassVar[tuple[str, ...]] = ()
    "reward names this task accepts as the training reward"
    metrics: ClassVar[tuple[str, ...]] = ()
    "registry names of the metrics computed at every evaluation"
    table_metrics: ClassVar[tuple[str, ...]] = ()
    "the columns of the paper-style table, in order"
    sampler_defaults: ClassVar[SamplerConfig] = SamplerConfig()

    def __init__(self, cfg: Any, device: str = "cpu") -> None:
        self.cfg = cfg
        self.device = device

    @property
    @abstractmethod
    def train_prompts(self) -> list[str]:
        """Prompts drawn during training."""

    @property
    def eval_prompt_sets(self) -> dict[str, list[str]]:
        """Named prompt sets evaluated at every evaluation; "train" metrics are unsuffixed, others
        get "@<set>" (e.g. "reward@heldout")."""
        return {"train": self.train_prompts}

    @abstractmethod
    def build_backbone(self) -> Backbone:
        """A fresh backbone with its trainable part at initialization."""

    @abstractmethod
    def build_reward(self, name: str) -> Any:
        """The reward object for a (canonical) reward name of this task."""

    def target(self, reward: str, alpha: float, prompt: str) -> Any | None:
        """The exact target p*(x) ∝ p_pre(x) e^{r(x)/α} for one prompt, or None."""
        return None

    def plot_samples(self, samples: Any, path: Path, title: str) -> None:
        """Write a PNG of evaluation samples (against the target where there is one)."""

    def describe(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"name": self.name, "version": self.version, "config": asdict(self.cfg)}
