""""Learns the toy" (SB3's test_identity): methods reach the exact KL-regularized target, and an
unregularized one over-optimizes, measured against ground truth on gmm-ring8 at α = 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.app.config import parse_sets, resolve
from bench.app.runner import reference_rows, run_one

FAST_EVAL = ["train.eval_every=0", "train.eval_samples=256", "train.final_eval_samples=2048", "train.plot=false"]


@pytest.fixture(scope="module")
def base_gap(tmp_path_factory: pytest.TempPathFactory) -> float:
    cfg = resolve("gmm-ring8", "sqdf", 0, layers=[parse_sets(FAST_EVAL)])
    rows = reference_rows("gmm-ring8", cfg.task_cfg, "quadratic", 1.0, cfg.sampler, 2048, tmp_path_factory.mktemp("ref"))
    return rows["base (pretrained)"]["gap"]


def test_sqdf_learns_the_toy(tmp_path: Path, base_gap: float) -> None:
    """SQDF with the shipped gmm-ring8 preset: E[r] within 10% of E*[r] = −1.340 and a gap
    (α·KL(P_θ‖P*)) well below the base model's (measured: −1.41 and 2.9 against the base's 6.2; its
    plug-in soft-Q overestimates the value's slope at mid noise, so its KL exceeds KL* ≈ 1.63)."""
    cfg = resolve("gmm-ring8", "sqdf", 0, layers=[parse_sets(FAST_EVAL)])
    m = run_one(cfg, tmp_path, progress=False)["metrics"]
    assert abs(m["reward"] - (-1.340)) < 0.134, m
    assert m["gap"] < 0.6 * base_gap, (m["gap"], base_gap)
    assert m["mode_recall"] == 1.0  # both admissible modes (80/18) are kept


def test_unregularized_draft_hacks_the_reward(tmp_path: Path) -> None:
    """DRaFT-1 ignores α: it exceeds E*[r] by leaving the base's support (docs/tasks/mixtures.md §7)."""
    cfg = resolve("gmm-ring8", "draft", 0, layers=[parse_sets(FAST_EVAL + ["train.iterations=150"])])
    m = run_one(cfg, tmp_path, progress=False)["metrics"]
    assert m["reward"] > -1.340 and m["off_manifold"] > 0.5 and m["path_kl"] > 10 * 1.628, m
