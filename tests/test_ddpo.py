"""DDPO, DDPO+KL and PPO+KL (DPOK) against independent computations on a tiny mixture backbone.

* the first PPO update's gradient is the REINFORCE gradient Σ_t ∇log π_θ(x_{t+1}|x_t)·A, computed
  here from the DDIM formulas and torch.distributions (ratio exactly 1, nothing clipped);
* ratio_first is 0 for both methods (sampling and training log-probs agree bit for bit);
* at initialization (policy ≡ reference) the KL terms and their gradients are exactly 0;
* gradient accumulation 1×8 equals 8×1, and batching timesteps in one pass equals one per pass;
* the per-prompt stat tracker (fallback, per-prompt z-scores, zero std, deque length);
* the clipped surrogates' gradients vanish on the right side of the band;
* configs, presets and paper YAMLs validate.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.core.clock import PhaseClock
from bench.app.config import CONFIG_DIR, load_yaml, resolve
from bench.core.errors import BenchError
from bench.core.registry import METHODS
from bench.core.task import SamplerConfig
from bench.tasks.gmm import GMMConfig, Ring8Task
from bench.core.method import TrainContext
from methods.ddpo import DDPOConfig
from methods.dpok import PPOKLConfig, TransitionBuffer
from methods.policy_gradient import PerPromptStatTracker, ppo_clip_loss, ratio_clamp_loss, recompute_transition
from bench.core.reward import CountingReward

T = 6
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # float32 reductions in different orders (atol relative to the largest entry)
RATIO_ROUND_OFF = 5e-5  # |ρ − 1| from float32 batch-layout round-off (measured <= 1.3e-5), see below
ACCUM_RTOL, ACCUM_ATOL = 1e-5, 2e-6  # 1×8 vs 8×1: max |Δgrad| measured 7e-7 on gradients of size ~0.3


@pytest.fixture(scope="module")
def ring() -> Ring8Task:
    return Ring8Task(GMMConfig(hidden=32, layers=2))


@pytest.fixture(scope="module")
def ring_learned(tmp_path_factory: pytest.TempPathFactory) -> Ring8Task:
    import os

    os.environ.setdefault("BENCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return Ring8Task(GMMConfig(base="learned", hidden=32, layers=1, learned_iterations=50, learned_batch=128))


def make(method: str, task: Any, cfg: Any, *, seed: int = 0, alpha: float = 1.0, perturb: bool = False) -> Any:
    """A method on a fresh backbone; `perturb` moves the policy off the reference (random output layer)."""
    with torch.random.fork_rng():  # the residual MLP's hidden layers are drawn from the global RNG
        torch.manual_seed(0)
        bb = task.build_backbone()
    if perturb:
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in bb.residual.out.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    clock = PhaseClock()
    ctx = TrainContext(bb, CountingReward(task.build_reward(task.default_reward), clock), list(task.train_prompts),
                       alpha, SamplerConfig(steps=T), seed, clock, task)
    return METHODS.get(method)(cfg, ctx)


def capture_grads(m: Any) -> list[list[torch.Tensor]]:
    """Record the (post-clip) gradients at every optimizer step of method m."""
    seen: list[list[torch.Tensor]] = []
    step = m.optimizer.step

    def wrapped(*a: Any, **k: Any) -> Any:
        seen.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in m.params])
        return step(*a, **k)

    m.optimizer.step = wrapped
    return seen


def one_update(**kw: Any) -> DDPOConfig:
    """8 samples, all in one accumulation group: exactly one optimizer step per iteration."""
    base = dict(samples_per_iteration=8, minibatch_size=8, gradient_accumulation_steps=1, grad_clip=0.0, lr=1e-3)
    return DDPOConfig(**{**base, **kw})


# ---- PPO = REINFORCE at the first update ----------------------------------------------------------


def reinforce_grad(m: Any) -> list[torch.Tensor]:
    """∇θ of −(1/(B·T)) Σ_b Σ_i A_b log π_θ(x_{i+1} | x_i), from the DDIM formulas and Normal.log_prob."""
    bb, data, s = m.ctx.backbone, m.last_batch, m.ctx.sampler
    grid = bb.schedule.grid(s.steps)
    lat, adv = data["latents"], data["advantages"]
    cond = bb.encode_prompts(data["prompts"])
    B = lat.shape[0]
    total = torch.zeros(())
    for i in range(s.steps):
        a, ap = grid.alpha_bars[i].float(), grid.prev_alpha_bars[i].float()  # the model's precision
        sigma = s.eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
        x = lat[:, i]
        eps = bb.policy(x, grid.timesteps[i].expand(B), cond)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        mean = ap.sqrt() * x0 + (1 - ap - sigma**2).sqrt() * eps
        lp = torch.distributions.Normal(mean, sigma).log_prob(lat[:, i + 1]).flatten(1)
        lp = lp.mean(1) if m.cfg.log_prob_reduce == "mean" else lp.sum(1)
        total = total + (adv * lp).sum()
    loss = -total / (B * s.steps)
    grads = torch.autograd.grad(loss, m.params)
    return [g.detach() for g in grads]


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("per_pass", [1, 0])
def test_first_ppo_update_is_reinforce(ring: Ring8Task, reduce: str, per_pass: int) -> None:
    m = make("ddpo", ring, one_update(log_prob_reduce=reduce, timesteps_per_pass=per_pass, clip_range=1e-4), perturb=True)
    seen = capture_grads(m)
    start = [p.detach().clone() for p in m.params]
    stats = m.train_step()
    assert len(seen) == 1
    # float32 batch-layout round-off only (see test_ratio_first_is_one_up_to_float32_round_off), inside ε = 1e-4
    assert stats["train/ratio_first"] <= RATIO_ROUND_OFF and stats["train/clipfrac"] == 0.0
    with torch.no_grad():  # evaluate the independent gradient at the parameters of the update
        for p, p0 in zip(m.params, start):
            p.copy_(p0)
    want = reinforce_grad(m)
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 1e-3, "the test needs a non-trivial gradient"
    for got, w in zip(seen[0], want):
        torch.testing.assert_close(got, w, rtol=GRAD_RTOL, atol=GRAD_ATOL * scale)


def test_ratio_first_is_exactly_one_at_init(ring: Ring8Task) -> None:
    """Zero-initialized residual: every row's ε̂ is layout-independent, so ρ = 1 bit for bit."""
    d = make("ddpo", ring, DDPOConfig(samples_per_iteration=16, minibatch_size=4, gradient_accumulation_steps=2))
    assert d.train_step()["train/ratio_first"] == 0.0
    p = make("ppo-kl", ring, PPOKLConfig.smoke())
    assert p.train_step()["train/ratio_first"] == 0.0


def test_ratio_first_is_one_up_to_float32_round_off(ring: Ring8Task) -> None:
    """A trained policy: a matmul row can depend on its position in the batch (1 ulp of ε̂), which
    the small σ of the last step amplifies; measured |ρ − 1| <= 1.3e-5 (mean-reduced log-probs).
    A real sampling/training mismatch (CFG, σ, timestep) is orders of magnitude larger."""
    d = make("ddpo", ring, DDPOConfig(samples_per_iteration=16, minibatch_size=4, gradient_accumulation_steps=2), perturb=True)
    for _ in range(3):
        st = d.train_step()
        assert st["train/ratio_first"] <= RATIO_ROUND_OFF
        assert abs(st["train/ratio_mean"] - 1.0) > 1e-7  # the second group is off-policy: ρ is measured, not assumed
    p = make("ppo-kl", ring, PPOKLConfig.smoke(), perturb=True)
    for _ in range(3):
        assert p.train_step()["train/ratio_first"] <= RATIO_ROUND_OFF


def path_terms(m: Any, lat: torch.Tensor, cond: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per step i: log π_θ(x_{i+1}|x_i) [B] (the method's reduction) and KL(π_θ ‖ π_ref)(x_i) [B] in nats,
    from the DDIM formulas (the model's float32 coefficients)."""
    bb, s = m.ctx.backbone, m.ctx.sampler
    grid = bb.schedule.grid(s.steps)
    lps, kls = [], []
    for i in range(s.steps):
        a, ap = grid.alpha_bars[i].float(), grid.prev_alpha_bars[i].float()
        sigma = s.eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
        x, t = lat[:, i], grid.timesteps[i].expand(lat.shape[0])

        def mean_of(eps: torch.Tensor) -> torch.Tensor:
            return ap.sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt() + (1 - ap - sigma**2).sqrt() * eps

        mu, mu_ref = mean_of(bb.policy(x, t, cond)), mean_of(bb.reference(x, t, cond).detach())
        lp = torch.distributions.Normal(mu, sigma).log_prob(lat[:, i + 1]).flatten(1)
        lps.append(lp.mean(1) if m.cfg.log_prob_reduce == "mean" else lp.sum(1))
        kls.append(torch.distributions.kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(mu_ref, sigma)).flatten(1).sum(1))
    return lps, kls


def test_kl_in_return_gives_the_exact_path_kl_gradient(ring: Ring8Task) -> None:
    """ddpo-kl with kl_in_return: the first update's gradient is that of E[r] − α·KL_path by the score
    function, −(1/(B·T·D)) Σ_{b,i} [(r_b − r̄ − α(F_{b,i} − F̄_i)) ∇log π_{b,i} − α ∇KL_{b,i}] with
    F_{b,i} = Σ_{s>i} KL_{b,s}, all recomputed here; and the switch changes the gradient."""
    alpha = 3.0
    cfg = one_update(advantage="center", adv_clip_max=0.0, kl_in_return=True)
    m = make("ddpo-kl", ring, cfg, alpha=alpha, perturb=True)
    seen = capture_grads(m)
    start = [p.detach().clone() for p in m.params]
    st = m.train_step()
    assert st["train/kl_path"] > 0
    with torch.no_grad():
        for p, p0 in zip(m.params, start):
            p.copy_(p0)
    data, T_ = m.last_batch, m.ctx.sampler.steps
    lat, r = data["latents"], data["rewards"].double()
    lps, kls = path_terms(m, lat, m.ctx.backbone.encode_prompts(data["prompts"]))
    kl = torch.stack([k.detach() for k in kls], 1).double()  # [B, T]
    torch.testing.assert_close(kl, data["kl"].double(), rtol=1e-3, atol=1e-5)  # float32, σ of the last step ≈ 0.01
    future = kl.flip(1).cumsum(1).flip(1) - kl
    adv = (r - r.mean())[:, None] - alpha * (future - future.mean(0))  # first iteration: batch fallback of the tracker
    D = m.ctx.backbone.dim
    loss = sum(-(adv[:, i].float() * lps[i]).sum() + alpha * kls[i].sum() / D for i in range(T_)) / (lat.shape[0] * T_)
    want = torch.autograd.grad(loss, m.params)
    scale = max(float(w.abs().max()) for w in want)
    for got, w in zip(seen[0], want):
        torch.testing.assert_close(got, w, rtol=GRAD_RTOL, atol=GRAD_ATOL * scale)
    plain = make("ddpo-kl", ring, dataclasses.replace(cfg, kl_in_return=False), alpha=alpha, perturb=True)
    g_plain = capture_grads(plain)
    plain.train_step()
    assert not all(torch.allclose(a, b) for a, b in zip(g_plain[0], seen[0]))


def test_ppo_kl_kl_in_return_buffers_the_path_returns(ring: Ring8Task) -> None:
    alpha, w = 2.0, 4.0
    cfg = dataclasses.replace(PPOKLConfig.smoke(), kl_in_return=True, reward_weight=w, buffer_size=64, rollouts_per_step=8)
    m = make("ppo-kl", ring, cfg, alpha=alpha, perturb=True)
    r = m._collect()  # fills the buffer with 8 trajectories × T transitions, step-major
    buf, n = m.buffer, 8
    x = buf.x[: n * T].reshape(T, n, -1).transpose(0, 1)
    lat = torch.cat([x, buf.x_next[(T - 1) * n : T * n][:, None]], 1)  # [n, T+1, d]
    _, kls = path_terms(m, lat, m.ctx.backbone.encode_prompts(buf.prompts[:n]))
    kl = torch.stack([k.detach() for k in kls], 1)
    future = kl.flip(1).cumsum(1).flip(1) - kl
    want = (r[:, None] - (alpha / w) * future).transpose(0, 1).reshape(-1)
    torch.testing.assert_close(buf.rewards[: n * T], want, rtol=1e-4, atol=1e-5)
    assert float(future.abs().max()) > 1e-3  # the policy is off the reference: the check is not vacuous


# ---- KL at initialization ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["analytic", "learned"])
def test_kl_and_its_gradient_are_zero_at_init(ring: Ring8Task, ring_learned: Ring8Task, which: str) -> None:
    task = ring if which == "analytic" else ring_learned
    m = make("ddpo-kl", task, one_update())
    data = m._sample()
    n, s = data["latents"].shape[0], m.ctx.sampler
    steps = torch.arange(n) % s.steps
    x, x_next = data["latents"][torch.arange(n), steps], data["latents"][torch.arange(n), steps + 1]
    terms = recompute_transition(m.ctx.backbone, m.grid, s, x, x_next, steps, data["cond"], reference=True)
    assert torch.equal(terms.kl, torch.zeros(n)) and torch.equal(terms.eps_mse, torch.zeros(n))
    grads = torch.autograd.grad((terms.kl + terms.eps_mse).sum(), m.params, allow_unused=True, retain_graph=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads)
    # ...while the log-prob term does move every parameter tensor (the check above is not vacuous)
    lp_grads = torch.autograd.grad(terms.log_prob.sum(), m.params, allow_unused=True)
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in lp_grads) >= (2 if which == "learned" else 1)


def test_ddpo_kl_first_update_equals_ddpo(ring: Ring8Task) -> None:
    """At init the KL term adds exactly 0 to the loss and to every gradient."""
    a, b = make("ddpo", ring, one_update(), alpha=10.0), make("ddpo-kl", ring, one_update(), alpha=10.0)
    ga, gb = capture_grads(a), capture_grads(b)
    sa, sb = a.train_step(), b.train_step()
    assert sb["train/kl_step"] == 0.0 and sa["train/loss"] == sb["train/loss"]
    assert all(torch.equal(x, y) for x, y in zip(ga[0], gb[0]))


@pytest.mark.parametrize("kl_form", ["gaussian", "eps_mse"])
def test_ppo_kl_first_update_independent_of_alpha(ring: Ring8Task, kl_form: str) -> None:
    cfg = dataclasses.replace(PPOKLConfig.smoke(), policy_steps=1, kl_form=kl_form)
    a, b = make("ppo-kl", ring, cfg, alpha=1.0), make("ppo-kl", ring, cfg, alpha=1000.0)
    ga, gb = capture_grads(a), capture_grads(b)
    sa, sb = a.train_step(), b.train_step()
    assert sa["train/kl_step"] == 0.0 and sb["train/kl_step"] == 0.0
    assert all(torch.equal(x, y) for x, y in zip(ga[0], gb[0]))
    # after an update the policy has moved: the KL is positive and α now matters
    sa, sb = a.train_step(), b.train_step()
    assert sa["train/kl_step"] > 0.0 and sa["train/loss"] != sb["train/loss"]


# ---- accumulation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ddpo", "ddpo-kl"])
def test_accumulation_1x8_equals_8x1(ring: Ring8Task, method: str) -> None:
    """One minibatch of 8 and 8 accumulated minibatches of 1 give the same update (same data)."""
    runs = {}
    for mb, acc, per_pass in [(8, 1, 1), (1, 8, 1), (8, 1, 0), (2, 4, 3)]:
        m = make(method, ring, one_update(minibatch_size=mb, gradient_accumulation_steps=acc, timesteps_per_pass=per_pass), perturb=True)
        seen = capture_grads(m)
        m.train_step()
        m.train_step()  # a second iteration: from a moved policy, through the optimizer state
        runs[(mb, acc, per_pass)] = (seen, [p.detach().clone() for p in m.params])
    ref_grads, ref_params = runs[(8, 1, 1)]
    for key, (grads, params) in runs.items():
        for step in range(2):
            for g, r in zip(grads[step], ref_grads[step]):
                torch.testing.assert_close(g, r, rtol=ACCUM_RTOL, atol=ACCUM_ATOL, msg=f"{key} step {step}")
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p, r, rtol=ACCUM_RTOL, atol=ACCUM_ATOL, msg=f"{key} params")


# ---- per-prompt stat tracker ------------------------------------------------------------------------


def test_tracker_falls_back_to_batch_statistics() -> None:
    tr = PerPromptStatTracker(buffer_size=8, min_count=3)
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    a = tr.update(["a", "a", "b", "b"], r)
    m, s = r.double().mean(), r.double().std(unbiased=False) + 1e-6
    torch.testing.assert_close(a, ((r.double() - m) / s).float())


def test_tracker_normalizes_per_prompt_once_it_has_min_count() -> None:
    tr = PerPromptStatTracker(buffer_size=8, min_count=2)
    r = torch.tensor([1.0, 3.0, 10.0, 30.0])
    a = tr.update(["a", "a", "b", "b"], r)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=1e-5, atol=1e-5)
    # the history persists: a new "a" reward is normalized with all stored "a" rewards
    a2 = tr.update(["a"], torch.tensor([5.0]))
    h = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    want = (5.0 - h.mean()) / (h.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(a2, want.float().reshape(1))
    c = tr.update(["b"], torch.tensor([20.0]), scale=False)  # center mode: reward units
    torch.testing.assert_close(c, torch.tensor([0.0]))


def test_tracker_zero_std_and_deque_length() -> None:
    tr = PerPromptStatTracker(buffer_size=3, min_count=2)
    a = tr.update(["p"] * 4, torch.full((4,), 2.5))
    assert torch.equal(a, torch.zeros(4))
    assert list(tr.stats["p"]) == [2.5, 2.5, 2.5]
    tr.update(["p"], torch.tensor([7.0]))
    assert list(tr.stats["p"]) == [2.5, 2.5, 7.0]
    tr2 = PerPromptStatTracker(3, 2)
    tr2.load_state_dict(tr.state_dict())
    assert torch.equal(tr2.update(["p"], torch.tensor([1.0])), tr.update(["p"], torch.tensor([1.0])))


# ---- surrogates ----------------------------------------------------------------------------------------


def _grad(fn: Any, ratio: float, adv: float, eps: float = 0.2) -> tuple[float, float]:
    lr = torch.tensor([math.log(ratio)], requires_grad=True)
    loss = fn(lr, torch.tensor([adv]), eps).sum()
    loss.backward()
    return float(loss.detach()), float(lr.grad)


def test_ppo_clip_hand_cases() -> None:
    assert _grad(ppo_clip_loss, 1.0, -1.0, 1e-4)[0] == 1.0  # advantage −1, ratio 1 -> loss 1.0
    # inside the band: −A·ρ, gradient w.r.t. log ρ is −A·ρ
    loss, g = _grad(ppo_clip_loss, 1.1, 2.0)
    assert math.isclose(loss, -2.2, rel_tol=1e-6) and math.isclose(g, -2.2, rel_tol=1e-6)
    # A > 0: no gradient above the band (the clipped branch), full gradient below it
    assert _grad(ppo_clip_loss, 1.5, 1.0) == (pytest.approx(-1.2), 0.0)
    assert _grad(ppo_clip_loss, 0.5, 1.0)[1] == pytest.approx(-0.5)
    # A < 0: no gradient below the band, full gradient above it
    assert _grad(ppo_clip_loss, 0.5, -1.0) == (pytest.approx(0.8), 0.0)
    assert _grad(ppo_clip_loss, 1.5, -1.0)[1] == pytest.approx(1.5)


def test_dpok_clamp_has_no_gradient_outside_the_band() -> None:
    for ratio in (0.5, 1.5):
        for adv in (-1.0, 1.0):
            assert _grad(ratio_clamp_loss, ratio, adv)[1] == 0.0
    assert _grad(ratio_clamp_loss, 1.05, 3.0)[1] == pytest.approx(-3.15)


# ---- time subsets, buffer -----------------------------------------------------------------------------


def test_exclude_last_step_and_timestep_fraction(ring: Ring8Task, monkeypatch: pytest.MonkeyPatch) -> None:
    import methods.ddpo as mod

    seen: list[torch.Tensor] = []
    real = mod.recompute_transition

    def spy(bb: Any, grid: Any, sampler: Any, x: Any, x_next: Any, steps: torch.Tensor, *a: Any, **k: Any) -> Any:
        seen.append(steps.clone())
        return real(bb, grid, sampler, x, x_next, steps, *a, **k)

    monkeypatch.setattr(mod, "recompute_transition", spy)
    m = make("ddpo", ring, one_update(exclude_last_step=True, timestep_fraction=0.6))  # int(5 · 0.6) = 3 per sample
    m.train_step()
    steps = torch.cat(seen)
    assert len(seen) == 3 and steps.numel() == 8 * 3
    assert int(steps.max()) <= T - 2
    per_sample = torch.stack(seen, 1)  # [8, 3], distinct steps per sample
    assert all(len(set(row.tolist())) == 3 for row in per_sample)


def test_transition_buffer_is_fifo() -> None:
    buf = TransitionBuffer(5)
    for k in range(3):
        x = torch.full((3, 2), float(k))
        buf.push(x, x + 1, torch.arange(3), torch.full((3,), float(k)), torch.zeros(3), [f"p{k}"] * 3, k)
    assert buf.size == 5
    assert sorted(buf.rewards.tolist()) == [1.0, 1.0, 2.0, 2.0, 2.0]  # iteration 0 is gone, one of 1's too
    assert sorted(buf.birth.tolist()) == [1, 1, 2, 2, 2]
    b2 = TransitionBuffer(5)
    b2.load_state_dict(buf.state_dict())
    assert torch.equal(b2.x, buf.x) and b2.prompts == buf.prompts and b2.head == buf.head
    big = torch.arange(7.0)  # more than the capacity at once: the newest 5 survive
    buf.push(big[:, None].expand(7, 2), big[:, None].expand(7, 2), torch.arange(7), big, big, [str(i) for i in range(7)], 9)
    assert sorted(buf.rewards.tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0] and set(buf.prompts) == {"2", "3", "4", "5", "6"}


def test_value_baseline_learns_the_reward(ring: Ring8Task) -> None:
    cfg = dataclasses.replace(PPOKLConfig.smoke(), value_lr=3e-2, value_steps=2, value_batch_size=64, buffer_size=256,
                              rollouts_per_step=32, policy_steps=1, gradient_accumulation_steps=1)
    m = make("ppo-kl", ring, cfg)
    first = m.train_step()["train/value_loss"]
    for _ in range(15):
        last = m.train_step()["train/value_loss"]
    assert last < 0.5 * first


# ---- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls,over,needle", [
    (DDPOConfig, {"clip_range": 0.0}, "method.clip_range"),
    (DDPOConfig, {"samples_per_iteration": 10, "minibatch_size": 4}, "multiple"),
    (DDPOConfig, {"advantage": "zscore"}, "method.advantage"),
    (DDPOConfig, {"timestep_fraction": 1.5}, "method.timestep_fraction"),
    (DDPOConfig, {"log_prob_reduce": "max"}, "method.log_prob_reduce"),
    (DDPOConfig, {"stat_min_count": 64, "stat_buffer_size": 32}, "method.stat_min_count"),
    (DDPOConfig, {"kl_in_return": True}, "method.kl_in_return"),
    (PPOKLConfig, {"kl_in_return": True, "kl_form": "eps_mse"}, "method.kl_in_return"),
    (PPOKLConfig, {"clip_range": -1.0}, "method.clip_range"),
    (PPOKLConfig, {"ratio": "min"}, "method.ratio"),
    (PPOKLConfig, {"buffer_size": 2, "batch_size": 4}, "method.buffer_size"),
    (PPOKLConfig, {"kl_form": "mse"}, "method.kl_form"),
])
def test_configs_reject_bad_values_in_one_line(cls: type, over: dict, needle: str) -> None:
    with pytest.raises(BenchError) as e:
        cls(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_ddpo_refuses_deterministic_sampler(ring: Ring8Task) -> None:
    bb = ring.build_backbone()
    clock = PhaseClock()
    ctx = TrainContext(bb, CountingReward(ring.build_reward("quadratic"), clock), [""], 1.0, SamplerConfig(steps=T, eta=0.0), 0, clock, ring)
    for name, cfg in (("ddpo", one_update()), ("ppo-kl", PPOKLConfig.smoke())):
        with pytest.raises(BenchError, match="eta"):
            METHODS.get(name)(cfg, ctx)


PRESET_TASKS = sorted(p.stem for p in (CONFIG_DIR / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("task", PRESET_TASKS)
@pytest.mark.parametrize("method", ["ddpo", "ddpo-kl", "ppo-kl"])
def test_task_presets_resolve(task: str, method: str) -> None:
    """Every shipped task preset (with or without a section for these methods) resolves."""
    cfg = resolve(task, method, 0)
    assert cfg.method == method


PAPER = sorted((CONFIG_DIR / "paper").glob("ddpo*.yaml")) + sorted((CONFIG_DIR / "paper").glob("dpok*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_yamls_validate(path: Path) -> None:
    """Each paper YAML names its launch command in the header, and resolves for that task and method
    (every key checked against the task, method, sampler and train configs; no weights needed)."""
    import re

    text = path.read_text()
    cmd = next((line for line in text.splitlines() if line.lstrip("# ").startswith("bench run")), None)
    assert cmd is not None, "the header needs the launch command"
    task, method = re.search(r"--task (\S+)", cmd).group(1), re.search(r"--methods (\S+)", cmd).group(1)
    assert path.name.split("_")[0] in ("ddpo", "dpok") and method in ("ddpo", "ddpo-kl", "dpok", "ppo-kl")
    cfg = resolve(task, method, 0, layers=[load_yaml(path)])
    assert isinstance(cfg.method_cfg, DDPOConfig if method.startswith("ddpo") else PPOKLConfig)


def test_paper_yamls_exist() -> None:
    names = {p.name for p in PAPER}
    assert {"ddpo_aesthetic.yaml", "ddpo_kl_aesthetic.yaml", "dpok_imagereward_single.yaml"} <= names


# ---- several processes ------------------------------------------------------------------------------


def _two_rank_worker(out: str) -> None:
    """Each of 2 ranks trains ddpo for 2 iterations on its own samples (bench.core.distributed)."""
    from bench.core import distributed as dist

    rank, _ = dist.world()
    m = make("ddpo", Ring8Task(GMMConfig(hidden=32, layers=2)), one_update(samples_per_iteration=8, minibatch_size=4, stat_min_count=4))
    dist.prepare_method(m, 0)
    stats = [m.train_step() for _ in range(2)]
    torch.save({"tracker": m.tracker.state_dict(), "params": [p.detach().clone() for p in m.params], "stats": stats,
                "rewards": m.last_batch["rewards"], "adv": m.last_batch["advantages"]}, Path(out) / f"rank{rank}.pt")


def test_two_processes_share_reward_statistics(tmp_path: Path) -> None:
    """ddpo-pytorch gathers rewards and prompts before normalizing: every rank's tracker holds the
    same history (both ranks' rewards), advantages are z-scores of the combined batch, and the
    synchronized gradients keep the parameters identical."""
    from bench.core import distributed as dist

    dist.launch(_two_rank_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["tracker"] == r1["tracker"] and len(r0["tracker"]["stats"][""]) == 2 * 2 * 8
    assert not torch.equal(r0["rewards"], r1["rewards"])  # each rank sampled its own batch
    both = torch.cat([r0["rewards"], r1["rewards"]]).double()
    hist = torch.tensor(r0["tracker"]["stats"][""], dtype=torch.float64)  # min_count reached: the tracker's stats
    want = ((both - hist.mean()) / (hist.std(unbiased=False) + 1e-6)).clamp(-5, 5).float()
    torch.testing.assert_close(torch.cat([r0["adv"], r1["adv"]]), want)
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def test_value_net_step_embedding_gradient_is_summed_in_a_fixed_order() -> None:
    """The value net's per-step embedding must not use advanced-indexing backward, which on the CPU
    adds repeated steps with parallel atomics (different float sums run to run with > 1 thread):
    its gradient equals the in-order sequential sum, bit for bit, at a size where ATen goes parallel."""
    from methods.dpok import ConditionalLinear

    g = torch.Generator().manual_seed(0)
    layer = ConditionalLinear(8, 128, 50, g)
    x = torch.randn(512, 8, generator=g)  # 512 × 128 = 65,536 elements > ATen's parallel grain size
    steps = torch.randint(0, 50, (512,), generator=g)
    upstream = torch.randn(512, 128, generator=g)
    (layer(x, steps) * upstream).sum().backward()
    with torch.no_grad():
        contrib = torch.nn.functional.linear(x, layer.weight, layer.bias) * upstream
        ref = torch.zeros_like(layer.embed)
        for i in range(512):  # index order, one addition at a time
            ref[steps[i]] += contrib[i]
    assert torch.equal(layer.embed.grad, ref)
