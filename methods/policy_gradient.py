"""Policy-gradient pieces shared by DDPO (methods/ddpo.py) and PPO+KL / DPOK (methods/dpok.py).

Pure functions and one small stateful tracker; no sampling, no optimizer. Derivations and the
notation in full: docs/methods/policy_gradient.md.

Papers:
* Black, Janner, Du, Kostrikov, Levine. "Training Diffusion Models with Reinforcement Learning".
  ICLR 2024, arXiv:2305.13301. §4.3: the denoising chain as a T-step MDP with the Gaussian policy
  π_θ(x_{t−1} | x_t, c) = N(μ_θ(x_t, t, c), σ_t² I), and the score-function (DDPO_SF) and
  importance-sampling (DDPO_IS) gradient estimators with a clipped trust region.
* Fan, Watkins, Du, Liu, Ryu, Boutilier, Abbeel, Ghavamzadeh, Lee, Lee. "DPOK: Reinforcement
  Learning for Fine-tuning Text-to-Image Diffusion Models". NeurIPS 2023, arXiv:2305.16381: the
  same MDP with a per-step KL to the pretrained model and a clamped ratio.
* Schulman, Wolski, Dhariwal, Radford, Klimov. "Proximal Policy Optimization Algorithms". 2017,
  arXiv:1707.06347, Eq. 7: the clipped surrogate L^CLIP.
* Song, Meng, Ermon. "Denoising Diffusion Implicit Models". ICLR 2021, arXiv:2010.02502, Eq. 12
  (the DDIM step, its mean μ and the predicted x̂0) and Eq. 16 (σ_t(η)); the step itself lives
  in bench.core.diffusion.ddim_step.

Notation (paper -> code):
    log π_θ(x_{t−1} | x_t, c)     -> TransitionTerms.log_prob (nats, Σ over the D dims)
    ρ = π_θ / π_old, ε (clip)      -> exp(log_ratio), clip_range
    A (advantage)                  -> advantages
    KL_t(π_θ ‖ π_ref) at x_t       -> TransitionTerms.kl = Σ_dims (μ_θ − μ_ref)² / (2σ_t²)
    ‖ε̂_θ − ε̂_ref‖² (DPOK code)     -> TransitionTerms.eps_mse (mean over dims)
    Σ_{s after t} KL_s             -> kl_to_go(kl)
    per-element mean (code)        -> reduce_dims(·, "mean", D) = nats / D

Deliberate deviations from the official code (kvablack/ddpo-pytorch @1958463, google-research
`dpok/`): log-probs are the nats sum of bench.core.diffusion divided by D for the "mean"
convention at sampling and training alike (the codes take the element mean inside the
scheduler), so ρ = 1 on the current policy's own data; prompts are kept as strings in the
per-prompt tracker (ddpo-pytorch decodes token ids, so prompts cut at 77 tokens collide).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from bench.core import distributed as dist
from bench.core.diffusion import SamplerGrid, ddim_step, gaussian_kl, guided_eps
from bench.core.task import Backbone, SamplerConfig

RATIO_WARN = 1e-3  # |ρ − 1| on the current policy's own transitions above this means sampling and training disagree


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward normalization (`ddpo_pytorch/stat_tracking.py`):
    A = (r − mean_c) / std_c with the statistics of rewards of the same prompt c.

    For each prompt string a deque of its last `buffer_size` rewards persists across iterations.
    `update` pushes the batch's rewards, then normalizes each reward with its prompt's deque
    statistics when the deque holds at least `min_count` values, else with the whole batch's
    (population std, + 1e-6).
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor, scale: bool = True) -> Tensor:
        """Advantages [N] for rewards [N] (float64 statistics).

        Args:
            scale: divide by the std (DDPO); False returns r − mean (reward units).
        """
        r = rewards.detach().double().cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False) + 1e-6
        for p in sorted(set(prompts)):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            dq = self.stats.setdefault(p, deque(maxlen=self.buffer_size))
            dq.extend(r[idx].tolist())
            if len(dq) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                h = torch.tensor(list(dq), dtype=torch.float64)
                mean, std = h.mean(), h.std(unbiased=False) + 1e-6
            out[idx] = (r[idx] - mean) / std if scale else r[idx] - mean
        return out.to(rewards.dtype).to(rewards.device)

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in s["stats"].items()}


def batch_zscore(rewards: Tensor) -> Tensor:
    """(r − mean_batch) / (std_batch + 1e-8) in float64, returned in the rewards' dtype
    (ddpo-pytorch without per-prompt tracking)."""
    r = rewards.double()
    return ((r - r.mean()) / (r.std(unbiased=False) + 1e-8)).to(rewards.dtype)


def gather_rewards(prompts: list[str], rewards: Tensor) -> tuple[list[str], Tensor, int]:
    """(prompts, rewards) of every rank in rank order, and where this rank's slice starts.

    ddpo-pytorch gathers rewards and prompts over processes before normalizing them. A no-op
    without a process group (bench.core.distributed)."""
    if not dist.initialized():
        return prompts, rewards, 0
    rank, world = dist.world()
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, (prompts, rewards.detach().cpu()))
    lo = sum(len(p[0]) for p in parts[:rank])
    return [q for p in parts for q in p[0]], torch.cat([p[1] for p in parts]), lo


def kl_to_go(kl: Tensor) -> Tensor:
    """Σ_{s > t} KL_s along each path: [N, T] per-step KLs (sampling order) -> [N, T].

    The part of KL_path that step t's action still influences after its own step; charging it to
    step t's return gives the exact score-function gradient of −α·KL_path
    (docs/methods/policy_gradient.md, "The KL still to come")."""
    return kl.flip(1).cumsum(1).flip(1) - kl


# --------------------------------------------------------------------------------------------------
# Surrogate losses
# --------------------------------------------------------------------------------------------------


def ppo_clip_loss(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """PPO's clipped surrogate per item (Schulman et al. 2017, arXiv:1707.06347, Eq. 7, negated):
    max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log_ratio). DDPO_IS's trust region.

    The gradient vanishes where the clipped branch is active: A > 0 with ρ > 1 + ε and A < 0 with
    ρ < 1 − ε. [B] -> [B].
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def ratio_clamp_loss(log_ratio: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """DPOK's surrogate per item (the official code's `_train_policy_func`): −A·clamp(ρ, 1 − ε, 1 + ε),
    with no min/max against the unclipped term, so the gradient vanishes whenever ρ leaves the
    band, whatever the sign of A. [B] -> [B]."""
    return -advantages * torch.clamp(torch.exp(log_ratio), 1.0 - clip_range, 1.0 + clip_range)


def log_ratio_stats(info: dict[str, list[float]], log_ratio: Tensor, per_item: Tensor, clip_range: float) -> Tensor:
    """Append a minibatch's PPO diagnostics to `info` (loss, mean ratio, clip fraction, approx KL
    ½·E[(log ρ)²]); returns the ratio exp(log ρ), detached."""
    dr = log_ratio.detach()
    ratio = torch.exp(dr)
    info["loss"].append(float(per_item.detach().mean()))
    info["ratio"].append(float(ratio.mean()))
    info["clipfrac"].append(float(((ratio - 1.0).abs() > clip_range).float().mean()))
    info["approx_kl"].append(float(0.5 * (dr**2).mean()))
    return ratio


# --------------------------------------------------------------------------------------------------
# Log-probabilities of stored transitions
# --------------------------------------------------------------------------------------------------


@dataclass
class TransitionTerms:
    """log π_θ of stored transitions, recomputed with gradient, and the terms against the reference."""

    log_prob: Tensor  # [B] nats, Σ dims; gradient through μ_θ only
    kl: Tensor | None  # [B] nats, KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) = Σ dims (μ_θ − μ_ref)² / (2σ²)
    eps_mse: Tensor | None  # [B] mean_dims (ε̂_θ − ε̂_ref)², DPOK's KL surrogate


def recompute_transition(
    backbone: Backbone,
    grid: SamplerGrid,
    sampler: SamplerConfig,
    x: Tensor,
    x_next: Tensor,
    steps: Tensor,
    cond: Tensor,
    *,
    reference: bool = False,
) -> TransitionTerms:
    """log π_θ(x_next | x) for stored transitions at per-item sampling-step indices.

    π_θ(x_next | x) = N(μ_θ(x, t), σ_t² I) with μ_θ the DDIM mean (Song et al., arXiv:2010.02502,
    Eq. 12) and σ_t(η) (Eq. 16). Uses exactly the sampler's arithmetic (guided ε̂ with the
    sampling CFG in one concatenated call, then `ddim_step(..., prev_sample=x_next)`), so on the
    data of the current policy it reproduces the rollout's log-probs bit for bit.

    Args:
        x, x_next: [B, ...] states and next states. steps: [B] long sampling-step indices i.
        cond: [B, ...] conditions. reference: also evaluate ε_ref (no gradient) for the KL terms.
    """
    s = steps.cpu()
    dev = x.device
    t = grid.timesteps[s].to(dev)
    a, ap = grid.alpha_bars[s], grid.prev_alpha_bars[s]
    null = backbone.null_cond(cond)
    eps = guided_eps(backbone.policy, x, t, cond, null, sampler.guidance)
    out = ddim_step(eps, x, a, ap, sampler.eta, prev_sample=x_next)
    if out.log_prob is None:
        raise ValueError("recompute_transition: σ_t = 0 at a trained step (η = 0 or ᾱ_final = 1); exclude that step")
    kl = eps_mse = None
    if reference:
        with torch.no_grad():
            eps_ref = guided_eps(backbone.reference, x, t, cond, null, sampler.guidance)
            mean_ref = ddim_step(eps_ref, x, a, ap, sampler.eta, prev_sample=x_next).mean
        kl = gaussian_kl(out.mean, mean_ref, out.std)
        eps_mse = ((eps - eps_ref) ** 2).flatten(1).mean(1)
    return TransitionTerms(out.log_prob, kl, eps_mse)


def reduce_dims(x: Tensor, mode: str, dim: int) -> Tensor:
    """A nats sum over dims [B] in the chosen convention: "sum" as is, "mean" divided by D."""
    return x / dim if mode == "mean" else x


def mean_or_zero(xs: list[float]) -> float:
    """The mean of logged values; 0 when none were logged."""
    return float(sum(xs) / len(xs)) if xs else 0.0
