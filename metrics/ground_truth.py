"""Metrics against the exact target of the mixture tasks (docs/tasks/mixtures.md §3, §6).

Each metric is a function (samples of one prompt, EvalContext) -> float, registered with its
better direction ("max", "min", or "target": closest to the exact value is best), a short label
for tables and, where the exact target defines one, its closed-form value.

Path-space accounting (docs/tasks/mixtures.md §3): for Gaussian kernels with a shared σ_t and x_T ~ N(0, I),
    KL(P_θ ‖ P_pre) = E_{P_θ} Σ_t ‖μ_θ − μ_ref‖² / (2σ_t²)           (nats, summed over dims)
    J(θ) = E_θ[r(x_0)] − α KL(P_θ ‖ P_pre)
    gap  = α log Z − J(θ) = α KL(P_θ ‖ P*) ≥ 0
The identity is exact for the sampler's own discrete chain; with the closed-form log Z of the
continuous base it holds up to the sampler's discretization floor, which the "ε* sampler" row
reports.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bench.core.diffusion import kl_nats_to_sqdf
from bench.core.evaluation import EvalContext, PromptSamples
from bench.core.registry import METRICS


def _nan() -> float:
    return float("nan")


# ---- reward and objective -------------------------------------------------------------------------


@METRICS.register("reward", direction="max", label="E[r]", doc="mean training reward of samples",
                  closed_form=lambda ctx, p: ctx.target(p).expected_reward)
def reward(s: PromptSamples, ctx: EvalContext) -> float:
    return float(ctx.rewards(s).mean())


def _gold_closed_form(ctx: EvalContext, p: str) -> float | None:
    """E[r_gold] under the KL-regularized optimum of the *training* reward."""
    if ctx.gold is None:
        return None
    t = ctx.target(p)

    def expect() -> float:
        x = t.sample(200_000, torch.Generator().manual_seed(99))
        return float(ctx.gold(x, [p] * x.shape[0]).double().mean())

    return ctx.memo(("gold_cf", p), expect)


@METRICS.register("gold_reward", direction="max", label="E[r_gold]", doc="mean gold reward (trap task: the reward the proxy stands for)",
                  closed_form=_gold_closed_form)
def gold_reward(s: PromptSamples, ctx: EvalContext) -> float:
    if ctx.gold is None:
        return _nan()
    return float(ctx.gold_rewards(s).mean())


@METRICS.register("path_kl", direction="target", label="KL", doc="path KL to the reference, nats (Σ_t Σ_dims Δμ²/2σ²)",
                  closed_form=lambda ctx, p: ctx.target(p).kl)
def path_kl(s: PromptSamples, ctx: EvalContext) -> float:
    return _nan() if s.path_kl is None else float(s.path_kl.mean())


@METRICS.register("path_kl_sqdf", direction="target", label="KL (SQDF conv.)",
                  doc="the same path KL in the SQDF code's convention: Σ_t mean_dims Δμ²/σ² = (2/d)·KL",
                  closed_form=lambda ctx, p: kl_nats_to_sqdf(ctx.target(p).kl, ctx.task.terminal.dim))
def path_kl_sqdf(s: PromptSamples, ctx: EvalContext) -> float:
    if s.path_kl is None:
        return _nan()
    dim = s.dim if s.dim is not None else s.x[0].numel()  # the latent dimension (not the decoded image's)
    return float(kl_nats_to_sqdf(s.path_kl.mean(), dim))


@METRICS.register("objective", direction="max", label="J", doc="E[r] − α·KL, the KL-regularized objective",
                  closed_form=lambda ctx, p: ctx.alpha * ctx.target(p).log_z)
def objective(s: PromptSamples, ctx: EvalContext) -> float:
    if s.path_kl is None:
        return _nan()
    return float(ctx.rewards(s).mean() - ctx.alpha * s.path_kl.mean())


@METRICS.register("gap", direction="min", label="gap", doc="suboptimality α·log Z − J = α·KL(P_θ‖P*) ≥ 0 (exact)",
                  closed_form=lambda ctx, p: 0.0)
def gap(s: PromptSamples, ctx: EvalContext) -> float:
    t = ctx.target(s.prompt)
    if t is None or s.path_kl is None:
        return _nan()
    return float(ctx.alpha * t.log_z - (ctx.rewards(s).mean() - ctx.alpha * s.path_kl.mean()))


# ---- distribution ----------------------------------------------------------------------------------


def _mode_fractions(s: PromptSamples, ctx: EvalContext) -> tuple[Tensor, Tensor] | None:
    t = ctx.target(s.prompt)
    if t is None:
        return None
    labels = t.assign(s.x)
    w = t.mode_weights.double()
    frac = torch.bincount(labels, minlength=w.shape[0]).double() / labels.shape[0]
    return frac, w


@METRICS.register("mode_tv", direction="min", label="mode TV", doc="total variation between sample mode fractions and the target's mode weights",
                  closed_form=lambda ctx, p: 0.0)
def mode_tv(s: PromptSamples, ctx: EvalContext) -> float:
    fw = _mode_fractions(s, ctx)
    return _nan() if fw is None else float(0.5 * (fw[0] - fw[1]).abs().sum())


@METRICS.register("mode_recall", direction="max", label="recall", doc="fraction of admissible modes (weight ≥ 1%) receiving ≥ half their weight",
                  closed_form=lambda ctx, p: 1.0)
def mode_recall(s: PromptSamples, ctx: EvalContext) -> float:
    fw = _mode_fractions(s, ctx)
    if fw is None:
        return _nan()
    frac, w = fw
    adm = w >= 0.01
    return float(((frac >= 0.5 * w) & adm).sum() / adm.sum())


def _rbf_mmd(x: Tensor, y: Tensor, scales: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)) -> float:
    """Multi-bandwidth RBF MMD (biased V-statistic, square-rooted); bandwidths are multiples of
    the median pairwise distance of y."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    dyy = torch.cdist(y, y)
    med = float(dyy[dyy > 0].median())
    dxx, dxy = torch.cdist(x, x), torch.cdist(x, y)
    total = 0.0
    for s in scales:
        h2 = 2 * (s * med) ** 2
        total += float(torch.exp(-dxx**2 / h2).mean() + torch.exp(-dyy**2 / h2).mean() - 2 * torch.exp(-dxy**2 / h2).mean())
    return math.sqrt(max(total, 0.0))


@METRICS.register("mmd", direction="min", label="MMD", doc="multi-bandwidth RBF MMD to 2000 exact p* samples",
                  closed_form=lambda ctx, p: 0.0)
def mmd(s: PromptSamples, ctx: EvalContext) -> float:
    if ctx.target(s.prompt) is None:
        return _nan()
    ref = ctx.target_samples(s.prompt)
    x = s.x[: ref.shape[0]]
    return _rbf_mmd(x, ref)


# ---- naturalness -----------------------------------------------------------------------------------


@METRICS.register("log_p_pre", direction="max", label="log p_pre", doc="mean log-density of samples under the exact base (naturalness)")
def log_p_pre(s: PromptSamples, ctx: EvalContext) -> float:
    return float(ctx.task.terminal.log_prob(s.x).mean())


@METRICS.register("off_manifold", direction="min", label="off-manifold", doc="fraction of samples with log p_pre below the base's 0.1% quantile")
def off_manifold(s: PromptSamples, ctx: EvalContext) -> float:
    thr = ctx.task.off_manifold_threshold
    return float((ctx.task.terminal.log_prob(s.x) < thr).double().mean())


@METRICS.register("off_plane", direction="min", label="off-plane", doc="mean distance of samples to the base's plane (gmm-sub64; exact unnaturalness)",
                  closed_form=lambda ctx, p: ctx.memo(("offplane_cf", p), lambda: float(ctx.task.off_plane(ctx.target(p).sample(100_000, torch.Generator().manual_seed(5)).double()).mean())))
def off_plane(s: PromptSamples, ctx: EvalContext) -> float:
    if not hasattr(ctx.task, "off_plane"):
        return _nan()
    return float(ctx.task.off_plane(s.x.double()).mean())


@METRICS.register("trap_occupancy", direction="min", label="trap", doc="fraction of samples inside the proxy's trap region (gmm-trap)",
                  closed_form=lambda ctx, p: ctx.memo(("trap_cf", p), lambda: float(ctx.task.trap_region(ctx.target(p).sample(200_000, torch.Generator().manual_seed(6))).double().mean())))
def trap_occupancy(s: PromptSamples, ctx: EvalContext) -> float:
    if not hasattr(ctx.task, "trap_region"):
        return _nan()
    return float(ctx.task.trap_region(s.x).double().mean())
