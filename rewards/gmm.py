"""Rewards of the Gaussian-mixture tasks (docs/tasks/mixtures.md §1, §5). All are differentiable in x.

* `quadratic`: r(x) = −½(x−m)ᵀA(x−m) + bᵀx; its tilt of a mixture is a mixture (exact target).
* `linear`: r(x) = bᵀx (A = 0); unbounded, so an unregularized optimizer diverges.
* `log-classifier`: r(x) = log p(c|x), the Bayes classifier of the base mixture for the prompt's
  label set (RTB-style prompt alignment). At α = 1 the target is exactly the sub-mixture.
* `bump-proxy`: the ring reward plus a Gaussian bump of height h at a point of zero base density
  (a hackable proxy; the gold reward is the ring reward).
* `learned-proxy`: an MLP fitted to the gold reward on 256 base samples; it extrapolates freely
  off the base's support (ELEGANT's "nominal vs genuine" reward).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from bench.core.gmm import GaussianMixture, QuadraticForm
from bench.core.registry import REWARDS
from bench.core.reward import Reward


@REWARDS.register("quadratic", modality="vector", doc="−½(x−m)ᵀA(x−m) + bᵀx; ring8: −x² − (y−1)²/10")
class QuadraticReward(Reward):
    name = "quadratic"
    version = 1
    differentiable = True

    def __init__(self, form: QuadraticForm) -> None:
        self.form = form

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.form(x)


@REWARDS.register("linear", modality="vector", doc="bᵀx (unbounded; sub64: half in-plane, half off-plane)")
class LinearReward(QuadraticReward):
    name = "linear"


@REWARDS.register("log-classifier", modality="vector", doc="log p(c|x) of the base mixture's Bayes classifier for the prompt's label set")
class MixtureClassifierReward(Reward):
    name = "log-classifier"
    version = 1
    differentiable = True

    def __init__(self, mixture: GaussianMixture, label_sets: dict[str, list[int]]) -> None:
        self.mixture = mixture
        self.label_sets = label_sets

    def mask(self, prompts: Sequence[str], device: torch.device) -> Tensor:
        """[N, K] membership of each component in each sample's label set."""
        index: dict[str, int] = {}
        rows = []
        for p in prompts:
            if p not in index:
                if p not in self.label_sets:
                    raise KeyError(f"log-classifier: unknown prompt {p!r}; known: {sorted(self.label_sets)}")
                index[p] = len(index)
            rows.append(index[p])
        table = torch.zeros(len(index), self.mixture.k, dtype=torch.bool)
        for p, i in index.items():
            table[i, self.label_sets[p]] = True
        return table[torch.tensor(rows)].to(device)

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        lp = self.mixture.component_log_probs(x) + torch.log(self.mixture.weights.to(x.device))[None]
        inside = lp.masked_fill(~self.mask(prompts, x.device), float("-inf"))
        return (torch.logsumexp(inside, 1) - torch.logsumexp(lp, 1)).to(x.dtype)


@REWARDS.register("bump-proxy", modality="vector", doc="gold ring reward + a Gaussian bump of height h at a zero-density point")
class BumpProxyReward(Reward):
    name = "bump-proxy"
    version = 1
    differentiable = True

    def __init__(self, gold: QuadraticForm, center: Sequence[float], height: float, width: float) -> None:
        self.gold = gold
        self.center = torch.tensor(center, dtype=torch.float32)
        self.height, self.width = height, width

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        d2 = ((x - self.center.to(x.device, x.dtype)) ** 2).sum(-1)
        return self.gold(x) + self.height * torch.exp(-d2 / (2 * self.width**2))


@REWARDS.register("learned-proxy", modality="vector", doc="MLP fitted to the gold reward on 256 base samples")
class LearnedProxyReward(Reward):
    name = "learned-proxy"
    version = 1
    differentiable = True

    def __init__(self, net: nn.Module) -> None:
        self.net = net.eval().requires_grad_(False)

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.net(x).squeeze(-1)

    @staticmethod
    def fit(gold: QuadraticForm, base: GaussianMixture, n: int = 256, seed: int = 0, iterations: int = 2000) -> "LearnedProxyReward":
        """Fit 2→64→64→1 (SiLU) by full-batch Adam to gold rewards of n base samples."""
        g = torch.Generator().manual_seed(seed)
        x, _ = base.sample(n, g)
        y = gold(x)
        with torch.random.fork_rng():  # reproducible nn.Linear init without touching the global RNG
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(base.dim, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for _ in range(iterations):
            loss = ((net(x).squeeze(-1) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return LearnedProxyReward(net)
