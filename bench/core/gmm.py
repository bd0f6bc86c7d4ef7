"""Gaussian mixtures and the exact KL-regularized targets of the embedded tasks.

For a base p_pre = Σ_k π_k N(μ_k, Σ_k) and a reward r(x) = −½(x−m)ᵀA(x−m) + bᵀx + c, the tilted
target p*(x) ∝ p_pre(x) e^{r(x)/α} is again a mixture (derivation: docs/tasks/mixtures.md §1),
with B = A/α, c = b/α:

    Σ'_k = (Σ_k⁻¹ + B)⁻¹,  μ'_k = Σ'_k (Σ_k⁻¹ μ_k + B m + c)
    log Z_k = −½ μ_kᵀΣ_k⁻¹μ_k − ½ mᵀBm + ½ μ'_kᵀΣ'_k⁻¹μ'_k + ½ log|Σ'_k| − ½ log|Σ_k| + c₀/α
    π'_k = π_k Z_k / Z,  Z = Σ_k π_k Z_k = E_pre[e^{r/α}]
    E*[r] = Σ_k π'_k [−½ tr(AΣ'_k) − ½ (μ'_k−m)ᵀA(μ'_k−m) + bᵀμ'_k + c₀]
    KL(p*‖p_pre) = E*[r]/α − log Z,  max_p E_p[r] − α KL(p‖p_pre) = α log Z.

Rewards without a closed-form tilt (classifier rewards at α ≠ 1, bumped or learned proxies) use
`GridTarget`: quadrature on a fine 2-D grid. Every noisy marginal of a mixture is a mixture
(`noised`), so the exact ε-prediction of any mixture is available at every timestep (`eps`).
Closed-form quantities are computed in float64; `eps` runs in float32 for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

LOG2PI = math.log(2 * math.pi)


@dataclass
class GaussianMixture:
    """Σ_k π_k N(μ_k, Σ_k) in d dimensions (float64 parameters).

    Attributes:
        weights: π [K], summing to 1.
        means: μ [K, d].
        covs: Σ [K, d, d], symmetric positive definite.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor
    _eig: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _f32: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covs = torch.as_tensor(self.covs, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()

    @property
    def k(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def eig(self) -> tuple[Tensor, Tensor]:
        """(λ [K, d], Q [K, d, d]) with Σ_k = Q_k diag(λ_k) Q_kᵀ."""
        if self._eig is None:
            lam, q = torch.linalg.eigh(self.covs)
            self._eig = (lam.clamp(min=1e-300), q)
        return self._eig

    def noised(self, alpha_bar: float) -> "GaussianMixture":
        """The marginal of x_t = √ᾱ x0 + √(1−ᾱ) ε for x0 from this mixture."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, math.sqrt(alpha_bar) * self.means, alpha_bar * self.covs + (1 - alpha_bar) * eye)

    # ---- densities --------------------------------------------------------------------------------

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log N(x; μ_k, Σ_k) for every component, [N, K] float64."""
        lam, q = self.eig()
        y = x.to(torch.float64)[:, None, :] - self.means[None]  # [N, K, d]
        z = torch.einsum("nkd,kde->nke", y, q)
        return -0.5 * (z**2 / lam[None]).sum(-1) - 0.5 * torch.log(lam).sum(-1)[None] - 0.5 * self.dim * LOG2PI

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) [N] float64."""
        return torch.logsumexp(self.component_log_probs(x) + torch.log(self.weights)[None], dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """p(k | x) [N, K] float64."""
        lp = self.component_log_probs(x) + torch.log(self.weights)[None]
        return torch.softmax(lp, dim=1)

    def assign(self, x: Tensor) -> Tensor:
        """Mode label of each point: argmax_k N(x; μ_k, Σ_k) (likelihood, not weighted by π)."""
        return self.component_log_probs(x).argmax(1)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n exact samples (float32 [n, d]) and their component labels [n]."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        lam, q = self.eig()
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + torch.einsum("nde,ne->nd", q[labels], lam[labels].sqrt() * z)
        return x.float(), labels

    # ---- the exact denoiser --------------------------------------------------------------------

    def _isotropic(self, device: torch.device) -> Tensor | None:
        """Per-component variances s_k [K] (float32) if every Σ_k = s_k I, else None."""
        key = ("iso", str(device))
        if key not in self._f32:
            s = torch.diagonal(self.covs, dim1=1, dim2=2).mean(1)
            iso = torch.allclose(self.covs, s[:, None, None] * torch.eye(self.dim, dtype=torch.float64)[None], rtol=0, atol=1e-12)
            self._f32[key] = s.float().to(device) if iso else None
        return self._f32[key]

    def _f32_params(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = str(device)
        if key not in self._f32:
            lam, q = self.eig()
            self._f32[key] = (
                torch.log(self.weights).float().to(device),
                self.means.float().to(device),
                lam.float().to(device),
                q.float().to(device),
            )
        return self._f32[key]

    def eps(self, x: Tensor, alpha_bar: Tensor | float, level: float = 1.0) -> Tensor:
        """Exact ε-prediction of the noised mixture: ε(x) = −√(1−ᾱ) ∇log p_t(x)
        = √(1−ᾱ) Σ_k γ_k(x) C_k⁻¹ (x − √ρ μ_k), C_k = ρΣ_k + (1−ρ)I, ρ = ᾱ / level.

        `level` is the ᾱ at which this mixture lives (1 for a clean distribution; the chain's
        final ᾱ_0 for a target defined on the chain's final samples): x_t is then this mixture
        noised further by ρ = ᾱ_t / level, as the forward process is Markov.

        Args:
            x: [B, d] float32. alpha_bar: scalar or per-item [B].
        """
        logw, mu, lam, q = self._f32_params(x.device)
        a = torch.as_tensor(alpha_bar, dtype=x.dtype, device=x.device)
        a = a.expand(x.shape[0]) if a.dim() == 0 else a
        rho = (a / level).clamp(max=1.0)
        iso = self._isotropic(x.device)
        if iso is not None:  # Σ_k = s_k I: C_k = (ρ s_k + 1 − ρ) I, no eigenbasis needed (fast path)
            y = x[:, None, :] - rho.sqrt()[:, None, None] * mu[None]  # [B, K, d]
            v = rho[:, None] * iso[None] + (1 - rho)[:, None]  # [B, K]
            logn = -0.5 * (y * y).sum(-1) / v - 0.5 * self.dim * torch.log(v)
            gamma = torch.softmax(logn + logw[None], dim=1)
            return (1 - a).sqrt()[:, None] * ((gamma / v)[:, :, None] * y).sum(1)
        sa = rho.sqrt()[:, None, None]
        s = rho[:, None, None] * lam[None] + (1 - rho)[:, None, None]  # [B, K, d] eigenvalues of C_k
        y = x[:, None, :] - sa * mu[None]  # [B, K, d]
        z = torch.einsum("bkd,kde->bke", y, q)
        zs = z / s
        logn = -0.5 * (z * zs).sum(-1) - 0.5 * torch.log(s).sum(-1)
        gamma = torch.softmax(logn + logw[None], dim=1)  # [B, K]
        cinv_y = torch.einsum("bke,kde->bkd", zs, q)
        return (1 - a).sqrt()[:, None] * (gamma[:, :, None] * cinv_y).sum(1)

    # ---- tilting ---------------------------------------------------------------------------------

    def tilt(self, reward: "QuadraticForm", alpha: float, level: float = 1.0) -> "TiltedMixture":
        """p*(x) ∝ p(x) e^{r(x)/α} for a quadratic-plus-linear reward: an exact mixture.
        `level`: the ᾱ at which this mixture lives (see `eps`)."""
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        d = self.dim
        A, m, b, c0 = reward.A, reward.m, reward.b, reward.c
        B = A / alpha
        c = b / alpha
        prec = torch.linalg.inv(self.covs)  # [K, d, d]
        prec_new = prec + B[None]
        cov_new = torch.linalg.inv(prec_new)
        cov_new = 0.5 * (cov_new + cov_new.transpose(1, 2))
        h = torch.einsum("kde,ke->kd", prec, self.means) + (B @ m)[None] + c[None]
        mu_new = torch.einsum("kde,ke->kd", cov_new, h)
        logdet_old = torch.linalg.slogdet(self.covs)[1]
        logdet_new = torch.linalg.slogdet(cov_new)[1]
        log_zk = (
            -0.5 * torch.einsum("kd,kde,ke->k", self.means, prec, self.means)
            - 0.5 * (m @ B @ m)
            + 0.5 * torch.einsum("kd,kd->k", mu_new, h)
            + 0.5 * logdet_new
            - 0.5 * logdet_old
            + c0 / alpha
        )
        log_w = torch.log(self.weights) + log_zk
        log_z = torch.logsumexp(log_w, 0)
        new_w = torch.exp(log_w - log_z)
        diff = mu_new - m[None]
        e_r_k = (
            -0.5 * torch.einsum("de,ked->k", A, cov_new)
            - 0.5 * torch.einsum("kd,de,ke->k", diff, A, diff)
            + mu_new @ b
            + c0
        )
        e_r = float((new_w * e_r_k).sum())
        mix = GaussianMixture(new_w, mu_new, cov_new)
        return TiltedMixture(mix, self, alpha, float(log_z), e_r, e_r / alpha - float(log_z), level)


@dataclass
class QuadraticForm:
    """r(x) = −½ (x−m)ᵀ A (x−m) + bᵀx + c (A ⪰ 0). A = 0 gives a linear reward."""

    A: Tensor
    m: Tensor
    b: Tensor
    c: float = 0.0

    def __post_init__(self) -> None:
        self.A = torch.as_tensor(self.A, dtype=torch.float64)
        self.m = torch.as_tensor(self.m, dtype=torch.float64)
        self.b = torch.as_tensor(self.b, dtype=torch.float64)

    def __call__(self, x: Tensor) -> Tensor:
        A, m, b = (t.to(x.dtype).to(x.device) for t in (self.A, self.m, self.b))
        y = x - m
        return -0.5 * ((y @ A) * y).sum(-1) + x @ b + self.c


@dataclass
class TiltedMixture:
    """The exact target p* of a mixture base and a quadratic reward, and its scalars."""

    mixture: GaussianMixture
    base: GaussianMixture
    alpha: float
    log_z: float
    expected_reward: float
    kl: float  # KL(p* ‖ p_pre), nats
    level: float = 1.0  # the ᾱ at which the mixtures live
    # When p* keeps only some of the base's components (p_pre(x | c) on gmm-grid25 at α = 1): the
    # base's index of each of `mixture`'s components. Modes are then the base's, so a sample far
    # from every kept component still counts against p* instead of joining the nearest kept one.
    components: Tensor | None = None

    @property
    def mode_weights(self) -> Tensor:
        """p*'s weight on each of the base's modes (one entry per base component)."""
        if self.components is None:
            return self.mixture.weights
        w = torch.zeros(self.base.k, dtype=self.mixture.weights.dtype)
        return w.index_add_(0, self.components, self.mixture.weights)

    def assign(self, x: Tensor) -> Tensor:
        """Mode label of each sample, indexing `mode_weights`."""
        return self.mixture.assign(x) if self.components is None else self.base.assign(x)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.mixture.sample(n, generator)[0]

    def log_prob(self, x: Tensor) -> Tensor:
        return self.mixture.log_prob(x)

    def oracle_eps(self, x: Tensor, alpha_bar: Tensor | float) -> Tensor:
        """ε* of the optimal fine-tuned denoiser: the exact ε of the noised target
        (docs/tasks/mixtures.md §2)."""
        return self.mixture.eps(x, alpha_bar, self.level)


class Quadrature:
    """A uniform 2-D grid over [−bound, bound]² with the base's log-density and mode labels,
    shared by every `GridTarget` of a task."""

    def __init__(self, base: GaussianMixture, bound: float = 9.0, n: int = 1201) -> None:
        if base.dim != 2:
            raise ValueError("Quadrature needs a 2-D base")
        g = torch.linspace(-bound, bound, n, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="ij")
        self.base, self.bound, self.n = base, bound, n
        self.points = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
        self.h = float(g[1] - g[0])
        comp = torch.cat([base.component_log_probs(c) for c in self.points.split(100_000)])
        self.log_pre = torch.logsumexp(comp + torch.log(base.weights)[None], 1)
        self.labels = comp.argmax(1)
        self.points32 = self.points.float()


@dataclass
class GridTarget:
    """p*(x) ∝ p_pre(x) e^{r(x)/α} by quadrature on a uniform 2-D grid, for any reward.

    Sampling draws a grid cell by its mass and a uniform point inside it, so samples are exact up
    to the cell size. Mode weights are the p*-masses of the base's mode regions (points assigned
    to argmax_k N(x; μ_k, Σ_k)).
    """

    quad: Quadrature
    reward: Callable[[Tensor], Tensor]
    alpha: float
    oracle_eps: Callable[[Tensor, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        q = self.quad
        with torch.no_grad():
            r = torch.cat([self.reward(c).double() for c in q.points32.split(200_000)])
        lw = q.log_pre + r / self.alpha
        self.log_z = float(torch.logsumexp(lw, 0) + 2 * math.log(q.h))
        p = torch.softmax(lw, 0)
        self.expected_reward = float((p * r).sum())
        self.kl = self.expected_reward / self.alpha - self.log_z
        self.mode_weights = torch.zeros(q.base.k, dtype=torch.float64).index_add_(0, q.labels, p)
        self._p = p

    @property
    def base(self) -> GaussianMixture:
        return self.quad.base

    def assign(self, x: Tensor) -> Tensor:
        return self.quad.base.assign(x)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.multinomial(self._p, n, replacement=True, generator=generator)
        jitter = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * self.quad.h
        return (self.quad.points[idx] + jitter).float()

    def log_prob(self, x: Tensor) -> Tensor:
        """log p*(x) = log p_pre(x) + r(x)/α − log Z (exact pointwise)."""
        with torch.no_grad():
            return self.quad.base.log_prob(x) + self.reward(x.float()).double() / self.alpha - self.log_z


def ring(n_modes: int, radius: float, var: float, offset: float = 0.0) -> GaussianMixture:
    """n equal-weight isotropic modes on a circle of the given radius (DAS GMM2: 8, 4, 0.3)."""
    ang = torch.arange(n_modes, dtype=torch.float64) * 2 * math.pi / n_modes + offset
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    covs = var * torch.eye(2, dtype=torch.float64).expand(n_modes, 2, 2).clone()
    return GaussianMixture(torch.ones(n_modes), means, covs)


def grid(side: int, spacing: float, var: float) -> GaussianMixture:
    """side² equal-weight isotropic modes on a square grid centred at 0 (RTB: 5, 5, 0.3)."""
    c = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    xx, yy = torch.meshgrid(c, c, indexing="ij")
    means = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    k = side * side
    covs = var * torch.eye(2, dtype=torch.float64).expand(k, 2, 2).clone()
    return GaussianMixture(torch.ones(k), means, covs)
