"""The one outer loop: build, restore, train, finalize; the run folder is written only here.

A run folder (runs/<task>/<method>/<reward>_a<α>_s<seed>_<hash>/) holds
    config.json     the resolved RunConfig (written before training starts)
    metrics.jsonl   one line per iteration (train/, budget/, time/ keys) and per evaluation (eval/)
    checkpoint.pt   the latest resumable state (method: parameters, optimizer, RNG, buffers;
                    runner: iteration, clock, counters, log length) and a header naming the run
                    it belongs to (config and its hash, method, task and reward with their versions,
                    checkpoint format); tensors and plain values only, read with the safe loader
    final.json      final metrics with provenance, budgets and wall time per phase (bench.app.results)
    samples.png     final samples against the target
Re-running a folder without final.json resumes from its checkpoint (only its own: a checkpoint
whose header names another run is refused); one with final.json is skipped.
Only this module evaluates; methods never score themselves.

`run_one` reads as its four phases: `_build` (task, backbone, reward, method: everything that can
fail on bad input, before the folder is written), `_restore` (checkpoint), `_train` (the loop),
`_finalize` (final evaluation, final.json). They share one `RunState`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bench.app import results
from bench.app.config import RunConfig
from bench.core import distributed as dist
from bench.core import progress as prog
from bench.core.cache import config_hash
from bench.core.clock import CallCounter, PhaseClock
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
from bench.core.io import atomic_torch_save, dump_json, read_json, safe_torch_load, unsafe_globals
from bench.core.method import AlignmentMethod, TrainContext
from bench.core.provenance import snapshot
from bench.core.registry import METHODS, METRICS, TASKS
from bench.core.reward import BudgetExhausted, CountingReward
from bench.core.task import Backbone, SamplerConfig, Task

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "diffusion-alignment-bench checkpoint"
CHECKPOINT_VERSION = 2
"1: the unversioned pickles of earlier releases (no header; refused); 2: header + safe types"

_SAMPLE_CHUNK = 8192  # samples per rollout batch in sample_model (its default): sizes the evaluation bar

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


def evaluate(task: Task, backbone: Backbone, ctx: EvalContext, sampler: SamplerConfig, n: int,
             tick: Callable[[int], Any] | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of the current model on the task's eval prompts (n samples per prompt).

    `tick(1)` is called after every denoising step of the policy (for a progress bar); the same
    denoiser runs on the same batches, so the numbers do not depend on it."""
    saved = backbone.counter
    backbone.counter = CallCounter()  # evaluation does not count toward training budgets
    was_training = backbone.training
    backbone.eval()
    try:
        policy = _ticking(backbone.policy, tick) if tick is not None else None
        samples = sample_model(backbone, all_eval_prompts(task), n, sampler, policy=policy)
        return compute_metrics(samples, ctx), samples
    finally:
        backbone.counter = saved
        backbone.train(was_training)


def _ticking(policy: Callable[..., Any], tick: Callable[[int], Any]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        out = policy(*args, **kwargs)
        tick(1)
        return out

    return counted


def _eval_steps(task: Task, n: int, sampler: SamplerConfig) -> int:
    """Policy calls of one evaluation: sampler steps per rollout batch."""
    return sampler.steps * max(1, math.ceil(len(all_eval_prompts(task)) * n / _SAMPLE_CHUNK))


# ---- the run's state ---------------------------------------------------------------------------


@dataclass
class RunState:
    """Everything the phases of one run share."""

    cfg: RunConfig
    dir: Path
    rank: int
    world: int
    progress: bool
    t_start: float
    task: Task
    backbone: Backbone
    clock: PhaseClock
    reward: CountingReward
    method_cls: type[AlignmentMethod]
    method: AlignmentMethod
    ectx: EvalContext | None = None
    log: MetricLog | None = None
    iteration: int = 0
    stopped_by_budget: bool = False
    global_budget: dict[str, float] = field(default_factory=dict)  # multi-process: counters summed over ranks

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    def budget_record(self, local: bool = False) -> dict[str, float]:
        calls = self.backbone.counter.state_dict()
        rec = {"budget/reward_queries": self.reward.queries, "budget/denoiser_calls": sum(calls.values())}
        rec.update({f"budget/denoiser_calls_{k}": v for k, v in calls.items()})
        return rec if self.world == 1 or local else {**rec, **self.global_budget}

    def header(self) -> dict[str, Any]:
        """What a checkpoint records about the run it belongs to (compared on resume)."""
        cfg = self.cfg
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "result_schema": results.SCHEMA_VERSION,
            "method": {"name": cfg.method, "version": self.method_cls.version},
            "task": {"name": cfg.task, "version": self.task.version},
            "reward": {"name": cfg.reward, "version": self.reward.version},
            "config_hash": cfg.hash(),
            "config": json.loads(json.dumps(cfg.to_dict())),
            "processes": self.world,
            "torch": str(torch.__version__),
        }


# ---- run_one: build / restore / train / finalize -------------------------------------------------


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
    d = run_dir(root, cfg)
    if (d / "final.json").exists() and not force:
        return results.read_final(d).to_dict() if rank == 0 else {}
    if (d / "config.json").exists() and not force:
        old = read_json(d / "config.json", "run config", "start this run over with --force, or delete its folder")
        if old != json.loads(json.dumps(cfg.to_dict())):
            raise BenchError(f"{d} holds a run with a different config; use another runs directory or --force")
    created = _claim_folder(d) if rank == 0 else []  # a file or an unwritable path fails now, not after the build
    try:
        with prog.announcing(progress and rank == 0):
            st = _build(cfg, d, rank, world, progress=progress and rank == 0)
    except BaseException:
        _unclaim(created)
        raise
    _open_folder(st, force)
    _restore(st)
    if not _train(st, stop_after, stop_when) or not st.main:
        return {}
    return _finalize(st).to_dict()


def _build(cfg: RunConfig, d: Path, rank: int, world: int, progress: bool) -> RunState:
    """Task, backbone, counted reward and method (missing weights and bad settings raise here)."""
    t_start = time.time()
    task = build_task(cfg.task, cfg.task_cfg)
    if hasattr(task, "progress"):  # optional task attribute: bars while it builds its artifacts (e.g. digits)
        task.progress = progress
    # Modules built with torch's default initializers (e.g. an nn.Linear) draw from the global RNG, whose
    # start seed differs per process: seed it from the run seed, locally, so that every process builds
    # the same initial weights (a requeued job, another rank, a local re-run of a Slurm cell).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = task.build_backbone()
        clock = PhaseClock()
        reward = CountingReward(task.build_reward(cfg.reward), clock, cfg.train.query_budget or None)
        ctx = TrainContext(backbone, reward, list(task.train_prompts), cfg.alpha, cfg.sampler, cfg.seed, clock, task)
        method_cls = METHODS.get(cfg.method)
        method = method_cls(cfg.method_cfg, ctx)
    return RunState(cfg, d, rank, world, progress, t_start, task, backbone, clock, reward, method_cls, method)


def _open_folder(st: RunState, force: bool) -> None:
    """Everything is built: only now replace (--force) or fill the run folder."""
    cfg, d = st.cfg, st.dir
    if force and d.exists() and st.main:
        shutil.rmtree(d)
    dist.barrier()
    d.mkdir(parents=True, exist_ok=True)
    if st.main and not (d / "config.json").exists():
        dump_json(cfg.to_dict(), d / "config.json")
    dist.prepare_method(st.method, cfg.seed)  # multi-process: rank-0 weights, one random stream per rank
    with prog.announcing(st.progress):
        st.ectx = EvalContext(st.task, cfg.reward, cfg.alpha)
    st.log = MetricLog(d / "metrics.jsonl")


def _claim_folder(d: Path) -> list[Path]:
    """Create the run folder (and missing parents) and check that it takes files, before the build;
    returns the folders created, for `_unclaim` should the build fail."""
    missing, p = [], d
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise BenchError(f"cannot create the run folder {d}: {p} is a file, not a folder; choose another --runs-dir")
    created: list[Path] = []
    try:
        for q in reversed(missing):
            q.mkdir()
            created.append(q)
        fd, probe = tempfile.mkstemp(prefix=".write-test", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _unclaim(created)
        raise BenchError(f"cannot write to the run folder {d} ({e.strerror or type(e).__name__}); choose a writable --runs-dir") from None
    return created


def _unclaim(created: list[Path]) -> None:
    """Remove the folders `_claim_folder` created, if still empty (nothing half-written is left)."""
    for q in reversed(created):
        try:
            q.rmdir()
        except OSError:
            return


# ---- checkpoints ------------------------------------------------------------------------------


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, read with the safe loader (tensors and plain values only; nothing in
    the file is executed). BenchError (one line, naming --force) if it is not a harness checkpoint."""
    try:
        state = safe_torch_load(path)
    except pickle.UnpicklingError:
        names = unsafe_globals(path)
        if not names:
            raise _corrupt(path, "UnpicklingError") from None
        raise BenchError(f"checkpoint {path} holds objects this harness does not load ({', '.join(names[:2])}): it was written by an "
                         "older version or by something else, and is not executed; start this run over with --force") from None
    except Exception as e:
        raise _corrupt(path, type(e).__name__) from None
    if not isinstance(state, dict) or "method" not in state or "iteration" not in state:
        raise _corrupt(path, "not a checkpoint of this harness")
    return state


def _corrupt(path: Path, why: str) -> BenchError:
    return BenchError(f"checkpoint {path} is corrupt or unreadable ({why}); delete it to restart this run from scratch, or re-run with --force")


def check_header(path: Path, saved: Any, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint that belongs to another run (or to an older checkpoint format)."""
    refuse = f"; start this run over with --force (it deletes {path.parent})"
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise BenchError(f"checkpoint {path} has no run header (written by an older version of the harness) and is not resumed{refuse}")
    for key in ("version", "result_schema"):
        if saved.get(key) != expected[key]:
            raise BenchError(f"checkpoint {path} has checkpoint {key} {saved.get(key)!r}, this harness writes {expected[key]!r}{refuse}")
    for part in ("method", "task", "reward"):
        for key in ("name", "version"):
            a, b = (saved.get(part) or {}).get(key), expected[part][key]
            if a != b:
                raise BenchError(f"checkpoint {path} belongs to another run: {part} {key} is {a!r} there, {b!r} here{refuse}")
    diff = _first_difference(saved.get("config"), expected["config"])
    if diff is not None or saved.get("config_hash") != expected["config_hash"]:
        what = f"{diff[0]} is {diff[1]!r} there, {diff[2]!r} here" if diff else f"config hash {saved.get('config_hash')!r}"
        raise BenchError(f"checkpoint {path} belongs to another run: {what}{refuse}")
    if saved.get("processes") != expected["processes"]:
        raise BenchError(f"checkpoint {path} was written by {saved.get('processes')} processes, this run has {expected['processes']}{refuse}")


def _first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted key (e.g. "method_cfg.lr") where two JSON-like values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(b) + [k for k in a if k not in b]:
            sub = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if sub is not None:
                return sub
        return None
    return None if a == b else (where or "config", a, b)


def _restore(st: RunState) -> None:
    """Resume from the run folder's checkpoint (its own only), or start a fresh log."""
    if not st.ckpt_path.exists():
        st.log.truncate(0)
        return
    state = load_checkpoint(st.ckpt_path)
    check_header(st.ckpt_path, state.get("header"), st.header())
    if len(state.get("ranks", [state])) != st.world:
        raise BenchError(f"{st.ckpt_path} was written by {len(state.get('ranks', [state]))} processes, this run has {st.world}")
    own = state["ranks"][st.rank] if st.world > 1 else state  # multi-process: this rank's own state
    st.method.load_state_dict(own["method"])
    st.clock.load_state_dict(state["clock"])
    st.backbone.counter.load_state_dict(own["counter"])
    st.reward.queries = int(own["reward_queries"])
    st.iteration = int(state["iteration"])
    st.stopped_by_budget = bool(state.get("stopped_by_budget", False))
    st.log.truncate(int(state["log_lines"]))


def _save_checkpoint(st: RunState) -> None:
    with st.clock("checkpoint"):
        method_state = st.method.state_dict()
        # multi-process: every rank's own method state (generator, buffers) and counters
        ranks = dist.gather_objects({"method": method_state, "counter": st.backbone.counter.state_dict(),
                                     "reward_queries": st.reward.queries}) if st.world > 1 else None
        if not st.main:
            return
        atomic_torch_save(
            {
                "header": st.header(),
                "iteration": st.iteration,
                "method": method_state,
                **({"ranks": ranks} if ranks is not None else {}),
                "clock": st.clock.state_dict(),
                "counter": st.backbone.counter.state_dict(),
                "reward_queries": st.reward.queries,
                "log_lines": st.log.lines(),
                "stopped_by_budget": st.stopped_by_budget,
            },
            st.ckpt_path,
        )


# ---- training and evaluation -------------------------------------------------------------------


def _evaluate(st: RunState, iteration: int, n: int, label: str) -> tuple[dict[str, float], dict[str, Any]]:
    """One logged evaluation (timed as "evaluation"), with a progress bar of its denoising steps."""
    with st.clock("evaluation"), prog.bar(f"{label} (sampling)", _eval_steps(st.task, n, st.cfg.sampler), st.progress) as bar:
        tick = _EvalTicker(bar, label) if bar is not None else None
        m, samples = evaluate(st.task, st.backbone, st.ectx, st.cfg.sampler, n, tick=tick)
        if st.cfg.train.plot and hasattr(st.task, "on_evaluation"):  # optional task hook, e.g. per-checkpoint sample grids
            st.task.on_evaluation(iteration, samples, st.dir)
    st.log.write({"iteration": iteration, **{f"eval/{k}": v for k, v in m.items()}, **st.budget_record()})
    return m, samples


class _EvalTicker:
    """Advances an evaluation's bar per denoising step; after the last step `evaluate` computes the
    metrics, which the bar's label then says."""

    def __init__(self, bar: Any, label: str) -> None:
        self.bar, self.label = bar, label

    def __call__(self, k: int) -> None:
        self.bar.update(k)
        if self.bar.n >= self.bar.total:
            self.bar.set_description_str(f"{self.label} (metrics)")


def _train(st: RunState, stop_after: int | None, stop_when: Callable[[], bool] | None) -> bool:
    """The training loop from st.iteration; False when stopped early (checkpointed, no final.json)."""
    cfg, N = st.cfg, st.cfg.train.iterations
    name = f"{cfg.task} {cfg.method} α={cfg.alpha:g} s={cfg.seed}"
    if st.iteration == 0 and st.main:
        _evaluate(st, 0, cfg.train.eval_samples, f"{name}: evaluation at iteration 0")
    done_this_call = 0
    with prog.bar(name, N, st.progress, start=st.iteration) as bar:
        while st.iteration < N and not st.stopped_by_budget:
            if not _step(st):
                break
            if cfg.train.eval_every and st.iteration % cfg.train.eval_every == 0 and st.iteration < N and st.main:
                _evaluate(st, st.iteration, cfg.train.eval_samples, f"{name}: evaluation at iteration {st.iteration}")
            if st.iteration % cfg.train.checkpoint_every == 0 or st.iteration == N:
                _save_checkpoint(st)
            if bar is not None:
                bar.update(1)
            done_this_call += 1
            stop = (stop_after is not None and done_this_call >= stop_after) or (stop_when is not None and dist.any_rank(stop_when()))
            if stop and st.iteration < N:
                _save_checkpoint(st)
                return False
    return True


def _step(st: RunState) -> bool:
    """One train_step and its log line; False when the query budget ran out (checkpointed)."""
    try:
        with st.clock("other"):
            stats = st.method.train_step()
    except BudgetExhausted:
        st.stopped_by_budget = True
        log.info("%s: query budget exhausted after %d iterations", st.dir.name, st.iteration)
        _save_checkpoint(st)
        return False
    st.iteration += 1
    if st.world > 1:
        stats = dist.reduce_floats(stats, "mean")
        st.global_budget.update(dist.reduce_floats(st.budget_record(local=True), "sum"))
    bad = [k for k, v in stats.items() if not math.isfinite(float(v))]
    if bad:
        raise BenchError(f"{st.cfg.method} produced non-finite {', '.join(bad)} at iteration {st.iteration}; lower method.lr or check the reward")
    train_time = sum(v for k, v in st.clock.seconds.items() if k != "evaluation")
    st.log.write({"iteration": st.iteration, **stats, **st.budget_record(), "time/train": train_time})
    return True


def _finalize(st: RunState) -> results.FinalResult:
    """Final evaluation, samples figure, exported weights and final.json (rank 0)."""
    cfg, d, clock = st.cfg, st.dir, st.clock
    name = f"{cfg.task} {cfg.method} α={cfg.alpha:g} s={cfg.seed}"
    metrics, samples = _evaluate(st, st.iteration, cfg.train.final_eval_samples, f"{name}: final evaluation")
    if cfg.train.plot:
        with clock("evaluation"):
            title = f"{cfg.task} · {cfg.method} · {cfg.reward} · α={cfg.alpha:g} · seed {cfg.seed} · {st.iteration} it"
            st.task.plot_samples({p: s.x for p, s in samples.items()}, cfg.reward, cfg.alpha, d / "samples.png", title)
    if hasattr(st.backbone, "save_trained"):  # e.g. the SD LoRA, loadable by diffusers pipelines
        with clock("checkpoint"):
            st.backbone.save_trained(d / "lora")
    ectx, task = st.ectx, st.task
    final = results.FinalResult(
        run=d.name,
        task=task.describe(),
        method={**st.method_cls.describe(), "config": asdict(cfg.method_cfg)},
        reward={"name": cfg.reward, "version": ectx.reward.version, **({"gold": ectx.gold_name} if ectx.gold_name else {})},
        alpha=cfg.alpha,
        alpha_sqdf=alpha_sqdf_from_nats(cfg.alpha, st.backbone.dim),
        seed=cfg.seed,
        sampler=asdict(cfg.sampler),
        train=asdict(cfg.train),
        config_hash=cfg.hash(),
        iterations=st.iteration,
        stopped_by_budget=st.stopped_by_budget,
        metrics=metrics,
        metric_meta={m: {k: v for k, v in METRICS.entry(m).meta.items() if k in ("direction", "label")} for m in task.metrics},
        eval={"samples_per_prompt": cfg.train.final_eval_samples, "prompt_sets": task.eval_prompt_sets,
              "prompt_set_hash": config_hash(task.eval_prompt_sets)[:8]},
        budget={k.split("/", 1)[1]: v for k, v in st.budget_record().items()},
        time={**{k: round(v, 3) for k, v in clock.state_dict().items()}, "total": round(sum(clock.state_dict().values()), 3),
              "this_call_wall": round(time.time() - st.t_start, 3)},
        backbone=st.backbone.describe(),
        provenance=snapshot(),
    )
    final.write(d / "final.json")
    return final


# ---- reference rows ----------------------------------------------------------------------------


def _read_reference_cache(path: Path, key: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """The cached reference rows at `path`, or None (and a warning) when the entry is missing,
    unreadable, malformed or written for another key: it is then recomputed and overwritten."""
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        rows = d["rows"]
        ok = (d.get("key") == json.loads(json.dumps(key)) and isinstance(rows, dict)
              and all(isinstance(r, dict) and all(isinstance(v, (int, float)) or v is None for v in r.values()) for r in rows.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning("reference cache %s is unreadable or not this table's; recomputing it", path)
        return None
    return rows


def reference_rows(task_name: str, task_cfg: Any, reward: str, alpha: float, sampler: SamplerConfig, n: int, root: Path,
                   progress: bool | None = None) -> dict[str, dict[str, float]]:
    """Rows that put a table in context: p* closed form, p* sample floor, ε* sampler floor, base.

    Cached under <root>/_reference/ (they depend only on the task, reward, α, sampler and n).
    progress: a bar on stderr while they are computed (None: only when stderr is a terminal)."""
    key = {"task": task_name, "task_cfg": asdict(task_cfg), "reward": reward, "alpha": alpha, "sampler": asdict(sampler), "n": n,
           "task_version": TASKS.get(task_name).version}
    path = Path(root) / "_reference" / f"{task_name}_{reward}_a{alpha:g}_{config_hash(key)[:8]}.json"
    cached_rows = _read_reference_cache(path, key)
    if cached_rows is not None:
        return cached_rows
    with prog.announcing(progress):
        task = build_task(task_name, task_cfg)
        ctx = EvalContext(task, reward, alpha)
        backbone = task.build_backbone()
    rows: dict[str, dict[str, float]] = {}
    with prog.ticks(f"reference rows {task_name} {reward} α={alpha:g}", 4, progress) as step:
        if task.target(reward, alpha, all_eval_prompts(task)[0]) is not None:
            rows["p* (closed form)"] = closed_form_row(ctx)
            ex = target_samples(ctx, n)
            if ex is not None:
                rows["p* sample (floor)"] = compute_metrics(ex, ctx)
            step(1)
            orc = oracle_samples(ctx, backbone, n, sampler)
            if orc is not None:
                rows["ε* sampler (floor)"] = compute_metrics(orc, ctx)
            step(1)
        else:
            step(2)
        rows["base (pretrained)"] = evaluate(task, backbone, ctx, sampler, n)[0]
        step(2)
    dump_json({"key": key, "rows": rows}, path)
    return rows
