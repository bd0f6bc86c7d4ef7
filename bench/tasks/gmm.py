"""Gaussian-mixture tasks with exact ground truth (closed forms and design: docs/tasks/mixtures.md).

Each task is a mixture base p_pre, a reward and prompts. The backbone is, by default, the exact
mixture denoiser plus a zero-initialized residual MLP (mode A: the fine-tuned model can represent
the exact target, so every gap is the method's); `task.base=learned` swaps in an MLP denoiser
pretrained on base samples and fine-tuned end to end (mode B, closer to Stable Diffusion; its
base error is reported as a floor).

Sampling (docs/tasks/mixtures.md §4): DDIM η = 1, 1000-step linear β (1e-4 … 0.02), T = 50,
"leading" timesteps 981 … 1 with ᾱ_final = ᾱ_0 (as SD1.5, so every step, the last included, has
σ > 0 and the per-step KL is defined). Rewards are evaluated on the chain's final sample, which
lives at noise level ᾱ_0 (std 0.01); the exact targets are therefore computed for the base at that
level (`terminal`), which differs from the clean mixture by 1e-4 in variance.

Tasks:
* gmm-ring8   8 modes on a radius-4 circle, var 0.3; r = −x² − (y−1)²/10 (DAS GMM2). α ∈ {3, 1, 0.3}.
* gmm-grid25  25 modes on {−10, −5, 0, 5, 10}², var 0.3; prompts are label sets (rows, columns;
              the two diagonals held out); r = log p(c|x). α = 1 is the exact sub-mixture.
* gmm-sub64   d = 64; 6 modes on a radius-4 circle in a random plane U, cov U(0.3 I)Uᵀ + 1e-4 I;
              linear reward with equal in-plane and off-plane parts. Off-plane distance is exact
              unnaturalness.
* gmm-trap    ring8 base; trained on a hackable proxy (bump at the empty centre, or a learned MLP),
              judged by the gold ring reward. Online black-box setting: the `gold-oracle` reward is
              the gold reward plus N(0, σ²) label noise (σ = task.oracle_noise), queried under a budget.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from bench.core.cache import cached
from bench.core.diffusion import NoiseSchedule, ode_x0
from bench.core.errors import BenchError
from bench.core.gmm import GaussianMixture, GridTarget, Quadrature, QuadraticForm, TiltedMixture, grid, ring
from bench.tasks.nets import TimeMLP
from bench.core.registry import REWARDS, TASKS
from bench.core.task import Backbone, SamplerConfig, Task
from bench.core.reward import Reward
from rewards.gmm import BumpProxyReward, LearnedProxyReward, LinearReward, MixtureClassifierReward, QuadraticReward


@dataclass(frozen=True)
class GMMConfig:
    """Options of the Gaussian-mixture tasks (`--set task.<field>=...`)."""

    base: str = "analytic"
    "analytic: exact mixture ε + zero-initialized residual MLP (exact target); learned: MLP base pretrained on samples, fine-tuned end to end"
    hidden: int = 128
    "width of the residual MLP (and of the learned base)"
    layers: int = 2
    "hidden layers of the residual MLP (the learned base has layers + 1)"
    cm_steps: int = 20
    "Heun steps (2·n − 1 denoiser calls) of the reference probability-flow ODE that serves as SQDF's exact consistency model"
    init_seed: int = 0
    "seed of the residual's (random) hidden-layer initialization; its output layer starts at zero"
    learned_iterations: int = 4000
    "pretraining iterations of the learned base"
    learned_batch: int = 512
    "pretraining batch size of the learned base"
    learned_lr: float = 1e-3
    "pretraining learning rate of the learned base"
    learned_seed: int = 0
    "seed of the learned base's pretraining (the base is part of the task, not of the run)"
    oracle_noise: float = 0.1
    "std σ of the Gaussian label noise of gmm-trap's gold-oracle reward (the online black-box setting; SEIKO's 0.1)"

    def __post_init__(self) -> None:
        if self.base not in ("analytic", "learned"):
            raise BenchError(f"task.base must be 'analytic' or 'learned', got {self.base!r}")
        for f in ("hidden", "layers", "cm_steps", "learned_iterations", "learned_batch"):
            if getattr(self, f) < 1:
                raise BenchError(f"task.{f} must be >= 1, got {getattr(self, f)}")
        if not self.oracle_noise >= 0:
            raise BenchError(f"task.oracle_noise must be >= 0, got {self.oracle_noise}")


def toy_schedule() -> NoiseSchedule:
    return NoiseSchedule.make("linear", 1e-4, 0.02, 1000, set_alpha_to_one=False, steps_offset=1)


class GMMBackbone(Backbone):
    """Mixture denoiser: ε_ref = exact mixture ε (or a frozen learned MLP); ε_θ = ε_ref + residual
    (or a trainable copy of the learned MLP).

    The residual is √ᾱ_t·net(x, t, c) with a zero-initialized output layer. √ᾱ_t is how the exact
    optimal correction vanishes at high noise: the optimum is the Doob transform
    ε* − ε_ref = −√ᾱ/√(1−ᾱ) · (E*[x0|x_t] − E[x0|x_t]), whose posterior-mean difference stays O(1)
    as ᾱ → 0 (x_T carries no information about x0, so any deviation there is pure KL). Without the
    factor, an MLP shared across t spills corrections learned at mid noise into the first steps,
    and methods whose signal is sparse in t (one step per trajectory) pay KL for it. At low noise
    the factor is ≈ 1, so methods that act on the last steps (DRaFT-1) are not slowed down.
    """

    def __init__(
        self,
        mixture: GaussianMixture,
        schedule: NoiseSchedule,
        encode: Any,
        cond_dim: int,
        cfg: GMMConfig,
        learned: TimeMLP | None = None,
    ) -> None:
        super().__init__()
        self.mixture = mixture
        self.schedule = schedule
        self.sample_shape = (mixture.dim,)
        self._encode = encode
        self.cond_dim = cond_dim
        self.cm_steps = cfg.cm_steps
        self._alpha = schedule.alphas_cumprod.float()
        if learned is None:
            with torch.random.fork_rng():  # deterministic init (hidden layers), global RNG untouched
                torch.manual_seed(cfg.init_seed)
                self.residual = TimeMLP(mixture.dim, cond_dim, cfg.hidden, cfg.layers, zero_out=True)
            self.base_net = None
            self.policy_net = None
        else:
            self.residual = None
            self.base_net = learned.requires_grad_(False).eval()
            self.policy_net = copy.deepcopy(learned).requires_grad_(True).train()

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        return self._encode(prompts)

    def _ab(self, t: Tensor) -> Tensor:
        return self._alpha.to(t.device)[t]

    def reference_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.base_net is not None:
            return self.base_net(x, t, cond)
        return self.mixture.eps(x, self._ab(t))

    def policy_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.policy_net is not None:
            return self.policy_net(x, t, cond)
        a = self._ab(t)
        return self.mixture.eps(x, a) + a.sqrt()[:, None] * self.residual(x, t, cond)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        net = self.policy_net if self.policy_net is not None else self.residual
        return list(net.parameters())

    def consistency_x0(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The reference's probability-flow ODE endpoint from (x, t): an exact consistency model."""
        self.counter.add("consistency", x.shape[0] * (2 * self.cm_steps - 1))
        return ode_x0(self.reference_eps, self.schedule, x, t, cond, self.cm_steps, solver="heun")


def train_learned_base(mixture: GaussianMixture, schedule: NoiseSchedule, cfg: GMMConfig, cond_dim: int, task: str) -> TimeMLP:
    """Pretrain an MLP ε-network on fresh base samples (ε-prediction loss), cached on disk."""
    key = {"task": task, "mixture": _mixture_digest(mixture), "schedule": schedule.state(), "cond_dim": cond_dim,
           **{k: v for k, v in asdict(cfg).items() if k.startswith("learned") or k in ("hidden", "layers")}}

    def build() -> dict[str, Any]:
        g = torch.Generator().manual_seed(cfg.learned_seed)
        with torch.random.fork_rng():
            torch.manual_seed(cfg.learned_seed)
            net = TimeMLP(mixture.dim, cond_dim, cfg.hidden, cfg.layers + 1)
        if cond_dim:
            torch.nn.init.zeros_(net.body[0].weight[:, -cond_dim:])  # unconditional base, conditional copy
        opt = torch.optim.Adam(net.parameters(), lr=cfg.learned_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.learned_iterations)
        ac = schedule.alphas_cumprod.float()
        for _ in range(cfg.learned_iterations):
            x0, _ = mixture.sample(cfg.learned_batch, g)
            t = torch.randint(0, schedule.num_train_timesteps, (cfg.learned_batch,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = ac[t][:, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
            cond = torch.zeros(cfg.learned_batch, cond_dim)
            loss = ((net(xt, t, cond) - eps) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return {"state_dict": net.state_dict(), "final_loss": float(loss.detach())}

    art = cached("gmm-learned-base", key, build)
    net = TimeMLP(mixture.dim, cond_dim, cfg.hidden, cfg.layers + 1)
    net.load_state_dict(art["state_dict"])
    return net


def _mixture_digest(m: GaussianMixture) -> str:
    import hashlib

    blob = torch.cat([m.weights.flatten(), m.means.flatten(), m.covs.flatten()]).numpy().tobytes()
    return hashlib.sha256(blob).hexdigest()[:12]


class GMMTask(Task):
    """Shared machinery of the mixture tasks; subclasses define the mixture, rewards and prompts."""

    Config = GMMConfig
    modality = "vector"
    sampler_defaults = SamplerConfig(steps=50, eta=1.0, guidance=1.0)
    metrics = ("reward", "path_kl", "path_kl_sqdf", "objective", "gap", "mode_tv", "mode_recall",
               "log_p_pre", "off_manifold", "mmd")
    table_metrics = ("reward", "path_kl", "gap", "mode_tv", "mode_recall", "log_p_pre", "off_manifold", "mmd")

    def __init__(self, cfg: GMMConfig, device: str = "cpu") -> None:
        super().__init__(cfg, device)
        self.schedule = toy_schedule()
        self._targets: dict[tuple[str, float, str], Any] = {}

    # ---- to define ---------------------------------------------------------------------------------

    mixture: GaussianMixture  # the clean base

    @property
    def cond_dim(self) -> int:
        return 0

    def encode(self, prompts: Sequence[str]) -> Tensor:
        return torch.zeros(len(prompts), 0)

    @property
    def train_prompts(self) -> list[str]:
        return [""]

    # ---- shared ------------------------------------------------------------------------------------

    @cached_property
    def terminal(self) -> GaussianMixture:
        """The base at the chain's final noise level ᾱ_0: what the rewards actually see."""
        return self.mixture.noised(self.schedule.final_alpha_cumprod)

    def build_backbone(self) -> Backbone:
        learned = None
        if self.cfg.base == "learned":
            learned = train_learned_base(self.mixture, self.schedule, self.cfg, self.cond_dim, self.name)
        return GMMBackbone(self.mixture, self.schedule, self.encode, self.cond_dim, self.cfg, learned)

    def target(self, reward: str, alpha: float, prompt: str) -> Any:
        key = (reward, float(alpha), prompt)
        if key not in self._targets:
            self._targets[key] = self._make_target(reward, float(alpha), prompt)
        return self._targets[key]

    def _make_target(self, reward: str, alpha: float, prompt: str) -> Any:
        r = self.build_reward(reward)
        if isinstance(r, QuadraticReward):
            return self.terminal.tilt(r.form, alpha, level=self.schedule.final_alpha_cumprod)
        if self.terminal.dim == 2:
            return GridTarget(self.quadrature, lambda x: r(x, [prompt] * x.shape[0]), alpha)
        return None

    grid_bound: ClassVar[float] = 9.0
    grid_points: ClassVar[int] = 801

    @cached_property
    def quadrature(self) -> Quadrature:
        return Quadrature(self.terminal, self.grid_bound, self.grid_points)

    @cached_property
    def off_manifold_threshold(self) -> float:
        """The 0.1 % quantile of log p_pre under exact base samples (docs/tasks/mixtures.md §6)."""
        x, _ = self.terminal.sample(200_000, torch.Generator().manual_seed(12345))
        return float(torch.quantile(self.terminal.log_prob(x).float(), 0.001))

    def gold_reward(self) -> str | None:
        """Name of the gold reward when training on a proxy (trap task)."""
        return None

    def proxy_features(self, x: Tensor) -> Tensor:
        """Features [N, F] that the online methods' proxy reward is fitted on (methods/proxy.py),
        differentiable in the decoded samples x [N, d]. For points these are the raw coordinates:
        the proxy MLP is non-linear itself, and fixed random Fourier features would only add a
        bandwidth choice that decides in advance how the proxy extrapolates off the data."""
        return x.flatten(1)

    def plot_samples(self, samples: dict[str, Tensor], reward: str, alpha: float, path: Path, title: str) -> None:
        from bench.tasks.figures import plot_2d_samples

        prompts = list(samples)[:6]
        plot_2d_samples(
            {p: samples[p] for p in prompts},
            {p: self.target(reward, alpha, p) for p in prompts},
            self.terminal,
            path,
            title,
            bound=self.grid_bound,
        )


RING_REWARD = QuadraticForm(torch.diag(torch.tensor([2.0, 0.2])), torch.tensor([0.0, 1.0]), torch.zeros(2))


@TASKS.register("gmm-ring8", doc="8-mode ring, quadratic reward −x²−(y−1)²/10 (DAS GMM2); exact target")
class Ring8Task(GMMTask):
    name = "gmm-ring8"
    version = 1
    default_reward = "quadratic"
    default_alphas = (3.0, 1.0, 0.3)

    mixture = ring(8, 4.0, 0.3)

    rewards = ("quadratic",)

    def build_reward(self, name: str) -> Any:
        if name != "quadratic":
            raise BenchError(f"task {self.name} has no reward {name!r}; its rewards: quadratic")
        return QuadraticReward(RING_REWARD)


def _grid25_label_sets() -> tuple[dict[str, list[int]], list[str], list[str]]:
    # component k = 5 i + j sits at x = (i − 2)·5, y = (j − 2)·5 (bench.core.gmm.grid ordering)
    sets: dict[str, list[int]] = {}
    for j in range(5):
        sets[f"row {j}"] = [5 * i + j for i in range(5)]
    for i in range(5):
        sets[f"column {i}"] = [5 * i + j for j in range(5)]
    sets["diagonal"] = [5 * i + i for i in range(5)]
    sets["anti-diagonal"] = [5 * i + (4 - i) for i in range(5)]
    train = [f"row {j}" for j in range(5)] + [f"column {i}" for i in range(5)]
    heldout = ["diagonal", "anti-diagonal"]
    return sets, train, heldout


@TASKS.register("gmm-grid25", doc="25-mode grid, prompts = label sets (diagonals held out), reward log p(c|x)")
class Grid25Task(GMMTask):
    name = "gmm-grid25"
    # 2: at α = 1, mode TV / recall count samples by the base's 25 modes (v1 assigned every sample to
    # one of the label set's own modes, so off-set samples were not counted against p*)
    version = 2
    default_reward = "log-classifier"
    default_alphas = (1.0, 0.5)
    grid_bound = 13.0
    grid_points = 601

    mixture = grid(5, 5.0, 0.3)

    def __init__(self, cfg: GMMConfig, device: str = "cpu") -> None:
        super().__init__(cfg, device)
        self.label_sets, self._train, self._heldout = _grid25_label_sets()

    rewards = ("log-classifier",)

    @property
    def cond_dim(self) -> int:
        return 25

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """A prompt's condition is the multi-hot vector of its label set (so unseen sets, such as
        the diagonals, are new combinations of known components)."""
        out = torch.zeros(len(prompts), 25)
        for i, p in enumerate(prompts):
            if p not in self.label_sets:
                raise BenchError(f"gmm-grid25: unknown prompt {p!r}; known: {', '.join(self.label_sets)}")
            out[i, self.label_sets[p]] = 1.0
        return out

    @property
    def train_prompts(self) -> list[str]:
        return list(self._train)

    @property
    def eval_prompt_sets(self) -> dict[str, list[str]]:
        return {"train": list(self._train), "heldout": list(self._heldout)}

    def build_reward(self, name: str) -> Any:
        if name != "log-classifier":
            raise BenchError(f"task {self.name} has no reward {name!r}; its rewards: log-classifier")
        return MixtureClassifierReward(self.terminal, self.label_sets)

    def _make_target(self, reward: str, alpha: float, prompt: str) -> Any:
        r = self.build_reward(reward)
        ks = self.label_sets[prompt]
        if abs(alpha - 1.0) < 1e-12:
            # p* = p_pre(x | c) exactly: the sub-mixture of the prompt's components, Z = P(c)
            sub = GaussianMixture(self.terminal.weights[ks], self.terminal.means[ks], self.terminal.covs[ks])
            log_z = float(torch.log(self.terminal.weights[ks].sum()))
            x = sub.sample(50_000, torch.Generator().manual_seed(31))[0]
            e_r = float(r(x, [prompt] * x.shape[0]).double().mean())
            return TiltedMixture(sub, self.terminal, alpha, log_z, e_r, e_r - log_z, self.schedule.final_alpha_cumprod,
                                 components=torch.as_tensor(ks, dtype=torch.long))
        return GridTarget(self.quadrature, lambda x: r(x, [prompt] * x.shape[0]), alpha)


@TASKS.register("gmm-sub64", doc="64-D: 6 modes in a random plane, linear reward with an off-plane part; off-plane distance is exact unnaturalness")
class Sub64Task(GMMTask):
    name = "gmm-sub64"
    version = 1
    default_reward = "linear"
    default_alphas = (1.0, 0.3)
    metrics = GMMTask.metrics + ("off_plane",)
    table_metrics = ("reward", "path_kl", "gap", "mode_tv", "mode_recall", "off_plane", "off_manifold")

    DIM = 64

    def __init__(self, cfg: GMMConfig, device: str = "cpu") -> None:
        super().__init__(cfg, device)
        g = torch.Generator().manual_seed(64)
        q, _ = torch.linalg.qr(torch.randn(self.DIM, 3, generator=g, dtype=torch.float64))
        self.plane = q[:, :2]  # U [64, 2], orthonormal
        normal = q[:, 2]  # a unit vector orthogonal to the plane
        ang = torch.arange(6, dtype=torch.float64) * 2 * math.pi / 6
        means = 4.0 * torch.stack([torch.cos(ang), torch.sin(ang)], 1) @ self.plane.T
        cov = 0.3 * self.plane @ self.plane.T + 1e-4 * torch.eye(self.DIM, dtype=torch.float64)
        self.mixture = GaussianMixture(torch.ones(6), means, cov.expand(6, -1, -1).clone())
        b_par = self.plane @ torch.tensor([1.0, 0.0], dtype=torch.float64)
        self.b = 0.5 * b_par + 0.5 * normal
        self.form = QuadraticForm(torch.zeros(self.DIM, self.DIM), torch.zeros(self.DIM), self.b)

    rewards = ("linear",)

    def build_reward(self, name: str) -> Any:
        if name != "linear":
            raise BenchError(f"task {self.name} has no reward {name!r}; its rewards: linear")
        return LinearReward(self.form)

    def off_plane(self, x: Tensor) -> Tensor:
        """‖(I − UUᵀ) x‖: distance of each sample to the base's plane."""
        u = self.plane.to(x.dtype)
        return (x - (x @ u) @ u.T).norm(dim=-1)

    def plot_samples(self, samples: dict[str, Tensor], reward: str, alpha: float, path: Path, title: str) -> None:
        from bench.tasks.figures import plot_subspace_samples

        tgt = self.target(reward, alpha, "")
        ref = tgt.sample(4000, torch.Generator().manual_seed(0))
        plot_subspace_samples(samples[""], ref, self.plane, self.off_plane, path, title)


TRAP_CENTER = (0.0, 0.0)


def _label_noise(x: Tensor, salt: bytes) -> Tensor:
    """N(0, 1) per sample [N], a fixed function of the sample's float32 bytes: two 53-bit
    uniforms from the row's keyed blake2b digest, then Box–Muller. A query's noise is thus
    reproducible with no generator state to checkpoint (resume, evaluation and training see the
    same label for the same point), and distinct points get independent draws; repeating a query
    at exactly the same point repeats its label."""
    rows = x.detach().to("cpu", torch.float32).contiguous().flatten(1).numpy()
    bits = []
    for row in rows:
        h = hashlib.blake2b(row.tobytes(), digest_size=16, key=salt).digest()
        bits.append((int.from_bytes(h[:8], "little") >> 11, int.from_bytes(h[8:], "little") >> 11))
    u = torch.tensor(bits, dtype=torch.float64).reshape(-1, 2) / 2.0**53
    u[:, 0] += 0.5 / 2.0**53  # in (0, 1): the log below stays finite
    z = torch.sqrt(-2.0 * torch.log(u[:, 0])) * torch.cos(2.0 * math.pi * u[:, 1])
    return z.to(x.device, x.dtype)


@REWARDS.register("gold-oracle", modality="vector", doc="gmm-trap's black-box oracle: gold ring reward + N(0, σ²) label noise (not differentiable)")
class GoldOracleReward(Reward):
    """The online black-box setting's oracle (SEIKO, Uehara et al. 2024; SQDF's BBO): the gold
    reward plus Gaussian label noise, queried under a budget and never differentiated. Its
    expectation is the gold reward, so its KL-regularized target is the gold target."""

    name = "gold-oracle"
    version = 1
    differentiable = False

    def __init__(self, gold: QuadraticForm, noise: float) -> None:
        self.gold = gold
        self.noise = float(noise)

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            y = self.gold(x.detach())
            return y + self.noise * _label_noise(x, b"gold-oracle") if self.noise > 0 else y


@TASKS.register("gmm-trap", doc="ring8 base trained on a hackable proxy (bump or learned MLP), judged by the gold ring reward")
class TrapTask(Ring8Task):
    name = "gmm-trap"
    version = 1
    default_reward = "bump-proxy"
    default_alphas = (1.0, 0.3)
    metrics = GMMTask.metrics + ("gold_reward", "trap_occupancy")
    table_metrics = ("reward", "gold_reward", "path_kl", "gap", "mode_tv", "trap_occupancy", "off_manifold")
    bump_height = 3.0
    bump_width = 0.5

    rewards = ("bump-proxy", "learned-proxy", "quadratic", "gold-oracle")

    def gold_reward(self) -> str | None:
        return "quadratic"

    @cached_property
    def _learned_proxy(self) -> LearnedProxyReward:
        return LearnedProxyReward.fit(RING_REWARD, self.terminal, n=256, seed=0)

    def build_reward(self, name: str) -> Any:
        if name == "quadratic":
            return QuadraticReward(RING_REWARD)
        if name == "bump-proxy":
            return BumpProxyReward(RING_REWARD, TRAP_CENTER, self.bump_height, self.bump_width)
        if name == "learned-proxy":
            return self._learned_proxy
        if name == "gold-oracle":
            return GoldOracleReward(RING_REWARD, self.cfg.oracle_noise)
        raise BenchError(f"task {self.name} has no reward {name!r}; its rewards: {', '.join(self.rewards)}")

    def target(self, reward: str, alpha: float, prompt: str) -> Any:
        """The gold-oracle's target is the gold reward's (its label noise has mean zero)."""
        return super().target("quadratic" if reward == "gold-oracle" else reward, alpha, prompt)

    def trap_region(self, x: Tensor) -> Tensor:
        """Samples within 2 bump widths of the bump's centre (where the proxy, not the gold reward, is high)."""
        c = torch.tensor(TRAP_CENTER, dtype=x.dtype, device=x.device)
        return ((x - c) ** 2).sum(-1).sqrt() < 2 * self.bump_width
