"""Held-out metrics of the `digits` task (design: docs/tasks/digits.md). None of them is used in training.

Every model here — the judges — is fitted on the task's *held-out* split (597 real digits), which
neither the base model nor the target rewards ever saw. The metrics are functions
(samples of one prompt, EvalContext) -> float, registered with a direction and a table label;
per-sample ones also carry a `closed_form`: their expectation under the SIR reference p*
(importance-weighted over the task's base-sample pool, not a resampled draw).

* Prompt fidelity: `judge_acc` (logistic regression), `judge_acc_knn` (5-NN), accuracy for the
  prompt's class. A model that fools the training classifier φ adversarially fails these.
* Gold attribute: `gold_mass`, the exact standardized stroke mass (what the `aesthetic` reward ψ
  was fitted to predict); compare it with E[r] on aesthetic runs.
* Naturalness: `log_density` under PCA + Gaussian mixture fitted on held-out digits; `nn_ratio`,
  the mean distance to the nearest held-out digit divided by the same distance for real
  train-split digits (1 ≈ as close to real digits as real digits are).
* Diversity: `pairwise_dist` (mean pairwise L2), `vendi` (Vendi score, RBF kernel whose width is
  the median distance between held-out digits of one class; Friedman &
  Dieng, "The Vendi Score", arXiv:2210.02410), `style_recall` (fraction of the prompt class's
  k-means style clusters on held-out digits that receive at least half their real frequency).
* Memorization: `mem_ratio`, mean NN distance to an equal-size subset of the train split over the
  mean NN distance to the held-out split (≈ 1 for fresh digits; < 1 when samples copy training
  digits).
* Distribution: `fd_pstar`, Fréchet distance in held-out PCA features to 2000 SIR draws from p*
  (its floor is the "p* sample" reference row, a second SIR draw from the same pool), and
  `fd_real`, to the held-out real digits of the prompt's class.
* Reference quality: `ess`, the effective sample size of the SIR reference (reference rows only).

NOTATION:
    x            -> images [n, 1, 8, 8] in [0, 1], flattened to gray pixels [n, 64]
    k            -> the prompt's class, rewards.digits.prompt_class
    h (Vendi)    -> `HeldOutJudges.bandwidth`, median distance between same-class held-out digits
    ρ_real       -> `HeldOutJudges.nn_real`, mean NN distance of train digits to the held-out set

DELIBERATE DEVIATIONS from the design (docs/tasks/digits.md):
1. Style recall counts a cluster as hit at ≥ half its real frequency (as `mode_recall` of the
   mixture tasks) instead of ≥ 1 % of samples, which nearly any sample set passes.
2. Vendi and pairwise distances use the first 512 samples of a prompt (fixed evaluation seeds),
   so their cost is bounded; Fréchet features are the held-out PCA, not a judge's hidden layer
   (16-D keeps the covariance estimable from the ~60 held-out digits per class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor

from bench.core.evaluation import EvalContext, PromptSamples
from bench.core.registry import METRICS
from rewards.digits import gray, prompt_class

MAX_SET = 512  # samples per prompt used by the O(n²) diversity metrics
FD_REFERENCE = 2000  # SIR draws per prompt the Fréchet distance compares against


@dataclass
class HeldOutJudges:
    """Models fitted on the held-out split only; plain tensors, so the cache is version-proof.

    Attributes (M held-out digits, d PCA dimensions, G mixture components, S styles per class):
        lr_weight [10, 64], lr_bias [10]: multinomial logistic regression on gray pixels.
        heldout [M, 64], heldout_y [M]: the held-out digits (kNN judge, NN distances, fd_real).
        knn_k: neighbours of the kNN judge.
        train_ref [M, 64]: a random equal-size subset of the train split (memorization).
        pca_mean [64], pca_components [d, 64]: held-out PCA (Fréchet features, density).
        gmm_log_weights [G], gmm_means [G, d], gmm_prec_chol [G, d, d]: held-out density.
        style_centroids [10, S, 64], style_freq [10, S]: k-means styles per class.
        nn_real: mean distance of train digits to their nearest held-out digit (ρ_real).
        bandwidth: median distance between held-out digits of the same class (Vendi RBF kernel).
    """

    lr_weight: Tensor
    lr_bias: Tensor
    heldout: Tensor
    heldout_y: Tensor
    knn_k: int
    train_ref: Tensor
    pca_mean: Tensor
    pca_components: Tensor
    gmm_log_weights: Tensor
    gmm_means: Tensor
    gmm_prec_chol: Tensor
    style_centroids: Tensor
    style_freq: Tensor
    nn_real: float
    bandwidth: float

    # ---- fitting and (de)serialization ------------------------------------------------------------

    @staticmethod
    def fit(x_ho: Tensor, y_ho: Tensor, x_tr: Tensor, seed: int = 0, pca_dim: int = 16, gmm_components: int = 10,
            styles: int = 8, knn_k: int = 5) -> "HeldOutJudges":
        """Fit every judge. x_ho [M, 64], x_tr [N, 64]: gray pixels in [0, 1]; y_ho [M]: classes."""
        import numpy as np
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
        from sklearn.linear_model import LogisticRegression
        from sklearn.mixture import GaussianMixture

        xh, yh = x_ho.double().numpy(), y_ho.numpy()
        lr = LogisticRegression(max_iter=5000).fit(xh, yh)
        pca = PCA(pca_dim, random_state=seed).fit(xh)
        feats = pca.transform(xh)
        gmm = GaussianMixture(gmm_components, covariance_type="full", reg_covar=1e-3, n_init=2, random_state=seed).fit(feats)
        cents, freqs = [], []
        for k in range(10):
            xk = xh[yh == k]
            km = KMeans(styles, n_init=10, random_state=seed).fit(xk)
            cents.append(torch.from_numpy(km.cluster_centers_))
            freqs.append(torch.from_numpy(np.bincount(km.labels_, minlength=styles) / len(xk)))
        g = torch.Generator().manual_seed(seed)
        sub = torch.randperm(x_tr.shape[0], generator=g)[: x_ho.shape[0]]
        d_hh = torch.cdist(x_ho.double(), x_ho.double())
        same = (y_ho[:, None] == y_ho[None, :]) & torch.ones_like(d_hh, dtype=torch.bool).triu(1)
        return HeldOutJudges(
            lr_weight=torch.from_numpy(lr.coef_).float(),
            lr_bias=torch.from_numpy(lr.intercept_).float(),
            heldout=x_ho.float().clone(),
            heldout_y=y_ho.long().clone(),
            knn_k=knn_k,
            train_ref=x_tr[sub].float().clone(),
            pca_mean=torch.from_numpy(pca.mean_).double(),
            pca_components=torch.from_numpy(pca.components_).double(),
            gmm_log_weights=torch.from_numpy(np.log(gmm.weights_)).double(),
            gmm_means=torch.from_numpy(gmm.means_).double(),
            gmm_prec_chol=torch.from_numpy(gmm.precisions_cholesky_).double(),
            style_centroids=torch.stack(cents).float(),
            style_freq=torch.stack(freqs).double(),
            nn_real=float(_nn_dist(x_tr.float(), x_ho.float()).mean()),
            bandwidth=float(d_hh[same].median()),
        )

    def state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @staticmethod
    def from_state(state: dict[str, Any]) -> "HeldOutJudges":
        return HeldOutJudges(**{f.name: state[f.name] for f in fields(HeldOutJudges)})

    # ---- per-sample quantities (x: gray pixels [n, 64]) ----------------------------------------

    def lr_predict(self, x: Tensor) -> Tensor:
        return (x.float() @ self.lr_weight.T + self.lr_bias).argmax(1)

    def knn_predict(self, x: Tensor) -> Tensor:
        d = torch.cdist(x.float(), self.heldout)
        idx = d.topk(self.knn_k, dim=1, largest=False).indices
        return torch.mode(self.heldout_y[idx], dim=1).values

    def features(self, x: Tensor) -> Tensor:
        """Held-out PCA features [n, d] (float64)."""
        return (x.double() - self.pca_mean) @ self.pca_components.T

    def log_density(self, x: Tensor) -> Tensor:
        """log p_ho(features(x)) under the held-out Gaussian mixture, nats [n]."""
        z = self.features(x)
        y = torch.einsum("nd,gde->nge", z, self.gmm_prec_chol) - torch.einsum("gd,gde->ge", self.gmm_means, self.gmm_prec_chol)[None]
        log_det = torch.log(torch.diagonal(self.gmm_prec_chol, dim1=1, dim2=2)).sum(1)
        d = z.shape[1]
        comp = -0.5 * (y**2).sum(2) + log_det[None] - 0.5 * d * math.log(2 * math.pi)
        return torch.logsumexp(comp + self.gmm_log_weights[None], dim=1)

    def nn_heldout(self, x: Tensor) -> Tensor:
        return _nn_dist(x, self.heldout)

    def nn_train(self, x: Tensor) -> Tensor:
        return _nn_dist(x, self.train_ref)


def _nn_dist(x: Tensor, ref: Tensor, chunk: int = 2048) -> Tensor:
    """Distance of each row of x [n, 64] to its nearest row of ref [m, 64], [n] (float64)."""
    out = [torch.cdist(x[i : i + chunk].double(), ref.double()).min(1).values for i in range(0, x.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½) of feature sets a [n, d], b [m, d]."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(ca)
    sa = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp(min=0).sqrt().sum()
    return float(mu @ mu + ca.trace() + cb.trace() - 2 * cross)


def vendi_score(x: Tensor, bandwidth: float) -> float:
    """exp(entropy of the eigenvalues of K/n), K_ij = exp(−‖x_i − x_j‖² / (2h²)); x [n, 64]."""
    x = x.double()
    k = torch.exp(-torch.cdist(x, x) ** 2 / (2 * bandwidth**2)) / x.shape[0]
    lam = torch.linalg.eigvalsh(k).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


# ---- plumbing --------------------------------------------------------------------------------------


def _judges(ctx: EvalContext) -> HeldOutJudges | None:
    return getattr(ctx.task, "judges", None)


def _nan() -> float:
    return float("nan")


def _per_sample(name: str, fn: Callable[[HeldOutJudges, Tensor, int], Tensor]) -> tuple[Callable[[PromptSamples, EvalContext], float], Callable[[EvalContext, str], float | None]]:
    """A metric = mean over samples of fn(judges, gray x [n, 64], class k) -> [n], and its
    closed form: the importance-weighted mean of fn over the SIR pool of p*."""

    def metric(s: PromptSamples, ctx: EvalContext) -> float:
        j = _judges(ctx)
        if j is None:
            return _nan()
        vals = ctx.memo_x(f"digits:{name}", s, lambda: fn(j, gray(s.x), prompt_class(s.prompt)))
        return float(vals.double().mean())

    def closed_form(ctx: EvalContext, prompt: str) -> float | None:
        j, t = _judges(ctx), ctx.target(prompt)
        if j is None or t is None or not hasattr(t, "expect"):
            return None
        return ctx.memo(("digits-cf", name, prompt, ctx.reward_name, ctx.alpha),
                        lambda: t.expect(lambda x: fn(j, gray(x), prompt_class(prompt))))

    return metric, closed_form


def _register(name: str, fn: Callable[[HeldOutJudges, Tensor, int], Tensor], **meta: Any) -> None:
    metric, cf = _per_sample(name, fn)
    METRICS.register(name, closed_form=cf, **meta)(metric)


# ---- prompt fidelity, gold attribute, naturalness (per-sample means) -------------------------------

_register("judge_acc", lambda j, x, k: (j.lr_predict(x) == k).double(), direction="max", label="judge acc",
          doc="digits: accuracy of a held-out logistic-regression judge for the prompt's class")
_register("judge_acc_knn", lambda j, x, k: (j.knn_predict(x) == k).double(), direction="max", label="kNN acc",
          doc="digits: accuracy of a held-out 5-NN judge for the prompt's class")
_register("log_density", lambda j, x, k: j.log_density(x), direction="max", label="log p_ho",
          doc="digits: log-density under PCA + Gaussian mixture fitted on held-out digits (naturalness)")
_register("nn_ratio", lambda j, x, k: j.nn_heldout(x) / j.nn_real, direction="min", label="NN ratio",
          doc="digits: distance to the nearest held-out digit / the same for real train digits (1 = as real)")


def _gold(ctx: EvalContext) -> Any:
    """The `aesthetic` reward object of the task (it owns the gold attribute's units)."""
    return ctx.memo(("digits-gold-reward",), lambda: ctx.task.build_reward("aesthetic"))


@METRICS.register("gold_mass", direction="max", label="gold",
                  doc="digits: exact standardized stroke mass, the attribute the aesthetic reward ψ predicts",
                  closed_form=lambda ctx, p: _gold_cf(ctx, p))
def gold_mass(s: PromptSamples, ctx: EvalContext) -> float:
    if _judges(ctx) is None:
        return _nan()
    return float(_gold(ctx).gold(s.x).double().mean())


def _gold_cf(ctx: EvalContext, prompt: str) -> float | None:
    t = ctx.target(prompt)
    if _judges(ctx) is None or t is None or not hasattr(t, "expect"):
        return None
    return ctx.memo(("digits-cf", "gold_mass", prompt, ctx.reward_name, ctx.alpha), lambda: t.expect(lambda x: _gold(ctx).gold(x)))


# ---- diversity, memorization, distribution (set-level) ---------------------------------------------


@METRICS.register("pairwise_dist", direction="max", label="pairwise L2", doc="digits: mean pairwise L2 distance between samples of a prompt")
def pairwise_dist(s: PromptSamples, ctx: EvalContext) -> float:
    x = gray(s.x[:MAX_SET]).double()
    n = x.shape[0]
    if n < 2:
        return _nan()
    return float(torch.cdist(x, x).sum() / (n * (n - 1)))


@METRICS.register("vendi", direction="max", label="Vendi", doc="digits: Vendi score (RBF kernel, width = median same-class held-out distance), effective number of distinct samples")
def vendi(s: PromptSamples, ctx: EvalContext) -> float:
    j = _judges(ctx)
    if j is None:
        return _nan()
    return vendi_score(gray(s.x[:MAX_SET]), j.bandwidth)


@METRICS.register("style_recall", direction="max", label="style recall",
                  doc="digits: fraction of the class's 8 held-out k-means styles receiving ≥ half their real frequency")
def style_recall(s: PromptSamples, ctx: EvalContext) -> float:
    j = _judges(ctx)
    if j is None:
        return _nan()
    k = prompt_class(s.prompt)
    cents, freq = j.style_centroids[k], j.style_freq[k]
    lab = torch.cdist(gray(s.x).float(), cents).argmin(1)
    frac = torch.bincount(lab, minlength=cents.shape[0]).double() / lab.shape[0]
    return float((frac >= 0.5 * freq).double().mean())


@METRICS.register("mem_ratio", direction="max", label="d_train/d_ho",
                  doc="digits: mean NN distance to train digits / to held-out digits (equal-size sets; < 1 = memorization)")
def mem_ratio(s: PromptSamples, ctx: EvalContext) -> float:
    j = _judges(ctx)
    if j is None:
        return _nan()
    x = gray(s.x)
    return float(j.nn_train(x).mean() / j.nn_heldout(x).mean())


@METRICS.register("fd_pstar", direction="min", label="FD(p*)", doc="digits: Fréchet distance in held-out PCA features to 2000 SIR draws from p*",
                  closed_form=lambda ctx, p: 0.0)
def fd_pstar(s: PromptSamples, ctx: EvalContext) -> float:
    j = _judges(ctx)
    if j is None or ctx.target(s.prompt) is None:
        return _nan()
    ref = ctx.memo(("digits-fd-ref", s.prompt, ctx.reward_name, ctx.alpha), lambda: j.features(gray(ctx.target_samples(s.prompt, FD_REFERENCE))))
    return frechet_distance(j.features(gray(s.x)), ref)


@METRICS.register("fd_real", direction="min", label="FD(real)", doc="digits: Fréchet distance in held-out PCA features to the held-out real digits of the prompt's class")
def fd_real(s: PromptSamples, ctx: EvalContext) -> float:
    j = _judges(ctx)
    if j is None:
        return _nan()
    k = prompt_class(s.prompt)
    ref = ctx.memo(("digits-fd-real", k), lambda: j.features(j.heldout[j.heldout_y == k]))
    return frechet_distance(j.features(gray(s.x)), ref)


@METRICS.register("ess", direction="max", label="ESS(p*)",
                  doc="digits: effective sample size of the SIR reference p* (reference rows only; NaN for models)",
                  closed_form=lambda ctx, p: getattr(ctx.target(p), "ess", None))
def ess(s: PromptSamples, ctx: EvalContext) -> float:
    return _nan()
