"""DDPO: policy-gradient fine-tuning with PPO-clip on the sampler's per-step log-ratios; DDPO+KL.

Black, Janner, Du, Kostrikov, Levine. "Training Diffusion Models with Reinforcement Learning".
ICLR 2024, arXiv:2305.13301. Official code: kvablack/ddpo-pytorch @1958463 (`scripts/train.py`,
`ddpo_pytorch/stat_tracking.py`, `ddpo_pytorch/diffusers_patch/ddim_with_logprob.py`,
`config/base.py`, `config/dgx.py`); the paper's JAX code is jannerm/ddpo. Clipped surrogate:
Schulman et al. 2017, arXiv:1707.06347, Eq. 7. DDPO+KL's per-step KL follows Flow-GRPO (Liu et
al. 2025, arXiv:2505.05470, its `kl_loss`). Derivations, notation and the KL calibration in full:
docs/methods/policy_gradient.md. The shared pieces (advantages, surrogates, log-prob
recomputation) live in methods/policy_gradient.py.

Objective (DDPO §4.1): maximize J(θ) = E_{c, x_0 ∼ p_θ(·|c)}[ r(x_0, c) ]. The denoising chain
is a T-step MDP (§4.3): state (x_t, t, c), action x_{t−1} ∼ π_θ(·|x_t, c) = N(μ_θ(x_t), σ_t² I)
(DDIM, Song et al. arXiv:2010.02502, Eqs. 12 and 16, with η > 0), and the only reward is
r(x_0, c) at the end. Every iteration samples a fresh batch with the current policy, scores it
(no reward gradient), turns the rewards into one advantage A per trajectory, and runs
`num_inner_epochs` passes of PPO-clip over shuffled (sample, timestep) pairs (DDPO_IS, §4.3):

    L(θ) = E_{samples, t}[ max( −A·ρ_t, −A·clip(ρ_t, 1 − ε, 1 + ε) ) ],
    ρ_t = π_θ(x_{t−1} | x_t, c) / π_old(x_{t−1} | x_t, c).

With one optimizer step per batch ρ ≡ 1 at the update and ∇L = −E[Σ_t A ∇log π_θ]: DDPO_SF
(REINFORCE, §4.3). DDPO+KL (`ddpo-kl`) adds α·KL_t(π_θ(·|x_t) ‖ π_ref(·|x_t)) at every trained
(sample, timestep); its trained-step average is KL_path/T.

Notation (paper / ddpo-pytorch -> code):
    x_t, x_{t−1} (state, next state)   -> data["latents"][:, i], [:, i + 1]  (i = sampling step index)
    log π_old(x_{t−1}|x_t)             -> data["log_probs"][:, i] (recorded by bench.core.diffusion.rollout)
    log π_θ(x_{t−1}|x_t)               -> recompute_transition(...).log_prob (ddim_step with prev_sample)
    ρ_t, ε (clip range)                -> ratio, cfg.clip_range
    A (advantage, one per trajectory)  -> data["advantages"]: PerPromptStatTracker z-score, clipped to ±adv_clip_max
    per-element mean log-prob (code)   -> cfg.log_prob_reduce = "mean": nats sum / D (D = backbone.dim)
    train.batch_size × GPUs            -> cfg.minibatch_size
    sample.batch_size × GPUs × batches -> cfg.samples_per_iteration
    gradient_accumulation_steps        -> cfg.gradient_accumulation_steps (× trained timesteps)
    β of DDPO+KL                       -> ctx.alpha (nats), KL_t = Σ_dims (μ_θ − μ_ref)² / (2σ_t²)

Calibration of the KL variants (derivation: docs/methods/policy_gradient.md). The loss weighs
reward and KL as the α-objective E[r] − α·KL_path does only when (i) the KL is reduced like the
log-prob (`kl_reduce="match"`, the default: both per element for "mean", which scales the whole
loss by 1/D), and (ii) the advantage is in reward units (`advantage="center"`: r minus a
per-prompt baseline that includes the sample itself, as DDPO's tracker does, which shrinks the
reward's weight by O(1/n) for n stored rewards). DDPO's z-scored advantage divides the reward by
its running std, which multiplies α by std(r); the mixture-task presets therefore run `ddpo-kl`
with `advantage: center` (bench/configs/tasks/). Even so, the KL gradient is the per-step one at
the sampled states (DPOK, Flow-GRPO); the exact gradient of KL_path also has the score term
Σ_t ∇log π_t·Σ_{s>t} KL_s of the states' dependence on θ, so the fixed point is near p*, not at it
(ring8, α = 1: path KL 1.49 against KL* = 1.63). `kl_in_return=true` adds that term: step t's
advantage becomes r − α·Σ_{s>t} KL_s (the KL the path still incurs, recorded by the rollout
against the reference) minus per-prompt / per-step batch baselines, which makes the gradient at
ρ = 1 exactly that of E[r] − α·KL_path.

Deliberate deviations from the official code:
1. Sizes are per process. A one-process run uses ddpo-pytorch's whole-run sizes
   (samples_per_iteration = sample.batch_size × GPUs × num_batches_per_epoch, minibatch_size =
   train.batch_size × GPUs): the averaged gradient is the same. With `train.processes = N`
   (bench/core/distributed.py) every rank draws these sizes, rewards and prompts are gathered for the
   advantages as in ddpo-pytorch, and gradients are averaged at every optimizer step
   (methods.common.optimizer_step), with no DDP/LoRA wrapper to get wrong. Rewards are computed
   synchronously (no thread pool).
2. Training always recomputes log π with the sampler's CFG (ddpo-pytorch's `train.cfg = True`;
   `False` makes ρ ≠ 1 by construction and is not offered).
3. Old and new log-probs use the same arithmetic: the nats sum of bench.core.diffusion, divided by D for
   the "mean" convention (ddpo-pytorch takes the element mean inside the scheduler at both places).
   ρ is therefore 1 on the first accumulation group, exactly when the denoiser's row results do not
   depend on the batch layout (the zero-initialized mixture backbone) and to float32 round-off
   otherwise (a row's matmul result can depend on its position in the batch: |ρ − 1| ≲ 1e-5
   measured on the toy). `train/ratio_first` logs max |ρ − 1| there, and a warning is emitted above
   1e-3 (RATIO_WARN).
4. Harness switches, all off in the defaults: `advantage="center"` (reward units, for the α-calibrated
   KL variant), `kl_in_return` (the exact KL gradient; one more reference call per sampled step),
   `exclude_last_step` (DanceGRPO/Flow-GRPO train on steps 0..T−2), `log_prob_reduce="sum"` (the
   true density; its clip range means something else), `kl_reduce`.
5. DDPO+KL has no official code (the SQDF paper, arXiv:2512.04559, compares against a DDPO+KL
   baseline without specifying its form); the KL is the exact Gaussian KL of the two step means
   at each trained step against the frozen pretrained model; with the default reductions (mean,
   match) it is Flow-GRPO's per-element `kl_loss`.
6. Prompts are kept as strings for the per-prompt tracker (ddpo-pytorch decodes token ids, so
   prompts truncated at 77 tokens collide).
7. `timesteps_per_pass` (harness addition) evaluates several of a minibatch's trained timesteps in
   one forward/backward pass; every (sample, timestep) still weighs 1/(minibatch × accumulation ×
   trained timesteps), so the gradient is ddpo-pytorch's up to float summation order. Default 1
   (one backward per timestep, as ddpo-pytorch); the CPU presets use 0 (all at once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from bench.core.diffusion import draw_noise, rollout
from bench.core.registry import METHODS
from bench.core.method import AlignmentMethod, TrainContext
from methods.common import check_choice, check_range, optimizer_step, require, sample_prompts
from methods.policy_gradient import (
    RATIO_WARN,
    PerPromptStatTracker,
    batch_zscore,
    gather_rewards,
    kl_to_go,
    log_ratio_stats,
    mean_or_zero,
    ppo_clip_loss,
    recompute_transition,
    reduce_dims,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DDPOConfig:
    """DDPO hyperparameters (defaults: ddpo-pytorch `config/dgx.py::aesthetic` as one process)."""

    samples_per_iteration: int = 256
    "trajectories sampled per iteration (ddpo-pytorch: sample.batch_size × GPUs × num_batches_per_epoch)"
    sample_batch_size: int = 0
    "trajectories per rollout call, for memory (0 = all at once); does not change the numbers"
    minibatch_size: int = 32
    "samples per training minibatch (ddpo-pytorch: train.batch_size × GPUs)"
    gradient_accumulation_steps: int = 4
    "minibatches per optimizer step; each accumulates over all trained timesteps (samples × timesteps)"
    num_inner_epochs: int = 1
    "passes over each iteration's samples (each reshuffles samples and per-sample time order)"
    timesteps_per_pass: int = 1
    "trained timesteps per forward/backward pass: 1 (ddpo-pytorch), c > 1 batches c of a minibatch's timesteps, 0 = all; same gradient, fewer calls"
    clip_range: float = 1e-4
    "PPO clip ε on the ratio ρ (defined on the per-element mean log-prob with log_prob_reduce=mean)"
    adv_clip_max: float = 5.0
    "advantages are clipped to ±adv_clip_max (0 = off)"
    advantage: str = "per_prompt"
    "per_prompt (DDPO's per-prompt z-score with batch fallback), batch (batch z-score), or center (per-prompt mean subtracted, reward units)"
    stat_buffer_size: int = 32
    "per-prompt tracker: rewards kept per prompt (a deque persisting across iterations)"
    stat_min_count: int = 16
    "per-prompt tracker: below this many stored rewards the batch mean/std are used instead"
    timestep_fraction: float = 1.0
    "fraction of the (eligible) timesteps trained per sample, a random subset in shuffled order"
    exclude_last_step: bool = False
    "do not train the last denoising step (DanceGRPO/Flow-GRPO); off reproduces DDPO"
    log_prob_reduce: str = "mean"
    "log-prob over dims: mean (ddpo-pytorch; the clip range is defined on it) or sum (the true density)"
    kl_reduce: str = "match"
    "ddpo-kl: KL_t reduction: match (as log_prob_reduce: reward and KL weighed as in E[r] − α·KL), sum (nats), mean (nats / D)"
    kl_in_return: bool = False
    "ddpo-kl: also charge each step the KL still to come on its path, −α·Σ_{s>t} KL_s, in its advantage (the exact gradient of E[r] − α·KL_path; needs advantage=center)"
    lr: float = 3e-4
    "AdamW learning rate (ddpo-pytorch LoRA default)"
    adam_beta1: float = 0.9
    "AdamW β1"
    adam_beta2: float = 0.999
    "AdamW β2"
    weight_decay: float = 1e-4
    "AdamW weight decay"
    adam_eps: float = 1e-8
    "AdamW ε"
    grad_clip: float = 1.0
    "global gradient-norm clip per optimizer step (0 = off)"

    def __post_init__(self) -> None:
        for f in ("samples_per_iteration", "minibatch_size", "gradient_accumulation_steps", "num_inner_epochs",
                  "stat_buffer_size", "stat_min_count"):
            check_range(f"method.{f}", getattr(self, f), 1)
        check_range("method.sample_batch_size", self.sample_batch_size, 0)
        check_range("method.timesteps_per_pass", self.timesteps_per_pass, 0)
        check_range("method.clip_range", self.clip_range, 0.0, lo_open=True)
        check_range("method.adv_clip_max", self.adv_clip_max, 0.0)
        check_range("method.timestep_fraction", self.timestep_fraction, 0.0, 1.0, lo_open=True)
        check_choice("method.advantage", self.advantage, ("per_prompt", "batch", "center"))
        check_choice("method.log_prob_reduce", self.log_prob_reduce, ("mean", "sum"))
        check_choice("method.kl_reduce", self.kl_reduce, ("match", "sum", "mean"))
        check_range("method.lr", self.lr, 0.0, lo_open=True)
        check_range("method.adam_beta1", self.adam_beta1, 0.0, 1.0, hi_open=True)
        check_range("method.adam_beta2", self.adam_beta2, 0.0, 1.0, hi_open=True)
        check_range("method.weight_decay", self.weight_decay, 0.0)
        check_range("method.adam_eps", self.adam_eps, 0.0, lo_open=True)
        check_range("method.grad_clip", self.grad_clip, 0.0)
        require(self.stat_min_count <= self.stat_buffer_size,
                f"method.stat_min_count ({self.stat_min_count}) must be <= method.stat_buffer_size ({self.stat_buffer_size}), "
                "or the per-prompt statistics are never used")
        require(not self.kl_in_return or self.advantage == "center",
                "method.kl_in_return needs method.advantage=center (the path's KL is in reward units, not in z-scores)")
        group = self.minibatch_size * self.gradient_accumulation_steps
        require(
            self.samples_per_iteration % group == 0,
            f"method.samples_per_iteration ({self.samples_per_iteration}) must be a multiple of minibatch_size × "
            f"gradient_accumulation_steps ({self.minibatch_size} × {self.gradient_accumulation_steps} = {group})",
        )

    @classmethod
    def smoke(cls) -> "DDPOConfig":
        """A seconds-long CPU configuration (contract tests): 2 updates per iteration."""
        return cls(samples_per_iteration=8, minibatch_size=4, gradient_accumulation_steps=1, stat_buffer_size=16, stat_min_count=8)


# --------------------------------------------------------------------------------------------------
# DDPO
# --------------------------------------------------------------------------------------------------


@METHODS.register("ddpo", doc="DDPO-IS: PPO-clip on per-step log-ratios of fresh rollouts, per-prompt reward z-scores, inner epochs")
class DDPO(AlignmentMethod):
    name = "ddpo"
    paper = "Black, Janner, Du, Kostrikov, Levine. ICLR 2024, arXiv:2305.13301"
    version = 1
    Config = DDPOConfig
    needs_reward_grad = False
    uses_alpha = False
    use_kl: bool = False
    "whether the loss has α·KL_t (ddpo-kl)"

    def __init__(self, cfg: DDPOConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        s = ctx.sampler
        require(s.eta > 0, f"{self.name} needs sampler.eta > 0 (the policy π_θ(x_t'|x_t) must be Gaussian), got {s.eta}")
        self.grid = ctx.grid
        self.eligible = s.steps - 1 if cfg.exclude_last_step else s.steps
        require(self.eligible >= 1, f"{self.name}: method.exclude_last_step needs sampler.steps >= 2")
        self.n_train = max(1, int(self.eligible * cfg.timestep_fraction))
        stds = self.grid.stds(s.eta)[: self.eligible]
        require(bool((stds > 0).all()), f"{self.name}: a trained step has σ_t = 0 (ᾱ_final = 1?); set method.exclude_last_step=true")
        self.params = self.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        self.tracker = PerPromptStatTracker(cfg.stat_buffer_size, cfg.stat_min_count)
        self.dim = ctx.backbone.dim
        self.kl_mode = cfg.log_prob_reduce if cfg.kl_reduce == "match" else cfg.kl_reduce
        self.last_batch: dict[str, Any] | None = None  # the latest iteration's samples (for tests and debugging)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    # ---- sampling (no gradients) -------------------------------------------------------------------

    def _sample(self) -> dict[str, Any]:
        """Fresh trajectories of the current policy: latents, old log-probs, prompts, conditions, rewards."""
        ctx, bb, cfg, s = self.ctx, self.ctx.backbone, self.cfg, self.ctx.sampler
        n = cfg.samples_per_iteration
        chunk = cfg.sample_batch_size or n
        prompts = sample_prompts(ctx.prompts, n, self.generator)
        path_kl = self.use_kl and cfg.kl_in_return
        lat, lps, conds, rewards, kls = [], [], [], [], []
        with ctx.clock("sampling"):
            for start in range(0, n, chunk):
                ps = prompts[start : start + chunk]
                cond = bb.encode_prompts(ps)
                x_T, z = draw_noise(self.generator, len(ps), s.steps, bb.sample_shape)
                traj = rollout(bb.policy, self.grid, cond, x_T.to(self.device), z.to(self.device), eta=s.eta,
                               guidance=s.guidance, null_cond=bb.null_cond(cond), reference=bb.reference if path_kl else None)
                with torch.no_grad():
                    rewards.append(ctx.reward(bb.decode(traj.x0), ps).detach().float())
                lat.append(traj.latents)
                lps.append(traj.log_probs)
                conds.append(cond)
                if path_kl:
                    kls.append(traj.kl)
        data = {
            "prompts": prompts,
            "latents": torch.cat(lat),  # [N, T+1, ...]
            "log_probs": reduce_dims(torch.cat(lps), self.cfg.log_prob_reduce, self.dim),  # [N, T]
            "cond": torch.cat(conds),
            "rewards": torch.cat(rewards).to(self.device),  # [N]
        }
        if path_kl:
            data["kl"] = torch.cat(kls)  # [N, T] nats, KL_t of the sampled path
        return data

    def advantages(self, prompts: Sequence[str], rewards: Tensor) -> Tensor:
        """One advantage per trajectory [N] (before clipping).

        With several processes the statistics are those of every rank's samples (ddpo-pytorch
        gathers rewards and prompts, normalizes, and keeps the local slice), so every rank's
        tracker holds the same history.
        """
        cfg = self.cfg
        all_prompts, all_r, lo = gather_rewards(list(prompts), rewards)
        if cfg.advantage == "batch":
            a = batch_zscore(all_r)
        else:
            a = self.tracker.update(all_prompts, all_r, scale=cfg.advantage == "per_prompt")
        return a[lo : lo + rewards.shape[0]].to(rewards.device)

    # ---- one iteration ---------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        # 1. trajectories of the current policy π_old = π_θ, with log π_old(x_{t−1}|x_t) and the
        #    terminal reward r(x_0, c) (the MDP of DDPO §4.3; DDIM steps, DDIM Eqs. 12 and 16)
        data = self._sample()
        # 2. one advantage A per trajectory: r normalized per prompt (ddpo-pytorch's tracker)
        adv = self.advantages(data["prompts"], data["rewards"])  # [N]
        if "kl" in data:
            # 2b. (kl_in_return) step t's return also carries −α·Σ_{s>t} KL_s; its batch mean per
            #     step is a baseline (docs/methods/policy_gradient.md, "The KL still to come")
            future = kl_to_go(data["kl"])  # Σ_{s>t} KL_s, [N, T]
            adv = adv[:, None] - ctx.alpha * (future - future.mean(0, keepdim=True))  # [N, T]
        if cfg.adv_clip_max > 0:
            adv = adv.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        data["advantages"] = adv
        self.last_batch = data
        # 3.-5. inner epochs of PPO-clip on (sample, timestep) pairs (DDPO_IS, §4.3)
        info, ratio_first = self._update(data, adv)
        return self._stats(data, adv, info, ratio_first)

    def _update(self, data: dict[str, Any], adv: Tensor) -> tuple[dict[str, list[float]], float]:
        """`num_inner_epochs` passes over the iteration's samples, one optimizer step per
        accumulation group. Returns the logged diagnostics and max |ρ − 1| on the first group."""
        cfg, ctx = self.cfg, self.ctx
        n = cfg.samples_per_iteration
        mb, accum, n_t = cfg.minibatch_size, cfg.gradient_accumulation_steps, self.n_train
        chunk = cfg.timesteps_per_pass or n_t
        norm = mb * accum * n_t  # every (sample, timestep) of an accumulation group weighs 1 / norm
        info: dict[str, list[float]] = {k: [] for k in ("loss", "ratio", "clipfrac", "approx_kl", "kl", "grad_norm")}
        ratio_first = 0.0
        first_group = True
        with ctx.clock("update"):
            for _ in range(cfg.num_inner_epochs):
                # 3. shuffle the samples, then each sample's time order independently (ddpo-pytorch)
                perm = torch.randperm(n, generator=self.generator)
                tperm = torch.rand((n, self.eligible), generator=self.generator).argsort(1)[:, :n_t]
                for g in range(0, n, mb * accum):
                    for m in range(g, g + mb * accum, mb):
                        rows = perm[m : m + mb]
                        for j in range(0, n_t, chunk):
                            ratio = self._accumulate(data, adv, rows, tperm[m : m + mb, j : j + chunk], norm, info)
                            if first_group:
                                ratio_first = max(ratio_first, float((ratio - 1.0).abs().max()))
                    # 5. one AdamW step per accumulation group (gradients averaged over ranks, clipped)
                    info["grad_norm"].append(optimizer_step(self.optimizer, self.params, cfg.grad_clip))
                    if first_group and ratio_first > RATIO_WARN:
                        log.warning("%s: |ratio − 1| = %.3g on the first accumulation group (expected 0): sampling and "
                                    "training log-probs disagree (batching, dtype or CFG)", self.name, ratio_first)
                    first_group = False
        return info, ratio_first

    def _accumulate(self, data: dict[str, Any], adv: Tensor, rows: Tensor, steps: Tensor, norm: int,
                    info: dict[str, list[float]]) -> Tensor:
        """4. Backpropagate the clipped surrogate (+ α·KL_t for ddpo-kl) of the (sample, timestep)
        pairs rows × steps [mb, c], each weighted 1 / norm; returns their ratios ρ (detached)."""
        cfg, ctx = self.cfg, self.ctx
        c = steps.shape[1]
        r_idx = rows[:, None].expand(-1, c).reshape(-1).to(self.device)
        s_idx = steps.reshape(-1)
        d_idx = s_idx.to(self.device)
        x = data["latents"][r_idx, d_idx]
        x_next = data["latents"][r_idx, d_idx + 1]
        old = data["log_probs"][r_idx, d_idx]
        # 4a. log π_θ(x_{t−1}|x_t, c) with gradient through μ_θ, and log ρ_t = log π_θ − log π_old
        terms = recompute_transition(ctx.backbone, self.grid, ctx.sampler, x, x_next, s_idx,
                                     data["cond"][r_idx.to(data["cond"].device)], reference=self.use_kl)
        log_ratio = reduce_dims(terms.log_prob, cfg.log_prob_reduce, self.dim) - old
        a_items = adv[r_idx, d_idx] if adv.dim() == 2 else adv[r_idx]
        # 4b. PPO's clipped surrogate (arXiv:1707.06347, Eq. 7), DDPO_IS's trust region
        per_item = ppo_clip_loss(log_ratio, a_items, cfg.clip_range)
        if self.use_kl:
            # 4c. ddpo-kl: + α·KL_t(π_θ(·|x_t) ‖ π_ref(·|x_t)), reduced like the log-prob
            per_item = per_item + ctx.alpha * reduce_dims(terms.kl, self.kl_mode, self.dim)
            info["kl"].append(float(terms.kl.detach().mean()))
        (per_item.sum() / norm).backward()
        with torch.no_grad():
            return log_ratio_stats(info, log_ratio, per_item, cfg.clip_range)

    def _stats(self, data: dict[str, Any], adv: Tensor, info: dict[str, list[float]], ratio_first: float) -> dict[str, float]:
        r = data["rewards"]
        stats = {
            "train/reward": float(r.mean()),
            "train/reward_std": float(r.std(unbiased=False)),
            "train/advantage_abs": float(adv.abs().mean()),
            "train/loss": mean_or_zero(info["loss"]),
            "train/ratio_first": ratio_first,
            "train/ratio_mean": mean_or_zero(info["ratio"]),
            "train/clipfrac": mean_or_zero(info["clipfrac"]),
            "train/approx_kl": mean_or_zero(info["approx_kl"]),
            "train/grad_norm": mean_or_zero(info["grad_norm"]),
        }
        if self.use_kl:
            stats["train/kl_step"] = mean_or_zero(info["kl"])
            stats["train/kl_path_est"] = mean_or_zero(info["kl"]) * self.ctx.sampler.steps
        if "kl" in data:
            stats["train/kl_path"] = float(data["kl"].sum(1).mean())
        return stats

    def extra_state(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])


@METHODS.register("ddpo-kl", aliases=("ddpo+kl",), doc="DDPO + α·KL_t(π_θ‖π_ref) at every trained step (Gaussian KL of the step means, nats)")
class DDPOKL(DDPO):
    name = "ddpo-kl"
    paper = "Black, Janner, Du, Kostrikov, Levine. ICLR 2024, arXiv:2305.13301 (+ per-step KL, as Flow-GRPO arXiv:2505.05470)"
    version = 1
    uses_alpha = True
    use_kl = True
