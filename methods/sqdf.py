"""SQDF: soft-Q-based diffusion fine-tuning by a reparameterized policy gradient.

Kang*, Lee*, Shin*, Om, Park. "Diffusion Fine-Tuning via Reparameterized Policy Gradient of the
Soft Q-Function". ICLR 2026, arXiv:2512.04559. Official code: Shin-woocheol/SQDF @68861b2
(`T2I/sd_pipeline.py`, `T2I/alignprop_trainer.py`, `BBO/online/sqdf_utils.py`).

Objective (paper Eq. 16, as the code optimizes it; the derivation from the KL-regularized objective
of Eq. 4, the soft-Q approximation and its discounting are in docs/methods/sqdf_soft_q.md). For a
state x_t from the replay buffer D and a fresh reparameterized action x_{t−1} = μ_θ(x_t, t) + σ_t z
(paper Eq. 12):

    L(θ) = E_{x_t∼D, z} [ −γ^{t−1} · r( f_ψ(x_{t−1}) ) + α · KL( p_θ(·|x_t) ‖ p′(·|x_t) ) ]

The soft-Q of the transition is approximated training-free by the reward of a one-shot x̂0
prediction of the future (paper Eq. 9), discounted by γ per remaining step (Eqs. 13–15). Gradients
flow through exactly one policy step per item, into μ_θ, through the frozen x̂0 predictor, decoder
and reward; there is no backpropagation through the sampling chain.

Notation (paper -> code):
    t (T..1), action x_{t−1}   -> step index k = 0..T−1, x = latents[:, k], x' = prev_sample
    γ^{t−1} (steps left)        -> gamma ** n_k, n_k = T − 1 − k = grid.steps_left(k)
    μ_θ(x_t, t), σ_t            -> out.mean, out.std (bench.core.diffusion.ddim_step, η = sampler.eta)
    p′ (pretrained)             -> backbone.reference
    f_ψ (consistency model;     -> backbone.consistency_x0 (x0_predictor="consistency"); the
      Song et al. 2023,            one-step Tweedie x̂0 of p′ ("tweedie"); n-step DDIM of p′ ("ddim")
      arXiv:2303.01469)
    α · KL                      -> ctx.alpha · gaussian_kl(μ_θ, μ_ref, σ_k), nats (Σ dims, ½)
    D (replay buffer)           -> ReplayBuffer: FIFO ring of trajectories (inputs of all T steps)

Deliberate deviations from the official code (each a documented switch where it matters):
1. KL in nats, Σ_dims Δμ²/(2σ²). The code uses mean_dims Δμ²/σ² = (2/d)·KL, so its α equals
   α_nats · d/2; runs record both (`alpha_sqdf`). Numerics are identical after the conversion.
2. The reward-sign mask 1[r > 0] of the T2I code (which also masks the KL) is off by default: the
   embedded tasks have negative rewards, where it would silence learning. `reward_mask=true`
   reproduces it.
3. Prioritized replay: the code samples (trajectory, k) ∝ max(r, 0)·γ^{n_k} and still weights the
   loss by γ^{n_k} (a double discount). `per_loss_discount=true` (default) keeps that;
   false drops the loss weight for prioritized draws. Because max(r, 0) is 0 for negative
   rewards, `priority_shift="min"` (default) uses r − min_buffer(r) + 1e-6 instead; "none" is the
   code's max(r, 0).
4. Uniform replay draws trajectories without replacement and one k per item, as the code; the
   code's multi-GPU shared-filesystem buffer is an in-memory buffer here.
5. On the mixture tasks the consistency model is the reference's exact probability-flow ODE
   endpoint (a "perfect" consistency model, available in closed form there; see
   docs/methods/sqdf_soft_q.md); on Stable Diffusion it is LCM-LoRA (Luo et al. 2023,
   arXiv:2311.05556), mapped to the nearest LCM timestep as in the code.
6. At the last step (n_k = 0) x̂0 is the sampled x', as in the code (for every predictor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.core.diffusion import draw_noise, ddim_step, gaussian_kl, guided_eps, ode_x0, rollout, x0_from_eps
from bench.core.registry import METHODS
from bench.core.method import AlignmentMethod, TrainContext
from methods.common import adamw, check_choice, check_range, discount, optimizer_step, require, sample_prompts


@dataclass(frozen=True)
class SQDFConfig:
    """SQDF hyperparameters (defaults: the paper's small-scale aesthetic setting, the official T2I scripts)."""

    gamma: float = 0.9
    "discount γ ∈ (0, 1]: the soft-Q of step k is weighted by γ^{steps left}"
    x0_predictor: str = "consistency"
    "x̂0 of x_{t−1} for the soft-Q: consistency (f_ψ), tweedie (one step of p′), or ddim (ddim_steps of p′)"
    ddim_steps: int = 2
    "steps of the deterministic DDIM predictor (x0_predictor=ddim; the paper's Fig. 7 uses 2 and 4)"
    batch_size: int = 64
    "transitions per update"
    rollouts_per_step: int = 64
    "new on-policy trajectories collected per update"
    use_buffer: bool = True
    "replay buffer on; off: train on one random transition of each fresh trajectory"
    buffer_size: int = 1024
    "buffer capacity in trajectories (FIFO ring)"
    buffer_sampling: str = "uniform"
    "uniform (without replacement, the T2I scripts) or prioritized ∝ reward·γ^{n_k} (the BBO script)"
    per_loss_discount: bool = True
    "prioritized draws keep the γ^{n_k} loss weight (the official code's double discount)"
    priority_shift: str = "min"
    "priority reward: min (r − min r + 1e-6, works for negative rewards) or none (max(r, 0), the code)"
    reward_mask: bool = False
    "multiply each item's loss by 1[r > 0] (the T2I code's mask)"
    lr: float = 1e-3
    "AdamW learning rate"
    weight_decay: float = 1e-4
    "AdamW weight decay"
    grad_clip: float = 1.0
    "global gradient-norm clip (0 = off)"

    def __post_init__(self) -> None:
        check_range("method.gamma", self.gamma, 0.0, 1.0, lo_open=True)
        check_choice("method.x0_predictor", self.x0_predictor, ("consistency", "tweedie", "ddim"))
        check_choice("method.buffer_sampling", self.buffer_sampling, ("uniform", "prioritized"))
        check_choice("method.priority_shift", self.priority_shift, ("min", "none"))
        for f in ("ddim_steps", "batch_size", "rollouts_per_step", "buffer_size"):
            check_range(f"method.{f}", getattr(self, f), 1)
        check_range("method.lr", self.lr, 0.0, lo_open=True)
        check_range("method.weight_decay", self.weight_decay, 0.0)
        check_range("method.grad_clip", self.grad_clip, 0.0)


class ReplayBuffer:
    """FIFO ring of trajectories: the inputs x_k of all T steps, their prompt and final reward."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.latents: Tensor | None = None  # [capacity, T, *shape]
        self.rewards = torch.zeros(capacity)
        self.prompts: list[str] = [""] * capacity
        self.size = 0
        self.head = 0

    def push(self, latents: Tensor, prompts: list[str], rewards: Tensor) -> None:
        if self.latents is None:
            self.latents = torch.zeros((self.capacity, *latents.shape[1:]), dtype=latents.dtype)
        for i in range(latents.shape[0]):
            self.latents[self.head] = latents[i]
            self.rewards[self.head] = rewards[i]
            self.prompts[self.head] = prompts[i]
            self.head = (self.head + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "rewards": self.rewards, "prompts": list(self.prompts), "size": self.size, "head": self.head}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.latents, self.rewards, self.prompts = s["latents"], s["rewards"], list(s["prompts"])
        self.size, self.head = int(s["size"]), int(s["head"])


@METHODS.register("sqdf", doc="soft-Q reparameterized policy gradient: one step at a random t, reward of x̂0(x_{t−1}) weighted by γ^{steps left}, KL, replay buffer")
class SQDF(AlignmentMethod):
    name = "sqdf"
    paper = "Kang, Lee, Shin, Om, Park. ICLR 2026, arXiv:2512.04559"
    version = 1
    Config = SQDFConfig
    needs_reward_grad = True
    uses_alpha = True

    def __init__(self, cfg: SQDFConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        require(ctx.sampler.eta > 0, "sqdf needs sampler.eta > 0 (the per-step KL and the policy are Gaussian)")
        if cfg.x0_predictor == "consistency":
            require(ctx.backbone.has_consistency_model, f"sqdf: backbone {type(ctx.backbone).__name__} has no consistency model; use method.x0_predictor=tweedie or ddim")
        self.params = self.trainable_parameters()
        self.optimizer = adamw(self.params, cfg.lr, cfg.weight_decay)
        self.buffer = ReplayBuffer(cfg.buffer_size)

    # ---- collection (no gradients) ---------------------------------------------------------------

    def _collect(self) -> tuple[Tensor, list[str], Tensor]:
        ctx, bb = self.ctx, self.ctx.backbone
        n = self.cfg.rollouts_per_step
        prompts = sample_prompts(ctx.prompts, n, self.generator)
        with ctx.clock("sampling"):
            cond = bb.encode_prompts(prompts)
            x_T, z = draw_noise(self.generator, n, ctx.sampler.steps, bb.sample_shape)
            traj = rollout(bb.policy, ctx.grid, cond, x_T, z, eta=ctx.sampler.eta, guidance=ctx.sampler.guidance, null_cond=bb.null_cond(cond))
            with torch.no_grad():
                r = ctx.reward(bb.decode(traj.x0), prompts).float().cpu()
        return traj.latents[:, :-1].cpu(), prompts, r  # inputs of steps 0..T−1

    def _draw(self, fresh: tuple[Tensor, list[str], Tensor]) -> tuple[Tensor, Tensor, list[str], Tensor]:
        """(states x_k [B, ...], step indices k [B], prompts, loss weights w [B])."""
        cfg, T, B = self.cfg, self.ctx.sampler.steps, self.cfg.batch_size
        if not cfg.use_buffer:
            lat, prompts, _ = fresh
            idx = torch.randperm(lat.shape[0], generator=self.generator)[:B]
            k = torch.randint(T, (idx.shape[0],), generator=self.generator)
            return lat[idx, k], k, [prompts[i] for i in idx.tolist()], torch.ones(idx.shape[0])
        buf = self.buffer
        if cfg.buffer_sampling == "uniform":
            m = min(B, buf.size)
            idx = torch.randperm(buf.size, generator=self.generator)[:m]
            k = torch.randint(T, (m,), generator=self.generator)
            return buf.latents[idx, k], k, [buf.prompts[i] for i in idx.tolist()], torch.ones(m)
        # prioritized ∝ priority(r_i) · γ^{n_k}, with replacement (the BBO code's `reward+gamma_PER`;
        # docs/methods/sqdf_soft_q.md, "Prioritized replay")
        r = buf.rewards[: buf.size]
        pr = (r - r.min() + 1e-6) if cfg.priority_shift == "min" else r.clamp(min=0)
        steps_left = T - 1 - torch.arange(T)
        w = pr[:, None] * discount(cfg.gamma, steps_left)[None]
        if float(w.sum()) <= 0:
            w = torch.ones_like(w)
        flat = torch.multinomial(w.flatten(), B, replacement=True, generator=self.generator)
        idx, k = flat // T, flat % T
        loss_w = torch.ones(B) if cfg.per_loss_discount else 1.0 / discount(cfg.gamma, steps_left[k])
        return buf.latents[idx, k], k, [buf.prompts[i] for i in idx.tolist()], loss_w

    # ---- the soft-Q estimate -------------------------------------------------------------------------

    def _x0_hat(self, x_next: Tensor, t_next: Tensor, cond: Tensor) -> Tensor:
        """x̂0(x_{t−1}) with gradient to x_{t−1}; t_next = −1 (after the last step) returns x_{t−1}."""
        bb, cfg, s = self.ctx.backbone, self.cfg, self.ctx.sampler
        last = t_next < 0
        out = x_next.clone()
        mid = ~last
        if bool(mid.any()):
            xm, tm, cm = x_next[mid], t_next[mid], cond[mid]
            if cfg.x0_predictor == "consistency":
                pred = bb.consistency_x0(xm, tm, cm)
            elif cfg.x0_predictor == "tweedie":
                eps = guided_eps(bb.reference, xm, tm, cm, bb.null_cond(cm), s.guidance)
                pred = x0_from_eps(xm, eps, bb.schedule.alpha_bar(tm.cpu()).to(xm.device))
            else:
                pred = ode_x0(bb.reference, bb.schedule, xm, tm, cm, cfg.ddim_steps, guidance=s.guidance, null_cond=bb.null_cond(cm))
            out = _put(out, mid, pred)
        return out

    # ---- one update ----------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, ctx, bb = self.cfg, self.ctx, self.ctx.backbone
        grid, T = ctx.grid, ctx.sampler.steps
        fresh = self._collect()
        if cfg.use_buffer:
            self.buffer.push(*fresh)
        x, k, prompts, loss_w = self._draw(fresh)
        with ctx.clock("update"):
            cond = bb.encode_prompts(prompts)
            null = bb.null_cond(cond)
            t = grid.timesteps[k]
            a, ap = grid.alpha_bars[k], grid.prev_alpha_bars[k]
            # 1. policy step with gradient: μ_θ(x_t, t) (DDIM mean, Song et al. arXiv:2010.02502, Eq. 12),
            #    and the reparameterized action x_{t−1} = μ_θ + σ_t z with a fresh z (paper Eq. 12)
            eps = guided_eps(bb.policy, x, t, cond, null, ctx.sampler.guidance)
            z = torch.randn(x.shape, generator=self.generator)
            out = ddim_step(eps, x, a, ap, ctx.sampler.eta, noise=z)
            # 2. reference mean at the same state (no parameter gradient) and the per-step KL of
            #    Eq. 16, KL(p_θ(·|x_t) ‖ p′(·|x_t)) = Σ_dims (μ_θ − μ_ref)² / (2σ_t²) (nats)
            with torch.no_grad():
                eps_ref = guided_eps(bb.reference, x, t, cond, null, ctx.sampler.guidance)
                mean_ref = ddim_step(eps_ref, x, a, ap, ctx.sampler.eta, noise=z).mean
            kl = gaussian_kl(out.mean, mean_ref, out.std)
            # 3. soft-Q ≈ γ^{n_k} r(x̂0(x_{t−1})) (paper Eqs. 9, 15), x̂0 by f_ψ (or Tweedie / DDIM)
            x0_hat = self._x0_hat(out.prev_sample, grid.prev_timesteps[k], cond)
            r = ctx.reward(bb.decode(x0_hat), prompts)
            steps_left = T - 1 - k
            q = discount(cfg.gamma, steps_left) * loss_w * r
            # 4. loss (paper Eq. 16): −Q + α KL, averaged over items
            per_item = -q + ctx.alpha * kl
            if cfg.reward_mask:
                per_item = per_item * (r.detach() > 0).float()
            loss = per_item.mean()
            loss.backward()
            gnorm = optimizer_step(self.optimizer, self.params, cfg.grad_clip)
        return {
            "train/loss": float(loss.detach()),
            "train/reward": float(fresh[2].mean()),
            "train/q_reward": float(r.detach().mean()),
            "train/kl_step": float(kl.detach().mean()),
            "train/grad_norm": gnorm,
            "train/buffer_size": float(self.buffer.size),
        }

    def extra_state(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])


def _put(out: Tensor, mask: Tensor, values: Tensor) -> Tensor:
    """out with out[mask] = values, differentiable in both."""
    idx = mask.nonzero().squeeze(1)
    return out.index_put((idx,), values)
