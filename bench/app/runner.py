"""The one outer loop: build, train, evaluate, checkpoint, write the run folder.

A run folder (runs/<task>/<method>/<reward>_a<α>_s<seed>_<hash>/) holds
    config.json     the resolved RunConfig (written before training starts)
    metrics.jsonl   one line per iteration (train/, budget/, time/ keys) and per evaluation (eval/)
    checkpoint.pt   the latest resumable state (method: parameters, optimizer, RNG, buffers;
                    runner: iteration, clock, counters, log length)
    final.json      final metrics with provenance, budgets and wall time per phase
    samples.png     final samples against the target
Re-running a folder without final.json resumes from its checkpoint; one with final.json is skipped.
Only this module evaluates; methods never score themselves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from bench.core import distributed as dist
from bench.core.cache import config_hash
from bench.core.clock import CallCounter, PhaseClock
from bench.app.config import RunConfig
from bench.core.io import atomic_torch_save, dump_json
from bench.core.diffusion import alpha_sqdf_from_nats
from bench.core.errors import BenchError
from bench.core.evaluation import (
    EvalContext,
    all_eval_prompts,
    closed_form_row,
    compute_metrics,
    oracle_samples,
    sample_model,
    target_samples,
)
from bench.core.provenance import snapshot
from bench.core.registry import METHODS, METRICS, TASKS
from bench.core.task import Backbone, SamplerConfig, Task
from bench.core.method import TrainContext
from bench.core.reward import BudgetExhausted, CountingReward

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1

_task_cache: dict[tuple[str, str], Task] = {}


def build_task(name: str, task_cfg: Any, device: str = "cpu") -> Task:
    """A task object, shared within the process by every run with the same task config."""
    key = (name, config_hash(asdict(task_cfg)))
    if key not in _task_cache:
        _task_cache[key] = TASKS.get(name)(task_cfg, device)
    return _task_cache[key]


def run_dir(root: Path, cfg: RunConfig) -> Path:
    return Path(root) / cfg.task / cfg.method / cfg.run_name()


class MetricLog:
    """metrics.jsonl, append-only; truncated to a checkpoint's length on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open() as f:
            return sum(1 for _ in f)

    def truncate(self, n: int) -> None:
        if not self.path.exists() or not dist.is_main():
            return
        keep = self.path.read_text().splitlines()[:n]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not dist.is_main():
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def evaluate(task: Task, backbone: Backbone, ctx: EvalContext, sampler: SamplerConfig, n: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the current model on the task's eval prompts (n samples per prompt)."""
    saved = backbone.counter
    backbone.counter = CallCounter()  # evaluation does not count toward training budgets
    was_training = backbone.training
    backbone.eval()
    try:
        samples = sample_model(backbone, all_eval_prompts(task), n, sampler)
        return compute_metrics(samples, ctx), samples
    finally:
        backbone.counter = saved
        backbone.train(was_training)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "method" not in state or "iteration" not in state:
            raise ValueError("not a checkpoint of this harness")
        return state
    except Exception as e:
        raise BenchError(
            f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); delete it to restart this run from scratch, "
            f"or re-run with --force"
        ) from None


def run_one(cfg: RunConfig, root: Path, *, force: bool = False, progress: bool = True, stop_after: int | None = None,
            stop_when: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train and evaluate one run; resume it if its folder has a checkpoint; skip it if finished.

    Args:
        stop_after: stop (with a checkpoint, without final.json) after this many iterations of
            this call: a test hook that simulates preemption.
        stop_when: polled after every iteration; once it returns True, stop the same way (the
            preemption/time-limit signal path of bench.app.grid.CellJob).
    Returns:
        The contents of final.json (or {} when stopped early, and on ranks other than 0).
    """
    rank, world = dist.world()
    if cfg.train.processes > 1 and world == 1:  # spawn the ranks of this run (bench/core/distributed.py)
        dist.launch(run_one, cfg.train.processes, cfg, root, force=force, progress=progress, stop_after=stop_after, stop_when=stop_when)
        final = run_dir(root, cfg) / "final.json"
        return json.loads(final.read_text()) if final.exists() else {}
    if world != cfg.train.processes:
        raise BenchError(f"train.processes={cfg.train.processes} but the process group has {world} processes")
    main = rank == 0
    d = run_dir(root, cfg)
    final_path = d / "final.json"
    if final_path.exists() and not force:
        return json.loads(final_path.read_text()) if main else {}
    cfg_dict = cfg.to_dict()
    if (d / "config.json").exists() and not force:
        old = json.loads((d / "config.json").read_text())
        if old != json.loads(json.dumps(cfg_dict)):
            raise BenchError(f"{d} holds a run with a different config; use another runs directory or --force")

    t_start = time.time()
    task = build_task(cfg.task, cfg.task_cfg)
    # Modules built with torch's default initializers (e.g. an nn.Linear) draw from the global RNG, whose
    # start seed differs per process: seed it from the run seed, locally, so that every process builds
    # the same initial weights (a requeued job, another rank, a local re-run of a Slurm cell).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = task.build_backbone()
        clock = PhaseClock()
        budget = cfg.train.query_budget or None
        reward = CountingReward(task.build_reward(cfg.reward), clock, budget)
        ctx = TrainContext(backbone, reward, list(task.train_prompts), cfg.alpha, cfg.sampler, cfg.seed, clock, task)
        method_cls = METHODS.get(cfg.method)
        method = method_cls(cfg.method_cfg, ctx)
    # Everything is built (missing weights, bad settings have raised): only now touch the disk.
    if force and d.exists() and main:
        shutil.rmtree(d)
    dist.barrier()
    d.mkdir(parents=True, exist_ok=True)
    if main and not (d / "config.json").exists():
        dump_json(cfg_dict, d / "config.json")
    dist.prepare_method(method, cfg.seed)  # multi-process: rank-0 weights, one random stream per rank
    ectx = EvalContext(task, cfg.reward, cfg.alpha)
    mlog = MetricLog(d / "metrics.jsonl")
    ckpt_path = d / "checkpoint.pt"

    start = 0
    stopped_by_budget = False
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if len(state.get("ranks", [state])) != world:
            raise BenchError(f"{ckpt_path} was written by {len(state.get('ranks', [state]))} processes, this run has {world}")
        own = state["ranks"][rank] if world > 1 else state  # multi-process: this rank's own state
        method.load_state_dict(own["method"])
        clock.load_state_dict(state["clock"])
        backbone.counter.load_state_dict(own["counter"])
        reward.queries = int(own["reward_queries"])
        start = int(state["iteration"])
        stopped_by_budget = bool(state.get("stopped_by_budget", False))
        mlog.truncate(int(state["log_lines"]))
    else:
        mlog.truncate(0)

    def budget_record(local: bool = False) -> dict[str, float]:
        calls = backbone.counter.state_dict()
        rec = {"budget/reward_queries": reward.queries, "budget/denoiser_calls": sum(calls.values())}
        rec.update({f"budget/denoiser_calls_{k}": v for k, v in calls.items()})
        return rec if world == 1 or local else {**rec, **global_budget}

    global_budget: dict[str, float] = {}  # multi-process: counters summed over ranks (updated every iteration)

    def do_eval(iteration: int, n: int) -> tuple[dict[str, float], dict[str, Any]]:
        with clock("evaluation"):
            m, samples = evaluate(task, backbone, ectx, cfg.sampler, n)
            if cfg.train.plot and hasattr(task, "on_evaluation"):  # optional task hook, e.g. per-checkpoint sample grids
                task.on_evaluation(iteration, samples, d)
        mlog.write({"iteration": iteration, **{f"eval/{k}": v for k, v in m.items()}, **budget_record()})
        return m, samples

    def save_ckpt(iteration: int) -> None:
        with clock("checkpoint"):
            method_state = method.state_dict()
            # multi-process: every rank's own method state (generator, buffers) and counters
            ranks = dist.gather_objects({"method": method_state, "counter": backbone.counter.state_dict(),
                                         "reward_queries": reward.queries}) if world > 1 else None
            if not main:
                return
            atomic_torch_save(
                {
                    "iteration": iteration,
                    "method": method_state,
                    **({"ranks": ranks} if ranks is not None else {}),
                    "clock": clock.state_dict(),
                    "counter": backbone.counter.state_dict(),
                    "reward_queries": reward.queries,
                    "log_lines": mlog.lines(),
                    "stopped_by_budget": stopped_by_budget,
                    "config_hash": cfg.hash(),
                },
                ckpt_path,
            )

    N = cfg.train.iterations
    if start == 0 and main:
        do_eval(0, cfg.train.eval_samples)
    bar = _bar(progress and main, f"{cfg.task} {cfg.method} α={cfg.alpha:g} s={cfg.seed}", N, start)
    iteration, done_this_call = start, 0
    while iteration < N and not stopped_by_budget:
        try:
            with clock("other"):
                stats = method.train_step()
        except BudgetExhausted:
            stopped_by_budget = True
            log.info("%s: query budget exhausted after %d iterations", d.name, iteration)
            save_ckpt(iteration)
            break
        iteration += 1
        if world > 1:
            stats = dist.reduce_floats(stats, "mean")
            global_budget.update(dist.reduce_floats(budget_record(local=True), "sum"))
        bad = [k for k, v in stats.items() if not math.isfinite(float(v))]
        if bad:
            raise BenchError(f"{cfg.method} produced non-finite {', '.join(bad)} at iteration {iteration}; lower method.lr or check the reward")
        mlog.write({"iteration": iteration, **stats, **budget_record(), "time/train": sum(v for k, v in clock.seconds.items() if k != "evaluation")})
        if cfg.train.eval_every and iteration % cfg.train.eval_every == 0 and iteration < N and main:
            do_eval(iteration, cfg.train.eval_samples)
        if iteration % cfg.train.checkpoint_every == 0 or iteration == N:
            save_ckpt(iteration)
        if bar is not None:
            bar.update(1)
        done_this_call += 1
        stop = (stop_after is not None and done_this_call >= stop_after) or (stop_when is not None and dist.any_rank(stop_when()))
        if stop and iteration < N:
            save_ckpt(iteration)
            return {}
    if bar is not None:
        bar.close()
    if not main:
        return {}
    iterations_done = iteration

    metrics, samples = do_eval(iterations_done, cfg.train.final_eval_samples)
    if cfg.train.plot:
        with clock("evaluation"):
            title = f"{cfg.task} · {cfg.method} · {cfg.reward} · α={cfg.alpha:g} · seed {cfg.seed} · {iterations_done} it"
            task.plot_samples({p: s.x for p, s in samples.items()}, cfg.reward, cfg.alpha, d / "samples.png", title)
    if hasattr(backbone, "save_trained"):  # e.g. the SD LoRA, loadable by diffusers pipelines
        with clock("checkpoint"):
            backbone.save_trained(d / "lora")
    result = {
        "schema": SCHEMA_VERSION,
        "run": d.name,
        "task": task.describe(),
        "method": {**method_cls.describe(), "config": asdict(cfg.method_cfg)},
        "reward": {"name": cfg.reward, "version": ectx.reward.version, **({"gold": ectx.gold_name} if ectx.gold_name else {})},
        "alpha": cfg.alpha,
        "alpha_sqdf": alpha_sqdf_from_nats(cfg.alpha, backbone.dim),
        "seed": cfg.seed,
        "sampler": asdict(cfg.sampler),
        "train": asdict(cfg.train),
        "config_hash": cfg.hash(),
        "iterations": iterations_done,
        "stopped_by_budget": stopped_by_budget,
        "metrics": metrics,
        "metric_meta": {m: {k: v for k, v in METRICS.entry(m).meta.items() if k in ("direction", "label")} for m in task.metrics},
        "eval": {"samples_per_prompt": cfg.train.final_eval_samples, "prompt_sets": task.eval_prompt_sets,
                 "prompt_set_hash": config_hash(task.eval_prompt_sets)[:8]},
        "budget": {k.split("/", 1)[1]: v for k, v in budget_record().items()},
        "time": {**{k: round(v, 3) for k, v in clock.state_dict().items()}, "total": round(sum(clock.state_dict().values()), 3),
                 "this_call_wall": round(time.time() - t_start, 3)},
        "backbone": backbone.describe(),
        "provenance": snapshot(),
    }
    dump_json(result, final_path)
    return result


def _bar(enabled: bool, desc: str, total: int, start: int, leave: bool = False) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, initial=start, leave=leave, dynamic_ncols=True, mininterval=1.0)


# ---- reference rows ----------------------------------------------------------------------------


def reference_rows(task_name: str, task_cfg: Any, reward: str, alpha: float, sampler: SamplerConfig, n: int, root: Path) -> dict[str, dict[str, float]]:
    """Rows that put a table in context: p* closed form, p* sample floor, ε* sampler floor, base.

    Cached under <root>/_reference/ (they depend only on the task, reward, α, sampler and n)."""
    key = {"task": task_name, "task_cfg": asdict(task_cfg), "reward": reward, "alpha": alpha, "sampler": asdict(sampler), "n": n,
           "task_version": TASKS.get(task_name).version}
    path = Path(root) / "_reference" / f"{task_name}_{reward}_a{alpha:g}_{config_hash(key)[:8]}.json"
    if path.exists():
        return json.loads(path.read_text())["rows"]
    task = build_task(task_name, task_cfg)
    ctx = EvalContext(task, reward, alpha)
    backbone = task.build_backbone()
    rows: dict[str, dict[str, float]] = {}
    if task.target(reward, alpha, all_eval_prompts(task)[0]) is not None:
        rows["p* (closed form)"] = closed_form_row(ctx)
        ex = target_samples(ctx, n)
        if ex is not None:
            rows["p* sample (floor)"] = compute_metrics(ex, ctx)
        orc = oracle_samples(ctx, backbone, n, sampler)
        if orc is not None:
            rows["ε* sampler (floor)"] = compute_metrics(orc, ctx)
    rows["base (pretrained)"] = evaluate(task, backbone, ctx, sampler, n)[0]
    dump_json({"key": key, "rows": rows}, path)
    return rows


def run_many(cfgs: list[RunConfig], root: Path, *, force: bool = False, progress: bool = True, on_done: Callable[[RunConfig, dict], None] | None = None) -> list[dict[str, Any]]:
    """Run configs one after the other (local executor); a failing run is reported, not fatal."""
    results = []
    outer = _bar(progress and len(cfgs) > 1, "runs", len(cfgs), 0, leave=True)
    for cfg in cfgs:
        res = run_one(cfg, root, force=force, progress=progress)
        results.append(res)
        if on_done:
            on_done(cfg, res)
        if outer is not None:
            outer.update(1)
    if outer is not None:
        outer.close()
    return results
