"""Exact ground truth of the mixture tasks: closed forms, quadrature, the exact denoiser, the gap."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from bench.core.diffusion import NoiseSchedule
from bench.core.evaluation import EvalContext, compute_metrics, oracle_samples, sample_model
from bench.core.gmm import GaussianMixture, GridTarget, Quadrature, QuadraticForm, ring
from bench.core.registry import TASKS
from bench.app.runner import build_task
from bench.core.task import SamplerConfig


def random_mixture(seed: int, k: int = 4, d: int = 2) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) * 0.5
    covs = a @ a.transpose(1, 2) + 0.2 * torch.eye(d, dtype=torch.float64)
    return GaussianMixture(torch.rand(k, generator=g, dtype=torch.float64) + 0.2, means, covs)


def random_reward(seed: int, d: int = 2) -> QuadraticForm:
    g = torch.Generator().manual_seed(100 + seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.4
    return QuadraticForm(a @ a.T, torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64), 0.3)


@functools.lru_cache(maxsize=None)
def _quadrature(seed: int) -> Quadrature:
    return Quadrature(random_mixture(seed), bound=14.0, n=1001)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha", [3.0, 1.0, 0.3])
def test_closed_form_matches_grid_quadrature(seed: int, alpha: float) -> None:
    """p* in closed form vs quadrature of p_pre·e^{r/α}: L1 < 1e-6; log Z, E*[r], KL agree."""
    base, r = random_mixture(seed), random_reward(seed)
    exact = base.tilt(r, alpha)
    quad = _quadrature(seed)
    grid = GridTarget(quad, lambda x: r(x), alpha)
    dens_exact = torch.exp(exact.log_prob(quad.points))
    dens_grid = grid._p / quad.h**2
    l1 = float((dens_exact - dens_grid).abs().sum() * quad.h**2)
    assert l1 < 1e-6, l1
    assert exact.log_z == pytest.approx(grid.log_z, abs=1e-6)  # float32 reward on the grid
    assert exact.expected_reward == pytest.approx(grid.expected_reward, abs=1e-6)
    assert exact.kl == pytest.approx(grid.kl, abs=1e-6)
    assert exact.kl >= 0


def test_ring8_targets_match_the_tabulated_values() -> None:
    """The closed-form values tabulated in docs/tasks/mixtures.md §7 (clean base)."""
    base = ring(8, 4.0, 0.3)
    r = QuadraticForm(torch.diag(torch.tensor([2.0, 0.2])), torch.tensor([0.0, 1.0]), torch.zeros(2))
    for alpha, log_z, e_r, kl, top in [(1.0, -2.968, -1.340, 1.628, 0.799), (0.3, -5.207, -0.764, 2.662, 0.987), (3.0, -1.750, -2.904, 0.782, 0.484)]:
        t = base.tilt(r, alpha)
        assert (t.log_z, t.expected_reward, t.kl) == pytest.approx((log_z, e_r, kl), abs=1.5e-3)
        assert float(t.mode_weights.max()) == pytest.approx(top, abs=1.5e-3)


def test_large_alpha_gives_the_base() -> None:
    base, r = random_mixture(5), random_reward(5)
    t = base.tilt(r, 1e9)
    torch.testing.assert_close(t.mixture.weights, base.weights, atol=1e-7, rtol=0)
    torch.testing.assert_close(t.mixture.means, base.means, atol=1e-6, rtol=0)
    torch.testing.assert_close(t.mixture.covs, base.covs, atol=1e-7, rtol=0)
    assert abs(t.kl) < 1e-7 and abs(t.log_z) < 1e-6


def test_linear_reward_is_a_mean_shift() -> None:
    """A = 0: μ'_k = μ_k + Σ_k b/α and log Z_k = bᵀμ_k/α + bᵀΣ_k b/(2α²)."""
    base = random_mixture(7)
    b = torch.tensor([0.7, -0.4], dtype=torch.float64)
    alpha = 0.8
    t = base.tilt(QuadraticForm(torch.zeros(2, 2), torch.zeros(2), b), alpha)
    want_means = base.means + torch.einsum("kde,e->kd", base.covs, b) / alpha
    torch.testing.assert_close(t.mixture.means, want_means)
    torch.testing.assert_close(t.mixture.covs, base.covs)
    log_zk = base.means @ b / alpha + torch.einsum("d,kde,e->k", b, base.covs, b) / (2 * alpha**2)
    assert t.log_z == pytest.approx(float(torch.logsumexp(torch.log(base.weights) + log_zk, 0)), abs=1e-10)


@pytest.mark.parametrize("mixture", ["isotropic", "full"])
@pytest.mark.parametrize("level", [1.0, 0.9999])
def test_exact_eps_is_the_scaled_score(mixture: str, level: float) -> None:
    """ε(x) = −√(1−ᾱ) ∇ log p_t(x), p_t the mixture noised from its level to ᾱ (both code paths)."""
    base = ring(8, 4.0, 0.3) if mixture == "isotropic" else random_mixture(11, k=3, d=3)
    g = torch.Generator().manual_seed(12)
    x = 3 * torch.randn(6, base.dim, generator=g)
    for a in (0.9, 0.3, 0.01):
        rho = a / level
        pt = GaussianMixture(base.weights, math.sqrt(rho) * base.means, rho * base.covs + (1 - rho) * torch.eye(base.dim, dtype=torch.float64))
        xx = x.double().requires_grad_()
        (score,) = torch.autograd.grad(pt.log_prob(xx).sum(), xx)
        torch.testing.assert_close(base.eps(x, a, level=level), (-math.sqrt(1 - a) * score).float(), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def ring8() -> object:
    return build_task("gmm-ring8", TASKS.get("gmm-ring8").Config())


def test_optimal_denoiser_gap_is_the_discretization_floor(ring8: object) -> None:
    """The exact optimal denoiser ε* has gap α·log Z − J → 0 as the sampler's T grows."""
    ctx = EvalContext(ring8, "quadratic", 1.0)
    bb = ring8.build_backbone()
    gaps = []
    for steps, n in ((25, 1024), (50, 1024), (200, 4096)):
        o = oracle_samples(ctx, bb, n, SamplerConfig(steps=steps))
        gaps.append(compute_metrics(o, ctx, ["gap"])["gap"])
    # measured: 1.49, 0.34, 0.03 (Monte Carlo s.e. ≈ 0.03 at n = 4096)
    assert gaps[0] > gaps[1] > gaps[2] > -0.1
    assert gaps[2] < 0.12
    base_gap = compute_metrics(sample_model(bb, [""], 1024, SamplerConfig(steps=50)), ctx, ["gap"])["gap"]
    assert base_gap > 5.0  # docs/tasks/mixtures.md §7: about 6.1 for the base


def test_gap_is_nonnegative_against_the_chains_own_partition_function(ring8: object) -> None:
    """α·KL(P_θ‖P*) ≥ 0 for any policy, with Z the sampler chain's own E_pre[e^{r/α}] (Monte Carlo),
    which removes the discretization error of the closed-form Z."""
    ctx = EvalContext(ring8, "quadratic", 1.0)
    bb = ring8.build_backbone()
    sampler = SamplerConfig(steps=20)
    base = sample_model(bb, [""], 6000, sampler, with_kl=False)[""]
    w = ctx.reward(base.x, [""] * base.x.shape[0]).double()
    log_z_chain = float(torch.logsumexp(w, 0) - math.log(w.shape[0]))
    g = torch.Generator().manual_seed(0)
    for scale in (0.3, 1.0, 3.0):
        with torch.no_grad():
            for p in bb.residual.parameters():
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        s = sample_model(bb, [""], 2000, sampler)[""]
        r = ctx.reward(s.x, [""] * s.x.shape[0]).double()
        j = r.mean() - s.path_kl.mean()
        se = float((r - s.path_kl).std() / math.sqrt(r.shape[0]))
        assert log_z_chain - float(j) > -3 * se - 0.02, (scale, log_z_chain, float(j))


def test_grid25_alpha_one_target_is_the_sub_mixture() -> None:
    task = build_task("gmm-grid25", TASKS.get("gmm-grid25").Config())
    t = task.target("log-classifier", 1.0, "row 2")
    assert t.log_z == pytest.approx(math.log(5 / 25), abs=1e-9)
    assert t.kl == pytest.approx(math.log(5), abs=1e-3)
    assert -1e-3 < t.expected_reward <= 0
    x = t.sample(2000, torch.Generator().manual_seed(0))
    r = task.build_reward("log-classifier")(x, ["row 2"] * 2000)
    assert float(r.max()) <= 1e-6 and float(r.mean()) > -0.01  # the samples sit in row 2's modes
    held = task.eval_prompt_sets["heldout"]
    assert held == ["diagonal", "anti-diagonal"] and not set(held) & set(task.train_prompts)


def test_grid25_mode_metrics_count_every_base_mode_at_every_alpha() -> None:
    """At α = 1 p* is the closed-form sub-mixture, at α ≠ 1 a quadrature target; both must score
    modes over the base's 25, so the base (samples spread over the whole grid) is far from p* at
    both, and a p* draw is near it at both. (The sub-mixture once assigned every sample to one of
    its own 5 components, which put the base next to p*: mode TV 0.04, recall 1.)"""
    task = build_task("gmm-grid25", TASKS.get("gmm-grid25").Config())
    x_base = task.terminal.sample(4000, torch.Generator().manual_seed(1))[0]
    for alpha in (1.0, 0.5, 1.0 - 1e-6):
        t = task.target("log-classifier", alpha, "row 2")
        w = t.mode_weights
        assert w.shape == (25,) and float(w.sum()) == pytest.approx(1.0, abs=1e-6)
        assert set(torch.nonzero(w > 0.01).flatten().tolist()) == set(task.label_sets["row 2"])
        for x, lo, hi in ((x_base, 0.75, 0.85), (t.sample(4000, torch.Generator().manual_seed(2)), 0.0, 0.05)):
            frac = torch.bincount(t.assign(x), minlength=25).double() / x.shape[0]
            assert lo <= float(0.5 * (frac - w).abs().sum()) <= hi, (alpha, lo, hi)


def test_sub64_target_stays_on_the_plane() -> None:
    task = build_task("gmm-sub64", TASKS.get("gmm-sub64").Config())
    t = task.target("linear", 1.0, "")
    assert t.expected_reward == pytest.approx(1.477, abs=2e-3) and t.kl == pytest.approx(0.615, abs=2e-3)  # docs/tasks/mixtures.md §7
    shift = task.off_plane(t.mixture.means).max()
    assert float(shift) < 1e-3  # 5e-5 in theory: the off-plane variance is 1e-4


def test_sampler_floor_of_the_base_is_small(ring8: object) -> None:
    """The analytic base through the 50-step sampler reproduces p_pre's mode weights (docs/tasks/mixtures.md §2)."""
    bb = ring8.build_backbone()
    s = sample_model(bb, [""], 8000, SamplerConfig(steps=50), with_kl=False)[""]
    frac = torch.bincount(ring8.terminal.assign(s.x), minlength=8).double() / 8000
    assert float(0.5 * (frac - 1 / 8).abs().sum()) < 0.03
