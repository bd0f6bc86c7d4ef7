"""The shared diffusion core against diffusers and against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from bench.core.diffusion import (
    NoiseSchedule,
    add_noise,
    alpha_nats_from_sqdf,
    alpha_sqdf_from_nats,
    ddim_step,
    gaussian_kl,
    gaussian_log_prob,
    guided_eps,
    kl_nats_to_sqdf,
    kl_sqdf_to_nats,
    noise_from_seeds,
    ode_x0,
    rollout,
    rollout_with_grad,
    truncation_mask,
    x0_from_eps,
)

diffusers = pytest.importorskip("diffusers")


def _diffusers_ddim(kind: str, b0: float, b1: float, spacing: str = "leading", set_one: bool = False) -> "diffusers.DDIMScheduler":
    return diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=b0, beta_end=b1, beta_schedule=kind, clip_sample=False,
        set_alpha_to_one=set_one, steps_offset=1 if spacing == "leading" else 0, timestep_spacing=spacing,
    )


@pytest.mark.parametrize("kind,b0,b1", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers(kind: str, b0: float, b1: float, eta: float, spacing: str) -> None:
    ref = _diffusers_ddim(kind, b0, b1, spacing)
    ref.set_timesteps(50)
    ours = NoiseSchedule.make(kind, b0, b1, 1000, set_alpha_to_one=False, steps_offset=1 if spacing == "leading" else 0, spacing=spacing)
    grid = ours.grid(50)
    assert torch.equal(grid.timesteps, ref.timesteps.long())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        eps = torch.randn(x.shape, generator=g)
        z = torch.randn(x.shape, generator=g)
        want = ref.step(eps, t, x, eta=eta, variance_noise=z if eta > 0 else None)
        got = ddim_step(eps, x, grid.alpha_bars[i], grid.prev_alpha_bars[i], eta, noise=z)
        torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.x0_pred, want.pred_original_sample, rtol=1e-5, atol=1e-5)
        x = want.prev_sample


def test_sd15_timesteps_and_sigmas() -> None:
    """SD1.5 with 50 steps: timesteps 981..1, σ_k as tabulated in docs/tasks/sd.md §1."""
    s = NoiseSchedule.make("scaled_linear", 0.00085, 0.012, 1000, set_alpha_to_one=False, steps_offset=1)
    grid = s.grid(50)
    assert grid.timesteps[0] == 981 and grid.timesteps[-1] == 1
    sig = grid.stds(1.0)
    for k, want in [(0, 0.4545), (21, 0.3159), (47, 0.0999), (48, 0.0395), (49, 0.0206)]:
        assert abs(float(sig[k]) - want) < 6e-4, (k, float(sig[k]), want)


def test_log_prob_is_the_gaussian_density() -> None:
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    std = torch.rand(5, generator=g) + 0.1
    want = torch.distributions.Normal(mean, std[:, None, None]).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), want)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduce="mean"), want / 12)


def test_step_log_prob_peaks_at_the_mean_and_matches_density() -> None:
    g = torch.Generator().manual_seed(2)
    x, eps, z = (torch.randn(4, 6, generator=g) for _ in range(3))
    out = ddim_step(eps, x, 0.5, 0.6, 1.0, noise=z)
    want = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).sum(1)
    torch.testing.assert_close(out.log_prob, want)
    at_mean = ddim_step(eps, x, 0.5, 0.6, 1.0, prev_sample=out.mean).log_prob
    assert bool((at_mean > out.log_prob).all())


def test_kl_zero_for_identical_models_and_positive_otherwise() -> None:
    g = torch.Generator().manual_seed(3)
    m = torch.randn(8, 10, generator=g)
    assert torch.equal(gaussian_kl(m, m, 0.3), torch.zeros(8))
    m2 = m + 0.1 * torch.randn(8, 10, generator=g)
    kl = gaussian_kl(m, m2, 0.3)
    assert bool((kl > 0).all())
    torch.testing.assert_close(kl, gaussian_kl(m2, m, 0.3))  # symmetric for equal σ
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m, 0.3), torch.distributions.Normal(m2, 0.3)).sum(1)
    torch.testing.assert_close(kl, want)


def test_monte_carlo_kl_matches_closed_form() -> None:
    """E_p[log p − log q] over many samples ≈ Σ Δμ²/(2σ²) (SB3's test_kl_divergence)."""
    g = torch.Generator().manual_seed(4)
    mp, mq, std = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g), 0.7
    n = 400_000
    x = mp + std * torch.randn(n, 6, generator=g)
    mc = (gaussian_log_prob(x, mp.expand(n, 6), std) - gaussian_log_prob(x, mq.expand(n, 6), std)).mean()
    exact = gaussian_kl(mp, mq, std)[0]
    assert abs(float(mc - exact)) < 0.02 * float(exact) + 0.01


def test_sqdf_convention_conversion() -> None:
    """SQDF's mean_dims Δμ²/σ² equals (2/d)·KL_nats; α converts the other way so α·KL agree."""
    g = torch.Generator().manual_seed(5)
    mp, mq, std = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g), 0.2
    d = 4 * 16 * 16
    kl = gaussian_kl(mp, mq, std)
    code = ((mp - mq) ** 2).flatten(1).mean(1) / std**2
    torch.testing.assert_close(kl_nats_to_sqdf(kl, d), code)
    torch.testing.assert_close(kl_sqdf_to_nats(code, d), kl)
    a_code = 2.0
    a_nats = alpha_nats_from_sqdf(a_code, d)
    torch.testing.assert_close(a_code * code, a_nats * kl)
    assert alpha_sqdf_from_nats(a_nats, d) == pytest.approx(a_code)
    assert alpha_nats_from_sqdf(2.0, 16384) == pytest.approx(2.44140625e-4)


def test_guidance_one_call_and_combination() -> None:
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x * c[:, :1]

    x = torch.ones(3, 2)
    cond, null = torch.full((3, 1), 2.0), torch.zeros(3, 1)
    out = guided_eps(model, x, 10, cond, null, 5.0)
    assert calls == [6]  # one concatenated call
    torch.testing.assert_close(out, torch.full((3, 2), 0.0 + 5.0 * (2.0 - 0.0)))
    assert guided_eps(model, x, 10, cond, null, 1.0).shape == (3, 2) and calls[-1] == 3


_AC = NoiseSchedule.make("linear", 1e-4, 0.02).alphas_cumprod.float()


def _linear_model(w: torch.Tensor):
    """The exact ε of N(0, I) data plus a small trainable perturbation (keeps x at O(1))."""

    def f(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (1 - _AC[t])[:, None].sqrt() * x + 0.1 * torch.tanh(x @ w)

    return f


def test_draft_with_k_equal_t_is_full_backprop() -> None:
    """rollout_with_grad with every step in the window = a plain differentiable sampler loop."""
    sched = NoiseSchedule.make("linear", 1e-4, 0.02)
    grid = sched.grid(8)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(3, 3, generator=g).requires_grad_()
    x_T, z = torch.randn(4, 3, generator=g), torch.randn(4, 8, 3, generator=g)
    cond = torch.zeros(4, 0)
    out = rollout_with_grad(_linear_model(w), grid, cond, x_T, z, truncation_mask(8, 8, 4), checkpoint=True)
    (gw,) = torch.autograd.grad(out.x0.square().sum(), w)
    x = x_T
    for i in range(8):
        eps = _linear_model(w)(x, grid.timesteps[i].expand(4), cond)
        x = ddim_step(eps, x, grid.alpha_bars[i], grid.prev_alpha_bars[i], 1.0, noise=z[:, i]).prev_sample
    (gw_ref,) = torch.autograd.grad(x.square().sum(), w)
    torch.testing.assert_close(out.x0, x)
    torch.testing.assert_close(gw, gw_ref)


def test_truncation_blocks_gradient_before_the_window() -> None:
    """With K=2, a loss on x entering the window gets no gradient; the window's steps do."""
    sched = NoiseSchedule.make("linear", 1e-4, 0.02)
    grid = sched.grid(6)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2, 2, generator=g).requires_grad_()
    x_T, z = torch.randn(3, 2, generator=g), torch.randn(3, 6, 2, generator=g)
    out = rollout_with_grad(_linear_model(w), grid, torch.zeros(3, 0), x_T, z, truncation_mask(6, 2, 3), checkpoint=False)
    assert not out.latents[:, 4].requires_grad
    (gw,) = torch.autograd.grad(out.x0.sum(), w)
    assert float(gw.abs().sum()) > 0
    # K differs per trajectory: trajectory 0 has K=0 -> no graph at all through the model
    mask = truncation_mask(6, torch.tensor([0, 3, 6]))
    out = rollout_with_grad(_linear_model(w), grid, torch.zeros(3, 0), x_T, z, mask, checkpoint=False)
    (g0,) = torch.autograd.grad(out.x0[0].sum(), w, allow_unused=True, retain_graph=True)
    assert g0 is None or float(g0.abs().sum()) == 0.0
    (g2,) = torch.autograd.grad(out.x0[2].sum(), w)
    assert float(g2.abs().sum()) > 0


def test_rollout_kl_zero_with_identical_reference_and_seed_invariance() -> None:
    sched = NoiseSchedule.make("linear", 1e-4, 0.02)
    grid = sched.grid(10)
    w = torch.randn(2, 2, generator=torch.Generator().manual_seed(8))
    f = _linear_model(w)
    x_T, z = noise_from_seeds([1, 2, 3, 4], 10, (2,))
    traj = rollout(f, grid, torch.zeros(4, 0), x_T, z, reference=f)
    assert torch.equal(traj.kl, torch.zeros(4, 10))
    # sample i depends only on its seed, not on the batch it is drawn in
    x1, z1 = noise_from_seeds([3], 10, (2,))
    t1 = rollout(f, grid, torch.zeros(1, 0), x1, z1)
    torch.testing.assert_close(t1.x0[0], traj.x0[2])


def test_ode_x0_matches_the_gaussian_flow_map() -> None:
    """For a Gaussian base N(μ, s²I) the PF-ODE maps x_t affinely onto the final level:
    x_f = √ᾱ_f μ + (σ_f/σ_t)(x_t − √ᾱ_t μ), σ_·² = ᾱ s² + 1 − ᾱ."""
    sched = NoiseSchedule.make("linear", 1e-4, 0.02)
    mu, s2 = torch.tensor([1.5, -0.5]), 0.3

    def eps_gauss(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a = sched.alphas_cumprod.float()[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s2 + 1 - a)

    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(9)) * 2
    t = torch.tensor([900, 600, 300, 100, 20])
    a_t = sched.alphas_cumprod.float()[t][:, None]
    a_f = sched.final_alpha_cumprod
    sig_t, sig_f = (a_t * s2 + 1 - a_t).sqrt(), math.sqrt(a_f * s2 + 1 - a_f)
    want = math.sqrt(a_f) * mu + sig_f / sig_t * (x - a_t.sqrt() * mu)
    heun = ode_x0(eps_gauss, sched, x, t, torch.zeros(5, 0), n_steps=30, solver="heun")
    torch.testing.assert_close(heun[1:], want[1:], rtol=0, atol=5e-3)  # t ≤ 600
    torch.testing.assert_close(heun[:1], want[:1], rtol=0, atol=3e-2)  # t = 900: ᾱ ≈ 2e-4
    # DDIM (Euler) converges at first order: the error shrinks as steps are added
    errs = [float((ode_x0(eps_gauss, sched, x, t, torch.zeros(5, 0), n_steps=n) - want).abs().max()) for n in (10, 40, 160)]
    assert errs[0] > 2 * errs[1] > 4 * errs[2]


def test_forward_process_and_tweedie_roundtrip() -> None:
    g = torch.Generator().manual_seed(10)
    x0, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    xt = add_noise(x0, eps, 0.37)
    torch.testing.assert_close(x0_from_eps(xt, eps, 0.37), x0)
