"""Small networks shared by the embedded tasks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def time_features(t: Tensor, n: int = 16, max_period: float = 1000.0) -> Tensor:
    """Sinusoidal features of integer timesteps t [B] -> [B, n]."""
    half = n // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)


class TimeMLP(nn.Module):
    """ε-network for vectors: [x, time features, condition] -> hidden (SiLU) × layers -> d.

    With `zero_out`, the last layer starts at exactly zero, so the network outputs exactly 0 at
    initialization (the residual of the mixture tasks' mode A, docs/tasks/mixtures.md §5; RTB/DEFT zero-init).
    """

    def __init__(self, dim: int, cond_dim: int = 0, hidden: int = 128, layers: int = 2, time_dim: int = 16, zero_out: bool = False) -> None:
        super().__init__()
        self.dim, self.cond_dim, self.time_dim = dim, cond_dim, time_dim
        mods: list[nn.Module] = []
        width = dim + time_dim + cond_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*mods)
        self.out = nn.Linear(width, dim)
        if zero_out:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        h = [x, time_features(t, self.time_dim)]
        if self.cond_dim:
            h.append(cond.to(x.dtype))
        return self.out(self.body(torch.cat(h, dim=1)))
