"""PPO+KL (DPOK): policy gradient with a per-step KL bound to the pretrained model, value baseline,
transition replay buffer.

Fan, Watkins, Du, Liu, Ryu, Boutilier, Abbeel, Ghavamzadeh, Lee, Lee. "DPOK: Reinforcement Learning
for Fine-tuning Text-to-Image Diffusion Models". NeurIPS 2023, arXiv:2305.16381. Official code:
google-research/google-research, folder `dpok/` (`train_online_pg.py` @1d49f2c0,
`pipeline_stable_diffusion_extended.py` @4c429948, `reward_model.py`, and its README). Clipped
surrogate: Schulman et al. 2017, arXiv:1707.06347, Eq. 7; DDIM step: Song et al., arXiv:2010.02502,
Eqs. 12 and 16. The KL upper bound, its per-step form and the calibration are derived in
docs/methods/policy_gradient.md; the pieces shared with DDPO live in methods/policy_gradient.py.

Objective (as the paper states it and the code optimizes it): minimize over θ

    E[ −w·r(x_0, c) ] + α · Σ_t E[ KL( π_θ(·|x_t, c) ‖ π_pre(·|x_t, c) ) ],

the per-step KL sum being an upper bound of KL(p_θ(x_0|c) ‖ p_pre(x_0|c)) (chain rule of the KL
plus data processing; docs/methods/policy_gradient.md, "The per-step KL bound"). Each iteration
samples `rollouts_per_step` trajectories with the current policy, appends their T transitions
(x_t, t, x_{t−1}, log π_old, final reward) to a FIFO buffer, fits the value baseline V(x_t, c, t)
to the final reward, and takes `policy_steps` optimizer steps, each accumulating
`gradient_accumulation_steps` minibatches of `batch_size` random buffered transitions:

    loss = −w·A·ρ̃ + α·KL_t,   A = r − V(x_t, c, t),   ρ = π_θ(x_{t−1}|x_t) / π_old(x_{t−1}|x_t),

with ρ̃ PPO's clipped surrogate (`ratio="clip"`, default, the "PPO + KL" form of later code such
as Flow-GRPO, arXiv:2505.05470) or DPOK's plain clamp of ρ to 1 ± ε (`ratio="clamp"`, the code).
Since transitions are drawn uniformly over t, both terms carry the same 1/T: at ρ = 1 the gradient
is (1/T)·∇θ(w·E[r] − α·KL_path) (times 1/D with the per-element reductions).

Notation (paper / DPOK code -> code):
    α (reward weight), β (KL weight)  -> cfg.reward_weight (w), ctx.alpha (nats)
    p_batch_size, p_step              -> cfg.batch_size, cfg.policy_steps
    g_batch_size                      -> cfg.rollouts_per_step
    gradient_accumulation_steps       -> cfg.gradient_accumulation_steps
    ratio_clip                        -> cfg.clip_range
    buffer_size (transitions)         -> cfg.buffer_size, TransitionBuffer (FIFO ring)
    ValueMulti, v_lr, v_batch_size,   -> ValueNet, cfg.value_lr, cfg.value_batch_size,
      v_step, v_flag                     cfg.value_steps (× cfg.value_updates), cfg.value_baseline
    KL_t (Gaussian, nats)             -> gaussian_kl(μ_θ, μ_ref, σ_t) = Σ dims (Δμ)² / (2σ_t²)
    kl_regularizer (code: ε-MSE)      -> cfg.kl_form = "eps_mse": mean_dims (ε̂_θ − ε̂_pre)²
    clip_norm, kl_warmup              -> cfg.grad_clip, cfg.kl_warmup

Calibration. With `kl_form="gaussian"` and `kl_reduce="match"` the KL is reduced like the log-prob
(both per element for "mean", i.e. the whole loss is divided by D) and A is in reward units, so
reward and KL are weighed as in the α-objective (p* ∝ p_pre·e^{w·r/α}). The KL gradient is the
per-step one at the buffered states, as in the code: it omits the score term of the states'
dependence on θ, so the fixed point is near p*, not at it. `kl_in_return=true` adds it: each
transition's return becomes r − (α/w)·Σ_{s>t} KL_s (the KL its path still incurs, recorded by the
rollout against the reference), which V then fits, making the gradient at ρ = 1 exactly that of
w·E[r] − α·KL_path. The ε-MSE form equals the Gaussian KL only up to the per-step weight
c_t²·D/(2σ_t²) (docs/methods/policy_gradient.md, "DPOK's ε-MSE"), so α is then not in nats.

Deliberate deviations from the official code:
1. KL to the pretrained model is the exact Gaussian KL of the step means in nats by default; DPOK's
   unweighted ε-MSE is `kl_form="eps_mse"`. Both use the CFG-combined ε̂ at the transition's state.
2. PPO-clip by default; DPOK's clamp without min/max (`ratio="clamp"`) silences the policy term
   whenever ρ leaves the band, whatever the sign of A.
3. Sizes are scaled to the toy in the task presets; the paper settings live in
   bench/configs/paper/dpok_*.yaml. Sizes are per process: with `train.processes = N`
   (bench/core/distributed.py) each rank samples into its own buffer and the policy and value gradients
   are averaged at every optimizer step (methods.common.optimizer_step), as the code's
   `--multi_gpu` DDP does. The buffer holds transitions on the backbone's device (the code keeps
   fp16 copies on the CPU).
4. The value network follows `ValueMulti` (three timestep-modulated linear layers, ReLU, linear
   head), but its prompt input is the backbone's condition (mean-pooled over tokens for text
   encoders) rather than CLIP-L text features from the reward model; its width is `value_hidden`.
   It is trained by MSE to the final reward with `value_steps` accumulated minibatches per
   optimizer step, as the code; `value_updates` (default 1, as the code) takes more such steps per
   iteration.
5. Prompts are drawn i.i.d. per rollout (the code walks a shuffled prompt list in batches; the same
   for a single prompt). Log-probs are the nats sum of bench.core.diffusion, divided by D for
   `log_prob_reduce="mean"` (the code's `Normal.log_prob(...).mean()`), at sampling and training
   alike, so ρ = 1 (up to float32 round-off) for transitions of the current policy; every iteration
   checks it on `batch_size` of them (`train/ratio_first`, a harness addition: the code logs the
   mean ratio only), at the cost of `batch_size` extra denoiser rows.
6. The learning rate is constant (the code's default scheduler is "constant").
7. `kl_in_return` (harness addition, off by default): the exact path-KL gradient (see Calibration);
   it costs one reference call per sampled step.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.core.diffusion import draw_noise, rollout
from bench.core.registry import METHODS
from bench.core.method import AlignmentMethod, TrainContext
from methods.common import check_choice, check_range, optimizer_step, require, sample_prompts
from methods.policy_gradient import RATIO_WARN, kl_to_go, log_ratio_stats, ppo_clip_loss, ratio_clamp_loss, recompute_transition, reduce_dims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOKLConfig:
    """PPO+KL / DPOK hyperparameters (defaults: DPOK's single-prompt README recipe, harness KL form)."""

    rollouts_per_step: int = 10
    "trajectories sampled per iteration (DPOK g_batch_size)"
    buffer_size: int = 1000
    "FIFO buffer capacity in transitions (T per trajectory; DPOK 1000 ≈ 20 trajectories of 50 steps)"
    batch_size: int = 4
    "transitions per policy minibatch (DPOK p_batch_size)"
    gradient_accumulation_steps: int = 12
    "minibatches accumulated per policy optimizer step"
    policy_steps: int = 5
    "policy optimizer steps per iteration (DPOK p_step)"
    ratio: str = "clip"
    "clip: PPO's max(−A·ρ, −A·clip(ρ)); clamp: DPOK's −A·clamp(ρ) with no min/max"
    clip_range: float = 1e-4
    "ε of the ratio band 1 ± ε (DPOK ratio_clip; on the per-element ratio with log_prob_reduce=mean)"
    log_prob_reduce: str = "mean"
    "log-prob over dims: mean (DPOK/DDPO code) or sum (the true density)"
    kl_form: str = "gaussian"
    "gaussian: KL of the step Gaussians (nats); eps_mse: DPOK's mean_dims (ε̂_θ − ε̂_pre)²"
    kl_reduce: str = "match"
    "gaussian KL reduction: match (as log_prob_reduce: reward and KL weighed as in E[r] − α·KL), sum (nats), mean (nats / D)"
    kl_warmup: int = 0
    "iterations before the KL term is switched on (DPOK kl_warmup)"
    kl_in_return: bool = False
    "also charge each transition the KL still to come on its path, −(α/w)·Σ_{s>t} KL_s, in its return (the exact gradient of w·E[r] − α·KL_path; gaussian KL only)"
    reward_weight: float = 1.0
    "w multiplying the advantage (DPOK reward_weight; 1 keeps α the nats weight of E[r] − α·KL)"
    value_baseline: bool = True
    "A = r − V(x_t, c, t) with a learned value network (DPOK v_flag); off: A = r"
    value_hidden: int = 256
    "width of the value network's three hidden layers"
    value_lr: float = 1e-4
    "AdamW learning rate of the value network"
    value_batch_size: int = 256
    "transitions per value minibatch"
    value_steps: int = 5
    "value minibatches accumulated into one value optimizer step (DPOK v_step)"
    value_updates: int = 1
    "value optimizer steps per iteration (DPOK: 1; the toy presets take more to fit the reward's offset fast)"
    lr: float = 1e-5
    "AdamW learning rate of the policy"
    weight_decay: float = 0.0
    "AdamW weight decay of the policy (DPOK: 0)"
    grad_clip: float = 0.1
    "global gradient-norm clip per policy step (DPOK clip_norm; 0 = off)"

    def __post_init__(self) -> None:
        for f in ("rollouts_per_step", "buffer_size", "batch_size", "gradient_accumulation_steps", "policy_steps",
                  "value_hidden", "value_batch_size", "value_steps", "value_updates"):
            check_range(f"method.{f}", getattr(self, f), 1)
        check_choice("method.ratio", self.ratio, ("clip", "clamp"))
        check_range("method.clip_range", self.clip_range, 0.0, lo_open=True)
        check_choice("method.log_prob_reduce", self.log_prob_reduce, ("mean", "sum"))
        check_choice("method.kl_form", self.kl_form, ("gaussian", "eps_mse"))
        check_choice("method.kl_reduce", self.kl_reduce, ("match", "sum", "mean"))
        check_range("method.kl_warmup", self.kl_warmup, 0)
        check_range("method.reward_weight", self.reward_weight, 0.0, lo_open=True)
        for f in ("lr", "value_lr"):
            check_range(f"method.{f}", getattr(self, f), 0.0, lo_open=True)
        check_range("method.weight_decay", self.weight_decay, 0.0)
        check_range("method.grad_clip", self.grad_clip, 0.0)
        require(not self.kl_in_return or self.kl_form == "gaussian",
                "method.kl_in_return needs method.kl_form=gaussian (the path's KL in nats)")
        require(self.buffer_size >= self.batch_size,
                f"method.buffer_size ({self.buffer_size}) must be >= method.batch_size ({self.batch_size})")

    @classmethod
    def smoke(cls) -> "PPOKLConfig":
        """A seconds-long CPU configuration (contract tests)."""
        return cls(rollouts_per_step=8, buffer_size=64, batch_size=8, gradient_accumulation_steps=2, policy_steps=2,
                   value_hidden=32, value_batch_size=16, value_steps=2, lr=1e-3, grad_clip=1.0)


# --------------------------------------------------------------------------------------------------
# Buffer and value network
# --------------------------------------------------------------------------------------------------


class TransitionBuffer:
    """FIFO ring of transitions (x_t, x_{t'}, step index, return, log π_old, prompt, birth).

    The return (`rewards`) is the final reward, minus (α/w)·Σ_{s>t} KL_s with `kl_in_return`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.size = 0
        self.head = 0
        self.x: Tensor | None = None  # [capacity, ...]
        self.x_next: Tensor | None = None
        self.steps = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity)
        self.log_probs = torch.zeros(capacity)  # in the method's log_prob_reduce convention
        self.birth = torch.full((capacity,), -1, dtype=torch.long)  # iteration that collected it
        self.prompts: list[str] = [""] * capacity

    def push(self, x: Tensor, x_next: Tensor, steps: Tensor, rewards: Tensor, log_probs: Tensor, prompts: list[str], birth: int) -> None:
        """Append N transitions (oldest are overwritten). Tensors [N, ...] / [N]."""
        if self.x is None:
            self.x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype, device=x.device)
            self.x_next = torch.zeros_like(self.x)
            dev = x.device
            self.steps, self.rewards = self.steps.to(dev), self.rewards.to(dev)
            self.log_probs, self.birth = self.log_probs.to(dev), self.birth.to(dev)
        n = x.shape[0]
        if n > self.capacity:  # only the newest `capacity` survive
            c = self.capacity
            x, x_next, steps, rewards, log_probs = x[-c:], x_next[-c:], steps[-c:], rewards[-c:], log_probs[-c:]
            prompts, n = prompts[-c:], c
        pos = (self.head + torch.arange(n)) % self.capacity
        dpos = pos.to(self.x.device)
        self.x[dpos], self.x_next[dpos] = x, x_next
        self.steps[dpos], self.rewards[dpos], self.log_probs[dpos] = steps.to(self.x.device), rewards, log_probs
        self.birth[dpos] = birth
        for k, p in zip(pos.tolist(), prompts):
            self.prompts[k] = p
        self.head = (self.head + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("size", "head", "x", "x_next", "steps", "rewards", "log_probs", "birth")} | {"prompts": list(self.prompts)}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        for k in ("size", "head", "x", "x_next", "steps", "rewards", "log_probs", "birth"):
            v = s[k]
            setattr(self, k, v.clone() if isinstance(v, Tensor) else v)
        self.prompts = list(s["prompts"])


class ConditionalLinear(nn.Module):
    """DPOK's timestep-modulated linear layer: (W x + b) ⊙ γ_t, γ a learned per-step embedding."""

    def __init__(self, d_in: int, d_out: int, n_steps: int, generator: torch.Generator) -> None:
        super().__init__()
        w = torch.empty(d_out, d_in)
        nn.init.xavier_normal_(w, generator=generator)
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.empty(d_out).uniform_(-bound, bound, generator=generator))
        self.embed = nn.Parameter(torch.empty(n_steps, d_out).uniform_(0.0, 1.0, generator=generator))

    def forward(self, x: Tensor, steps: Tensor) -> Tensor:
        # index_select, not embed[steps]: the backward of advanced indexing accumulates repeated
        # steps with parallel atomic adds on the CPU (run-to-run different sums with > 1 thread);
        # index_select's backward (index_add_) adds them in index order, the same every run.
        return nn.functional.linear(x, self.weight, self.bias) * torch.index_select(self.embed, 0, steps)


class ValueNet(nn.Module):
    """V(x_t, c, t): [flatten(x_t), pooled condition] -> 3 × (ConditionalLinear, ReLU) -> linear -> [B]."""

    def __init__(self, x_dim: int, c_dim: int, hidden: int, n_steps: int, generator: torch.Generator) -> None:
        super().__init__()
        self.l1 = ConditionalLinear(x_dim + c_dim, hidden, n_steps, generator)
        self.l2 = ConditionalLinear(hidden, hidden, n_steps, generator)
        self.l3 = ConditionalLinear(hidden, hidden, n_steps, generator)
        w = torch.empty(1, hidden)
        nn.init.xavier_normal_(w, generator=generator)
        bound = 1.0 / math.sqrt(hidden)
        self.out_w = nn.Parameter(w)
        self.out_b = nn.Parameter(torch.empty(1).uniform_(-bound, bound, generator=generator))

    @staticmethod
    def pool(cond: Tensor) -> Tensor:
        """Conditions [B, ...] -> [B, c]: token sequences [B, L, E] are mean-pooled over L."""
        return (cond.mean(1) if cond.dim() > 2 else cond).flatten(1)

    def forward(self, x: Tensor, cond: Tensor, steps: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), self.pool(cond).to(x.device, x.dtype)], 1)  # conditions may live on the host (SD)
        h = torch.relu(self.l1(h, steps))
        h = torch.relu(self.l2(h, steps))
        h = torch.relu(self.l3(h, steps))
        return nn.functional.linear(h, self.out_w, self.out_b).squeeze(1)


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


@METHODS.register("ppo-kl", aliases=("dpok",), doc="PPO+KL (DPOK): policy gradient on buffered transitions, value baseline, KL_t to the pretrained model")
class PPOKL(AlignmentMethod):
    name = "ppo-kl"
    paper = "Fan, Watkins, Du, Liu, Ryu, Boutilier, Abbeel, Ghavamzadeh, Lee, Lee. NeurIPS 2023, arXiv:2305.16381"
    version = 2  # 2: the value net's step embedding sums its gradient in a fixed order (v1 was nondeterministic at ~1e-7 with > 1 CPU thread)
    Config = PPOKLConfig
    needs_reward_grad = False
    uses_alpha = True

    def __init__(self, cfg: PPOKLConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        s, bb = ctx.sampler, ctx.backbone
        require(s.eta > 0, f"ppo-kl needs sampler.eta > 0 (the policy π_θ(x_t'|x_t) must be Gaussian), got {s.eta}")
        self.grid = ctx.grid
        require(bool((self.grid.stds(s.eta) > 0).all()), "ppo-kl: a sampling step has σ_t = 0 (ᾱ_final = 1?); every buffered step is trained")
        self.params = self.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.dim = bb.dim
        self.kl_mode = cfg.log_prob_reduce if cfg.kl_reduce == "match" else cfg.kl_reduce
        self.buffer = TransitionBuffer(cfg.buffer_size)
        self.iteration = 0
        self.last_path_kl: float | None = None  # mean KL_path of the latest rollouts (kl_in_return)
        self.value: ValueNet | None = None
        self.value_optimizer: torch.optim.Optimizer | None = None
        if cfg.value_baseline:
            c_dim = ValueNet.pool(bb.encode_prompts(ctx.prompts[:1])).shape[1]
            self.value = ValueNet(self.dim, c_dim, cfg.value_hidden, s.steps, self.generator).to(self.device)
            self.value_optimizer = torch.optim.AdamW(self.value.parameters(), lr=cfg.value_lr)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    # ---- collection ----------------------------------------------------------------------------------

    def _collect(self) -> Tensor:
        """Sample, score and buffer the transitions of `rollouts_per_step` trajectories; rewards [N]."""
        ctx, bb, s, cfg = self.ctx, self.ctx.backbone, self.ctx.sampler, self.cfg
        n, T = cfg.rollouts_per_step, s.steps
        prompts = sample_prompts(ctx.prompts, n, self.generator)
        with ctx.clock("sampling"):
            cond = bb.encode_prompts(prompts)
            x_T, z = draw_noise(self.generator, n, T, bb.sample_shape)
            path_kl = cfg.kl_in_return and self.iteration >= cfg.kl_warmup
            traj = rollout(bb.policy, self.grid, cond, x_T.to(self.device), z.to(self.device), eta=s.eta,
                           guidance=s.guidance, null_cond=bb.null_cond(cond), reference=bb.reference if path_kl else None)
            with torch.no_grad():
                r = ctx.reward(bb.decode(traj.x0), prompts).detach().float().to(self.device)
            ret = r[:, None].expand(n, T)  # [n, T]: the return of each transition
            if path_kl:
                future = kl_to_go(traj.kl)  # Σ_{s>t} KL_s (nats)
                ret = ret - (ctx.alpha / cfg.reward_weight) * future
                self.last_path_kl = float(traj.kl.sum(1).mean())
            # step-major order, as DPOK appends all trajectories' step i, then step i + 1, ...
            lat = traj.latents
            x = lat[:, :-1].transpose(0, 1).reshape(T * n, *lat.shape[2:])
            x_next = lat[:, 1:].transpose(0, 1).reshape(T * n, *lat.shape[2:])
            steps = torch.arange(T).repeat_interleave(n)
            lps = reduce_dims(traj.log_probs, cfg.log_prob_reduce, self.dim).transpose(0, 1).reshape(-1)
            self.buffer.push(x, x_next, steps, ret.transpose(0, 1).reshape(-1), lps, prompts * T, self.iteration)
        return r

    def _draw(self, k: int) -> Tensor:
        """k distinct buffer indices (DPOK: np.random.choice without replacement)."""
        k = min(k, self.buffer.size)
        return torch.randperm(self.buffer.size, generator=self.generator)[:k]

    def _ratio_check(self) -> float:
        """max |ρ − 1| on up to `batch_size` of this iteration's own transitions, before any update
        (it must be 0: the sampler's arithmetic is reused; methods.policy_gradient.recompute_transition)."""
        buf, bb = self.buffer, self.ctx.backbone
        fresh = (buf.birth[: buf.size] == self.iteration).nonzero().squeeze(1).cpu()
        pick = torch.randperm(fresh.numel(), generator=self.generator)[: self.cfg.batch_size]
        idx = fresh[pick].to(self.device)
        with torch.no_grad():
            cond = bb.encode_prompts([buf.prompts[i] for i in idx.tolist()])
            terms = recompute_transition(bb, self.grid, self.ctx.sampler, buf.x[idx], buf.x_next[idx], buf.steps[idx], cond)
            log_ratio = reduce_dims(terms.log_prob, self.cfg.log_prob_reduce, self.dim) - buf.log_probs[idx]
            dev = float((torch.exp(log_ratio) - 1.0).abs().max())
        if dev > RATIO_WARN:
            log.warning("ppo-kl: |ratio − 1| = %.3g on the current policy's own transitions (expected 0)", dev)
        return dev

    # ---- value baseline ----------------------------------------------------------------------------

    def _value_update(self) -> float:
        """`value_updates` AdamW steps, each on `value_steps` accumulated MSE minibatches; the last
        step's loss (before it)."""
        cfg, buf, bb = self.cfg, self.buffer, self.ctx.backbone
        assert self.value is not None and self.value_optimizer is not None
        self.value_optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.value_updates):
            total = 0.0
            for _ in range(cfg.value_steps):
                idx = self._draw(cfg.value_batch_size).to(self.device)
                cond = bb.encode_prompts([buf.prompts[i] for i in idx.tolist()])
                pred = self.value(buf.x[idx], cond, buf.steps[idx])
                loss = nn.functional.mse_loss(pred.float(), buf.rewards[idx].float()) / cfg.value_steps
                loss.backward()
                total += float(loss.detach())
            optimizer_step(self.value_optimizer, list(self.value.parameters()), 0.0)  # averages over ranks, steps, zeroes
        return total

    # ---- one iteration -------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, ctx, bb, buf = self.cfg, self.ctx, self.ctx.backbone, self.buffer
        # 1. T transitions of `rollouts_per_step` fresh trajectories of π_θ into the FIFO buffer
        fresh_r = self._collect()
        stats: dict[str, float] = {}
        if cfg.kl_in_return:
            stats["train/kl_path"] = self.last_path_kl if self.last_path_kl is not None else 0.0
        info: dict[str, list[float]] = {k: [] for k in ("loss", "ratio", "clipfrac", "approx_kl", "kl", "grad_norm", "adv")}
        with ctx.clock("update"):
            stats["train/ratio_first"] = self._ratio_check()
            if self.value is not None:
                # 2. fit the value baseline V(x_t, c, t) to the buffered returns (MSE; DPOK's ValueMulti)
                stats["train/value_loss"] = self._value_update()
            use_kl = self.iteration >= cfg.kl_warmup
            surrogate = ppo_clip_loss if cfg.ratio == "clip" else ratio_clamp_loss
            accum = cfg.gradient_accumulation_steps
            for _ in range(cfg.policy_steps):
                for _ in range(accum):
                    # 3. a minibatch of buffered transitions (x_t, t, x_{t−1}, log π_old, return)
                    idx = self._draw(cfg.batch_size).to(self.device)
                    prompts = [buf.prompts[i] for i in idx.tolist()]
                    cond = bb.encode_prompts(prompts)
                    x, steps = buf.x[idx], buf.steps[idx]
                    # 4. log π_θ(x_{t−1}|x_t, c) with gradient (DDIM Eqs. 12, 16), KL_t to π_pre, log ρ
                    terms = recompute_transition(bb, self.grid, ctx.sampler, x, buf.x_next[idx], steps, cond, reference=True)
                    log_ratio = reduce_dims(terms.log_prob, cfg.log_prob_reduce, self.dim) - buf.log_probs[idx]
                    # 5. advantage w·A = w·(r − V(x_t, c, t)) (no gradient into V)
                    with torch.no_grad():
                        adv = buf.rewards[idx]
                        if self.value is not None:
                            adv = adv - self.value(x, cond, steps)
                        adv = cfg.reward_weight * adv
                    # 6. loss = −w·A·ρ̃ + α·KL_t: ρ̃ clipped (PPO, arXiv:1707.06347, Eq. 7) or clamped (DPOK code)
                    per_item = surrogate(log_ratio, adv, cfg.clip_range)
                    kl = terms.kl if cfg.kl_form == "gaussian" else terms.eps_mse
                    kl_term = reduce_dims(kl, self.kl_mode, self.dim) if cfg.kl_form == "gaussian" else kl
                    if use_kl:
                        per_item = per_item + ctx.alpha * kl_term
                    (per_item.mean() / accum).backward()
                    with torch.no_grad():
                        log_ratio_stats(info, log_ratio, per_item, cfg.clip_range)
                        info["kl"].append(float(terms.kl.detach().mean()))
                        info["adv"].append(float(adv.abs().mean()))
                # 7. one AdamW step per `accum` minibatches (gradients averaged over ranks, clipped)
                info["grad_norm"].append(optimizer_step(self.optimizer, self.params, cfg.grad_clip))
        self.iteration += 1

        def mean(k: str) -> float:
            return float(sum(info[k]) / len(info[k]))

        stats.update({
            "train/reward": float(fresh_r.mean()),
            "train/buffer_return": float(buf.rewards[: buf.size].mean()),
            "train/loss": mean("loss"),
            "train/ratio_mean": mean("ratio"),
            "train/clipfrac": mean("clipfrac"),
            "train/approx_kl": mean("approx_kl"),
            "train/kl_step": mean("kl"),
            "train/kl_path_est": mean("kl") * ctx.sampler.steps,
            "train/advantage_abs": mean("adv"),
            "train/grad_norm": mean("grad_norm"),
        })
        return stats

    # ---- state -----------------------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        st: dict[str, Any] = {"buffer": self.buffer.state_dict(), "iteration": self.iteration}
        if self.value is not None and self.value_optimizer is not None:
            st["value"] = {k: v.detach().clone() for k, v in self.value.state_dict().items()}
            st["value_optimizer"] = self.value_optimizer.state_dict()
        return st

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        self.iteration = int(state.get("iteration", 0))
        if self.value is not None and self.value_optimizer is not None and "value" in state:
            self.value.load_state_dict(state["value"])
            self.value_optimizer.load_state_dict(state["value_optimizer"])
