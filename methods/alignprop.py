"""AlignProp: reward backpropagation through the sampler with randomized truncation.

Prabhudesai, Goyal, Pathak, Fragkiadaki. "Aligning Text-to-Image Diffusion Models with Reward
Backpropagation". arXiv:2310.03739. Official code: mihirp1998/AlignProp @b22918a (HEAD, TRL-based:
`sd_pipeline.py::pipeline_step_with_grad`, `alignprop_trainer.py`, `config/alignprop_config.py`);
the original code @a831a5f (`main.py`) and TRL's AlignPropTrainer @1d0b196. DDIM step through which
gradients flow: Song et al., arXiv:2010.02502, Eqs. 12 and 16.

Objective: maximize E_{c, x_T, z}[ r(decode(x_0(θ))) ] by the pathwise gradient through the DDIM
sampler (x_T and the per-step noises z are constants of the graph), with gradient checkpointing of
every gradient-carrying denoiser call. Memory is bounded by truncated backpropagation: only the
last K steps of a trajectory carry parameter gradient (the x-path through them is exact), and K is
random, drawn ONCE PER TRAJECTORY from the index b of the first gradient-carrying step:

    gaussian  b = int(N(mean, std)), redrawn until 1 ≤ b ≤ T−1   (HEAD's default: N(42, 5), K ≈ 8)
    uniform   b ~ U{min, …, max−1}, redrawn until 1 ≤ b ≤ T−1
    fixed     b = fixed                                         (HEAD's "AlignProp K=1": b = 49)
    K = T − b.

Loss (per item, averaged): −r (default), or |r − target| (`loss=abs_target`; the code's aesthetic
loss with target 10, equal to −r + 10 while r < 10), times `loss_scale` (the code's loss_coeff 0.01,
which matters together with the gradient clip).

Notation (paper/code -> here):
    backprop_timestep b       -> first index with gradient; mask = truncation_mask(T, T − b)
    K (truncation)            -> T − b, per trajectory
    loss_coeff, grad_scale    -> loss_scale
    aesthetic_target          -> reward_target
    x_T, z                    -> draw_noise (constants of the graph)

Deliberate deviations from the official code:
1. One truncation index per TRAJECTORY. HEAD draws one per pipeline call (a micro-batch of 8 per
   GPU, the same marginal law); the original code and TRL draw a fresh integer in [0, 50] at EVERY
   step and detach that step if i < draw, so gradients "skip" steps (AlignProp issue #15, "conceptually
   wrong"). That per-step draw is kept only as `truncation="per_step_legacy"` for reproduction.
2. Loss −r by default (the |r − 10| loss flips sign above 10; `loss=abs_target` reproduces it).
3. Steps before a trajectory's window run its ε̂ detached and, when no trajectory of the batch has
   gradient there, under no_grad (identical gradient, less memory; bench.core.diffusion.rollout_with_grad).
4. Gradient accumulation is `micro_batch` within one update (no multi-GPU); the noise of the whole
   batch is drawn first, so the update does not depend on the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.core.diffusion import draw_noise, rollout_with_grad, truncation_mask
from bench.core.registry import METHODS
from bench.core.method import AlignmentMethod, TrainContext
from methods.common import adamw, check_choice, check_range, optimizer_step, require, sample_prompts

TRUNCATIONS = ("gaussian", "uniform", "fixed", "per_step_legacy")


@dataclass(frozen=True)
class AlignPropConfig:
    """AlignProp hyperparameters (defaults: AlignProp HEAD's aesthetic run, `config/alignprop_config.py`)."""

    truncation: str = "gaussian"
    "K per trajectory: gaussian (b ~ N(mean, std)), uniform (b ~ U[min, max)), fixed (b = trunc_fixed); per_step_legacy: v1/TRL's per-step draw in [min, max]"
    trunc_mean: float = 42.0
    "gaussian: mean of the first gradient-carrying step index b (K = T − b)"
    trunc_std: float = 5.0
    "gaussian: std of b"
    trunc_min: int = 0
    "uniform: smallest b; per_step_legacy: smallest per-step draw"
    trunc_max: int = 50
    "uniform: b < trunc_max; per_step_legacy: largest per-step draw (inclusive, random.randint)"
    trunc_fixed: int = 49
    "fixed: b (49 of 50 = K = 1, 'AlignProp K=1'; 0 = full backpropagation)"
    loss: str = "neg"
    "neg: −r; abs_target: |r − reward_target| (the code's aesthetic loss)"
    reward_target: float = 10.0
    "target of loss=abs_target (the code's aesthetic_target)"
    loss_scale: float = 0.01
    "multiplies the loss (the code's loss_coeff; matters with the gradient clip)"
    batch_size: int = 128
    "trajectories per update"
    micro_batch: int = 0
    "trajectories per backward pass (gradient accumulation); 0 = the whole batch at once"
    lr: float = 1e-3
    "AdamW learning rate"
    weight_decay: float = 1e-4
    "AdamW weight decay"
    grad_clip: float = 1.0
    "global gradient-norm clip (0 = off)"
    checkpoint: bool = True
    "gradient checkpointing of each gradient-carrying denoiser call"

    def __post_init__(self) -> None:
        check_reward_backprop_fields(self)

    @classmethod
    def smoke(cls) -> "AlignPropConfig":
        """A seconds-long CPU configuration for 6-step chains (tests)."""
        return cls(truncation="uniform", trunc_min=1, trunc_max=6, batch_size=8, micro_batch=4, loss_scale=1.0)


# --------------------------------------------------------------------------------------------------
# Truncation and loss, shared with SEIKO
# --------------------------------------------------------------------------------------------------


def check_reward_backprop_fields(cfg: Any) -> None:
    """Validate the fields AlignProp and SEIKO share: truncation, loss, batch, optimizer."""
    check_truncation_fields(cfg)
    check_choice("method.loss", cfg.loss, ("neg", "abs_target"))
    check_range("method.loss_scale", cfg.loss_scale, 0.0, lo_open=True)
    check_range("method.batch_size", cfg.batch_size, 1)
    check_range("method.micro_batch", cfg.micro_batch, 0)
    check_range("method.lr", cfg.lr, 0.0, lo_open=True)
    check_range("method.weight_decay", cfg.weight_decay, 0.0)
    check_range("method.grad_clip", cfg.grad_clip, 0.0)


def check_truncation_fields(cfg: Any) -> None:
    """Validate the `truncation` and `trunc_*` fields of a config (AlignProp, SEIKO)."""
    check_choice("method.truncation", cfg.truncation, TRUNCATIONS)
    check_range("method.trunc_std", cfg.trunc_std, 0.0)
    check_range("method.trunc_min", cfg.trunc_min, 0)
    check_range("method.trunc_fixed", cfg.trunc_fixed, 0)
    require(cfg.trunc_max > cfg.trunc_min or cfg.truncation != "uniform",
            f"method.trunc_max must be > method.trunc_min for uniform truncation, got [{cfg.trunc_min}, {cfg.trunc_max})")
    require(cfg.trunc_max >= cfg.trunc_min, f"method.trunc_max must be >= method.trunc_min, got [{cfg.trunc_min}, {cfg.trunc_max}]")


def check_truncation_for(cfg: Any, steps: int, name: str) -> None:
    """The truncation settings must describe indices of a T-step chain (checked at build time)."""
    if cfg.truncation == "fixed":
        require(cfg.trunc_fixed < steps, f"{name}: method.trunc_fixed must be < sampler.steps ({steps}), got {cfg.trunc_fixed}")
    elif cfg.truncation == "uniform":
        require(cfg.trunc_max <= steps and cfg.trunc_max >= 2, f"{name}: uniform truncation needs 2 <= method.trunc_max <= sampler.steps ({steps}), got {cfg.trunc_max}")
    elif cfg.truncation == "gaussian":
        require(steps >= 2 and 1 <= cfg.trunc_mean <= steps - 1,
                f"{name}: gaussian truncation needs 1 <= method.trunc_mean <= sampler.steps − 1 ({steps - 1}), got {cfg.trunc_mean}")
    else:
        require(cfg.trunc_max <= steps, f"{name}: per_step_legacy needs method.trunc_max <= sampler.steps ({steps}), got {cfg.trunc_max}")


def draw_truncation(cfg: Any, steps: int, batch: int, generator: torch.Generator) -> Tensor:
    """The [T, B] boolean mask of gradient-carrying steps for one batch.

    Per-trajectory kinds give every column a suffix i ≥ b_b (K_b = T − b_b steps); the legacy kind
    draws r_i ∈ {min..max} per step, shared by the batch, and marks step i when i ≥ r_i.
    """
    T = steps
    if cfg.truncation == "per_step_legacy":
        r = torch.randint(cfg.trunc_min, cfg.trunc_max + 1, (T,), generator=generator)
        return (torch.arange(T) >= r).unsqueeze(1).expand(T, batch).clone()
    if cfg.truncation == "fixed":
        b = torch.full((batch,), cfg.trunc_fixed, dtype=torch.long)
    else:
        b = torch.full((batch,), -1, dtype=torch.long)
        for _ in range(10_000):  # the code's rejection loop: redraw until 1 ≤ b ≤ T−1
            bad = (b < 1) | (b > T - 1)
            if not bool(bad.any()):
                break
            m = int(bad.sum())
            if cfg.truncation == "gaussian":
                new = (cfg.trunc_mean + cfg.trunc_std * torch.randn(m, generator=generator)).trunc().long()  # int() rounds toward 0
            else:
                new = torch.randint(cfg.trunc_min, cfg.trunc_max, (m,), generator=generator)
            b[bad] = new
        else:
            raise RuntimeError(f"truncation draw did not land in [1, {T - 1}] (mean {cfg.trunc_mean}, std {cfg.trunc_std})")
    return truncation_mask(T, T - b)


def reward_loss(r: Tensor, kind: str, target: float) -> Tensor:
    """Per-item reward loss [B]: −r, or |r − target| (AlignProp/SEIKO's aesthetic loss)."""
    return -r if kind == "neg" else (r - target).abs()


def micro_batches(n: int, size: int) -> list[slice]:
    """Slices covering range(n) in chunks of `size` (0 = one chunk)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register("alignprop", doc="reward backprop through the sampler, randomized truncation K drawn once per trajectory (per-step draw as a legacy flag)")
class AlignProp(AlignmentMethod):
    name = "alignprop"
    paper = "Prabhudesai, Goyal, Pathak, Fragkiadaki. arXiv:2310.03739"
    version = 1
    Config = AlignPropConfig
    needs_reward_grad = True
    uses_alpha = False

    def __init__(self, cfg: AlignPropConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        check_truncation_for(cfg, ctx.sampler.steps, self.name)
        self.params = self.trainable_parameters()
        self.optimizer = adamw(self.params, cfg.lr, cfg.weight_decay)

    def loss(self, prompts: list[str], x_T: Tensor, z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(scaled loss, rewards [B]) of one chunk: a differentiable rollout with the given
        gradient mask [T, B], reward of the decoded final sample."""
        cfg, ctx, bb, s = self.cfg, self.ctx, self.ctx.backbone, self.ctx.sampler
        cond = bb.encode_prompts(prompts)
        out = rollout_with_grad(bb.policy, ctx.grid, cond, x_T, z, mask, eta=s.eta, guidance=s.guidance,
                                null_cond=bb.null_cond(cond), checkpoint=cfg.checkpoint)
        r = ctx.reward(bb.decode(out.x0), prompts)
        return cfg.loss_scale * reward_loss(r, cfg.loss, cfg.reward_target).mean(), r.detach()

    def train_step(self) -> dict[str, float]:
        cfg, ctx, bb = self.cfg, self.ctx, self.ctx.backbone
        B, T = cfg.batch_size, ctx.sampler.steps
        prompts = sample_prompts(ctx.prompts, B, self.generator)
        # 1. the graph's constants x_T, z (the whole batch first, so micro-batching changes nothing)
        x_T, z = draw_noise(self.generator, B, T, bb.sample_shape)
        # 2. randomized truncation: K = T − b per trajectory (mask [T, B] of gradient-carrying steps)
        mask = draw_truncation(cfg, T, B, self.generator)
        total, rewards = 0.0, []
        with ctx.clock("update"):
            for sl in micro_batches(B, cfg.micro_batch):
                n = sl.stop - sl.start
                # 3. differentiable rollout, loss_scale · ℓ(r(decode(x_0))), accumulated over micro-batches
                loss, r = self.loss(prompts[sl], x_T[sl], z[sl], mask[:, sl])
                (loss * (n / B)).backward()
                total += float(loss.detach()) * n / B
                rewards.append(r)
            gnorm = optimizer_step(self.optimizer, self.params, cfg.grad_clip)
        k = mask.sum(0).float()
        return {
            "train/loss": total,
            "train/reward": float(torch.cat(rewards).float().mean()),
            "train/k_mean": float(k.mean()),
            "train/grad_norm": gnorm,
        }
