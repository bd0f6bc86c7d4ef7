"""The `digits` task: text-to-image fine-tuning in miniature, on CPU in minutes (design: docs/tasks/digits.md).

Data: scikit-learn's 8×8 digits (1797 images shipped inside the package, no download), scaled to
[−1, 1] and split once by a fixed permutation into 1200 train digits (base model, target rewards)
and 597 held-out digits (judges only).

Base: a class-conditional ε-MLP (64 pixels + 32 sinusoidal time features + a 32-D prompt
embedding -> 3 × 512 SiLU -> 64, ≈ 0.62 M parameters) trained on the train split with a null
prompt 10 % of the time, so classifier-free guidance works. It is trained locally on first use
and cached on disk keyed by the hash of its config (`bench prepare digits`, about a minute of
2-core CPU for the default config).

Prompts: "digit k"; k = 0..7 are the training prompts, 8 and 9 are held out (evaluated as
"@heldout"; the base knows them, fine-tuning never samples them).

Rewards (rewards/digits.py; both differentiable, fitted on the train split): `classifier`
log p_φ(k | x) (HPS / ImageReward analogue) and `aesthetic` ψ(x), a regressor of the standardized
stroke mass (LAION-aesthetic analogue) whose exact attribute is kept as the gold score.

Reference p*(x) ∝ p_pre(x) e^{r(x)/α} (docs/tasks/digits.md, ground truth):
sampling-importance-resampling of `sir_samples` base samples per prompt, drawn with the task's
default sampler, with weights w = e^{r/α}. log Ẑ = log mean w, E*[r] = Σ w̃ r, KL(p*‖p_pre) =
E*[r]/α − log Ẑ (the path KL of the optimal path measure equals this terminal KL), ESS = 1 / Σ w̃².
log Ẑ is biased low by Jensen, so the estimated gap α log Ẑ − J can come out slightly negative;
references with ESS < `sir_min_ess` are flagged unreliable in the report.

Backbone: ε_ref is the frozen pretrained network; ε_θ is an exact copy of it (all 0.62 M
parameters trainable), so ε_θ ≡ ε_ref bit for bit at initialization and every KL starts at 0.
`decode` maps the 64-vector to images [N, 1, 8, 8] in [0, 1] (ink = 1), clamped as Stable
Diffusion's decoded images are. SQDF's consistency model f_ψ is the reference's probability-flow
ODE solved with `cm_steps` Heun steps (as on the mixture tasks, but with the learned ε_ref).

Sampling follows the mixture tasks' convention (docs/tasks/mixtures.md §4): DDIM η = 1, 1000-step
linear β (1e-4 … 0.02), "leading" timesteps with offset 1 and ᾱ_final = ᾱ_0, here T = 20 steps
by default (CPU budget).

NOTATION (docs/tasks/digits.md -> code):
    x (64 pixels in [−1, 1])  -> latents [B, 64]; decoded images [B, 1, 8, 8] in [0, 1]
    c, the prompt "digit k"   -> one-hot condition [B, 11] (index 10 = the null prompt ∅)
    ε_ref, ε_θ                -> DigitsBackbone.reference_net, .policy_net (EpsNet)
    p_pre, p*                 -> base samples of the default sampler; SIRTarget
    w, w̃, Ẑ                   -> exp(log_w), SIRTarget.weights, exp(SIRTarget.log_z)

DELIBERATE DEVIATIONS from the design (docs/tasks/digits.md):
1. The trainable policy is a full copy of the base rather than a zero-initialized adapter: the
   network is small enough that full fine-tuning costs nothing extra on CPU, it has no rank
   hyperparameter that would interact with each method's learning rate, and it lets methods
   over-optimize within a few hundred iterations, which is what the task is for.
2. T = 20 sampling steps (the design's T = 50) to fit all methods × 3 seeds × 2 rewards into
   30 minutes on 2 cores; `--set sampler.steps=50` restores it, but the SIR reference is defined
   for the task's default sampler (it is cached per sampler, so a run with another sampler is
   compared against the default-sampler target).
3. The SIR pool is 8192 base samples per prompt (the design's 20 000) to bound the one-time cost and
   the cache size (10.5 MB in float16); the ESS is reported with every reference.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from bench.core import progress as prog
from bench.core.cache import cache_folder, cache_path, cached
from bench.core.io import atomic_torch_save, save_figure
from bench.core.diffusion import NoiseSchedule, draw_noise, ode_x0, rollout
from bench.core.errors import BenchError
from bench.tasks.nets import TimeMLP
from bench.core.registry import TASKS
from bench.core.task import Backbone, SamplerConfig, Task
from rewards.digits import (
    DIGIT_PROMPTS,
    DigitClassifierReward,
    FitSettings,
    StrokeMassReward,
    build_mlp,
    fit_classifier,
    fit_regressor,
    gray,
    prompt_classes,
)

log = logging.getLogger(__name__)

N_DIGITS = 1797  # sklearn.datasets.load_digits
NULL_TOKEN = 10  # index of the null prompt ∅ in the one-hot condition
POOL_SEED = 7_000_000  # seeds of the SIR base-sample pool (disjoint from the evaluation seeds)
GRID_KEEP = 8  # samples per prompt kept at every evaluation for the per-checkpoint grids


@dataclass(frozen=True)
class DigitsConfig:
    """Options of the digits task (`--set task.<field>=...`); every cached artifact is keyed by
    the fields it depends on, so changing one rebuilds exactly what it affects."""

    hidden: int = 512
    "width of the ε-MLP's hidden layers (256 gives the ≈0.16 M-parameter smoke-test variant)"
    layers: int = 3
    "hidden layers of the ε-MLP"
    time_dim: int = 32
    "sinusoidal timestep features fed to the ε-MLP"
    embed_dim: int = 32
    "width of the learned prompt embedding (10 digits + the null prompt)"
    null_prob: float = 0.1
    "probability of training the base on the null prompt (enables classifier-free guidance)"
    base_iterations: int = 6000
    "pretraining iterations of the base (ε-prediction loss, cosine learning rate)"
    base_batch: int = 256
    "pretraining batch size of the base"
    base_lr: float = 1e-3
    "pretraining learning rate of the base (Adam)"
    base_seed: int = 0
    "seed of the base's initialization and pretraining batches (the base is part of the task)"
    split_seed: int = 0
    "seed of the fixed permutation that splits the 1797 digits into train and held-out"
    n_train: int = 1200
    "digits in the train split (base, rewards); the rest are held out for the judges"
    reward_hidden: int = 128
    "width of the reward MLPs φ (classifier) and ψ (aesthetic regressor)"
    reward_iterations: int = 1500
    "training iterations of each reward MLP"
    reward_lr: float = 1e-3
    "learning rate of the reward MLPs (AdamW)"
    reward_seed: int = 0
    "seed of the reward MLPs' initialization and batches"
    judge_pca_dim: int = 16
    "PCA dimensions of the held-out features (density model and Fréchet distances)"
    judge_gmm_components: int = 10
    "Gaussian-mixture components of the held-out density model"
    judge_styles: int = 8
    "k-means style clusters per class (style recall)"
    cm_steps: int = 8
    "Heun steps of the reference PF-ODE serving as SQDF's consistency model f_ψ (2n − 1 denoiser calls)"
    sir_samples: int = 8192
    "base samples per prompt behind the SIR reference p*"
    sir_min_ess: int = 500
    "references with a smaller effective sample size are flagged unreliable"

    def __post_init__(self) -> None:
        for f in ("hidden", "layers", "time_dim", "embed_dim", "base_iterations", "base_batch", "reward_hidden",
                  "reward_iterations", "judge_pca_dim", "judge_gmm_components", "judge_styles", "cm_steps", "sir_samples"):
            if getattr(self, f) < 1:
                raise BenchError(f"task.{f} must be >= 1, got {getattr(self, f)}")
        if self.time_dim % 2:
            raise BenchError(f"task.time_dim must be even (sine and cosine pairs), got {self.time_dim}")
        if not 0.0 <= self.null_prob < 1.0:
            raise BenchError(f"task.null_prob must be in [0, 1), got {self.null_prob}")
        if not 100 <= self.n_train <= 1500:
            raise BenchError(f"task.n_train must be in [100, 1500] (the held-out judges need ≥ 297 digits), got {self.n_train}")
        if self.base_lr <= 0 or self.reward_lr <= 0:
            raise BenchError("task.base_lr and task.reward_lr must be > 0")
        if not 2 <= self.judge_pca_dim <= 64:
            raise BenchError(f"task.judge_pca_dim must be in [2, 64], got {self.judge_pca_dim}")
        if self.sir_min_ess < 0:
            raise BenchError(f"task.sir_min_ess must be >= 0, got {self.sir_min_ess}")


def digits_schedule() -> NoiseSchedule:
    """The mixture tasks' schedule (docs/tasks/mixtures.md §4): linear β 1e-4 … 0.02 over 1000 steps,
    leading, offset 1, ᾱ_final = ᾱ_0."""
    return NoiseSchedule.make("linear", 1e-4, 0.02, 1000, set_alpha_to_one=False, steps_offset=1)


# ---- data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsData:
    """The fixed split. x_*: pixels [N, 64] in [−1, 1]; y_*: classes [N]."""

    x_train: Tensor
    y_train: Tensor
    x_heldout: Tensor
    y_heldout: Tensor
    digest: str  # sha of the raw dataset, part of every cache key

    @staticmethod
    def load(split_seed: int, n_train: int) -> "DigitsData":
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = torch.as_tensor(d.data, dtype=torch.float32)  # 0 … 16
        if raw.shape != (N_DIGITS, 64):
            raise BenchError(f"scikit-learn's digits have shape {tuple(raw.shape)}, expected ({N_DIGITS}, 64)")
        x = raw / 8.0 - 1.0
        y = torch.as_tensor(d.target, dtype=torch.long)
        perm = torch.randperm(N_DIGITS, generator=torch.Generator().manual_seed(split_seed))
        tr, ho = perm[:n_train], perm[n_train:]
        digest = hashlib.sha256(raw.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:12]
        return DigitsData(x[tr], y[tr], x[ho], y[ho], digest)

    @staticmethod
    def to_images(x: Tensor) -> Tensor:
        """Pixels [N, 64] in [−1, 1] -> images [N, 1, 8, 8] in [0, 1] (the backbone's decode)."""
        return ((x + 1) / 2).clamp(0, 1).reshape(-1, 1, 8, 8)


# ---- the network and its pretraining ---------------------------------------------------------------


class EpsNet(nn.Module):
    """ε(x [B, 64], t [B], c [B, 11] one-hot) -> [B, 64]: a learned prompt embedding + TimeMLP."""

    def __init__(self, cfg: DigitsConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(11, cfg.embed_dim, bias=False)
        self.mlp = TimeMLP(64, cfg.embed_dim, cfg.hidden, cfg.layers, time_dim=cfg.time_dim)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.mlp(x, t, self.embed(cond.to(x.dtype)))


def build_net(cfg: DigitsConfig) -> EpsNet:
    """A freshly initialized ε-MLP (seeded by base_seed; the caller's global RNG is untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.base_seed)
        return EpsNet(cfg)


def one_hot(classes: Tensor) -> Tensor:
    """[B] classes in 0..10 -> [B, 11] float conditions."""
    return nn.functional.one_hot(classes, 11).float()


def train_base(cfg: DigitsConfig, data: DigitsData, schedule: NoiseSchedule, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Pretrain the class-conditional ε-MLP on the train split (ε-prediction, null prompt w.p. null_prob)."""
    net = build_net(cfg)
    g = torch.Generator().manual_seed(cfg.base_seed + 1)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.base_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.base_iterations)
    ac = schedule.alphas_cumprod.float()
    n, B = data.x_train.shape[0], cfg.base_batch
    loss = torch.zeros(())
    for _ in range(cfg.base_iterations):
        idx = torch.randint(n, (B,), generator=g)
        x0, y = data.x_train[idx], data.y_train[idx].clone()
        y[torch.rand(B, generator=g) < cfg.null_prob] = NULL_TOKEN
        t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t][:, None]
        loss = ((net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, one_hot(y)) - eps) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(1)
    return {"state_dict": net.state_dict(), "final_loss": float(loss.detach())}


# ---- backbone --------------------------------------------------------------------------------------


class DigitsBackbone(Backbone):
    """ε_ref: the frozen pretrained ε-MLP; ε_θ: an exact, fully trainable copy of it."""

    def __init__(self, net: EpsNet, schedule: NoiseSchedule, cm_steps: int) -> None:
        super().__init__()
        self.schedule = schedule
        self.sample_shape = (64,)
        self.cm_steps = cm_steps
        self.reference_net = net.requires_grad_(False).eval()
        self.policy_net = copy.deepcopy(net).requires_grad_(True).train()

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        return one_hot(prompt_classes(prompts))

    def null_cond(self, cond: Tensor) -> Tensor | None:
        return one_hot(torch.full((cond.shape[0],), NULL_TOKEN, dtype=torch.long, device=cond.device)).to(cond.dtype)

    def reference_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.reference_net(x, t, cond)

    def policy_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.policy_net(x, t, cond)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.policy_net.parameters())

    def decode(self, x0: Tensor) -> Tensor:
        """[B, 64] in ≈[−1, 1] -> images [B, 1, 8, 8] in [0, 1] (clamped; ink = 1)."""
        return DigitsData.to_images(x0)

    def consistency_x0(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The reference's PF-ODE endpoint from (x, t) by `cm_steps` Heun steps (SQDF's f_ψ)."""
        self.counter.add("consistency", x.shape[0] * (2 * self.cm_steps - 1))
        return ode_x0(self.reference_eps, self.schedule, x, t, cond, self.cm_steps, solver="heun")


# ---- the SIR reference -----------------------------------------------------------------------------


@dataclass
class SIRTarget:
    """p*(x) ∝ p_pre(x) e^{r(x)/α} for one prompt, by importance resampling of base samples.

    Attributes:
        pool: base samples (the proposal p_pre), decoded images [N, 1, 8, 8].
        rewards: r of each pool sample [N] (float64).
        alpha: α in nats.
        min_ess: below this effective sample size the reference is flagged unreliable.
    """

    pool: Tensor
    rewards: Tensor
    alpha: float
    min_ess: float

    oracle_eps = None  # no optimal denoiser is known (the evaluation then skips that row)

    def __post_init__(self) -> None:
        log_w = self.rewards.double() / self.alpha
        self.weights = torch.softmax(log_w, dim=0)  # w̃, self-normalized
        self.log_z = float(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))  # log mean w
        self.expected_reward = float((self.weights * self.rewards.double()).sum())
        self.kl = self.expected_reward / self.alpha - self.log_z  # KL(p* ‖ p_pre), nats
        self.ess = float(1.0 / (self.weights**2).sum())

    @property
    def reliable(self) -> bool:
        return self.ess >= self.min_ess

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n draws from p* (multinomial resampling with replacement): images [n, 1, 8, 8]."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.pool[idx]

    def expect(self, fn: Callable[[Tensor], Tensor]) -> float:
        """E_{p*}[fn(x)] = Σ w̃ fn(pool) for a per-sample function fn(images [N, ...]) -> [N]."""
        return float((self.weights * fn(self.pool).double()).sum())


# ---- the task --------------------------------------------------------------------------------------


@TASKS.register("digits", doc="8×8 digits (scikit-learn): class-conditional diffusion base, learned classifier/aesthetic rewards, held-out judges, SIR reference")
class DigitsTask(Task):
    name = "digits"
    version = 1
    Config = DigitsConfig
    modality = "image"
    default_reward = "classifier"
    default_alpha = 0.5
    "α of a run that names none: the aesthetic SIR reference keeps ESS ≥ 1000 of 8192 per prompt down to α = 0.5"
    default_alphas = (1.0, 0.5)
    rewards = ("classifier", "aesthetic")
    metrics = ("reward", "path_kl", "objective", "gap", "judge_acc", "judge_acc_knn", "gold_mass", "log_density", "nn_ratio",
               "pairwise_dist", "vendi", "style_recall", "mem_ratio", "fd_pstar", "fd_real", "ess")
    table_metrics = ("reward", "path_kl", "gap", "judge_acc", "judge_acc@heldout", "gold_mass", "nn_ratio", "vendi", "style_recall",
                     "fd_pstar", "ess")
    reward_curve_metrics: tuple[str, ...] = ("judge_acc", "gold_mass", "nn_ratio", "log_density", "vendi", "style_recall", "fd_pstar")
    "held-out metrics the report plots against the training reward over training (Fig. 3 of the SQDF paper)"
    sampler_defaults = SamplerConfig(steps=20, eta=1.0, guidance=1.0)

    def __init__(self, cfg: DigitsConfig, device: str = "cpu") -> None:
        super().__init__(cfg, device)
        self.schedule = digits_schedule()
        self.progress: bool | None = None  # None: progress bars only on a terminal
        self._rewards: dict[str, Any] = {}
        self._targets: dict[tuple[str, float, str], SIRTarget] = {}
        self._pool_rewards: dict[tuple[str, str], Tensor] = {}

    # ---- prompts -------------------------------------------------------------------------------------

    @property
    def train_prompts(self) -> list[str]:
        return list(DIGIT_PROMPTS[:8])

    @property
    def eval_prompt_sets(self) -> dict[str, list[str]]:
        return {"train": list(DIGIT_PROMPTS[:8]), "heldout": list(DIGIT_PROMPTS[8:])}

    # ---- cached artifacts ----------------------------------------------------------------------------

    @cached_property
    def data(self) -> DigitsData:
        return DigitsData.load(self.cfg.split_seed, self.cfg.n_train)

    def _data_key(self) -> dict[str, Any]:
        return {"dataset": self.data.digest, "split_seed": self.cfg.split_seed, "n_train": self.cfg.n_train}

    def base_key(self) -> dict[str, Any]:
        c = self.cfg
        return {"format": 1, "data": self._data_key(), "schedule": self.schedule.state(),
                "net": {"hidden": c.hidden, "layers": c.layers, "time_dim": c.time_dim, "embed_dim": c.embed_dim},
                "train": {"iterations": c.base_iterations, "batch": c.base_batch, "lr": c.base_lr, "seed": c.base_seed, "null_prob": c.null_prob}}

    def _reward_key(self, which: str) -> dict[str, Any]:
        c = self.cfg
        return {"format": 1, "reward": which, "data": self._data_key(),
                "fit": {"hidden": c.reward_hidden, "iterations": c.reward_iterations, "lr": c.reward_lr, "seed": c.reward_seed}}

    def _judges_key(self) -> dict[str, Any]:
        c = self.cfg
        return {"format": 2, "data": self._data_key(), "pca_dim": c.judge_pca_dim, "gmm": c.judge_gmm_components, "styles": c.judge_styles}

    def _pool_key(self) -> dict[str, Any]:
        s = self.sampler_defaults
        return {"format": 1, "base": self.base_key(), "sampler": {"steps": s.steps, "eta": s.eta, "guidance": s.guidance},
                "n": self.cfg.sir_samples, "seed": POOL_SEED, "prompts": list(DIGIT_PROMPTS)}

    @cached_property
    def base_net(self) -> EpsNet:
        """The pretrained ε-MLP (trained and cached on first use)."""
        c = self.cfg

        def build() -> dict[str, Any]:
            with prog.ticks("digits: training the base ε-MLP", c.base_iterations, self.progress, mininterval=0.5) as step:
                return train_base(c, self.data, self.schedule, step)

        def load(art: dict[str, Any]) -> EpsNet:
            net = build_net(c)
            net.load_state_dict(art["state_dict"])
            return net

        return _load_cached("digits-base", self.base_key(), build, load)

    def build_backbone(self) -> Backbone:
        return DigitsBackbone(copy.deepcopy(self.base_net), self.schedule, self.cfg.cm_steps)

    def _fit_settings(self) -> FitSettings:
        c = self.cfg
        return FitSettings(hidden=c.reward_hidden, iterations=c.reward_iterations, lr=c.reward_lr, seed=c.reward_seed)

    def build_reward(self, name: str) -> Any:
        if name not in self.rewards:
            raise BenchError(f"task {self.name} has no reward {name!r}; its rewards: {', '.join(self.rewards)}")
        if name not in self._rewards:
            self._rewards[name] = self._load_reward(name)
        return self._rewards[name]

    def _load_reward(self, name: str) -> Any:
        s = self._fit_settings()
        x = gray(DigitsData.to_images(self.data.x_train))
        if name == "classifier":

            def build() -> dict[str, Any]:
                with prog.ticks("digits: fitting the classifier reward φ", s.iterations, self.progress, mininterval=0.5) as step:
                    net, last = fit_classifier(x, self.data.y_train, s, step)
                return {"state_dict": net.state_dict(), "final_loss": last}

            def load(art: dict[str, Any]) -> DigitClassifierReward:
                net = build_mlp(s.hidden, 10, s.seed)
                net.load_state_dict(art["state_dict"])
                return DigitClassifierReward(net)

            return _load_cached("digits-classifier", self._reward_key(name), build, load)

        mass = x.mean(1)
        mean, std = float(mass.mean()), float(mass.std())

        def build_aes() -> dict[str, Any]:
            with prog.ticks("digits: fitting the aesthetic reward ψ", s.iterations, self.progress, mininterval=0.5) as step:
                net, last = fit_regressor(x, (mass - mean) / std, s, step)
            return {"state_dict": net.state_dict(), "final_loss": last, "mean": mean, "std": std}

        def load_aes(art: dict[str, Any]) -> StrokeMassReward:
            net = build_mlp(s.hidden, 1, s.seed)
            net.load_state_dict(art["state_dict"])
            return StrokeMassReward(net, float(art["mean"]), float(art["std"]))

        return _load_cached("digits-aesthetic", self._reward_key(name), build_aes, load_aes)

    @cached_property
    def judges(self) -> Any:
        """Held-out judges, `metrics.digits.HeldOutJudges` (fitted on the held-out split only)."""
        from metrics.digits import HeldOutJudges  # (imported here: metrics import bench.core.evaluation, which imports the tasks)

        c, d = self.cfg, self.data

        def build() -> dict[str, Any]:
            j = HeldOutJudges.fit(gray(d.to_images(d.x_heldout)), d.y_heldout, gray(d.to_images(d.x_train)), seed=0,
                                  pca_dim=c.judge_pca_dim, gmm_components=c.judge_gmm_components, styles=c.judge_styles)
            return j.state()

        return _load_cached("digits-judges", self._judges_key(), build, HeldOutJudges.from_state)

    @cached_property
    def pools(self) -> dict[str, Tensor]:
        """The SIR proposal: `sir_samples` base samples per prompt (default sampler), images [N, 1, 8, 8]."""
        c, s = self.cfg, self.sampler_defaults

        def build() -> dict[str, Any]:
            bb = DigitsBackbone(copy.deepcopy(self.base_net), self.schedule, c.cm_steps)
            grid = self.schedule.grid(s.steps)
            out: dict[str, Tensor] = {}
            chunk = 2048
            with prog.ticks("digits: sampling the SIR reference pool", len(DIGIT_PROMPTS) * c.sir_samples, self.progress, mininterval=0.5) as step:
                for k, p in enumerate(DIGIT_PROMPTS):
                    g = torch.Generator().manual_seed(POOL_SEED + k)
                    parts = []
                    for start in range(0, c.sir_samples, chunk):
                        m = min(chunk, c.sir_samples - start)
                        x_T, z = draw_noise(g, m, s.steps, bb.sample_shape)
                        cond = bb.encode_prompts([p] * m)
                        traj = rollout(bb.reference, grid, cond, x_T, z, eta=s.eta, guidance=s.guidance,
                                       null_cond=bb.null_cond(cond), keep_latents=False)
                        parts.append(bb.decode(traj.x0).half())
                        step(m)
                    out[p] = torch.cat(parts)
            return {"pools": out}

        def load(art: dict[str, Any]) -> dict[str, Tensor]:
            pools = {p: art["pools"][p].float() for p in DIGIT_PROMPTS}
            for p, v in pools.items():
                if v.shape != (c.sir_samples, 1, 8, 8):
                    raise ValueError(f"pool of {p!r} has shape {tuple(v.shape)}")
            return pools

        return _load_cached("digits-sir-pool", self._pool_key(), build, load)

    def target(self, reward: str, alpha: float, prompt: str) -> SIRTarget:
        key = (reward, float(alpha), prompt)
        if key not in self._targets:
            rk = (reward, prompt)
            if rk not in self._pool_rewards:
                r = self.build_reward(reward)
                pool = self.pools[prompt]  # outside no_grad: the first access may train the cached base model
                with torch.no_grad():
                    self._pool_rewards[rk] = r(pool, [prompt] * self.cfg.sir_samples).double()
            self._targets[key] = SIRTarget(self.pools[prompt], self._pool_rewards[rk], float(alpha), float(self.cfg.sir_min_ess))
        return self._targets[key]

    def prepare(self, progress: bool | None = True) -> dict[str, Any]:
        """Train (or load) every cached piece: base, both rewards, the judges and the SIR pool.

        Returns a summary: cache files and quality checks of each piece on real digits.
        """
        self.progress = progress
        d = self.data
        self.base_net
        cls = self.build_reward("classifier")
        aes = self.build_reward("aesthetic")
        j = self.judges
        self.pools
        ho = d.to_images(d.x_heldout)
        tr = d.to_images(d.x_train)
        with torch.no_grad():
            cls_acc = float((cls.logits(ho).argmax(1) == d.y_heldout).double().mean())
            res = aes(ho, ["digit 0"] * ho.shape[0]) - aes.gold(ho)
        base_acc = {}
        for set_name, prompts in self.eval_prompt_sets.items():  # the pool's first 256 samples per prompt
            hits = [j.lr_predict(gray(self.pools[p][:256])) == prompt_classes([p])[0] for p in prompts]
            base_acc[set_name] = float(torch.cat(hits).double().mean())
        return {
            "base samples: held-out judge accuracy (train prompts)": base_acc["train"],
            "base samples: held-out judge accuracy (held-out prompts)": base_acc["heldout"],
            "cache": {k: str(cache_path(k, key)) for k, key in (("digits-base", self.base_key()), ("digits-classifier", self._reward_key("classifier")),
                                                                   ("digits-aesthetic", self._reward_key("aesthetic")), ("digits-judges", self._judges_key()),
                                                                   ("digits-sir-pool", self._pool_key()))},
            "classifier reward φ: accuracy on held-out real digits": cls_acc,
            "aesthetic reward ψ: RMSE on held-out real digits (standard units)": float(res.pow(2).mean().sqrt()),
            "held-out judge (logistic): accuracy on train real digits": float((j.lr_predict(gray(tr)) == d.y_train).double().mean()),
            "held-out judge (5-NN): accuracy on train real digits": float((j.knn_predict(gray(tr)) == d.y_train).double().mean()),
        }

    def proxy_features(self, images: Tensor) -> Tensor:
        """Features [N, 64] the online methods' proxy reward is fitted on (methods/proxy.py): the
        gray pixels, differentiable in the images [N, 1, 8, 8] (the proxy MLP is non-linear itself)."""
        return gray(images).float()

    # ---- reporting hooks -----------------------------------------------------------------------------

    def on_evaluation(self, iteration: int, samples: dict[str, Any], run_dir: Path) -> None:
        """Keep the first GRID_KEEP samples of every prompt at every evaluation (eval_grids.pt), for
        the per-checkpoint rows of the sample figure."""
        path = Path(run_dir) / "eval_grids.pt"
        grids: dict[int, dict[str, Tensor]] = {}
        if path.exists():
            try:
                grids = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # a torn or foreign file: start over (only figures depend on it)
                log.warning("%s is unreadable (%s); starting a new one", path, type(e).__name__)
        grids = {int(k): v for k, v in grids.items() if int(k) < iteration}
        grids[iteration] = {p: s.x[:GRID_KEEP].detach().cpu().half() for p, s in samples.items()}
        atomic_torch_save(grids, path)

    def plot_samples(self, samples: dict[str, Tensor], reward: str, alpha: float, path: Path, title: str) -> None:
        """Final samples (rows: prompts) and, when recorded, the same seeds at every evaluation."""
        grids: dict[int, dict[str, Tensor]] = {}
        gpath = Path(path).parent / "eval_grids.pt"
        if gpath.exists():
            try:
                grids = {int(k): v for k, v in torch.load(gpath, map_location="cpu", weights_only=True).items()}
            except Exception:
                grids = {}
        plot_digit_samples(samples, grids, Path(path), title)

    def reference_note(self, reward: str, alpha: float) -> str:
        """One paragraph for the report: how p* was estimated, its ESS, and where it is unreliable."""
        s = self.sampler_defaults
        ess = {p: self.target(reward, alpha, p).ess for p in DIGIT_PROMPTS}
        low = [p for p, e in ess.items() if e < self.cfg.sir_min_ess]
        lo_p = min(ess, key=ess.get)
        text = (f"On `digits` the p* rows are estimates, not closed forms: sampling-importance-resampling of {self.cfg.sir_samples} "
                f"base samples per prompt (sampler T={s.steps}, η={s.eta:g}, w={s.guidance:g}) with weights e^(r/α); "
                f"'p* (closed form)' holds the importance-weighted expectations and log Ẑ, 'p* sample (floor)' a resampled draw "
                f"(with repeats) from the same pool. ESS per prompt: min {ess[lo_p]:.0f} ({lo_p}), "
                f"median {sorted(ess.values())[len(ess) // 2]:.0f} of {self.cfg.sir_samples}.")
        if low:
            text += (f" **Unreliable reference (ESS < {self.cfg.sir_min_ess})** for {', '.join(low)}: "
                     "treat its gap, KL and FD(p*) values as rough.")
        return text


# ---- helpers ---------------------------------------------------------------------------------------


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that parallel runs build a missing artifact once. The holder
    removes the lock file before releasing it (also on an error or Ctrl-C); a waiter that then gets
    the lock on the removed file tries again on the path's current one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (at worst the artifact is built twice)
        yield
        return
    while True:
        fh = open(path, "a")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)  # Ctrl-C while waiting: the file closes below, nothing held
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:  # the holder before us removed it on release: lock the new one
                same = False
            if same:
                break
        except BaseException:
            fh.close()
            raise
        fh.close()
    try:
        yield
    finally:  # on success, error or Ctrl-C alike: remove the lock file, then release it (no stale .lock files)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _load_cached(kind: str, key: dict[str, Any], build: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], Any]) -> Any:
    """cached() under a lock, then `load`; an entry that unpickles but does not load (a foreign or
    damaged file) is removed and rebuilt once, so the caller never sees an error deep inside torch."""
    cache_folder(kind)  # a cache folder that cannot be created fails here, in one line, before any build
    path = cache_path(kind, key)
    with _file_lock(path.with_name(path.name + ".lock")):
        art = cached(kind, key, build)
        try:
            return load(art)
        except Exception as e:
            log.warning("cache file %s does not load (%s: %s); rebuilding it", path, type(e).__name__, e)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            art = cached(kind, key, build)
            try:
                return load(art)
            except Exception as e2:
                raise BenchError(f"digits: the rebuilt cache entry {path} does not load ({type(e2).__name__}: {e2})") from None


def plot_digit_samples(samples: dict[str, Tensor], grids: dict[int, dict[str, Tensor]], path: Path, title: str, per_prompt: int = 24, per_checkpoint: int = 3) -> None:
    """Top: `per_prompt` final samples per prompt (one row per prompt). Bottom (when grids hold
    more than one evaluation): the first `per_checkpoint` samples of every prompt at every
    evaluation, one row per checkpoint; the evaluation seeds are fixed, so a column follows one
    noise draw through training."""
    import matplotlib.pyplot as plt


    prompts = list(samples)
    top = _mosaic([[samples[p][i] for i in range(min(per_prompt, samples[p].shape[0]))] for p in prompts])
    rows = sorted(grids) if len(grids) > 1 else []
    heights = [len(prompts)] + ([len(rows)] if rows else [])
    fig, axes = plt.subplots(len(heights), 1, figsize=(0.42 * max(per_prompt, per_checkpoint * len(prompts)) + 1.2, 0.45 * sum(heights) + 1.4),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    ax = axes[0][0]
    ax.imshow(top, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * 9 for i in range(len(prompts))], prompts, fontsize=7)
    ax.set_xticks([])
    ax.set_title("final samples (fixed evaluation seeds)", fontsize=8)
    if rows:
        cells = [[g[p][i].float() for p in prompts for i in range(min(per_checkpoint, g[p].shape[0])) if p in g] for g in (grids[r] for r in rows)]
        ax2 = axes[1][0]
        ax2.imshow(_mosaic(cells), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax2.set_yticks([(i + 0.5) * 9 for i in range(len(rows))], [f"it {r}" for r in rows], fontsize=7)
        ax2.set_xticks([(j * per_checkpoint + per_checkpoint / 2) * 9 for j in range(len(prompts))], [p.split()[-1] for p in prompts], fontsize=7)
        ax2.set_title(f"the first {per_checkpoint} samples of each prompt at every evaluation (columns: digit)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _mosaic(rows: list[list[Tensor]]) -> Any:
    """Images [1, 8, 8] arranged in rows, with a 1-pixel gap (NaN, drawn blank)."""
    import numpy as np

    n_cols = max((len(r) for r in rows), default=1)
    out = np.full((9 * len(rows), 9 * n_cols), np.nan)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            out[9 * i : 9 * i + 8, 9 * j : 9 * j + 8] = img.float().reshape(8, 8).numpy()
    return out
