"""Target rewards of the `digits` task (design: docs/tasks/digits.md): learned, differentiable, hackable.

Both rewards are small MLPs fitted on the task's *train* split only; the held-out judges that score
the runs (metrics/digits.py) are fitted on the disjoint held-out split and never see a gradient.

* `classifier`  r(x, "digit k") = log p_φ(k | x): an MLP classifier of the 10 digit classes. The
                prompt-alignment reward, analogue of HPSv2 / ImageReward on Stable Diffusion and of
                the classifier rewards of RTB's MNIST experiments (Venkatraman et al., "Amortizing
                intractable inference in diffusion models for vision, language, and control",
                arXiv:2405.20971). A fine-tuned model can raise it by fooling φ; held-out judges
                catch that.
* `aesthetic`   r(x) = ψ(x): an MLP regressor of a procedural attribute, the stroke mass
                m(x) = mean ink of the 8×8 image, in train-split standard units
                (m − μ_train) / σ_train. The LAION-aesthetic analogue: a learned score of a visual
                attribute that ψ extrapolates freely off the data manifold. The exact attribute in
                the same units is the gold score (`StrokeMassReward.gold`), so proxy-versus-gold
                over-optimization is measurable, as in ELEGANT (Uehara et al., "Fine-tuning of
                continuous-time diffusion models as entropy-regularized control",
                arXiv:2402.15194).

Images are what `DigitsBackbone.decode` returns: [N, 1, 8, 8] in [0, 1] (ink = 1). [N, 3, 8, 8] is
accepted too (averaged to gray), so RGB-producing code paths can score digits unchanged.

NOTATION (docs/tasks/digits.md -> code):
    φ (classifier)         -> `DigitClassifierReward.net`, logits [N, 10]
    ψ (attribute regressor)-> `StrokeMassReward.net`, output [N, 1]
    m(x) (stroke mass)     -> `stroke_mass(images)`, mean of the gray pixels, in [0, 1]
    μ_train, σ_train       -> `StrokeMassReward.mean`, `.std` (train-split real digits)
    c / k (prompt class)   -> `prompt_class("digit k") = k`

DELIBERATE DEVIATIONS (there is no official code; these are choices against the design,
docs/tasks/digits.md):
1. The aesthetic reward is in standard units of the train split's stroke mass, not raw mean ink,
   so that one α (in nats) tilts both rewards comparably (a raw-ink reward spans ~0.2 on real
   digits and would need α ≈ 0.02 for the same tilt).
2. Rewards see the decoded, clamped image (as Stable Diffusion rewards see the clamped VAE
   output), so pixel values outside [0, 1] cannot be exploited; hacking has to happen inside the
   image range.
3. Neither model is trained with noise or adversarial augmentation: they are meant to be
   hackable off the data manifold, as the large reward models are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from bench.core.errors import BenchError
from bench.core.registry import REWARDS
from bench.core.reward import Reward

DIGIT_PROMPTS: tuple[str, ...] = tuple(f"digit {k}" for k in range(10))
_PROMPT_INDEX = {p: k for k, p in enumerate(DIGIT_PROMPTS)}


def prompt_class(prompt: str) -> int:
    """The digit class k of the prompt "digit k"."""
    k = _PROMPT_INDEX.get(prompt)
    if k is None:
        raise BenchError(f"digits: unknown prompt {prompt!r}; known: 'digit 0' … 'digit 9'")
    return k


def prompt_classes(prompts: Sequence[str], device: torch.device | str = "cpu") -> Tensor:
    """Classes [N] (long) of a list of prompts."""
    return torch.tensor([prompt_class(p) for p in prompts], dtype=torch.long, device=device)


def gray(images: Tensor) -> Tensor:
    """[N, 1 or 3, 8, 8] images in [0, 1] -> flat gray pixels [N, 64] (differentiable)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or tuple(images.shape[2:]) != (8, 8):
        raise BenchError(f"digits rewards take images [N, 1 or 3, 8, 8] in [0, 1], got shape {tuple(images.shape)}")
    return images.mean(1).flatten(1)


def stroke_mass(images: Tensor) -> Tensor:
    """The procedural attribute m(x): mean ink of each image, in [0, 1]. Shape [N]."""
    return gray(images).mean(1)


class MLP(nn.Module):
    """64 -> hidden (SiLU) -> hidden (SiLU) -> out: the shared shape of φ and ψ."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_mlp(hidden: int, out: int, seed: int) -> MLP:
    """An MLP initialized from `seed` without touching the caller's global RNG state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return MLP(hidden, out)


@dataclass(frozen=True)
class FitSettings:
    """How φ and ψ are fitted (the task's config passes them through)."""

    hidden: int = 128
    "width of the two hidden layers"
    iterations: int = 1500
    "AdamW steps (cosine learning-rate decay to 0)"
    batch: int = 128
    "minibatch size (drawn with replacement)"
    lr: float = 1e-3
    "peak learning rate"
    weight_decay: float = 1e-4
    "AdamW weight decay"
    seed: int = 0
    "seed of the initialization and of the minibatches"

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.iterations < 1 or self.batch < 1 or not self.lr > 0 or self.weight_decay < 0:
            raise BenchError(f"invalid reward-fit settings {self}: hidden, iterations, batch >= 1, lr > 0, weight_decay >= 0")


def _fit(net: nn.Module, x: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor], s: FitSettings, progress: Callable[[int], None] | None) -> float:
    """Minibatch AdamW on (x [N, 64], index) with a cosine learning rate; returns the last loss."""
    g = torch.Generator().manual_seed(s.seed + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.iterations)
    loss = torch.zeros(())
    for _ in range(s.iterations):
        idx = torch.randint(x.shape[0], (min(s.batch, x.shape[0]),), generator=g)
        loss = loss_fn(net(x[idx]), idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    return float(loss.detach())


def fit_classifier(x: Tensor, y: Tensor, s: FitSettings, progress: Callable[[int], None] | None = None) -> tuple[MLP, float]:
    """φ: cross-entropy on train-split digits. x: [N, 64] gray in [0, 1]; y: [N] classes."""
    net = build_mlp(s.hidden, 10, s.seed)
    last = _fit(net, x, lambda out, idx: nn.functional.cross_entropy(out, y[idx]), s, progress)
    return net.eval(), last


def fit_regressor(x: Tensor, target: Tensor, s: FitSettings, progress: Callable[[int], None] | None = None) -> tuple[MLP, float]:
    """ψ: squared error to the standardized attribute. x: [N, 64]; target: [N]."""
    net = build_mlp(s.hidden, 1, s.seed)
    last = _fit(net, x, lambda out, idx: ((out.squeeze(1) - target[idx]) ** 2).mean(), s, progress)
    return net.eval(), last


@REWARDS.register("digits-classifier", modality="image", doc="digits task (--reward classifier): log p_φ(k | x) of an MLP classifier fitted on the train split")
class DigitClassifierReward(Reward):
    """r(x, "digit k") = log p_φ(k | x) ≤ 0 (log-softmax of φ's logits)."""

    name = "classifier"
    version = 1
    differentiable = True

    def __init__(self, net: MLP) -> None:
        self.net = net.eval().requires_grad_(False)

    def logits(self, images: Tensor) -> Tensor:
        """φ's logits [N, 10] of images [N, C, 8, 8]."""
        return self.net(gray(images).float())

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        logp = torch.log_softmax(self.logits(x), dim=1)
        k = prompt_classes(prompts, x.device)
        return logp.gather(1, k[:, None]).squeeze(1)

    def state(self) -> dict[str, Any]:
        return {"state_dict": self.net.state_dict()}


@REWARDS.register("digits-aesthetic", modality="image", doc="digits task (--reward aesthetic): ψ(x), an MLP regressor of the standardized stroke mass (gold: the exact mass)")
class StrokeMassReward(Reward):
    """r(x) = ψ(x) ≈ (m(x) − μ_train) / σ_train; the prompt is ignored (as LAION aesthetic ignores it)."""

    name = "aesthetic"
    version = 1
    differentiable = True

    def __init__(self, net: MLP, mean: float, std: float) -> None:
        self.net = net.eval().requires_grad_(False)
        self.mean = float(mean)
        self.std = float(std)

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.net(gray(x).float()).squeeze(1)

    def gold(self, x: Tensor) -> Tensor:
        """The exact attribute in the reward's units: (m(x) − μ_train) / σ_train. Shape [N]."""
        return (stroke_mass(x).float() - self.mean) / self.std
