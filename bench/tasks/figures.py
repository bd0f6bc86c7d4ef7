"""Figures of a task's samples against its exact target (written at the end of a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.core.io import save_figure  # noqa: E402


def plot_2d_samples(samples: dict[str, Tensor], targets: dict[str, Any], base: Any, path: Path, title: str, bound: float = 9.0, n_show: int = 1500) -> None:
    """One panel per prompt: contours of log p* (or of the base) and the samples on top."""
    prompts = list(samples)
    n = len(prompts)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    g = torch.linspace(-bound, bound, 241, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    for ax, p in zip(axes.flat, prompts):
        tgt = targets.get(p)
        dens = tgt.log_prob(pts) if tgt is not None else base.log_prob(pts)
        z = dens.reshape(xx.shape).clamp(min=float(dens.max()) - 12).numpy()
        ax.contourf(xx.numpy(), yy.numpy(), z, levels=14, cmap="Blues")
        x = samples[p][:n_show].cpu()
        ax.scatter(x[:, 0], x[:, 1], s=2, c="tab:red", alpha=0.5, linewidths=0)
        ax.set_xlim(-bound, bound)
        ax.set_ylim(-bound, bound)
        ax.set_aspect("equal")
        ax.set_title(p or "samples (red) on log p* (blue)", fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def plot_subspace_samples(x: Tensor, ref: Tensor, plane: Tensor, off_plane: Callable[[Tensor], Tensor], path: Path, title: str) -> None:
    """Left: projection on the base's plane (samples vs exact p*); right: off-plane distances."""
    u = plane.float()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    pr, px = ref.float() @ u, x.float() @ u
    a1.scatter(pr[:, 0], pr[:, 1], s=2, c="tab:blue", alpha=0.3, label="p* (exact)")
    a1.scatter(px[:, 0], px[:, 1], s=2, c="tab:red", alpha=0.5, label="samples")
    a1.set_aspect("equal")
    a1.set_xlabel("u₁")
    a1.set_ylabel("u₂")
    a1.legend(fontsize=8, markerscale=4)
    a1.set_title("projection on the base plane", fontsize=9)
    d_s, d_r = off_plane(x.double()).numpy(), off_plane(ref.double()).numpy()
    hi = max(d_s.max(), d_r.max(), 1e-3)
    a2.hist(d_r, bins=60, range=(0, hi), alpha=0.6, label="p* (exact)", color="tab:blue")
    a2.hist(d_s, bins=60, range=(0, hi), alpha=0.6, label="samples", color="tab:red")
    a2.set_xlabel("distance to plane")
    a2.set_ylabel("count")
    a2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)
