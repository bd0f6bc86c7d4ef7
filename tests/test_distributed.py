"""Multi-process training (bench/core/distributed.py) with 2 CPU processes (gloo, through accelerate):
the synchronized gradient is the gradient of the combined batch, parameters stay identical across
ranks, and a 2-process run of the runner keeps every rank's state in its checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.core import distributed as dist
from bench.app.config import resolve
from bench.app.runner import load_checkpoint, run_dir, run_one
from methods.common import adamw, optimizer_step


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1), nn.Linear(1, 1))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(dist.rank_seed(100 + step, rank))
    x = torch.randn(5, 3, generator=g)
    return x, x.sum(1, keepdim=True).sin()


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
    out = model[:3](x)
    # rank 1 also uses the last layer: on rank 0 that layer's .grad stays None (a zero gradient there)
    if rank == 1:
        out = model[3](out)
    return ((out - y) ** 2).mean()


def _worker(out: str) -> None:
    """Runs on each of the 2 ranks: one synchronized gradient, then 3 AdamW steps."""
    rank, world = dist.world()
    assert world == 2
    model = _model()
    params = list(model.parameters())
    x, y = _batch(rank, 0)
    _loss(model, x, y, rank).backward()
    dist.sync_gradients(params)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    opt = adamw(params, 1e-2, 1e-4)
    for step in range(1, 4):
        x, y = _batch(rank, step)
        _loss(model, x, y, rank).backward()
        optimizer_step(opt, params, grad_clip=0.5)
    torch.save({"grads": grads, "params": [p.detach().clone() for p in params]}, Path(out) / f"rank{rank}.pt")


def _combined_loss(model: nn.Module, step: int) -> torch.Tensor:
    """The mean of the two ranks' losses = the loss of the combined batch (equal batch sizes)."""
    return 0.5 * sum(_loss(model, *_batch(r, step), r) for r in (0, 1))


def test_synchronized_gradients_equal_the_combined_batch(tmp_path: Path) -> None:
    dist.launch(_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    model = _model()
    _combined_loss(model, 0).backward()
    for g0, g1, p in zip(r0["grads"], r1["grads"], model.parameters()):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, p.grad, rtol=1e-6, atol=1e-7)
    # parameters are identical on both ranks after the steps, and equal one process training on the combined batches
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    model = _model()
    params = list(model.parameters())
    opt = adamw(params, 1e-2, 1e-4)
    for step in range(1, 4):
        _combined_loss(model, step).backward()
        optimizer_step(opt, params, grad_clip=0.5)
    for p0, p in zip(r0["params"], params):
        torch.testing.assert_close(p0, p.detach(), rtol=1e-5, atol=1e-6)


def test_single_process_helpers_are_no_ops() -> None:
    assert dist.world() == (0, 1) and dist.is_main() and not dist.initialized()
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.tensor([1.0, 2.0])
    dist.sync_gradients([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))
    assert dist.reduce_floats({"a": 1.5}, "mean") == {"a": 1.5}
    assert dist.gather_objects(3) == [3] and dist.any_rank(True) and not dist.any_rank(False)
    assert dist.rank_seed(7, 0) == 7 and dist.rank_seed(7, 1) != dist.rank_seed(7, 2) != 7


def test_two_process_run_keeps_ranks_in_sync_and_checkpoints_each_rank(tmp_path: Path) -> None:
    sets = {"train": {"iterations": 3, "eval_every": 0, "eval_samples": 16, "final_eval_samples": 32, "checkpoint_every": 1, "plot": False,
                      "processes": 2}, "method": {"batch_size": 4}}
    cfg = resolve("gmm-ring8", "draft", 0, alpha=1.0, layers=[sets])
    res = run_one(cfg, tmp_path, progress=False)
    assert res["iterations"] == 3 and res["train"]["processes"] == 2
    assert res["budget"]["reward_queries"] == 2 * 3 * 4  # summed over both ranks
    state = load_checkpoint(run_dir(tmp_path, cfg) / "checkpoint.pt")
    ranks = state["ranks"]
    assert len(ranks) == 2
    for k, v in ranks[0]["method"]["params"].items():
        assert torch.equal(v, ranks[1]["method"]["params"][k]), k
    assert not torch.equal(ranks[0]["method"]["generator"], ranks[1]["method"]["generator"]), "each rank draws its own batches"
    # a 1-process config keeps its pre-existing identity (train.processes is left out of it)
    one = resolve("gmm-ring8", "draft", 0, alpha=1.0, layers=[{**sets, "train": {**sets["train"], "processes": 1}}])
    assert "processes" not in one.to_dict()["train"] and one.hash() != cfg.hash()
