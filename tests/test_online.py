"""The online black-box setting: oracle, query schedule and budget, proxy models, SEIKO, SQDF-online.

Tiny gmm-trap backbone (analytic base), T = 6, a few dozen oracle queries per run.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import pytest
import torch

from bench.app.config import resolve
from bench.core.diffusion import draw_noise, rollout_with_grad, truncation_mask
from bench.core.errors import BenchError
from bench.app.runner import run_one
from bench.core.method import TrainContext
from methods.proxy import ProxyModel, query_schedule
from methods.seiko import SEIKOBootstrap, SEIKOConfig, SEIKOUCB
from methods.sqdf_online import SQDFOnline, SQDFOnlineConfig
from bench.core.reward import BudgetExhausted

T = 6


@pytest.fixture(scope="module")
def task(tiny_gmm: Callable[..., Any]) -> Any:
    return tiny_gmm("gmm-trap")


@pytest.fixture(scope="module")
def ctx_for(contexts: Any) -> Callable[..., TrainContext]:
    """ctx_for(task, budget, seed, reward): a fresh context with the oracle behind a query budget;
    backbones share their initial weights."""

    def make(task: Any, budget: int | None = None, seed: int = 0, reward: str = "gold-oracle") -> TrainContext:
        return contexts(task, reward, sampler=T, seed=seed, budget=budget, shared_init=True)

    return make


def seiko_cfg(**kw: Any) -> SEIKOConfig:
    return dataclasses.replace(SEIKOConfig.smoke(), **kw)


def sqdf_cfg(**kw: Any) -> SQDFOnlineConfig:
    return dataclasses.replace(SQDFOnlineConfig.smoke(), **kw)


def run_until_exhausted(m: Any, limit: int = 100) -> list[dict[str, float]]:
    out = []
    for _ in range(limit):
        try:
            out.append(m.train_step())
        except BudgetExhausted:
            return out
    raise AssertionError("the method never stopped")


# ---- the oracle ------------------------------------------------------------------------------------


def test_gold_oracle_is_the_gold_reward_plus_reproducible_noise(task: Any) -> None:
    oracle, gold = task.build_reward("gold-oracle"), task.build_reward("quadratic")
    x = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0)) * 3
    noise = oracle(x, [""] * x.shape[0]) - gold(x, [""] * x.shape[0])
    assert abs(float(noise.mean())) < 0.005 and abs(float(noise.std()) - task.cfg.oracle_noise) < 0.005
    again = task.build_reward("gold-oracle")(x[:100], [""] * 100)  # a fresh object, no state: the same labels
    assert torch.equal(again, oracle(x[:100], [""] * 100))
    assert oracle.differentiable is False
    assert task.target("gold-oracle", 1.0, "") is task.target("quadratic", 1.0, "")
    with pytest.raises(BenchError, match="differentiable"):
        resolve("gmm-trap", "draft", 0, reward="gold-oracle")
    assert resolve("gmm-trap", "seiko-ucb", 0, reward="gold-oracle").reward == "gold-oracle"


# ---- schedule and budget -------------------------------------------------------------------------------


def test_query_schedule() -> None:
    assert query_schedule(15360, 4) == [1024, 2048, 4096, 8192]
    for total in (15, 16, 97, 480, 1920):
        s = query_schedule(total, 4)
        assert sum(s) == total and s == sorted(s) and min(s) >= 1
    assert query_schedule(100, 1) == [100]
    with pytest.raises(BenchError):
        query_schedule(10, 4)


@pytest.mark.parametrize("method", ["seiko-ucb", "sqdf-online"])
def test_never_exceeds_the_budget_and_refits_on_growing_data(task: Any, ctx_for: Callable[..., TrainContext], method: str) -> None:
    budget = 60
    ctx = ctx_for(task, budget=budget)
    m = SEIKOUCB(seiko_cfg(queries_total=0), ctx) if method == "seiko-ucb" else SQDFOnline(sqdf_cfg(queries_total=0, rounds=3), ctx)
    sched = m.online.schedule
    assert sum(sched) == budget
    assert sched == query_schedule(budget, m.cfg.rounds)
    stats = run_until_exhausted(m)
    assert ctx.reward.queries == budget, "the whole budget is spent, never more"
    sizes = [s["train/dataset_size"] for s in stats if "train/dataset_size" in s]
    assert sizes == [float(sum(sched[: i + 1])) for i in range(len(sched))], "one refit per round, on all data so far"
    assert len(stats) == m.cfg.rounds * m.cfg.updates_per_round
    assert m.online.size == budget


def test_budget_below_the_schedule_is_refused(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    with pytest.raises(BenchError, match="exceeds train.query_budget"):
        SEIKOUCB(seiko_cfg(queries_total=100), ctx_for(task, budget=50))
    with pytest.raises(BenchError, match="needs a query budget"):
        SEIKOUCB(seiko_cfg(queries_total=0), ctx_for(task, budget=None))
    m = SEIKOUCB(seiko_cfg(queries_total=30), ctx_for(task, budget=50))  # a smaller schedule inside a budget
    run_until_exhausted(m)
    assert m.ctx.reward.queries == 30


def test_a_round_never_starts_without_its_queries(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task, budget=48)
    m = SEIKOUCB(seiko_cfg(queries_total=48), ctx)
    ctx.reward.queries = 40  # someone else spent part of the budget
    with pytest.raises(BudgetExhausted):
        m.train_step()
    assert ctx.reward.queries == 40, "no partial round is queried"


# ---- KL to the previous round ------------------------------------------------------------------------


def test_seiko_kl_and_its_gradient_are_zero_when_policy_is_the_reference(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task, budget=48)
    m = SEIKOUCB(seiko_cfg(), ctx)
    bb = ctx.backbone
    g = torch.Generator().manual_seed(0)
    x_T, z = draw_noise(g, 4, T, bb.sample_shape)
    cond = bb.encode_prompts([""] * 4)
    out = rollout_with_grad(bb.policy, ctx.grid, cond, x_T, z, truncation_mask(T, T, 4), reference=m.previous_denoiser(), kl="local")
    assert torch.equal(out.kl, torch.zeros_like(out.kl))
    grads = torch.autograd.grad(out.kl.sum(), m.params, allow_unused=True)
    assert all(gr is None or torch.equal(gr, torch.zeros_like(gr)) for gr in grads)
    # every round starts from the previous round's model: its first update has KL exactly 0, later ones do not
    stats = run_until_exhausted(m)
    per_round = m.cfg.updates_per_round
    assert [s["train/kl_path_previous"] for s in stats[::per_round]] == [0.0] * m.cfg.rounds
    assert all(s["train/kl_path_previous"] > 0 for i, s in enumerate(stats) if i % per_round)


def test_seiko_kl_reference_is_the_previous_round(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task, budget=48)
    m = SEIKOUCB(seiko_cfg(), ctx)
    for _ in range(m.cfg.updates_per_round + 1):  # round 0, then the first update of round 1
        m.train_step()
    bb = ctx.backbone
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)), ctx.grid.timesteps[2].expand(5)
    cond = bb.encode_prompts([""] * 5)
    eps_prev = m.previous_denoiser()(x, t, cond)
    with torch.no_grad():
        current = {k: v.clone() for k, v in bb.trainable_state_dict().items()}
        bb.load_trainable_state_dict(m.previous_state)
        want = bb.policy(x, t, cond)
        moved = bb.reference(x, t, cond)
        bb.load_trainable_state_dict(current)
    torch.testing.assert_close(eps_prev, want, rtol=0, atol=0)
    assert (eps_prev - moved).abs().max() > 0, "after round 0 the reference is no longer the pretrained model"


def test_sqdf_online_kl_and_its_gradient_are_zero_at_init(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    """With a zero proxy reward, the first SQDF update's loss is α·KL to the pretrained model:
    exactly 0, with exactly zero gradients."""
    ctx = ctx_for(task, budget=48)
    m = SQDFOnline(sqdf_cfg(), ctx)

    class Zero(torch.nn.Module):
        differentiable = True
        name = "zero"
        version = 1

        def score(self, x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            return 0.0 * x.sum(-1)

    m.proxy_reward.inner = Zero()
    seen: list[list[torch.Tensor]] = []
    real_step = m.inner.optimizer.step

    def spy(*a: Any, **k: Any) -> Any:
        seen.append([p.grad.clone() for p in m.inner.params if p.grad is not None])
        return real_step(*a, **k)

    m.online.start_round()
    m.online.round, m.online.updates_in_round = 0, 0
    m.inner.optimizer.step = spy
    stats = m.inner.train_step()
    assert stats["train/kl_step"] == 0.0 and stats["train/loss"] == 0.0
    assert seen and all(torch.equal(gr, torch.zeros_like(gr)) for gr in seen[0])


# ---- proxy models ------------------------------------------------------------------------------------


def _proxy(optimism: str, **kw: Any) -> ProxyModel:
    cfg = seiko_cfg(proxy_hidden=(32, 8), proxy_dropout=(0.0, 0.0), proxy_epochs=60, proxy_batch=64, proxy_standardize=True, **kw)
    return ProxyModel(2, cfg, optimism, torch.Generator().manual_seed(0))


def _ring_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(n, 2, generator=g) + torch.tensor([4.0, 0.0])
    y = -x[:, 0] ** 2 - (x[:, 1] - 1) ** 2 / 10
    return x, y


def test_ucb_bonus_shrinks_where_data_is_dense() -> None:
    """Linear UCB's Gram form: small bonus on the data, large away from it, shrinking as 1/√n.
    SEIKO's centered covariance (the faithful default) is invariant to the amount of data and,
    measuring uncentered features, is not guaranteed to be smaller on the data (SEIKO's code,
    zhaoyl18/SEIKO @947f9ade, computes it with torch.cov)."""
    p = _proxy("ucb", ucb_alpha=1.0, ucb_clip=1e6, ucb_cov="gram")
    x, y = _ring_data(256)
    p.fit(x, y, torch.Generator().manual_seed(1))
    far_x = torch.tensor([[-6.0, 6.0]])
    dense = p.bonus(torch.tensor([[4.0, 0.0]]))
    far = p.bonus(far_x)
    assert float(dense) < float(far)
    assert float(p.optimistic(torch.tensor([[4.0, 0.0]]))) == pytest.approx(float(p.heads(torch.tensor([[4.0, 0.0]]))[0][0, 0] + dense), abs=1e-5)
    # Gram form: duplicating the data shrinks the bonus by √2; the code's centered covariance does not
    centre = torch.tensor([[4.0, 0.0]])
    for form, ratio in (("gram", 2**-0.5), ("cov", 1.0)):
        q = _proxy("ucb", ucb_alpha=1.0, ucb_clip=1e6, ucb_cov=form, ucb_lambda=1e-6)
        q.net.load_state_dict(p.net.state_dict())
        q.ucb_matrix = q._ucb_matrix(x)
        b1 = float(q.bonus(centre))
        q.ucb_matrix = q._ucb_matrix(torch.cat([x, x]))
        b2 = float(q.bonus(centre))
        assert b2 / b1 == pytest.approx(ratio, rel=0.01), form
    clipped = _proxy("ucb", ucb_alpha=1.0, ucb_clip=1e-3)
    clipped.net.load_state_dict(p.net.state_dict())
    clipped.ucb_matrix = p.ucb_matrix
    assert float(clipped.bonus(far_x)) == pytest.approx(1e-3)


def test_bootstrap_heads_differ_and_optimism_is_their_max() -> None:
    p = _proxy("bootstrap", proxy_heads=4)
    x, y = _ring_data(128)
    stats = p.fit(x, y, torch.Generator().manual_seed(1))
    assert stats["train/proxy_train_mse"] < float(y.var())
    probe = torch.tensor([[4.0, 0.0], [0.0, 0.0], [-5.0, 5.0]])
    heads, _ = p.heads(probe)
    assert heads.shape == (4, 3)
    assert float((heads.max(0).values - heads.min(0).values).min()) > 0, "heads trained on different resamples disagree"
    torch.testing.assert_close(p.optimistic(probe), heads.max(0).values)
    # far from the data they disagree more than where the data is
    spread = heads.max(0).values - heads.min(0).values
    assert float(spread[2]) > float(spread[0])


def test_validation_split_is_the_newest_queries() -> None:
    p = _proxy("none", proxy_val_fraction=0.1)
    train, val = p.split(40, torch.Generator())
    assert torch.equal(val, torch.arange(36, 40)) and torch.equal(train, torch.arange(36))
    q = _proxy("none", proxy_val_fraction=0.1, proxy_val_split="random")
    _, val_r = q.split(40, torch.Generator().manual_seed(0))
    assert val_r.numel() == 4 and not torch.equal(val_r, torch.arange(36, 40))


def test_proxy_select_best_keeps_the_best_validation_weights() -> None:
    x, y = _ring_data(200)
    last = _proxy("none", proxy_val_fraction=0.2)
    best = _proxy("none", proxy_val_fraction=0.2, proxy_select="best")
    s_last = last.fit(x, y, torch.Generator().manual_seed(1))
    s_best = best.fit(x, y, torch.Generator().manual_seed(1))
    assert s_best["train/proxy_val_mae"] <= s_last["train/proxy_val_mae"] + 1e-7


# ---- resume and the runner -------------------------------------------------------------------------


@pytest.mark.parametrize("cls,make_cfg", [(SEIKOBootstrap, seiko_cfg), (SQDFOnline, sqdf_cfg)])
def test_resume_mid_round_is_bit_exact(task: Any, ctx_for: Callable[..., TrainContext], cls: Any, make_cfg: Any) -> None:
    cfg = make_cfg(updates_per_round=3)
    ref = cls(cfg, ctx_for(task, budget=48, seed=2))
    want = [ref.train_step() for _ in range(5)]
    a = cls(cfg, ctx_for(task, budget=48, seed=2))
    first = [a.train_step() for _ in range(4)]  # round 1, one update in
    state = a.state_dict()
    b = cls(cfg, ctx_for(task, budget=48, seed=2))
    b.load_state_dict(state)
    b.ctx.reward.queries = a.ctx.reward.queries
    assert first + [b.train_step()] == want
    for p, q in zip(ref.params if hasattr(ref, "params") else ref.inner.params, b.params if hasattr(b, "params") else b.inner.params):
        assert torch.equal(p, q)


def test_runner_stops_at_the_budget(task: Any, tmp_path: Any) -> None:
    sets = {"method": {"queries_total": 0, "rounds": 2, "query_batch": 32, "updates_per_round": 2, "proxy_hidden": "16,8",
                       "proxy_dropout": "0,0", "proxy_activation": "silu", "proxy_epochs": 5, "batch_size": 8, "trunc_max": 6},
            "task": {"hidden": 16, "layers": 1},
            "sampler": {"steps": T},
            "train": {"iterations": 10, "eval_every": 0, "eval_samples": 64, "final_eval_samples": 64, "query_budget": 24, "plot": False}}
    cfg = resolve("gmm-trap", "seiko-ucb", 0, reward="gold-oracle", layers=[sets])
    res = run_one(cfg, tmp_path, progress=False)
    assert res["stopped_by_budget"] is True
    assert res["budget"]["reward_queries"] == 24 and res["iterations"] == 4
    assert res["budget"]["denoiser_calls_previous"] > 0
    assert "gold_reward" in res["metrics"]
    lines = [json.loads(x) for x in (tmp_path / "gmm-trap" / "seiko-ucb").glob("*/metrics.jsonl").__next__().read_text().splitlines()]
    assert max(r.get("budget/reward_queries", 0) for r in lines) == 24
