"""Evaluation: the only place samples are drawn for metrics (methods never score themselves).

Every evaluation draws `n` samples per prompt from the model with fixed per-sample seeds (the same
for every method, seed and checkpoint: common random numbers), records each trajectory's path KL
to the frozen reference, and computes the task's registered metrics per prompt, averaged within
each prompt set ("train": plain keys, others: "key@set").

Reference rows put every number in context, computed by the same metric code:
* "p* (closed form)": the exact target's scalars (E*[r], KL*, α log Z, gap 0, ...);
* "p* sample (floor)": an exact draw from p*: the sampling floor of distribution metrics;
* "ε* sampler (floor)": the optimal denoiser run through the same T-step sampler: the
  discretization floor of the path metrics (KL, gap);
* "base": the pretrained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from bench.core.diffusion import noise_from_seeds, rollout
from bench.core.registry import METRICS
from bench.core.task import Backbone, SamplerConfig, Task

EVAL_SEED = 1_000_000  # per-sample eval seeds: EVAL_SEED + 100_000 · (crc32(prompt) mod 10⁴) + sample index


@dataclass
class PromptSamples:
    """Samples of one prompt: decoded x [n, ...] and, for model samples, the path KL [n] (nats)."""

    prompt: str
    x: Tensor
    path_kl: Tensor | None = None
    source: str = "model"
    dim: int | None = None  # dimension of the sampled (latent) space, where the KL lives
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # per-sample values shared by metrics

    def memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]


@dataclass
class EvalContext:
    """What metrics may use besides the samples: task, training reward, α, targets, caches."""

    task: Task
    reward_name: str
    alpha: float
    cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reward = self.task.build_reward(self.reward_name)
        gold = self.task.gold_reward() if hasattr(self.task, "gold_reward") else None
        self.gold_name = gold
        self.gold = self.task.build_reward(gold) if gold else None

    def target(self, prompt: str) -> Any | None:
        return self.task.target(self.reward_name, self.alpha, prompt)

    def memo(self, key: Any, fn: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def memo_x(self, tag: str, s: PromptSamples, fn: Callable[[], Any]) -> Any:
        """Memoize a quantity of one samples object (stored on it, so it lives exactly as long as the
        samples: an id()-keyed cache would hand a later evaluation a freed tensor's numbers)."""
        return s.memo(tag, fn)

    def rewards(self, s: PromptSamples) -> Tensor:
        return self.memo_x("r", s, lambda: _score(self.reward, s))

    def gold_rewards(self, s: PromptSamples) -> Tensor:
        return self.memo_x("gold", s, lambda: _score(self.gold, s))

    def target_samples(self, prompt: str, n: int = 2000) -> Tensor:
        """A fixed exact draw from p* (for MMD); independent of the floor row's draw."""
        return self.memo(("p*", prompt, n), lambda: self.target(prompt).sample(n, torch.Generator().manual_seed(777)))


@torch.no_grad()
def _score(reward: Any, s: PromptSamples) -> Tensor:
    return reward(s.x, [s.prompt] * s.x.shape[0]).double().cpu()


def eval_seeds(prompt: str, n: int) -> list[int]:
    """The fixed per-sample seeds of a prompt's evaluation samples (the same in every run)."""
    import zlib

    base = EVAL_SEED + 100_000 * (zlib.crc32(prompt.encode()) % 10_000)
    return [base + i for i in range(n)]


@torch.no_grad()
def sample_model(
    backbone: Backbone,
    prompts: Sequence[str],
    n: int,
    sampler: SamplerConfig,
    *,
    with_kl: bool = True,
    chunk: int = 8192,
    policy: Callable | None = None,
    source: str = "model",
) -> dict[str, PromptSamples]:
    """n samples per prompt with the fixed evaluation seeds, with per-trajectory path KL."""
    grid = backbone.schedule.grid(sampler.steps)
    out: dict[str, PromptSamples] = {}
    all_prompts = sorted(set(prompts), key=list(prompts).index)
    jobs = [(p, i) for p in all_prompts for i in eval_seeds(p, n)]
    xs: dict[str, list[Tensor]] = {p: [] for p in all_prompts}
    kls: dict[str, list[Tensor]] = {p: [] for p in all_prompts}
    pol = policy or backbone.policy
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        ps = [p for p, _ in part]
        x_T, z = noise_from_seeds([s for _, s in part], sampler.steps, backbone.sample_shape)
        cond = backbone.encode_prompts(ps)
        traj = rollout(
            pol, grid, cond, x_T, z, eta=sampler.eta, guidance=sampler.guidance,
            null_cond=backbone.null_cond(cond), reference=backbone.reference if with_kl else None, keep_latents=False,
        )
        x0 = backbone.decode(traj.x0)
        for k, p in enumerate(ps):
            xs[p].append(x0[k : k + 1])
            if with_kl:
                kls[p].append(traj.path_kl[k : k + 1])
    for p in all_prompts:
        out[p] = PromptSamples(p, torch.cat(xs[p]), torch.cat(kls[p]).double() if with_kl else None, source, backbone.dim)
    return out


def compute_metrics(samples: dict[str, PromptSamples], ctx: EvalContext, names: Sequence[str] | None = None) -> dict[str, float]:
    """Every metric of the task, averaged over the prompts of each eval prompt set."""
    names = list(names or ctx.task.metrics)
    out: dict[str, float] = {}
    for set_name, prompts in ctx.task.eval_prompt_sets.items():
        suffix = "" if set_name == "train" else f"@{set_name}"
        for m in names:
            fn = METRICS.get(m)
            vals = [fn(samples[p], ctx) for p in prompts if p in samples]
            vals = [v for v in vals if v is not None and not math.isnan(v)]
            out[m + suffix] = float(sum(vals) / len(vals)) if vals else float("nan")
    return out


def closed_form_row(ctx: EvalContext, names: Sequence[str] | None = None) -> dict[str, float]:
    """The exact target's value of each metric that has one (NaN elsewhere)."""
    names = list(names or ctx.task.metrics)
    out: dict[str, float] = {}
    for set_name, prompts in ctx.task.eval_prompt_sets.items():
        suffix = "" if set_name == "train" else f"@{set_name}"
        for m in names:
            cf = METRICS.entry(m).meta.get("closed_form")
            vals = []
            for p in prompts:
                if cf is None or ctx.target(p) is None:
                    continue
                v = cf(ctx, p)
                if v is not None:
                    vals.append(v)
            out[m + suffix] = float(sum(vals) / len(vals)) if vals else float("nan")
    return out


def target_samples(ctx: EvalContext, n: int, seed: int = 4242) -> dict[str, PromptSamples] | None:
    """An exact draw from p* for every eval prompt (None if the task has no exact target)."""
    out = {}
    for j, p in enumerate(_all_eval_prompts(ctx.task)):
        t = ctx.target(p)
        if t is None:
            return None
        out[p] = PromptSamples(p, t.sample(n, torch.Generator().manual_seed(seed + j)), None, "exact")
    return out


def oracle_samples(ctx: EvalContext, backbone: Backbone, n: int, sampler: SamplerConfig) -> dict[str, PromptSamples] | None:
    """The optimal denoiser ε* through the same sampler (None where no ε* is known)."""
    ac = backbone.schedule.alphas_cumprod.float()
    out: dict[str, PromptSamples] = {}
    for p in _all_eval_prompts(ctx.task):
        t = ctx.target(p)
        if t is None or getattr(t, "oracle_eps", None) is None:
            return None

        def policy(x: Tensor, ts: Tensor, cond: Tensor, _t: Any = t) -> Tensor:
            return _t.oracle_eps(x, ac[ts])

        out.update(sample_model(backbone, [p], n, sampler, policy=policy, source="oracle"))
    return out


def _all_eval_prompts(task: Task) -> list[str]:
    seen: list[str] = []
    for ps in task.eval_prompt_sets.values():
        for p in ps:
            if p not in seen:
                seen.append(p)
    return seen


def all_eval_prompts(task: Task) -> list[str]:
    return _all_eval_prompts(task)
