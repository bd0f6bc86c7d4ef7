"""Proxy rewards and the round structure of the online black-box setting (SEIKO, SQDF-online).

Uehara, Zhao, Black, Hajiramezanali, Scalia, Diamant, Tseng, Levine, Biancalani. "Feedback Efficient
Online Fine-Tuning of Diffusion Models". ICML 2024, arXiv:2402.16359. Official code: zhaoyl18/SEIKO
@947f9ad (`online/online_main.py`, `online/dataset.py`, `aesthetic_scorer.py`,
`reward_aesthetic/train_bootstrap.py`); SQDF's BBO code (Shin-woocheol/SQDF @68861b2, `BBO/`;
Kang et al., ICLR 2026, arXiv:2512.04559) is a fork of it. The optimism bonuses and why they are
optimistic: docs/methods/seiko_optimism.md.

Setting. The true reward is a black-box oracle: it is only *queried*, on samples of the model, under
a fixed total budget, and never differentiated. The budget is spent in R rounds whose sizes grow
geometrically (SEIKO: 1024/2048/4096/8192 = 15,360, i.e. 1/2/4/8 of the total over 15). Each round

    1. samples n_r points with the current model (no gradient) and queries the oracle: y = r(x) + noise;
    2. refits a proxy r̂ on ALL data queried so far (features φ(x) from `task.proxy_features`),
       warm-started from the previous round's weights;
    3. fine-tunes the diffusion model on an optimistic proxy r̂⁺ (the method's own inner loop:
       SEIKO's KL-regularized backprop, or SQDF updates).

Optimism (SEIKO `aesthetic_scorer.py::online_AestheticScorerDiff`):
    none       r̂⁺ = r̂(φ)
    bootstrap  r̂⁺ = max_k r̂_k(φ) over K heads, head k fitted on its own bootstrap resample
    ucb        r̂⁺ = r̂(φ) + min(α_ucb · sqrt(hᵀ (Σ + λI)⁻¹ h), clip), h the proxy's penultimate
               features; Σ = torch.cov(H_Dᵀ) over the queried data D (centered, /(n−1): the code's
               form) or the Gram matrix H_DᵀH_D of linear UCB (`ucb_cov="gram"`; shrinks as 1/√n).

Notation (paper/code -> here):
    D = {(x_i, y_i)}          -> QueriedData (features φ(x_i) [N, F], labels y_i [N])
    r̂, r̂_k (MLPDiff heads)    -> ProxyModel.heads(φ) [K, N]
    f(x) (16-d penultimate)   -> ProxyModel.heads(φ)[1] (features before the last linear layer)
    Σ, λ, α (osm_*)           -> ucb_cov / ucb_lambda / ucb_alpha, clip = ucb_clip
    num_samples[i]            -> query_schedule(queries_total, rounds, round_growth)[i]
    num_outer_loop            -> rounds

Deliberate deviations from the official code:
1. Heads are trained in one batched forward (weights [K, in, out]); each head still gets its own
   bootstrap resample and its own minibatch order. The validation split is not resampled per
   head (the code bootstraps it too); the validation MAE is only reported and used for
   `proxy_select="best"`.
2. Model selection: the code means to keep the best-validation weights but stores a live
   `state_dict()` reference, so it loads the final epoch's weights. The faithful
   default is therefore `proxy_select="last"`; "best" keeps a real copy of the best weights.
3. Dropout and the weight init draw from the method's generator (the code uses the global RNG).
4. The UCB matrix (Σ + λI)⁻¹ is computed once per refit (the proxy is frozen within a round),
   not inverted again for every sample of every reward call: identical values.
5. The proxy's MLP shape and activation are settings: the code's LAION-aesthetic MLP on 768-d
   CLIP embeddings has no non-linearity (a linear model in disguise), which cannot fit the ring
   reward of the 2-D mixture task; its presets use SiLU on raw coordinates. Likewise
   `proxy_standardize` (off in the code) fits standardized labels, so that a few hundred Adam
   steps at lr 1e-3 can fit labels far from 0 (the ring reward is about −16 on the base).
6. The number of queries is taken from `method.queries_total`, or from the run's
   `train.query_budget` when that is 0; the schedule always sums to exactly that total and a
   round that would exceed the budget is never started (the runner's query counter enforces it).
7. One process only: the code gathers every GPU's queries into one dataset; multi-process runs
   (train.processes > 1) are refused rather than letting each rank spend the whole budget.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from bench.core.diffusion import draw_noise, rollout
from bench.core.distributed import world as dist_world
from bench.core.errors import BenchError
from bench.core.method import TrainContext
from methods.common import check_choice, check_range, require, sample_prompts
from bench.core.reward import BudgetExhausted, Reward

OPTIMISM = ("ucb", "bootstrap", "none")


# --------------------------------------------------------------------------------------------------
# Settings (the fields live in each online method's config; these check them in one place)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnlineConfig:
    """Fields every online black-box method shares (SEIKO, SQDF-online): the oracle's query rounds
    and the optimistic proxy model. A method's config subclasses it and adds its own fields."""

    queries_total: int = 0
    "oracle queries over all rounds; 0 = the run's train.query_budget"
    rounds: int = 4
    "rounds of oracle queries"
    round_growth: float = 2.0
    "each round queries this many times the previous one (2: 1/2/4/8 of the total)"
    query_batch: int = 256
    "samples per no-grad sampling batch when querying"
    proxy_heads: int = 4
    "bootstrap heads (optimism=bootstrap)"
    proxy_hidden: tuple[int, ...] = (1024, 128, 64, 16)
    "hidden widths of the proxy MLP; the last one is the UCB feature dimension"
    proxy_dropout: tuple[float, ...] = (0.2, 0.2, 0.1, 0.0)
    "dropout after each hidden layer while fitting"
    proxy_activation: str = "none"
    "none (the code's LAION-aesthetic MLP is linear), silu or relu"
    proxy_epochs: int = 300
    "epochs per refit"
    proxy_batch: int = 512
    "minibatch size of the refit"
    proxy_lr: float = 1e-3
    "Adam learning rate of the refit (a fresh Adam each round, warm-started weights)"
    proxy_standardize: bool = False
    "fit on labels standardized by the queried data's mean/std, mapped back on prediction (the code fits raw labels)"
    proxy_val_fraction: float = 0.05
    "fraction of the queried data held out for validation"
    proxy_val_split: str = "newest"
    "newest (the code: the last queries, no shuffle) or random"
    proxy_select: str = "last"
    "last (what the code effectively keeps) or best (lowest validation MAE)"
    ucb_alpha: float = 1e-2
    "UCB bonus scale α_ucb (optimism=ucb; the code's osm_alpha)"
    ucb_lambda: float = 1e-3
    "ridge λ of (Σ + λI)⁻¹ (osm_lambda)"
    ucb_clip: float = 10.0
    "upper clip of the bonus (osm_clipping)"
    ucb_cov: str = "cov"
    "cov: centered torch.cov of the features (the code); gram: Σ_j h_j h_jᵀ (linear UCB)"


def check_online_fields(cfg: Any) -> None:
    """Validate the round-structure fields of an online method's config."""
    check_range("method.queries_total", cfg.queries_total, 0)
    check_range("method.rounds", cfg.rounds, 1)
    check_range("method.round_growth", cfg.round_growth, 0.0, lo_open=True)
    check_range("method.query_batch", cfg.query_batch, 1)
    check_range("method.updates_per_round", cfg.updates_per_round, 1)
    if cfg.queries_total:
        query_schedule(cfg.queries_total, cfg.rounds, cfg.round_growth)


def check_proxy_fields(cfg: Any) -> None:
    """Validate the proxy-model fields of an online method's config."""
    check_range("method.proxy_heads", cfg.proxy_heads, 1)
    require(len(cfg.proxy_hidden) >= 1 and all(h >= 1 for h in cfg.proxy_hidden),
            f"method.proxy_hidden must be a non-empty list of widths >= 1, got {cfg.proxy_hidden}")
    require(len(cfg.proxy_dropout) == len(cfg.proxy_hidden) and all(0 <= p < 1 for p in cfg.proxy_dropout),
            f"method.proxy_dropout must give one rate in [0, 1) per hidden layer ({len(cfg.proxy_hidden)}), got {cfg.proxy_dropout}")
    check_choice("method.proxy_activation", cfg.proxy_activation, ("none", "silu", "relu"))
    check_range("method.proxy_epochs", cfg.proxy_epochs, 1)
    check_range("method.proxy_batch", cfg.proxy_batch, 1)
    check_range("method.proxy_lr", cfg.proxy_lr, 0.0, lo_open=True)
    check_range("method.proxy_val_fraction", cfg.proxy_val_fraction, 0.0, 1.0, hi_open=True)
    check_choice("method.proxy_val_split", cfg.proxy_val_split, ("newest", "random"))
    check_choice("method.proxy_select", cfg.proxy_select, ("last", "best"))
    check_range("method.ucb_alpha", cfg.ucb_alpha, 0.0)
    check_range("method.ucb_lambda", cfg.ucb_lambda, 0.0, lo_open=True)
    check_range("method.ucb_clip", cfg.ucb_clip, 0.0)
    check_choice("method.ucb_cov", cfg.ucb_cov, ("cov", "gram"))


def query_schedule(total: int, rounds: int, growth: float = 2.0) -> list[int]:
    """Queries per round, proportional to growth^r and summing to exactly `total`.

    SEIKO: query_schedule(15360, 4) == [1024, 2048, 4096, 8192]. Rounding down every round but the
    last, which takes the remainder, keeps the sum exact.
    """
    w = [growth**r for r in range(rounds)]
    s = sum(w)
    sizes = [int(math.floor(total * wi / s)) for wi in w[:-1]]
    sizes.append(total - sum(sizes))
    if min(sizes) < 1:
        raise BenchError(f"a query budget of {total} cannot give each of {rounds} rounds at least one query; raise method.queries_total / train.query_budget or lower method.rounds")
    return sizes


# --------------------------------------------------------------------------------------------------
# The proxy: an MLP regressor with K heads
# --------------------------------------------------------------------------------------------------


class HeadsMLP(nn.Module):
    """K independent MLPs F -> hidden... -> 1, evaluated in one batched pass.

    Weights are stacked [K, in, out]; `forward` takes shared inputs [N, F] or per-head inputs
    [K, N, F] and returns (outputs [K, N], penultimate features [K, N, h_last]).
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], heads: int, activation: str, dropout: Sequence[float], generator: torch.Generator) -> None:
        super().__init__()
        sizes = [in_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default init range, drawn from our generator
            self.weights.append(nn.Parameter((torch.rand(heads, a, b, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(heads, b, generator=generator) * 2 - 1) * bound))
        self.activation = activation
        self.dropout = tuple(float(p) for p in dropout)

    def _act(self, h: Tensor) -> Tensor:
        if self.activation == "silu":
            return torch.nn.functional.silu(h)
        if self.activation == "relu":
            return torch.relu(h)
        return h

    def forward(self, x: Tensor, dropout_generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        k = self.weights[0].shape[0]
        h = x.unsqueeze(0).expand(k, *x.shape) if x.dim() == 2 else x
        n_hidden = len(self.weights) - 1
        for i in range(n_hidden):
            h = self._act(torch.baddbmm(self.biases[i].unsqueeze(1), h, self.weights[i]))
            p = self.dropout[i]
            if dropout_generator is not None and p > 0:  # inverted dropout, training only
                keep = (torch.rand(h.shape, generator=dropout_generator) >= p).to(h.device)
                h = h * keep / (1 - p)
        out = torch.baddbmm(self.biases[-1].unsqueeze(1), h, self.weights[-1]).squeeze(-1)
        return out, h


class ProxyModel:
    """r̂ (and its optimism) fitted on queried (φ(x), y) pairs; refit each round, warm-started.

    Args:
        in_dim: feature dimension F. cfg: an online method's config (the `proxy_*` and `ucb_*`
        fields). optimism: "ucb", "bootstrap" or "none". generator: init, resampling, dropout,
        minibatch order. device: where the heads live.
    """

    def __init__(self, in_dim: int, cfg: Any, optimism: str, generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        check_choice("optimism", optimism, OPTIMISM)
        self.cfg = cfg
        self.optimism = optimism
        self.in_dim = in_dim
        self.k = cfg.proxy_heads if optimism == "bootstrap" else 1
        self.net = HeadsMLP(in_dim, cfg.proxy_hidden, self.k, cfg.proxy_activation, cfg.proxy_dropout, generator).to(device)
        self.net.requires_grad_(False)
        self.ucb_matrix: Tensor | None = None  # (Σ + λI)⁻¹ [h, h] float64, ucb only
        self.y_shift, self.y_scale = 0.0, 1.0  # label standardization (proxy_standardize)

    @property
    def device(self) -> torch.device:
        return self.net.weights[0].device

    # ---- fitting ---------------------------------------------------------------------------------

    def split(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(train indices, validation indices) of n data points, per the configured policy: the
        newest `proxy_val_fraction` (the code: the last 5 %, no shuffle) or a random subset."""
        border = int(n * (1 - self.cfg.proxy_val_fraction))
        border = min(max(border, 1), n)
        order = torch.arange(n) if self.cfg.proxy_val_split == "newest" else torch.randperm(n, generator=generator)
        return order[:border], order[border:]

    def fit(self, features: Tensor, labels: Tensor, generator: torch.Generator) -> dict[str, float]:
        """MSE regression of every head on its (bootstrap resample of the) training split with a
        fresh Adam, `proxy_epochs` epochs of shuffled minibatches (the last one partial).

        Args:
            features: φ(x) [N, F]. labels: y [N] (noisy oracle labels).
        Returns:
            Stats: final training MSE, validation MAE (when there is a validation split).
        """
        cfg, dev = self.cfg, self.device
        feats, ys = features.to(dev, torch.float32), labels.to(dev, torch.float32)
        train, val = self.split(feats.shape[0], generator)
        n = train.shape[0]
        if cfg.proxy_standardize:
            self.y_shift = float(ys[train.to(dev)].mean())
            self.y_scale = float(ys[train.to(dev)].std()) if n > 1 else 1.0
            self.y_scale = self.y_scale if self.y_scale > 1e-8 else 1.0
        target = (ys - self.y_shift) / self.y_scale
        if self.k > 1:  # bootstrap: each head resamples the training split with replacement
            idx = train[torch.randint(n, (self.k, n), generator=generator)]
        else:
            idx = train.unsqueeze(0)
        net = self.net.requires_grad_(True)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.proxy_lr)
        best_mae, best_state = math.inf, None
        train_mse = math.nan
        for _ in range(cfg.proxy_epochs):
            order = torch.argsort(torch.rand(self.k, n, generator=generator), dim=1)
            total, count = 0.0, 0
            for start in range(0, n, cfg.proxy_batch):
                ids = torch.gather(idx, 1, order[:, start : start + cfg.proxy_batch]).to(dev)
                pred, _ = net(feats[ids], dropout_generator=generator)
                loss = ((pred - target[ids]) ** 2).mean(1).mean(0)  # mean over heads of per-head MSE
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * ids.shape[1]
                count += ids.shape[1]
            train_mse = total / count * self.y_scale**2  # in label units
            if val.numel():
                mae = self.val_mae(feats, ys, val)
                if cfg.proxy_select == "best" and mae < best_mae:
                    best_mae, best_state = mae, copy.deepcopy(net.state_dict())
        if best_state is not None:
            net.load_state_dict(best_state)
        net.requires_grad_(False)
        stats = {"train/proxy_train_mse": train_mse}
        if val.numel():
            stats["train/proxy_val_mae"] = self.val_mae(feats, ys, val)
        if self.optimism == "ucb":
            self.ucb_matrix = self._ucb_matrix(feats)
        return stats

    @torch.no_grad()
    def val_mae(self, feats: Tensor, ys: Tensor, val: Tensor) -> float:
        pred, _ = self.heads(feats[val.to(feats.device)])
        return float((pred - ys[val.to(feats.device)]).abs().mean())

    @torch.no_grad()
    def _ucb_matrix(self, feats: Tensor) -> Tensor:
        """(Σ + λI)⁻¹ from the penultimate features of all queried data."""
        _, h = self.net(feats)
        h = h[0].double()
        if self.cfg.ucb_cov == "cov":
            sigma = torch.cov(h.T) if h.shape[0] > 1 else torch.zeros(h.shape[1], h.shape[1], dtype=h.dtype, device=h.device)
        else:
            sigma = h.T @ h
        eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
        return torch.linalg.inv(sigma + self.cfg.ucb_lambda * eye)  # float64: λ may be tiny against Σ

    # ---- prediction ------------------------------------------------------------------------------

    def heads(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(r̂_k(φ) [K, N] in label units, penultimate features [K, N, h]); differentiable in φ."""
        out, h = self.net(features.to(self.device, torch.float32))
        return out * self.y_scale + self.y_shift, h

    def bonus(self, features: Tensor) -> Tensor:
        """UCB bonus min(α·sqrt(hᵀ(Σ + λI)⁻¹h), clip) [N]; differentiable in φ."""
        if self.ucb_matrix is None:
            raise BenchError("the UCB bonus needs a fitted proxy (ucb optimism)")
        _, h = self.heads(features)
        h = h[0].double()
        quad = torch.einsum("ni,ij,nj->n", h, self.ucb_matrix.to(h.device), h)
        return torch.clamp(self.cfg.ucb_alpha * torch.sqrt(quad.clamp(min=1e-12)), max=self.cfg.ucb_clip).float()

    def optimistic(self, features: Tensor) -> Tensor:
        """r̂⁺(φ) [N]: the plain proxy, the max over bootstrap heads, or proxy + UCB bonus."""
        out, _ = self.heads(features)
        if self.optimism == "bootstrap":
            return out.max(0).values
        if self.optimism == "ucb":
            return out[0] + self.bonus(features)
        return out[0]

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"in_dim": self.in_dim, "net": self.net.state_dict(), "ucb_matrix": self.ucb_matrix, "y_shift": self.y_shift, "y_scale": self.y_scale}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.net.load_state_dict(s["net"])
        self.ucb_matrix = s["ucb_matrix"]
        self.y_shift, self.y_scale = float(s["y_shift"]), float(s["y_scale"])


class OptimisticReward(Reward):
    """r̂⁺(decode(x)) as a differentiable reward: `task.proxy_features` then the proxy's optimism."""

    name = "optimistic-proxy"
    version = 1
    differentiable = True

    def __init__(self, rounds: "OnlineRounds") -> None:
        self.rounds = rounds

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.rounds.proxy is None:
            raise BenchError("the optimistic proxy is used before the first round was queried")
        return self.rounds.proxy.optimistic(self.rounds.features(x)).to(x.device, x.dtype)


# --------------------------------------------------------------------------------------------------
# Rounds of oracle queries
# --------------------------------------------------------------------------------------------------


class OnlineRounds:
    """The outer loop of the online setting: query schedule, queried data, proxy, round counters.

    A method calls `due()` at the start of each `train_step`; when a round is due, `start_round()`
    queries the oracle (`ctx.reward`, counted against the budget) with the current model, refits
    the proxy and returns its stats; after each inner update the method calls `finish_update()`.
    When every round of the schedule has run its `updates_per_round` updates, `start_round()`
    raises BudgetExhausted: the runner then stops and evaluates.

    Args:
        name: the method's name (messages). cfg: the method's config (online + proxy fields).
        ctx: the run's TrainContext (ctx.reward is the oracle). optimism: resolved optimism.
        generator: the method's generator (every random draw).
    """

    def __init__(self, name: str, cfg: Any, ctx: TrainContext, optimism: str, generator: torch.Generator) -> None:
        self.name, self.cfg, self.ctx, self.optimism, self.generator = name, cfg, ctx, optimism, generator
        task = ctx.task
        require(dist_world()[1] == 1, f"{name} runs in one process (train.processes=1): every rank would spend the whole query budget and fit its own proxy")
        require(task is not None and callable(getattr(task, "proxy_features", None)),
                f"{name} needs the task's proxy_features(x) (the features its proxy is fitted on); task {getattr(task, 'name', None)!r} has none")
        budget = ctx.reward.budget
        if cfg.queries_total:
            total = cfg.queries_total
            require(budget is None or total <= budget,
                    f"method.queries_total ({total}) exceeds train.query_budget ({budget}); lower one or raise the other")
        else:
            require(budget is not None, f"{name} needs a query budget: set train.query_budget (or method.queries_total)")
            total = int(budget)
        self.schedule = query_schedule(total, cfg.rounds, cfg.round_growth)
        self.round = -1  # index of the current round; −1 before the first query
        self.updates_in_round = 0
        self.features_data: Tensor | None = None  # φ(x) of every query so far [N, F] (CPU)
        self.labels = torch.zeros(0)  # oracle labels [N]
        self.proxy: ProxyModel | None = None
        self.reward = OptimisticReward(self)

    @property
    def oracle(self) -> Reward:
        return getattr(self.ctx.reward, "inner", self.ctx.reward)

    def features(self, x: Tensor) -> Tensor:
        """φ(x) [N, F] of decoded samples (differentiable when the task's features are)."""
        return self.ctx.task.proxy_features(x)

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def due(self) -> bool:
        return self.round < 0 or self.updates_in_round >= self.cfg.updates_per_round

    def start_round(self) -> dict[str, float]:
        """Query the next round's oracle batch with the current model and refit the proxy."""
        ctx, r = self.ctx, self.round + 1
        if r >= len(self.schedule):
            raise BudgetExhausted(f"{self.name}: all {len(self.schedule)} query rounds ({sum(self.schedule)} oracle queries) are complete")
        n = self.schedule[r]
        left = ctx.reward.remaining()
        if left is not None and left < n:
            raise BudgetExhausted(f"{self.name}: round {r} needs {n} oracle queries but only {left} remain")
        feats, labels = self.query(n)
        self.features_data = feats if self.features_data is None else torch.cat([self.features_data, feats])
        self.labels = torch.cat([self.labels, labels])
        if self.proxy is None:
            self.proxy = ProxyModel(feats.shape[1], self.cfg, self.optimism, self.generator, _device_of(ctx))
        with ctx.clock("proxy"):
            stats = self.proxy.fit(self.features_data, self.labels, self.generator)
        self.round, self.updates_in_round = r, 0
        stats.update({
            "train/round": float(r),
            "train/round_queries": float(n),
            "train/dataset_size": float(self.size),
            "train/oracle_label_mean": float(labels.mean()),
        })
        return stats

    @torch.no_grad()
    def query(self, n: int) -> tuple[Tensor, Tensor]:
        """n fresh samples of the current model (no gradient), labelled by the oracle.

        Returns:
            (φ(x) [n, F] on CPU, labels [n] on CPU).
        """
        ctx, bb, s = self.ctx, self.ctx.backbone, self.ctx.sampler
        feats, labels = [], []
        for start in range(0, n, self.cfg.query_batch):
            m = min(self.cfg.query_batch, n - start)
            prompts = sample_prompts(ctx.prompts, m, self.generator)
            with ctx.clock("sampling"):
                cond = bb.encode_prompts(prompts)
                x_T, z = draw_noise(self.generator, m, s.steps, bb.sample_shape)  # on the CPU, as every method's noise
                traj = rollout(bb.policy, ctx.grid, cond, x_T, z, eta=s.eta, guidance=s.guidance, null_cond=bb.null_cond(cond), keep_latents=False)
                x = bb.decode(traj.x0)
            y = ctx.reward(x, prompts)  # the oracle: counted (and budgeted) by the runner's CountingReward
            labels.append(y.detach().float().cpu())
            feats.append(self.features(x).detach().float().cpu())
        return torch.cat(feats), torch.cat(labels)

    def finish_update(self) -> None:
        self.updates_in_round += 1

    # ---- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        gen = getattr(self.oracle, "generator", None)
        return {
            "round": self.round,
            "updates_in_round": self.updates_in_round,
            "features": self.features_data,
            "labels": self.labels,
            "proxy": self.proxy.state_dict() if self.proxy is not None else None,
            # an oracle with stateful label noise exposes it as `.generator`; keep its stream
            "oracle_generator": gen.get_state() if isinstance(gen, torch.Generator) else None,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.round, self.updates_in_round = int(s["round"]), int(s["updates_in_round"])
        self.features_data, self.labels = s["features"], s["labels"]
        if s["proxy"] is not None:
            # a throwaway generator: the weights are overwritten right away, the method's stream is untouched
            self.proxy = ProxyModel(int(s["proxy"]["in_dim"]), self.cfg, self.optimism, torch.Generator(), _device_of(self.ctx))
            self.proxy.load_state_dict(s["proxy"])
        gen = getattr(self.oracle, "generator", None)
        if isinstance(gen, torch.Generator) and s.get("oracle_generator") is not None:
            gen.set_state(s["oracle_generator"])


def _device_of(ctx: TrainContext) -> torch.device:
    params = ctx.backbone.trainable_parameters()
    return params[0].device if params else torch.device("cpu")
