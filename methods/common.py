"""Small pieces several methods share (the diffusion math itself lives in `bench.core.diffusion`).

* sample_prompts: prompts i.i.d. uniform per trajectory, as ddpo-pytorch (Black et al., ICLR 2024,
  arXiv:2305.13301) and the SQDF code draw them.
* adamw / optimizer_step: AdamW (Loshchilov & Hutter, ICLR 2019, arXiv:1711.05101) with a global
  gradient-norm clip (Pascanu, Mikolov, Bengio, ICML 2013, arXiv:1211.5063), gradients averaged over
  ranks first (bench.core.distributed).
* require / check_range / check_choice: config validation as one-line BenchErrors.
* discount: SQDF's γ^{steps left} (Kang et al., ICLR 2026, arXiv:2512.04559, Eqs. 13–15;
  docs/methods/sqdf_soft_q.md, "Discounting").

Notation: n_k = T − 1 − k (steps left after sampling step k) = t − 1 in the paper's countdown t.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from bench.core.distributed import sync_gradients
from bench.core.errors import BenchError


def sample_prompts(prompts: Sequence[str], n: int, generator: torch.Generator) -> list[str]:
    """n prompts drawn uniformly with replacement."""
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return [prompts[i] for i in idx.tolist()]


def adamw(params: Iterable[nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], grad_clip: float | None) -> float:
    """Average gradients over ranks (multi-process runs, bench.core.distributed), clip the global
    gradient norm (if set), step, zero grads. Returns the pre-clip norm."""
    sync_gradients(params)
    grads = [p.grad for p in params if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    if grad_clip is not None and grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def require(cond: bool, msg: str) -> None:
    """Config validation: a one-line BenchError naming the field and the accepted values."""
    if not cond:
        raise BenchError(msg)


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = True
    if lo is not None:
        ok &= value > lo if lo_open else value >= lo
    if hi is not None:
        ok &= value < hi if hi_open else value <= hi
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise BenchError(f"{name} must be in {rng}, got {value}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise BenchError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def discount(gamma: float, steps_left: Tensor) -> Tensor:
    """γ^{steps left} per item (SQDF's weight on the soft-Q of step k: n_k = T − 1 − k)."""
    return torch.as_tensor(gamma, dtype=torch.float32) ** steps_left.float()
