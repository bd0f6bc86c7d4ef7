"""Contract tests run over every registered method (a new method is checked automatically).

On a tiny mixture backbone (gmm-trap with a learned base, so frozen parameters exist; T = 6):
* same seed -> bit-identical stats and parameters;
* trainable parameters change, frozen ones do not;
* stats are finite floats under "train/";
* state_dict/load_state_dict resumes bit-for-bit (2 + 2 steps == 4 steps);
* methods with a KL term: its value and gradient are 0 at init (the first gradient ignores α).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench.core.registry import METHODS
from bench.app.runner import build_task

@pytest.fixture(scope="module")
def task(bench_cache: Path) -> Any:
    from bench.tasks.gmm import GMMConfig

    return build_task("gmm-trap", GMMConfig(base="learned", learned_iterations=200, learned_batch=256))


@pytest.fixture(scope="module")
def make(contexts: Any, tiny_config: Callable[[str], Any]) -> Callable[..., Any]:
    """make(method, task, seed, alpha): the method on a fresh backbone, 6-step chains, the task's
    default reward."""

    def build(method: str, task: Any, seed: int = 0, alpha: float = 1.0) -> Any:
        ctx = contexts(task, task.default_reward, sampler=6, seed=seed, alpha=alpha)
        return METHODS.get(method)(tiny_config(method), ctx)

    return build


def params(m: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.ctx.backbone.named_parameters()}


METHOD_NAMES = METHODS.names()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_same_seed_same_numbers(method: str, task: Any, make: Callable[..., Any]) -> None:
    a, b = make(method, task), make(method, task)
    sa = [a.train_step() for _ in range(2)]
    sb = [b.train_step() for _ in range(2)]
    assert sa == sb
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_trainable_change_frozen_do_not(method: str, task: Any, make: Callable[..., Any]) -> None:
    m = make(method, task)
    before = params(m)
    trainable = {id(p) for p in m.trainable_parameters()}
    names_trainable = {k for k, p in m.ctx.backbone.named_parameters() if id(p) in trainable}
    assert names_trainable, "a method must train something"
    for _ in range(3):
        stats = m.train_step()
        assert stats and all(k.startswith("train/") for k in stats), stats
        assert all(isinstance(v, float) and math.isfinite(v) for v in stats.values()), stats
    after = params(m)
    unchanged = [k for k in names_trainable if torch.equal(before[k], after[k])]
    assert not unchanged, f"trainable parameters did not change: {unchanged}"
    frozen = [k for k in before if k not in names_trainable]
    assert frozen, "the learned base must have frozen parameters"
    moved = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert not moved, f"frozen parameters changed: {moved}"


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_resume_is_bit_exact(method: str, task: Any, make: Callable[..., Any]) -> None:
    ref = make(method, task, seed=3)
    ref_stats = [ref.train_step() for _ in range(4)]
    a = make(method, task, seed=3)
    first = [a.train_step() for _ in range(2)]
    state = a.state_dict()
    b = make(method, task, seed=3)
    b.load_state_dict(state)
    b.ctx.reward.queries = a.ctx.reward.queries  # counters live in the runner, which restores them likewise
    b.ctx.backbone.counter.load_state_dict(a.ctx.backbone.counter.state_dict())
    second = [b.train_step() for _ in range(2)]
    assert first + second == ref_stats
    pr, pb = params(ref), params(b)
    assert all(torch.equal(pr[k], pb[k]) for k in pr)


class _FirstPolicyStep(Exception):
    pass


def first_policy_gradient(m: Any) -> list[torch.Tensor]:
    """The gradient of the trainable backbone parameters at the method's first optimizer step
    (steps of other optimizers, such as proxy or value models, pass through)."""
    mine = {id(p) for p in m.trainable_parameters()}
    grads: list[torch.Tensor] = []

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        ps = [p for g in opt.param_groups for p in g["params"] if id(p) in mine]
        if ps:
            grads.extend(torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in ps)
            raise _FirstPolicyStep

    handle = register_optimizer_step_pre_hook(hook)
    try:
        m.train_step()
    except _FirstPolicyStep:
        pass
    finally:
        handle.remove()
    assert grads, "the method never stepped an optimizer over its trainable parameters"
    return grads


@pytest.mark.parametrize("method", [n for n in METHOD_NAMES if METHODS.get(n).uses_alpha])
def test_kl_term_and_its_gradient_are_zero_at_init(method: str, task: Any, make: Callable[..., Any]) -> None:
    """At initialization policy ≡ reference, so every KL term and its gradient are exactly 0: the
    first policy gradient cannot depend on the KL weight α."""
    g1 = first_policy_gradient(make(method, task, alpha=1.0))
    g2 = first_policy_gradient(make(method, task, alpha=37.0))
    assert any(bool(g.abs().sum() > 0) for g in g1), "the first gradient is zero"
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_declares_its_contract(method: str) -> None:
    cls = METHODS.get(method)
    for attr in ("paper", "version", "Config", "needs_reward_grad"):
        assert hasattr(cls, attr), attr
    assert isinstance(cls.version, int)
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
    doc = (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")
    assert "arXiv" in doc or "arxiv" in doc, "module docstring must cite the paper"
    assert "otation" in doc, "module docstring needs a notation block"
    assert "eviation" in doc, "module docstring needs the list of deviations from the official code"
    # every config field has help text (the string literal under it, cleanrl style)
    import inspect

    sources = [inspect.getsource(c).splitlines() for c in cls.Config.__mro__ if dataclasses.is_dataclass(c)]
    for f in dataclasses.fields(cls.Config):
        src = next(s for s in sources if any(l.strip().startswith(f"{f.name}:") for l in s))  # the defining class
        line = next(i for i, l in enumerate(src) if l.strip().startswith(f"{f.name}:"))
        nxt = src[line + 1].strip()
        assert nxt.startswith('"') or nxt.startswith("'"), f"{cls.__name__}.{f.name} has no help text"
