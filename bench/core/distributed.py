"""Several processes (ranks) training one run: gradient averaging, rank seeds, rank-0 I/O.

A run with `train.processes = N` (`--set train.processes=2`, or `set:` in a grid file) trains with
N processes inside one job. Every rank builds the same task, backbone and method; then

* its method generator is re-seeded from (seed, rank) (`prepare_method`), so each rank draws its
  own prompts, noises and replay samples. Rank 0 keeps the run seed, so a 1-process run is
  unchanged, and everything a method draws while it is being built (initial weights of a proxy
  model, say) is identical on every rank;
* the trainable parameters are broadcast from rank 0 once (a guard; they are equal by
  construction);
* every optimizer step averages the gradients over the ranks first (`sync_gradients`, called
  by methods/common.py:optimizer_step), so the parameters stay identical and the update is the
  one of the combined batch of N × batch_size items;
* the logged train/ statistics are averaged and the budget counters summed over the ranks;
* rank 0 alone evaluates and writes the run folder. A checkpoint holds every rank's method state
  (generators and buffers differ per rank), so a resumed run continues exactly as it would have.

The process group comes from accelerate (`PartialState`: gloo on CPU, NCCL on GPUs) and the usual
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `launch` spawns the N
processes of one run itself (bench.app.runner.run_one calls it when `train.processes > 1` and no
process group exists); `torchrun --nproc_per_node N` or `accelerate launch` around a script that
calls run_one work as well, the world size having to match `train.processes`.

Without a process group every helper is a no-op, so single-process code pays nothing.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bench.core.errors import BenchError


def initialized() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s generator: the run seed on rank 0, a hash of (seed, rank) elsewhere."""
    if rank == 0:
        return int(seed)
    return int(hashlib.sha256(f"bench-rank:{seed}:{rank}".encode()).hexdigest()[:15], 16)


def prepare_method(method: Any, seed: int) -> None:
    """Broadcast rank 0's trainable parameters and give each rank its own random stream.

    Args:
        method: an AlignmentMethod (uses `trainable_parameters()` and `generator`).
        seed: the run seed.
    """
    rank, n = world()
    if n == 1:
        return
    with torch.no_grad():
        for p in method.trainable_parameters():
            dist.broadcast(p.data, src=0)
    method.generator.manual_seed(rank_seed(seed, rank))


def sync_gradients(params: Sequence[nn.Parameter]) -> None:
    """Average `.grad` over the ranks (in place); a no-op in a single process.

    A parameter without a gradient on some ranks counts as a zero gradient there; one without a
    gradient on every rank keeps `.grad = None` (so AdamW skips it, as it would in one process).
    All gradients travel in one flat buffer per dtype.
    """
    if not initialized():
        return
    n = dist.get_world_size()
    params = list(params)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in live:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= n
        i = 0
        for p in group:
            k = p.grad.numel()
            p.grad.copy_(flat[i:i + k].view_as(p.grad))
            i += k


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (ranks agree on when to stop)."""
    if not initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def reduce_floats(values: dict[str, float], op: str) -> dict[str, float]:
    """Mean ("mean") or sum ("sum") of each value over the ranks; every rank must pass the same keys."""
    if not initialized() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (a list indexed by rank), None on the others."""
    if not initialized():
        return [obj]
    rank, n = world()
    out: list[Any] | None = [None] * n if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# ---- launching the processes of one run ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_process_group(rank: int, world_size: int, port: int, cpu: bool = True) -> None:
    """Join the process group of a run through accelerate (gloo on CPU)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    if state.num_processes != world_size:
        raise BenchError(f"accelerate set up {state.num_processes} processes, expected {world_size}")


def _worker(rank: int, fn: Callable[..., Any], args: tuple, kwargs: dict, world_size: int, port: int, threads: int,
            stop_event: Any) -> None:
    # Slurm signals the whole process tree; the parent decides when to stop and tells the ranks.
    for s in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(s, signal.SIG_IGN)
    torch.set_num_threads(threads)
    init_process_group(rank, world_size, port)
    try:
        if stop_event is not None:
            kwargs = {**kwargs, "stop_when": stop_event.is_set}
        fn(*args, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, stop_when: Callable[[], bool] | None = None, **kwargs: Any) -> None:
    """Run `fn(*args, **kwargs)` in `world_size` spawned processes that form one process group.

    Args:
        fn: an importable function (it is pickled for the spawned processes).
        stop_when: polled here (e.g. a signal flag of this process); once true, each rank's `fn`
            sees `stop_when=` (a shared event) return true.
    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (the first error).
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    event = ctx.Event() if stop_when is not None else None
    threads = max(1, torch.get_num_threads() // world_size)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            if stop_when is not None and stop_when():
                event.set()
                return

    watcher = threading.Thread(target=watch, daemon=True) if event is not None else None
    if watcher is not None:
        watcher.start()
    try:
        mp.start_processes(_worker, args=(fn, args, kwargs, world_size, _free_port(), threads, event), nprocs=world_size,
                           join=True, start_method="spawn")
    finally:
        done.set()
        if watcher is not None:
            watcher.join()
