"""Shared diffusion math, used by every method: schedules, the DDIM step, log-probs, KL, x̂0, rollouts.

Everything here is a pure function of its tensor arguments (no hidden state, no global RNG), so the
methods in `methods/` share one implementation and the tests can check it against diffusers and
against closed forms.

Notation (Song et al. 2021, "DDIM", arXiv 2010.02502; diffusers' `DDIMScheduler.step`):

    alpha_bar_t      -> ᾱ_t, cumulative product of (1 − β)
    alpha_bar_prev   -> ᾱ_{t'}, t' the next (less noisy) timestep of the sampling grid
    eps              -> ε̂(x_t, t, c), classifier-free guided: ε_u + w (ε_c − ε_u)
    x0_pred          -> x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t                      (DDIM eq. 12, Tweedie)
    std              -> σ_t(η) = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})   (DDIM eq. 16)
    mean             -> μ = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − σ_t²) ε̂
    prev_sample      -> x_{t'} = μ + σ_t z,  z ~ N(0, I)

Conventions:
* Log-probs and KLs are in nats, summed over all non-batch dimensions, with the ½:
  KL_t = Σ_dims (μ_θ − μ_ref)² / (2 σ_t²). The SQDF code uses mean_dims (Δμ)² / σ_t², which is
  (2/d)·KL_t; `kl_nats_to_sqdf` / `alpha_nats_from_sqdf` convert explicitly.
* Timesteps are integers in [0, num_train_timesteps); ᾱ of the step after the last one is
  `final_alpha_cumprod` (ᾱ[0] unless `set_alpha_to_one`), as in diffusers.
* Index i = 0..T−1 counts sampling steps from the noisiest; `steps_left(i) = T − 1 − i`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = [
    "NoiseSchedule",
    "SamplerGrid",
    "StepOutput",
    "Trajectory",
    "GradRollout",
    "DenoiserFn",
    "ddim_step",
    "gaussian_log_prob",
    "gaussian_kl",
    "kl_nats_to_sqdf",
    "kl_sqdf_to_nats",
    "alpha_nats_from_sqdf",
    "alpha_sqdf_from_nats",
    "x0_from_eps",
    "eps_from_x0",
    "add_noise",
    "guided_eps",
    "draw_noise",
    "noise_from_seeds",
    "rollout",
    "rollout_with_grad",
    "ode_x0",
    "truncation_mask",
]


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP noise schedule, in the form diffusers' DDIMScheduler uses.

    Attributes:
        alphas_cumprod: ᾱ_t for t = 0..N−1, float64.
        final_alpha_cumprod: ᾱ after the last sampling step (1 if `set_alpha_to_one`, else ᾱ_0).
        steps_offset: added to every sampling timestep ("leading" spacing; SD1.5 uses 1).
        spacing: "leading" (diffusers default for SD) or "trailing".
    """

    alphas_cumprod: Tensor
    final_alpha_cumprod: float
    steps_offset: int = 1
    spacing: str = "leading"

    @staticmethod
    def make(
        kind: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        set_alpha_to_one: bool = False,
        steps_offset: int = 1,
        spacing: str = "leading",
    ) -> "NoiseSchedule":
        """Build a schedule. `kind`: "linear" (DDPM) or "scaled_linear" (Stable Diffusion)."""
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown beta schedule {kind!r}; known: linear, scaled_linear")
        if spacing not in ("leading", "trailing"):
            raise ValueError(f"unknown timestep spacing {spacing!r}; known: leading, trailing")
        ac = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if set_alpha_to_one else float(ac[0])
        return NoiseSchedule(ac, final, steps_offset, spacing)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: Tensor | int) -> Tensor:
        """ᾱ_t as float64; t < 0 maps to `final_alpha_cumprod`. Works on int or LongTensor t."""
        t = torch.as_tensor(t, dtype=torch.long)
        ac = self.alphas_cumprod
        out = ac[t.clamp(min=0)]
        return torch.where(t < 0, torch.tensor(self.final_alpha_cumprod, dtype=ac.dtype), out)

    def grid(self, steps: int) -> "SamplerGrid":
        """The T sampling timesteps (noisiest first) and their successors, as diffusers' DDIM."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"number of sampling steps must be in [1, {n}], got {steps}")
        if self.spacing == "leading":
            ratio = n // steps
            ts = (torch.arange(steps) * ratio).flip(0) + self.steps_offset
            prev = ts - ratio
        else:  # trailing
            ts = torch.round(torch.arange(n, 0, -n / steps)).long() - 1
            prev = torch.cat([ts[1:], torch.tensor([-1])])
        ts = ts.long()
        prev = prev.long()
        return SamplerGrid(ts, prev, self.alpha_bar(ts), self.alpha_bar(prev))

    def state(self) -> dict:
        return {
            "alphas_cumprod_sha": _tensor_digest(self.alphas_cumprod),
            "final_alpha_cumprod": self.final_alpha_cumprod,
            "steps_offset": self.steps_offset,
            "spacing": self.spacing,
        }


def _tensor_digest(t: Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().double().numpy().tobytes()).hexdigest()[:12]


@dataclass(frozen=True)
class SamplerGrid:
    """Timesteps of one sampling run: step i maps x at `timesteps[i]` to x at `prev_timesteps[i]`."""

    timesteps: Tensor  # [T] long, noisiest first
    prev_timesteps: Tensor  # [T] long, −1 after the last
    alpha_bars: Tensor  # [T] float64, ᾱ_{t_i}
    prev_alpha_bars: Tensor  # [T] float64, ᾱ_{t_i'}

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def stds(self, eta: float) -> Tensor:
        """σ_i(η) for every step, float64 [T]."""
        a, ap = self.alpha_bars, self.prev_alpha_bars
        var = (1 - ap) / (1 - a) * (1 - a / ap)
        return eta * var.clamp(min=0).sqrt()

    def steps_left(self, i: Tensor | int) -> Tensor:
        """Number of denoising steps that follow step i (T − 1 − i): SQDF's discount exponent."""
        return self.steps - 1 - torch.as_tensor(i)


# --------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------


def _bcast(a: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a scalar or a per-item [B] tensor against x [B, ...], in x's dtype."""
    a = torch.as_tensor(a, device=x.device)
    if a.dim() == 0:
        return a.to(x.dtype)
    return a.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Tweedie / DDIM eq. 12: x̂0 = (x_t − √(1−ᾱ) ε̂) / √ᾱ."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Inverse of `x0_from_eps`: ε = (x_t − √ᾱ x0) / √(1−ᾱ)."""
    a = _bcast(alpha_bar, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


def add_noise(x0: Tensor, eps: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Forward process q(x_t | x0): x_t = √ᾱ x0 + √(1−ᾱ) ε."""
    a = _bcast(alpha_bar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "sum") -> Tensor:
    """log N(x; mean, std² I) per item, in nats.

    Args:
        x, mean: [B, ...].
        std: scalar or [B]; must be > 0.
        reduce: "sum" over non-batch dims (the true density, default) or "mean" (the per-element
            average used by DDPO/DPOK code; their PPO clip ranges are defined on it).
    Returns:
        [B] tensor.
    """
    s = _bcast(std, x)
    lp = -((x - mean) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    if reduce == "sum":
        return lp.sum(1)
    if reduce == "mean":
        return lp.mean(1)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor | float) -> Tensor:
    """KL(N(mean_p, σ²I) ‖ N(mean_q, σ²I)) = Σ_dims (mean_p − mean_q)² / (2σ²), nats, per item [B]."""
    s = _bcast(std, mean_p)
    return (((mean_p - mean_q) ** 2) / (2 * s**2)).flatten(1).sum(1)


def kl_nats_to_sqdf(kl_nats: Tensor | float, dim: int) -> Tensor | float:
    """SQDF code's KL surrogate, mean_dims (Δμ)²/σ², from the KL in nats: (2/d)·KL."""
    return kl_nats * 2.0 / dim


def kl_sqdf_to_nats(kl_sqdf: Tensor | float, dim: int) -> Tensor | float:
    """KL in nats from SQDF's mean_dims (Δμ)²/σ²: (d/2)·KL_sqdf."""
    return kl_sqdf * dim / 2.0


def alpha_nats_from_sqdf(alpha_sqdf: float, dim: int) -> float:
    """α_sqdf · KL_sqdf = α_nats · KL_nats  ⇒  α_nats = 2 α_sqdf / d (SD1.5: d = 16384)."""
    return 2.0 * alpha_sqdf / dim


def alpha_sqdf_from_nats(alpha_nats: float, dim: int) -> float:
    """Inverse of `alpha_nats_from_sqdf`: α_sqdf = α_nats · d / 2."""
    return alpha_nats * dim / 2.0


@dataclass
class StepOutput:
    """Result of one DDIM step (all tensors [B, ...] unless noted)."""

    prev_sample: Tensor
    mean: Tensor
    std: Tensor  # scalar or [B]
    x0_pred: Tensor
    log_prob: Tensor | None  # [B], nats (sum); None when σ = 0


def ddim_step(
    eps: Tensor,
    x_t: Tensor,
    alpha_bar_t: Tensor | float,
    alpha_bar_prev: Tensor | float,
    eta: float,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """One DDIM step with stochasticity η (η = 1 is DDPM-like ancestral sampling).

    Args:
        eps: guided noise prediction ε̂ [B, ...].
        x_t: current sample [B, ...].
        alpha_bar_t, alpha_bar_prev: ᾱ_t and ᾱ_{t'}; scalars or per-item [B] tensors.
        eta: η ≥ 0.
        noise: z for x_{t'} = μ + σ z. Ignored if `prev_sample` is given; required when σ > 0.
        prev_sample: an already-sampled x_{t'} whose log-prob is wanted (PPO-style recomputation).
    Returns:
        StepOutput with the mean μ, σ_t, the sample, its log-prob (nats, summed; gradient flows
        through μ only) and x̂0.
    """
    a_t = _bcast(torch.as_tensor(alpha_bar_t, dtype=torch.float64), x_t)
    a_p = _bcast(torch.as_tensor(alpha_bar_prev, dtype=torch.float64), x_t)
    # 1. x̂0 (DDIM eq. 12)
    x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    # 2. σ_t(η) (DDIM eq. 16)
    var = ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).clamp(min=0)
    std = eta * var.sqrt()
    # 3. mean: "direction pointing to x_t" plus the rescaled x̂0 (DDIM eq. 12)
    mean = a_p.sqrt() * x0 + (1 - a_p - std**2).clamp(min=0).sqrt() * eps
    std_item = std.reshape(std.shape[0]) if std.dim() > 0 else std
    positive = bool((std > 0).all())
    if prev_sample is None:
        if positive:
            if noise is None:
                raise ValueError("ddim_step: noise is required when σ > 0")
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std_item) if positive else None
    return StepOutput(prev_sample, mean, std_item, x0, log_prob)


# --------------------------------------------------------------------------------------------------
# Denoisers and guidance
# --------------------------------------------------------------------------------------------------


class DenoiserFn(Protocol):
    """What rollouts call: ε(x [B, ...], t [B] long, cond [B, ...]) -> [B, ...]."""

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor: ...


def guided_eps(
    model: DenoiserFn,
    x: Tensor,
    t: Tensor | int,
    cond: Tensor,
    null_cond: Tensor | None,
    guidance: float,
) -> Tensor:
    """Classifier-free guidance ε_u + w (ε_c − ε_u), in one concatenated model call.

    With `guidance == 1` or no null condition, only the conditional branch runs.
    """
    t = torch.as_tensor(t, device=x.device, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if guidance == 1.0 or null_cond is None:
        return model(x, t, cond)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_cond, cond]))
    eps_u, eps_c = out.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


# --------------------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------------------


def draw_noise(
    generator: torch.Generator, batch: int, steps: int, shape: Sequence[int], device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """x_T [B, *shape] and the per-step noises z [B, T, *shape] from one generator."""
    x_T = torch.randn((batch, *shape), generator=generator, device=device)
    z = torch.randn((batch, steps, *shape), generator=generator, device=device)
    return x_T, z


def noise_from_seeds(
    seeds: Sequence[int], steps: int, shape: Sequence[int], device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """Per-sample noise: sample i depends only on seeds[i] (EDM's per-sample generators), so a
    sample is the same whatever the batch it is drawn in."""
    xs, zs = [], []
    for s in seeds:
        g = torch.Generator(device="cpu").manual_seed(int(s))
        xs.append(torch.randn(tuple(shape), generator=g))
        zs.append(torch.randn((steps, *shape), generator=g))
    return torch.stack(xs).to(device), torch.stack(zs).to(device)


# --------------------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A batch of sampling trajectories recorded without gradients.

    latents[:, i] is the input of step i (latents[:, 0] = x_T); latents[:, T] is the final sample.
    """

    latents: Tensor  # [B, n+1, *shape] (n = steps run; n = T unless stopped early)
    timesteps: Tensor  # [T] long
    log_probs: Tensor  # [B, n] nats, log π_θ(x_{i+1} | x_i)
    stds: Tensor  # [T] float64
    kl: Tensor | None = None  # [B, n] nats, KL(π_θ(·|x_i) ‖ π_ref(·|x_i)); with_reference only
    ref_log_probs: Tensor | None = None  # [B, n] nats, log π_ref(x_{i+1} | x_i); with_reference only

    @property
    def x0(self) -> Tensor:
        return self.latents[:, -1]

    @property
    def path_kl(self) -> Tensor:
        """Σ_i KL_i per trajectory, nats [B] (requires with_reference=True)."""
        if self.kl is None:
            raise ValueError("trajectory was recorded without the reference model")
        return self.kl.sum(1)


def _noise_at(noise: Tensor | torch.Generator, i: int, like: Tensor) -> Tensor:
    if isinstance(noise, torch.Generator):
        return torch.randn(like.shape, generator=noise, device=like.device, dtype=like.dtype)
    return noise[:, i].to(like.dtype)


@torch.no_grad()
def rollout(
    policy: DenoiserFn,
    grid: SamplerGrid,
    cond: Tensor,
    x_T: Tensor,
    noise: Tensor | torch.Generator,
    *,
    eta: float = 1.0,
    guidance: float = 1.0,
    null_cond: Tensor | None = None,
    reference: DenoiserFn | None = None,
    stop_at: int | None = None,
    keep_latents: bool = True,
) -> Trajectory:
    """Sample trajectories without gradients, recording latents, log-probs and (optionally) the
    per-step KL to a reference denoiser evaluated at the same states.

    Args:
        policy: ε_θ. reference: ε_ref (frozen), or None.
        grid: sampling timesteps. cond / null_cond: conditions [B, ...] (null for CFG).
        x_T: initial noise [B, *shape]. noise: z [B, T, *shape] or a generator.
        stop_at: run only steps 0..stop_at−1 (ReFL's prefix); latents[:, -1] is then x at
            step stop_at.
        keep_latents: store every latent (needed by DDPO/SQDF buffers) or only x_T and the last.
    """
    n = grid.steps if stop_at is None else stop_at
    stds = grid.stds(eta)
    x = x_T
    latents = [x]
    log_probs, kls, ref_lps = [], [], []
    for i in range(n):
        t = grid.timesteps[i]
        eps = guided_eps(policy, x, t, cond, null_cond, guidance)
        out = ddim_step(eps, x, grid.alpha_bars[i], grid.prev_alpha_bars[i], eta, noise=_noise_at(noise, i, x))
        lp = out.log_prob if out.log_prob is not None else torch.zeros(x.shape[0], device=x.device)
        log_probs.append(lp)
        if reference is not None:
            eps_r = guided_eps(reference, x, t, cond, null_cond, guidance)
            ref = ddim_step(eps_r, x, grid.alpha_bars[i], grid.prev_alpha_bars[i], eta, prev_sample=out.prev_sample)
            if stds[i] > 0:
                kls.append(gaussian_kl(out.mean, ref.mean, out.std))
                ref_lps.append(ref.log_prob)
            else:
                kls.append(torch.zeros_like(lp))
                ref_lps.append(torch.zeros_like(lp))
        x = out.prev_sample
        if keep_latents or i == n - 1:
            latents.append(x)
    return Trajectory(
        latents=torch.stack(latents, 1),
        timesteps=grid.timesteps,
        log_probs=torch.stack(log_probs, 1) if log_probs else x.new_zeros(x.shape[0], 0),
        stds=stds,
        kl=torch.stack(kls, 1) if reference is not None and kls else None,
        ref_log_probs=torch.stack(ref_lps, 1) if reference is not None and ref_lps else None,
    )


def truncation_mask(steps: int, k: Tensor | int, batch: int | None = None) -> Tensor:
    """Boolean [T, B] mask of the steps that carry gradient: the last k_b steps of trajectory b.

    `k` is one K for the batch (DRaFT-K) or a per-trajectory [B] tensor (AlignProp's randomized
    truncation, drawn once per trajectory).
    """
    k = torch.as_tensor(k)
    if k.dim() == 0:
        if batch is None:
            raise ValueError("batch is required with a scalar k")
        k = k.expand(batch)
    i = torch.arange(steps).unsqueeze(1)
    return i >= (steps - k).unsqueeze(0)


@dataclass
class GradRollout:
    """Output of `rollout_with_grad`: the final sample with its graph, and per-step KL terms."""

    x0: Tensor  # [B, *shape], differentiable w.r.t. θ through the steps in the mask
    kl: Tensor | None  # [B, T] nats, with gradients local to each step (kl="local")
    latents: Tensor  # [B, T+1, *shape], detached copies (for logging / buffers)


def rollout_with_grad(
    policy: DenoiserFn,
    grid: SamplerGrid,
    cond: Tensor,
    x_T: Tensor,
    noise: Tensor,
    grad_mask: Tensor,
    *,
    eta: float = 1.0,
    guidance: float = 1.0,
    null_cond: Tensor | None = None,
    reference: DenoiserFn | None = None,
    kl: str = "none",
    checkpoint: bool = True,
) -> GradRollout:
    """A differentiable sampler with truncated backpropagation (DRaFT-K, AlignProp, SEIKO).

    At step i the guided ε̂ carries parameter gradients only for trajectories b with
    grad_mask[i, b]; elsewhere it is detached. The x-path (the linear DDIM map) is always kept, so
    with DRaFT-K's mask (the last K steps) the gradient is the exact Jacobian chain through those K
    steps, and steps before the window cost no graph at all (they run under no_grad). The noise z
    is a constant of the graph (reparameterization).

    Args:
        grad_mask: [T, B] bool (see `truncation_mask`).
        kl: "none"; or "local": KL_i(π_θ(·|x_i) ‖ π_ref(·|x_i)) at every step i, with x_i detached,
            so its gradient is local to the step's mean (DRaFT+, SQDF's "draft+" baseline, SEIKO).
        checkpoint: recompute each gradient-carrying denoiser call in the backward pass
            (gradient checkpointing; trades compute for activation memory).
    """
    if kl not in ("none", "local"):
        raise ValueError(f"kl must be 'none' or 'local', got {kl!r}")
    if kl == "local" and reference is None:
        raise ValueError("kl='local' needs a reference denoiser")
    T = grid.steps
    if grad_mask.shape != (T, x_T.shape[0]):
        raise ValueError(f"grad_mask must be [T={T}, B={x_T.shape[0]}], got {tuple(grad_mask.shape)}")
    stds = grid.stds(eta)

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        return guided_eps(policy, x, t, cond, null_cond, guidance)

    def call(x: Tensor, t: Tensor) -> Tensor:
        if checkpoint and torch.is_grad_enabled():
            return _checkpoint(eps_fn, x, t, use_reentrant=False)
        return eps_fn(x, t)

    x = x_T
    latents = [x.detach()]
    kls: list[Tensor] = []
    for i in range(T):
        t = grid.timesteps[i]
        a, ap = grid.alpha_bars[i], grid.prev_alpha_bars[i]
        m = grad_mask[i].to(x.device)
        any_grad = bool(m.any())
        if not any_grad and not x.requires_grad:
            with torch.no_grad():
                eps = eps_fn(x, t)
        elif any_grad:
            eps = call(x, t)
            if not bool(m.all()):
                eps = torch.where(_bcast(m, eps).bool(), eps, eps.detach())
        else:
            with torch.no_grad():
                eps = eps_fn(x, t)
        out = ddim_step(eps, x, a, ap, eta, noise=noise[:, i].to(x.dtype))
        if kl == "local" and stds[i] > 0:
            xd = x.detach()
            with torch.no_grad():
                ref = ddim_step(guided_eps(reference, xd, t, cond, null_cond, guidance), xd, a, ap, eta, noise=noise[:, i])
            if any_grad and bool(m.all()) and not x.requires_grad:
                mean_local = out.mean  # this step's ε̂ was computed on a constant x with grad
            else:
                mean_local = ddim_step(call(xd, t), xd, a, ap, eta, noise=noise[:, i]).mean
            kls.append(gaussian_kl(mean_local, ref.mean, out.std))
        elif kl == "local":
            kls.append(x.new_zeros(x.shape[0]))
        x = out.prev_sample
        latents.append(x.detach())
    return GradRollout(x0=x, kl=torch.stack(kls, 1) if kls else None, latents=torch.stack(latents, 1))


def ode_x0(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    x: Tensor,
    t: Tensor,
    cond: Tensor,
    n_steps: int,
    *,
    guidance: float = 1.0,
    null_cond: Tensor | None = None,
    solver: str = "ddim",
) -> Tensor:
    """Integrate the probability-flow ODE from x at per-item timesteps t [B] down to the final
    noise level, with `n_steps` steps.

    solver:
        "ddim": deterministic DDIM (η = 0), i.e. Euler in (x/√ᾱ, √(1−ᾱ)/√ᾱ), on a uniform
            timestep grid: SQDF's n-step DDIM x̂0 predictor (n = 2 or 4 in the paper's Fig. 7).
        "heun": second-order Heun (EDM) on a grid even in log-SNR, 2n−1 denoiser calls; with an
            exact denoiser and n ≈ 25 this is the PF-ODE endpoint to ~1e-3, the "perfect
            consistency model" SQDF's f_ψ stands for on the mixture tasks.
    Differentiable in x (and in the model's parameters, if they require grad).
    """
    t = torch.as_tensor(t, device=x.device, dtype=torch.long)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if solver == "ddim":
        tf = t.double().cpu()
        ts = torch.stack([torch.round(tf * (1 - j / n_steps)).long() for j in range(n_steps)] + [torch.full_like(t.cpu(), -1)], 1)
    elif solver == "heun":
        ts = _logsnr_grid(schedule, t.cpu(), n_steps)
    else:
        raise ValueError(f"solver must be 'ddim' or 'heun', got {solver!r}")

    def eps_at(xx: Tensor, tt: Tensor) -> Tensor:
        return guided_eps(model, xx, tt.to(x.device), cond, null_cond, guidance)

    for j in range(n_steps):
        t_cur, t_next = ts[:, j], ts[:, j + 1]
        a_cur, a_next = schedule.alpha_bar(t_cur).to(x.device), schedule.alpha_bar(t_next).to(x.device)
        eps = eps_at(x, t_cur)
        x_next = ddim_step(eps, x, a_cur, a_next, eta=0.0).prev_sample
        if solver == "heun" and j < n_steps - 1:
            # Heun: average the slopes dx̄/dσ̄ = ε at both ends (x̄ = x/√ᾱ, σ̄ = √(1−ᾱ)/√ᾱ)
            eps2 = eps_at(x_next, t_next)
            x_next = ddim_step(0.5 * (eps + eps2), x, a_cur, a_next, eta=0.0).prev_sample
        x = x_next
    return x


def _logsnr_grid(schedule: NoiseSchedule, t: Tensor, n: int) -> Tensor:
    """Per item, n+1 integer timesteps from t down to the final level, evenly spaced in
    log-SNR λ = log(ᾱ/(1−ᾱ)) (DDIM is first order in λ-like variables, so even λ steps keep its
    error small at high noise); duplicates are harmless (a step between equal ᾱ is the identity)."""
    ac = schedule.alphas_cumprod
    lam = torch.log(ac / (1 - ac))  # increasing as t decreases
    lam_final = math.log(schedule.final_alpha_cumprod / max(1 - schedule.final_alpha_cumprod, 1e-12))
    lam_start = lam[t]
    frac = torch.arange(n + 1, dtype=torch.float64) / n
    target = lam_start[:, None] + (lam_final - lam_start[:, None]) * frac[None]
    # nearest timestep with λ ≥ target, searching the decreasing-in-t table reversed
    rev = lam.flip(0)  # increasing
    idx = torch.searchsorted(rev, target.clamp(max=float(rev[-1])).contiguous())
    out = (lam.shape[0] - 1 - idx).clamp(min=0)
    out = torch.minimum(out, t[:, None])  # never start above t
    out[:, 0] = t
    out[:, -1] = -1
    return out.long()


DenoiserFactory = Callable[[bool], DenoiserFn]
