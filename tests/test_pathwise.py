"""ReFL and AlignProp: what is differentiated, where, and how the truncation is drawn.

Tiny analytic mixture backbone (gmm-ring8, exact ε + residual MLP), T = 8, batches of a few items.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from bench.core.diffusion import ddim_step, draw_noise, rollout, truncation_mask, x0_from_eps
from methods.alignprop import AlignProp, AlignPropConfig, draw_truncation
from bench.core.method import TrainContext
from methods.refl import ReFL, ReFLConfig, window_indices

T = 8


@pytest.fixture(scope="module")
def task(tiny_gmm: Callable[..., Any]) -> Any:
    return tiny_gmm("gmm-ring8")


@pytest.fixture(scope="module")
def ctx_for(contexts: Any) -> Callable[..., TrainContext]:
    """ctx_for(task, seed, steps): a fresh context on the quadratic reward; every backbone of this
    module starts from the same weights."""

    def make(task: Any, seed: int = 0, steps: int = T) -> TrainContext:
        return contexts(task, "quadratic", sampler=steps, seed=seed, shared_init=True)

    return make


def perturb(ctx: TrainContext, scale: float = 0.3) -> None:
    """Move the zero-initialized residual away from 0, so ε_θ differs from ε_ref."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ctx.backbone.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def record_policy_calls(bb: Any) -> list[tuple[int, bool]]:
    """Wrap ε_θ so every call logs (rows, whether it builds a graph into θ)."""
    calls: list[tuple[int, bool]] = []
    inner = bb.policy_eps

    def wrapped(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], torch.is_grad_enabled()))
        return inner(x, t, cond)

    bb.policy_eps = wrapped
    return calls


# ---- ReFL --------------------------------------------------------------------------------------------


def test_refl_window_matches_the_codes() -> None:
    assert window_indices((0.75, 1.0), 40) == (30, 40)  # ImageReward: randint(30, 39) of 40 steps
    assert window_indices((0.8, 1.0), 50) == (40, 50)  # SQDF's ReFL baseline: [40, 50) of 50


def test_refl_one_gradient_call_per_item(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task)
    m = ReFL(ReFLConfig(batch_size=5, lr=1e-3), ctx)
    calls = record_policy_calls(ctx.backbone)
    stats = m.train_step()
    k = int(stats["train/k"])
    assert window_indices(m.cfg.window, T)[0] <= k < T
    with_grad = [n for n, g in calls if g]
    assert with_grad == [5], "exactly one gradient-carrying denoiser call, one row per item"
    assert sum(n for n, g in calls if not g) == 5 * k, "the prefix runs steps 0..k-1 without gradients"
    assert ctx.backbone.counter.state_dict()["policy"] == 5 * (k + 1)
    assert "reference" not in ctx.backbone.counter.state_dict()


def test_refl_x0_is_the_finetuned_models_tweedie_at_k(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task)
    perturb(ctx)
    bb, grid = ctx.backbone, ctx.grid
    m = ReFL(ReFLConfig(batch_size=4), ctx)
    g = torch.Generator().manual_seed(3)
    x_T, z = draw_noise(g, 4, T, bb.sample_shape)
    cond = bb.encode_prompts([""] * 4)
    k = 6
    x0, x_k = m.x0_hat([""] * 4, x_T, z, k)
    # an independent prefix: k plain DDIM steps of the fine-tuned model
    x = x_T
    with torch.no_grad():
        for i in range(k):
            x = ddim_step(bb.policy(x, grid.timesteps[i].expand(4), cond), x, grid.alpha_bars[i], grid.prev_alpha_bars[i], 1.0, noise=z[:, i]).prev_sample
    torch.testing.assert_close(x_k, x, rtol=0, atol=1e-6)
    t_k = grid.timesteps[k].expand(4)
    want = x0_from_eps(x, bb.policy(x, t_k, cond), grid.alpha_bars[k])
    torch.testing.assert_close(x0, want, rtol=0, atol=1e-6)
    ref = x0_from_eps(x, bb.reference(x, t_k, cond), grid.alpha_bars[k])
    assert (x0 - ref).abs().max() > 1e-3, "x̂0 must come from the fine-tuned model, not the reference"
    # its gradient is the single call's Jacobian at the constant x_k
    params = bb.trainable_parameters()
    g1 = torch.autograd.grad(x0.sum(), params)
    g2 = torch.autograd.grad(want.sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_refl_hinge_loss(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    m = ReFL(ReFLConfig(loss="hinge", hinge_target=2.0, loss_scale=1e-3), ctx_for(task))
    r = torch.tensor([-1.0, 1.5, 2.0, 3.0])
    torch.testing.assert_close(m.refl_loss(r), 1e-3 * torch.tensor([3.0, 0.5, 0.0, 0.0]))
    m2 = ReFL(ReFLConfig(loss_scale=0.5), ctx_for(task))
    torch.testing.assert_close(m2.refl_loss(r), -0.5 * r)


def test_refl_pretraining_regularizer_is_a_switch(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task)
    m = ReFL(ReFLConfig(batch_size=4, pretrain_weight=1.0, pretrain_pool=6, pretrain_batch=3, lr=1e-3), ctx)
    stats = m.train_step()
    assert stats["train/pretrain_loss"] > 0
    assert ctx.backbone.counter.state_dict()["reference"] == 6 * T, "the pool is drawn once from the pretrained model"
    m.train_step()
    assert ctx.backbone.counter.state_dict()["reference"] == 6 * T
    assert m.extra_state()["pool"].shape == (6, 2)
    off = ReFL(ReFLConfig(batch_size=4), ctx_for(task))
    assert "train/pretrain_loss" not in off.train_step()


# ---- AlignProp: the truncation draw --------------------------------------------------------------------


def _is_suffix(col: torch.Tensor) -> bool:
    """A column of the mask is [False]*b + [True]*(T−b)."""
    k = int(col.sum())
    return bool(torch.equal(col, torch.arange(col.shape[0]) >= col.shape[0] - k))


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "fixed"])
def test_truncation_is_drawn_once_per_trajectory(kind: str) -> None:
    cfg = AlignPropConfig(truncation=kind)
    g = torch.Generator().manual_seed(0)
    mask = draw_truncation(cfg, 50, 4000, g)
    assert mask.shape == (50, 4000)
    assert all(_is_suffix(mask[:, b]) for b in range(0, 4000, 97))
    k = mask.sum(0)
    assert int(k.min()) >= 1 and int(k.max()) <= 49  # the code's rejection: 1 ≤ b ≤ T−1
    if kind == "fixed":
        assert bool((k == 1).all())  # b = 49: "AlignProp K=1"
    elif kind == "gaussian":
        # b = int(N(42, 5)) (toward zero) redrawn until 1 ≤ b ≤ 49: P(b) ∝ Φ((b+1−42)/5) − Φ((b−42)/5)
        bs = torch.arange(1, 50, dtype=torch.float64)
        p = torch.special.ndtr((bs + 1 - 42) / 5) - torch.special.ndtr((bs - 42) / 5)
        want = float((bs * p).sum() / p.sum())
        assert abs(float((50 - k).double().mean()) - want) < 0.25  # ± 3.5 standard errors
        assert len(set(k.tolist())) > 5, "trajectories of one batch get different K"
    else:
        assert set((50 - k).tolist()) == set(range(1, 50))


def test_legacy_truncation_draws_per_step() -> None:
    cfg = AlignPropConfig(truncation="per_step_legacy", trunc_min=0, trunc_max=50)
    g = torch.Generator().manual_seed(0)
    masks = [draw_truncation(cfg, 50, 3, g) for _ in range(50)]
    assert all(bool((m == m[:, :1]).all()) for m in masks), "one draw per step, shared by the batch"
    assert any(not _is_suffix(m[:, 0]) for m in masks), "gradient steps can be skipped (AlignProp issue #15)"
    freq = torch.stack([m[:, 0] for m in masks]).float().mean(0)
    assert float(freq[0]) < 0.2 and float(freq[-1]) > 0.8  # P(step i has grad) = (i+1)/51


# ---- AlignProp: gradients --------------------------------------------------------------------------------


def test_alignprop_gradient_stays_in_each_trajectorys_window(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    ctx = ctx_for(task)
    perturb(ctx)
    bb = ctx.backbone
    m = AlignProp(AlignPropConfig(truncation="fixed", trunc_fixed=0, checkpoint=False, loss_scale=1.0), ctx)
    ks = torch.tensor([1, 3, 8])
    mask = truncation_mask(T, ks)
    grads: dict[int, torch.Tensor] = {}
    inner = bb.policy_eps

    def hooked(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = inner(x, t, cond)
        if out.requires_grad:
            i = int((ctx.grid.timesteps == t[0]).nonzero())
            out.register_hook(lambda gr, i=i: grads.__setitem__(i, gr.detach().clone()))
        return out

    bb.policy_eps = hooked
    g = torch.Generator().manual_seed(1)
    x_T, z = draw_noise(g, 3, T, bb.sample_shape)
    loss, _ = m.loss([""] * 3, x_T, z, mask)
    loss.backward()
    for i in range(T):
        for b, k in enumerate(ks.tolist()):
            gi = grads.get(i)
            norm = 0.0 if gi is None else float(gi[b].abs().sum())
            if i < T - k:
                assert norm == 0.0, f"trajectory {b} (K={k}) got gradient at step {i}, before its window"
            else:
                assert norm > 0.0, f"trajectory {b} (K={k}) got no gradient at step {i}, inside its window"


def test_per_trajectory_truncation_equals_draft_k_per_item(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    """A batch with K = (2, 5) has the summed gradient of DRaFT-2 on item 0 and DRaFT-5 on item 1."""
    ctx = ctx_for(task)
    perturb(ctx)
    bb = ctx.backbone
    params = bb.trainable_parameters()
    m = AlignProp(AlignPropConfig(truncation="fixed", trunc_fixed=0, checkpoint=False, loss_scale=1.0), ctx)
    g = torch.Generator().manual_seed(2)
    x_T, z = draw_noise(g, 2, T, bb.sample_shape)
    loss, _ = m.loss(["", ""], x_T, z, truncation_mask(T, torch.tensor([2, 5])))
    joint = torch.autograd.grad(loss * 2, params)  # the loss is a batch mean
    sep = [torch.zeros_like(p) for p in params]
    for b, k in enumerate((2, 5)):
        lb, _ = m.loss([""], x_T[b : b + 1], z[b : b + 1], truncation_mask(T, k, 1))
        for acc, gr in zip(sep, torch.autograd.grad(lb, params)):
            acc += gr
    for a, b in zip(joint, sep):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_alignprop_micro_batches_do_not_change_the_update(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    outs = []
    for micro in (0, 2):
        ctx = ctx_for(task, seed=5)
        m = AlignProp(AlignPropConfig(truncation="uniform", trunc_min=1, trunc_max=T, batch_size=6, micro_batch=micro, loss_scale=1.0, grad_clip=0.0), ctx)
        stats = m.train_step()
        outs.append((stats, [p.detach().clone() for p in m.params]))
    assert outs[0][0]["train/k_mean"] == outs[1][0]["train/k_mean"]
    assert abs(outs[0][0]["train/loss"] - outs[1][0]["train/loss"]) < 1e-5
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_abs_target_loss_equals_neg_below_target(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    """|r − 10| and −r give the same gradient while r < 10 (the ring reward is ≤ 0)."""
    grads = []
    for loss in ("neg", "abs_target"):
        ctx = ctx_for(task)
        perturb(ctx)
        m = AlignProp(AlignPropConfig(truncation="fixed", trunc_fixed=0, loss=loss, checkpoint=False, loss_scale=1.0), ctx)
        g = torch.Generator().manual_seed(4)
        x_T, z = draw_noise(g, 3, T, ctx.backbone.sample_shape)
        value, _ = m.loss([""] * 3, x_T, z, truncation_mask(T, 3, 3))
        grads.append(torch.autograd.grad(value, m.params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_rollout_prefix_matches_full_rollout(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    """ReFL's no-grad prefix (rollout stop_at=k) is the first k steps of the full chain."""
    ctx = ctx_for(task)
    bb = ctx.backbone
    g = torch.Generator().manual_seed(0)
    x_T, z = draw_noise(g, 3, T, bb.sample_shape)
    cond = bb.encode_prompts([""] * 3)
    full = rollout(bb.policy, ctx.grid, cond, x_T, z)
    part = rollout(bb.policy, ctx.grid, cond, x_T, z, stop_at=5, keep_latents=False)
    torch.testing.assert_close(part.x0, full.latents[:, 5])


def test_truncation_settings_are_checked_against_the_chain(task: Any, ctx_for: Callable[..., TrainContext]) -> None:
    from bench.core.errors import BenchError

    with pytest.raises(BenchError, match="trunc_mean"):
        AlignProp(AlignPropConfig(), ctx_for(task))  # N(42, 5) cannot land in [1, 7]
    with pytest.raises(BenchError, match="trunc_fixed"):
        AlignProp(AlignPropConfig(truncation="fixed", trunc_fixed=T), ctx_for(task))
    AlignProp(AlignPropConfig(trunc_mean=5.0, trunc_std=1.0), ctx_for(task))
