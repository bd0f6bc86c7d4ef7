"""SQDF in the online black-box setting: SQDF updates driven by an optimistic proxy of a queried oracle.

Kang*, Lee*, Shin*, Om, Park. "Diffusion Fine-Tuning via Reparameterized Policy Gradient of the
Soft Q-Function". ICLR 2026, arXiv:2512.04559, §"online black-box optimization" (Table 1). Official
code: Shin-woocheol/SQDF @68861b2 (`BBO/online/sqdf_cm_buffer_main.py`, `BBO/online/sqdf_utils.py`,
`BBO/config/Bootstrap.py:aesthetic_sqdf_cm_buffer`, `BBO/aesthetic.sh`), a fork of SEIKO
(Uehara et al., ICML 2024, arXiv:2402.16359). The SQDF update is derived in
docs/methods/sqdf_soft_q.md, the optimistic proxy in docs/methods/seiko_optimism.md.

The outer loop is SEIKO's (methods/proxy.py: OnlineRounds): R rounds of oracle queries (1/2/4/8 of
the budget) on samples of the current model, a proxy refit on all labels so far, and an optimistic
reward r̂⁺ (max over bootstrap heads by default, or UCB). Inside each round the model takes
`updates_per_round` ordinary SQDF updates (methods/sqdf.py, reused unchanged: an `SQDF` instance
whose training reward is r̂⁺):

    L(θ) = E_{x_t∼D, z}[ −γ^{t−1} r̂⁺(f_ψ(x_{t−1})) + α KL(p_θ(·|x_t) ‖ p_pre(·|x_t)) ]

with the replay buffer D filled by fresh on-policy trajectories scored by r̂⁺ (never the oracle),
prioritized replay ∝ r̂⁺·γ^{n_k}, and the KL anchored to the PRETRAINED model in every round.
At each round's start the buffer is emptied (`buffer_init_per_loop`) and AdamW is rebuilt; the
fine-tuned weights carry over. After the last round's updates the method raises BudgetExhausted.

Notation (paper/code -> here):
    num_samples [1024, 2048, 4096, 8192]  -> proxy.query_schedule(queries_total, rounds, round_growth)
    num_epochs × 2 updates per loop        -> updates_per_round (40)
    reward_opt = max_heads proxy(CLIP(x))  -> OnlineRounds.reward (features: task.proxy_features)
    SQDF update (paper Eq. 16)             -> self.inner.train_step() (methods.sqdf.SQDF)
    buffer_init_per_loop                   -> reset_buffer
    α (script: 1), γ 0.9, PER              -> ctx.alpha (nats), gamma, buffer_sampling="prioritized"

Deliberate deviations from the official code:
1. The SQDF update itself carries methods/sqdf.py's deviations (KL in nats, so the script's α = 1
   is α_nats = 2/d; the PER priority shift for negative rewards, `priority_shift`; no reward mask).
2. Every update collects `rollouts_per_step` fresh trajectories; the code collects 32 instead of
   16 per GPU whenever `global_step % 20 == 0` (also in the middle of a round).
3. The proxy, schedule and budget follow methods/proxy.py (its deviations apply); the code's proxy
   uses the final-epoch weights, which is the default `proxy_select="last"`.
4. Single process: the code's two GPUs and shared-filesystem buffer are one in-memory buffer with
   the same per-update totals (64 transitions, 32 new trajectories).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from bench.core.registry import METHODS
from bench.core.method import AlignmentMethod, TrainContext
from methods.common import adamw, check_choice
from methods.proxy import OnlineConfig, OnlineRounds, check_online_fields, check_proxy_fields
from methods.sqdf import SQDF, ReplayBuffer, SQDFConfig
from bench.core.reward import CountingReward


@dataclass(frozen=True)
class SQDFOnlineConfig(OnlineConfig):
    """SQDF-online hyperparameters (defaults: SQDF's BBO script, `BBO/config/Bootstrap.py:aesthetic_sqdf_cm_buffer`)."""

    optimism: str = "bootstrap"
    "optimistic proxy: bootstrap (max over heads; the paper's SQDF-Bootstrap), ucb, or none"
    updates_per_round: int = 40
    "SQDF updates per round (the script: 20 epochs × 2)"
    reset_buffer: bool = True
    "empty the replay buffer at every round's start (buffer_init_per_loop)"
    reset_optimizer: bool = True
    "a fresh AdamW every round (the code)"
    gamma: float = 0.9
    "SQDF discount γ ∈ (0, 1]"
    x0_predictor: str = "consistency"
    "x̂0 of x_{t−1} for the soft-Q: consistency, tweedie, or ddim"
    ddim_steps: int = 2
    "steps of the deterministic DDIM predictor (x0_predictor=ddim)"
    batch_size: int = 64
    "transitions per SQDF update"
    rollouts_per_step: int = 32
    "new on-policy trajectories (scored by the proxy) per update"
    use_buffer: bool = True
    "replay buffer on"
    buffer_size: int = 1024
    "buffer capacity in trajectories"
    buffer_sampling: str = "prioritized"
    "prioritized ∝ r̂⁺·γ^{n_k} (the BBO script) or uniform"
    per_loss_discount: bool = True
    "prioritized draws keep the γ^{n_k} loss weight (the code's double discount)"
    priority_shift: str = "min"
    "priority reward: min (r − min r + 1e-6) or none (max(r, 0), the code)"
    reward_mask: bool = False
    "multiply each item's loss by 1[r > 0] (the T2I code's mask; off in BBO)"
    lr: float = 1e-3
    "AdamW learning rate"
    weight_decay: float = 0.1
    "AdamW weight decay"
    grad_clip: float = 5.0
    "global gradient-norm clip (0 = off)"

    def __post_init__(self) -> None:
        check_choice("method.optimism", self.optimism, ("bootstrap", "ucb", "none"))
        check_online_fields(self)
        check_proxy_fields(self)
        self.sqdf_config()  # validates the SQDF fields with SQDF's own checks

    def sqdf_config(self) -> SQDFConfig:
        """The inner SQDF's config: every SQDFConfig field this config has (others keep SQDF's defaults)."""
        return SQDFConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SQDFConfig) if hasattr(self, f.name)})

    @classmethod
    def smoke(cls) -> "SQDFOnlineConfig":
        """A seconds-long CPU configuration (tests): 2 rounds of 2 updates, Tweedie x̂0."""
        return cls(queries_total=48, rounds=2, query_batch=32, updates_per_round=2, proxy_hidden=(16, 8), proxy_dropout=(0.1, 0.0),
                   proxy_activation="silu", proxy_epochs=5, proxy_batch=16, proxy_standardize=True, x0_predictor="tweedie", batch_size=8, rollouts_per_step=8, buffer_size=32)


@METHODS.register("sqdf-online", doc="SQDF in the online black-box setting: oracle rounds 1/2/4/8, bootstrap/UCB proxy refit, SQDF updates on the optimistic proxy (KL to the pretrained model)")
class SQDFOnline(AlignmentMethod):
    name = "sqdf-online"
    paper = "Kang, Lee, Shin, Om, Park. ICLR 2026, arXiv:2512.04559 (online BBO; setting of Uehara et al., arXiv:2402.16359)"
    version = 1
    Config = SQDFOnlineConfig
    needs_reward_grad = False  # the oracle is only queried; gradients come from the proxy
    uses_alpha = True

    def __init__(self, cfg: SQDFOnlineConfig, ctx: TrainContext) -> None:
        super().__init__(cfg, ctx)
        self.online = OnlineRounds(self.name, cfg, ctx, cfg.optimism, self.generator)
        # the inner SQDF sees the optimistic proxy as its (differentiable) training reward; its
        # calls are counted apart from the oracle's, which the runner budgets
        self.proxy_reward = CountingReward(self.online.reward, ctx.clock)
        self.inner = SQDF(cfg.sqdf_config(), dataclasses.replace(ctx, reward=self.proxy_reward))
        self.inner.generator = self.generator  # one random stream for the whole method
        self.optimizer = self.inner.optimizer

    def _begin_round(self) -> None:
        cfg = self.cfg
        if cfg.reset_buffer:
            self.inner.buffer = ReplayBuffer(self.inner.cfg.buffer_size)
        if cfg.reset_optimizer:
            self.inner.optimizer = adamw(self.inner.params, self.inner.cfg.lr, self.inner.cfg.weight_decay)
            self.optimizer = self.inner.optimizer

    def train_step(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.online.due():
            # 1. a new round: query the oracle on the current model, refit the proxy and its
            #    optimism r̂⁺ (methods/proxy.py), empty the buffer and rebuild AdamW
            stats.update(self.online.start_round())
            self._begin_round()
        # 2. one SQDF update (paper Eq. 16) with r̂⁺ as the differentiable reward
        inner = self.inner.train_step()
        self.online.finish_update()
        inner["train/proxy_reward"] = inner.pop("train/reward")  # the fresh rollouts' r̂⁺, not the oracle
        stats.update(inner)
        stats["train/proxy_calls"] = float(self.proxy_reward.queries)
        return stats

    def extra_state(self) -> dict[str, Any]:
        return {"online": self.online.state_dict(), "inner": self.inner.extra_state(), "proxy_calls": self.proxy_reward.queries}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "online" in state:
            self.online.load_state_dict(state["online"])
            self.inner.load_extra_state(state["inner"])
            self.proxy_reward.queries = int(state["proxy_calls"])
