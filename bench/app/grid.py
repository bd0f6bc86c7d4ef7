"""Grids of runs: one sweep format (grid files and suites), expansion, submission through submitit
(debug, local, Slurm), preemption, cell states.

    bench grid my_grid.yaml --dry-run                          # the cells, and which would run
    bench grid my_grid.yaml --executor slurm --partition gpu --gpus 1 --time 240
    bench grid my_grid.yaml --executor local                   # no Slurm: processes on this machine
    bench run --suite baselines                                # a suite is a grid file (bench/configs/suites)
    bench status my_grid.yaml                                  # done / running / pending / failed

A grid file (YAML; every key but `methods` optional):

    name: ring8-sweep              # results/<name>/ and the manifest folder (default: the file's stem)
    description: one paragraph for results/<name>/table.md
    tasks: [gmm-ring8]             # or `task: gmm-ring8` (default gmm-ring8)
    methods: [sqdf, draft]
    rewards: [quadratic]           # or `reward:`; default: each task's (a reward a task lacks is skipped for it)
    alphas: [3, 1, 0.3]            # KL weights α in nats (default: each task's default α)
    seeds: [0, 1, 2]               # default 0, 1, 2
    set:                           # overrides of every cell; a LIST is a SWEEP (cartesian product)
      train.iterations: 200
      method.lr: [1.0e-3, 3.0e-4]
    method_sets:                   # overrides of one method's cells (lists sweep too)
      sqdf: {method.gamma: [0.9, 1.0]}
    max_parallel: 8                # cells running at once (Slurm: the array's %N; local: processes)
    slurm:                         # each cell's job (command-line options override these)
      partition: gpu
      gpus_per_node: 1
      cpus_per_task: 8
      mem_gb: 32
      timeout_min: 240
      account: myproject
      additional: {qos: high}      # any other sbatch flag
      setup: ["module load cuda/12.4"]

Several blocks: `runs:` lists blocks (mappings of task(s), methods, reward(s), alphas, seeds, set,
method_sets); the block keys at the top level are then shared by every block (an entry's own
keys win; `set` and `method_sets` are merged), and cells are listed block after block, a cell
that two blocks both name only once. The suites in bench/configs/suites are such files.

Cells are tasks × rewards × methods × alphas × sweeps × seeds, each a resolved RunConfig (bad
keys and values fail with one line before anything is submitted; a single value where a list is
expected is a one-element list). `set` keys are dotted (`method.lr`) or nested (`method: {lr: ...}`).
The command line changes every block (`Overrides`): `--set` (bench/app/config.py `parse_sets`, the
one parser; `--set 'alpha=[1,0.3]'` sweeps, `--set alpha=1` fixes) wins over the file's `set` and
`method_sets`, `--config` sits between them, and `bench run`'s `--seeds`, `--alpha`, `--reward`
replace the blocks' lists. A field that itself holds a list is given as a string ("a,b") or swept
as a list of lists.

Submission (`submit`): cells whose run folder has final.json are skipped, as are cells already
queued or running under an earlier submission; each remaining cell becomes one submitit job
(`CellJob`), all of them one Slurm job array (`--array=0-(n-1)%max_parallel`). Every submission
gets a fresh submitit folder (<runs>/_grids/<name>/<id>/) and a manifest (<id>.json) naming each
cell's folder and job id: job ids restart when a cluster's state is wiped, and a reused folder would
hand back an old job's result. A failing cell is reported and the others go on.

Preemption and time limits: a cell runs `bench.app.runner.run_one`, which resumes from the run
folder's checkpoint.pt (method parameters, optimizer, RNG, buffers, proxy models, counters). The
job turns submitit's timeout/preemption signal (USR2, `signal_delay_s` before the limit) and
Slurm's SIGTERM into a request to stop at the end of the current iteration with a checkpoint; on
USR2 it then requeues itself through submitit (`checkpoint()` resubmits the same cell), on SIGTERM
(scontrol requeue, preemption, scancel) it exits without a result and Slurm decides: a requeued job
starts again and resumes, a cancelled one is reported as failed and resumes on the next
`bench grid`. Work lost to a kill without warning is at most `train.checkpoint_every` iterations.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from bench.app.config import (
    SECTIONS,
    TOP_LEVEL,
    RunConfig,
    apply_dict,
    check_seed,
    coerce,
    config_from_dict,
    load_yaml,
    parse_sets,
    resolve,
)
from bench.core import progress as prog
from bench.core.io import dump_json
from bench.core import errors
from bench.core.errors import BenchError
from bench.core.registry import METHODS, REWARDS, TASKS

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm", "debug")
GRID_KEYS = ("name", "description", "task", "tasks", "methods", "rewards", "alphas", "seeds", "set", "method_sets", "max_parallel", "slurm")
SLURM_LIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "COMPLETING",
              "CONFIGURING", "PREEMPTED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD")


@dataclass(frozen=True)
class SlurmParams:
    """Slurm resources of each cell's job (`slurm:` in a grid file; `--partition` etc. on the command line)."""

    partition: str | None = None
    "partition (sbatch --partition); default: the cluster's default partition"
    gpus_per_node: int | None = None
    "GPUs per job (sbatch --gpus-per-node)"
    cpus_per_task: int | None = None
    "CPU cores per job (sbatch --cpus-per-task); torch uses this many threads"
    mem_gb: float | None = None
    "memory per job in GB (sbatch --mem)"
    timeout_min: int = 1440
    "time limit per job in minutes; a job that reaches it checkpoints and requeues itself"
    account: str | None = None
    "account to charge (sbatch --account)"
    signal_delay_s: int = 120
    "seconds before the time limit at which the job is told to checkpoint and requeue (must exceed one iteration)"
    max_num_timeout: int = 10
    "how many times a job may requeue itself after reaching its time limit"
    additional: dict[str, Any] = field(default_factory=dict)
    "any other sbatch flag, e.g. {qos: high, constraint: a100}"
    setup: tuple[str, ...] = ()
    "shell lines run in the job before the cell (module load ..., source venv/bin/activate)"

    def __post_init__(self) -> None:
        for f in ("gpus_per_node", "cpus_per_task", "mem_gb"):
            v = getattr(self, f)
            if v is not None and v < 0:
                raise BenchError(f"slurm.{f} must be >= 0, got {v}")
        if self.timeout_min < 1:
            raise BenchError(f"slurm.timeout_min must be >= 1, got {self.timeout_min}")
        if not 0 <= self.signal_delay_s < self.timeout_min * 60:
            raise BenchError(f"slurm.signal_delay_s must be in [0, timeout_min·60), got {self.signal_delay_s}")
        if not isinstance(self.additional, dict):
            raise BenchError("slurm.additional must be a mapping of sbatch flags, e.g. {qos: high}")

    @classmethod
    def from_dict(cls, d: Any, where: str = "grid") -> "SlurmParams":
        """`slurm:` of a grid file, every value checked and coerced to its field's type."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise BenchError(f"malformed {where}: 'slurm' must be a mapping (partition, gpus_per_node, ...), got {d!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(map(str, d)) - set(names))
        if unknown:
            raise BenchError(f"unknown slurm keys {unknown}; accepted: {', '.join(sorted(names))}")
        d = dict(d)
        if isinstance(d.get("setup"), str):
            d["setup"] = [d["setup"]]
        return apply_dict(cls(), d, "slurm.")

    def merged(self, overrides: dict[str, Any]) -> "SlurmParams":
        """A copy with the non-None command-line values applied ("additional" is merged)."""
        o = {k: v for k, v in overrides.items() if v is not None}
        if "additional" in o:
            o["additional"] = {**self.additional, **o["additional"]}
        return replace(self, **o)

    def executor_parameters(self, name: str, max_parallel: int) -> dict[str, Any]:
        """submitit AutoExecutor parameters (generic and slurm_-prefixed)."""
        p: dict[str, Any] = {"name": name, "timeout_min": self.timeout_min, "slurm_signal_delay_s": self.signal_delay_s,
                             "slurm_array_parallelism": max_parallel}
        for key, val in (("slurm_partition", self.partition), ("gpus_per_node", self.gpus_per_node),
                         ("cpus_per_task", self.cpus_per_task), ("mem_gb", self.mem_gb), ("slurm_account", self.account)):
            if val is not None:
                p[key] = val
        if self.additional:
            p["slurm_additional_parameters"] = dict(self.additional)
        if self.setup:
            p["slurm_setup"] = list(self.setup)
        return p


def parse_sbatch(items: Iterable[str]) -> dict[str, Any]:
    """["qos=high", "exclusive"] -> {"qos": "high", "exclusive": True} (extra sbatch flags)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not key:
            raise BenchError(f"malformed --sbatch {item!r}: expected flag=value, e.g. qos=high")
        out[key] = val.strip() if sep else True
    return out


# ---- grid files and cells ---------------------------------------------------------------------------------

DEFAULT_TASK = "gmm-ring8"
BLOCK_KEYS = ("task", "tasks", "methods", "reward", "rewards", "alphas", "seeds", "set", "method_sets")
FILE_KEYS = ("name", "description", "max_parallel", "slurm", "runs")
GRID_KEYS = FILE_KEYS + BLOCK_KEYS


@dataclass(frozen=True)
class Block:
    """One block of cells: tasks × rewards × methods × alphas × `set` sweeps × seeds (a grid file
    without `runs:` is one block; each `runs:` entry is one)."""

    tasks: tuple[str, ...] = (DEFAULT_TASK,)
    "task names (canonical)"
    methods: tuple[str, ...] = ()
    "method names (canonical)"
    rewards: tuple[str, ...] = ()
    "training rewards; empty: each task's default"
    alphas: tuple[float, ...] = ()
    "KL weights α in nats; empty: from `set`/--set alpha, else each task's default"
    seeds: tuple[int, ...] = (0, 1, 2)
    "seeds of every configuration"
    sets: dict[str, Any] = field(default_factory=dict)
    "dotted key -> value, or -> list of values (a sweep), for every cell"
    method_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    "method -> dotted key -> value or sweep, for that method's cells"
    tagged: bool = False
    "name this block's fixed settings in its cells' labels (files with several blocks)"


@dataclass(frozen=True)
class Overrides:
    """Command-line changes to every block of a grid: they win over the file."""

    sets: dict[str, Any] = field(default_factory=dict)
    "--set: dotted key -> value or sweep"
    layer: dict[str, Any] = field(default_factory=dict)
    "--config: a nested layer of fixed values (alpha, reward, method: {...}, ...); --set wins over it"
    seeds: tuple[int, ...] | None = None
    "--seeds: replaces every block's seeds"
    alphas: tuple[float, ...] | None = None
    "--alpha: replaces every block's alphas"
    rewards: tuple[str, ...] | None = None
    "--reward: replaces every block's rewards"


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file (see the module docstring)."""

    name: str
    "results/<name>/ and the manifest folder runs/_grids/<name>/"
    description: str = ""
    "a paragraph for the results page"
    blocks: tuple[Block, ...] = ()
    "the blocks, in file order (cells in this order; a cell listed twice runs once)"
    max_parallel: int = 0
    "cells running at once (0: the executor's default)"
    slurm: SlurmParams = field(default_factory=SlurmParams)
    "each cell's Slurm job"
    overrides: Overrides = field(default_factory=Overrides)
    "command-line changes applied to every block"


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its resolved config and the swept values that single it out."""

    cfg: RunConfig
    sweep: tuple[tuple[str, Any], ...] = ()
    tags: tuple[tuple[str, Any], ...] = ()

    def dir(self, root: Path) -> Path:
        from bench.app.runner import run_dir

        return run_dir(root, self.cfg)

    def rel(self) -> str:
        return f"{self.cfg.task}/{self.cfg.method}/{self.cfg.run_name()}"

    @property
    def label(self) -> str:
        c = self.cfg
        extra = "".join(f" {k}={v}" for k, v in (*self.sweep, *self.tags))
        return f"{c.task} {c.method} {c.reward} α={c.alpha:g} seed={c.seed}{extra}"


def _flatten(d: Any, where: str) -> dict[str, Any]:
    """{"method": {"lr": x}, "train.iterations": y} -> {"method.lr": x, "train.iterations": y}, keys checked."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise BenchError(f"{where} must be a mapping of key: value (a list of values is a sweep), e.g. {{method.lr: [1.0e-3, 3.0e-4]}}; "
                         f"got {type(d).__name__}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[str(k)] = v
    for k, v in out.items():
        head, _, tail = k.partition(".")
        if k.count(".") > 1 or (head not in SECTIONS or not tail) and (head not in TOP_LEVEL or tail):
            raise BenchError(f"{where}: malformed key {k!r}; use {', '.join(TOP_LEVEL)} or <section>.<field> with section in {', '.join(SECTIONS)}")
        if isinstance(v, list) and not v:
            raise BenchError(f"{where}: {k}: a sweep lists at least one value")
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if "." in k:
            sect, f = k.split(".", 1)
            out.setdefault(sect, {})[f] = v
        else:
            out[k] = v
    return out


def _listed(e: dict[str, Any], key: str, default: list[Any], where: str) -> list[Any]:
    """A list-valued key of a block; a scalar is a one-element list, an empty list is an error."""
    v = e.get(key, default)
    if v is None or isinstance(v, dict):
        raise BenchError(f"{where}: '{key}' must be a list (or one value), got {v!r}")
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    if not v:
        raise BenchError(f"{where}: '{key}' must list at least one value (leave it out for the default)")
    return v


def _names(values: list[Any], reg: Any, what: str, where: str) -> tuple[str, ...]:
    if not all(isinstance(v, str) for v in values):
        raise BenchError(f"{where}: '{what}' must be names (bench ls {reg.kind}s), got {values!r}")
    return tuple(reg.canonical(v) for v in values)


def _with_defaults(shared: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A `runs:` entry over the file's top-level block keys (the entry's task/tasks, reward/rewards win as a pair)."""
    out = {k: v for k, v in shared.items() if k not in ("set", "method_sets")}
    for pair in (("task", "tasks"), ("reward", "rewards")):
        if any(k in entry for k in pair):
            for k in pair:
                out.pop(k, None)
    return {**out, **{k: v for k, v in entry.items() if k not in ("set", "method_sets")}}


def _method_sets(layers: list[Any], where: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for ms in layers:
        if ms is None:
            continue
        if not isinstance(ms, dict):
            raise BenchError(f"{where}: 'method_sets' must map method names to settings, e.g. {{sqdf: {{method.gamma: 0.9}}}}")
        for m, s in ms.items():
            name = METHODS.canonical(str(m))
            out[name] = {**out.get(name, {}), **_flatten(s, f"{where}: method_sets.{m}")}
    return out


def _block(entry: Any, where: str, over: Overrides, shared: dict[str, Any] | None = None, tagged: bool = False) -> Block:
    """Check and canonicalize one block (task, methods, α, seeds, set sweeps) of a grid file."""
    if not isinstance(entry, dict):
        raise BenchError(f"{where} must be a mapping (methods, task, alphas, seeds, set, ...), got {entry!r}")
    shared = shared or {}
    unknown = sorted(set(map(str, entry)) - set(BLOCK_KEYS))
    if unknown:
        raise BenchError(f"malformed {where}: unknown keys {unknown}; accepted: {', '.join(BLOCK_KEYS)}")
    for a, b in (("task", "tasks"), ("reward", "rewards")):
        if a in entry and b in entry:
            raise BenchError(f"malformed {where}: give '{a}' or '{b}', not both")
    e = _with_defaults(shared, entry)
    if not e.get("methods"):
        raise BenchError(f"malformed {where}: 'methods' must list at least one method (bench ls methods)")
    tasks = _names(_listed(e, "tasks" if "tasks" in e else "task", [DEFAULT_TASK], where), TASKS, "tasks", where)
    methods = _names(_listed(e, "methods", [], where), METHODS, "methods", where)
    rkey = "rewards" if "rewards" in e else "reward"
    rewards = _names(_listed(e, rkey, [], where), _RewardNames(), rkey, where) if e.get(rkey) is not None else ()
    alphas = tuple(coerce(a, float, f"{where}: alphas") for a in _listed(e, "alphas", [], where)) if "alphas" in e else ()
    seeds = tuple(check_seed(s, f"{where}: seeds") for s in _listed(e, "seeds", [0, 1, 2], where))
    sets = {**_flatten(shared.get("set"), f"{where}: set"), **_flatten(entry.get("set"), f"{where}: set")}
    method_sets = _method_sets([shared.get("method_sets"), entry.get("method_sets")], where)
    for key, given, cli in (("alpha", alphas, over.alphas), ("reward", rewards, over.rewards)):
        if given and (key in sets or any(key in s for s in method_sets.values())):
            raise BenchError(f"malformed {where}: give {key} either as '{key}s' or as a 'set: {key}', not both")
        if given and cli is None and (key in over.sets or key in over.layer):
            raise BenchError(f"{where} lists {key}s; replace them with --{key}, not with --set/--config {key}")
    if over.rewards is not None:
        rewards = tuple(_RewardNames().canonical(r) for r in over.rewards)
    return Block(tasks, methods, rewards, over.alphas if over.alphas is not None else alphas,
                 over.seeds if over.seeds is not None else seeds, sets, method_sets, tagged)


class _RewardNames:
    """Reward names as a grid may give them: registered rewards (aliases canonicalized) and task-local ones."""

    kind = "reward"

    def canonical(self, name: str) -> str:
        return REWARDS.canonical(name) if name in REWARDS else name


def grid_from_dict(data: dict[str, Any], where: str, default_name: str, overrides: Overrides | None = None) -> GridSpec:
    """A grid (or suite) as a mapping -> GridSpec; every key and value checked (one-line BenchError)."""
    over = overrides or Overrides()
    unknown = sorted(set(map(str, data)) - set(GRID_KEYS))
    if unknown:
        raise BenchError(f"malformed {where}: unknown keys {unknown}; accepted: {', '.join(GRID_KEYS)}")
    shared = {k: v for k, v in data.items() if k in BLOCK_KEYS}
    if "runs" in data:
        entries = data["runs"]
        if not isinstance(entries, list) or not entries:
            raise BenchError(f"malformed {where}: 'runs' must be a non-empty list of blocks (mappings with methods, task, alphas, seeds, set)")
        blocks = tuple(_block(e, f"{where}: runs[{i}]", over, shared, len(entries) > 1) for i, e in enumerate(entries))
    else:
        blocks = (_block(shared, where, over),)
    name = data.get("name", default_name)
    if not isinstance(name, (str, int)) or isinstance(name, bool) or not str(name).strip() or "/" in str(name) or str(name).startswith("."):
        raise BenchError(f"malformed {where}: 'name' must be a folder name (no '/', not starting with '.'), got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise BenchError(f"malformed {where}: 'description' must be text")
    max_parallel = coerce(data.get("max_parallel", 0), int, f"{where}: max_parallel")
    if max_parallel < 0:
        raise BenchError(f"malformed {where}: max_parallel must be >= 0 (0: the executor's default), got {max_parallel}")
    slurm = SlurmParams.from_dict(data.get("slurm"), where)
    return GridSpec(str(name), description, blocks, max_parallel, slurm, over)


def load_grid(path: Path, cli_sets: Iterable[str] = (), overrides: Overrides | None = None, what: str = "grid") -> GridSpec:
    """Read and check a grid file (or suite); `cli_sets` (`--set`) and `overrides` win over the file."""
    over = overrides or Overrides()
    if cli_sets:
        over = replace(over, sets={**over.sets, **_flatten(parse_sets(cli_sets), "--set")})
    data = load_yaml(Path(path), f"{what} file")
    return grid_from_dict(data, f"{what} {path}", Path(path).stem, over)


def _check_rewards(b: Block) -> None:
    for r in b.rewards:
        if not any(r in TASKS.get(t).rewards for t in b.tasks):
            if len(b.tasks) == 1:
                raise BenchError(f"task {b.tasks[0]} has no reward {r!r}; its rewards: {', '.join(TASKS.get(b.tasks[0]).rewards)}")
            offered = sorted({x for t in b.tasks for x in TASKS.get(t).rewards})
            raise BenchError(f"no task of this grid offers reward {r!r}; rewards of {', '.join(b.tasks)}: {', '.join(offered)}")


def _block_cells(b: Block, over: Overrides) -> Iterator[Cell]:
    """The cells of one block: tasks × rewards × methods × alphas × sweeps × seeds, in this order."""
    _check_rewards(b)
    for task in b.tasks:
        rewards: list[str | None] = [r for r in b.rewards if r in TASKS.get(task).rewards] if b.rewards else [None]
        for reward, method in itertools.product(rewards, b.methods):
            own = {**b.sets, **b.method_sets.get(method, {})}
            flat = {**b.sets, **over.sets, **b.method_sets.get(method, {})}  # the swept keys' order: the cells' order
            flat.update(over.sets)  # values: the command line wins
            swept = [k for k, v in flat.items() if isinstance(v, list)]
            tags = tuple((k, v) for k, v in own.items() if k not in swept and k not in over.sets) if b.tagged else ()
            for alpha in b.alphas or [None]:
                for combo in itertools.product(*(flat[k] for k in swept)):
                    chosen = {**flat, **dict(zip(swept, combo))}
                    layers = [_unflatten({k: v for k, v in chosen.items() if k not in over.sets}), over.layer,
                              _unflatten({k: v for k, v in chosen.items() if k in over.sets})]
                    for seed in b.seeds:
                        cfg = resolve(task, method, seed, alpha=alpha, reward=reward, layers=layers)
                        yield Cell(cfg, tuple(zip(swept, combo)), tags)


def expand(spec: GridSpec) -> list[Cell]:
    """The cells of a grid, block after block, in a stable order; each config resolved and validated
    (BenchError on bad input); a cell that two blocks both list is kept once."""
    cells: list[Cell] = []
    seen: set[str] = set()
    for block in spec.blocks:
        for cell in _block_cells(block, spec.overrides):
            if cell.rel() not in seen:
                seen.add(cell.rel())
                cells.append(cell)
    if not cells:
        raise BenchError(f"grid {spec.name} has no cells")
    return cells


# ---- the submitted callable -------------------------------------------------------------------------------


class _StopRequest:
    """Signals that mean "stop soon": recorded here, acted on at the next iteration boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self, signums: Sequence[int]) -> None:
        for s in signums:
            self.previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(f"bench: caught {signal.Signals(signum).name}; checkpointing at the end of this iteration", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def _job_cluster() -> str | None:
    """The submitit cluster ("slurm", "local") this process runs a job of; None otherwise (debug executor, plain calls)."""
    try:
        import submitit

        return submitit.JobEnvironment().cluster
    except Exception:
        return None


class CellJob:
    """The callable submitted for each cell: run (or resume) one run folder.

    Implements submitit's Checkpointable protocol: `checkpoint()` returns the same call, which
    resumes from the run folder's checkpoint.pt. Inside a submitit job, the preemption/timeout
    signal and SIGTERM stop training at the next iteration boundary with a checkpoint (see the
    module docstring).

    Attributes:
        threads: torch threads (None: Slurm's cpus-per-task inside a Slurm job, else torch's default).
        progress: show the run's progress bars (the debug executor, in this process).
    """

    def __init__(self, threads: int | None = None, progress: bool = False) -> None:
        self.threads = threads
        self.progress = progress

    def __call__(self, cfg_dict: dict[str, Any], runs_root: str) -> dict[str, Any]:
        import torch

        from bench.app.runner import run_one

        cfg = config_from_dict(cfg_dict)
        threads = self.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if threads:
            torch.set_num_threads(threads)
        cluster = _job_cluster()
        stop = _StopRequest()
        if cluster in ("slurm", "local"):
            import submitit

            sigs = [submitit.JobEnvironment._usr_sig()] + ([signal.SIGTERM] if cluster == "slurm" else [])
            stop.install(sigs)
        d = Path(runs_root) / cfg.task / cfg.method / cfg.run_name()
        if (d / "checkpoint.pt").exists() and not (d / "final.json").exists():
            prog.say(f"bench: {cfg.task}/{cfg.method}/{cfg.run_name()}: resuming from checkpoint.pt (log at iteration {_progress(d)[0]})",
                 sys.stderr if cluster else sys.stdout)  # a job's log; in this process, not an error line
        try:
            result = run_one(cfg, Path(runs_root), progress=self.progress, stop_when=stop.requested)
        finally:
            stop.restore()
        if result:
            return {"dir": str(d.resolve()), "metrics": result["metrics"],
                    "iterations": result["iterations"]}
        if stop.signum is not None:
            self._leave(stop)
        raise RuntimeError(f"run {cfg.run_name()} stopped without final.json")

    @staticmethod
    def _leave(stop: _StopRequest) -> None:
        """After the stop checkpoint: requeue through submitit (USR2), or exit without a result (SIGTERM)."""
        import submitit

        signum = stop.signum
        handler = stop.previous.get(signum)
        code = 128 + int(signum or signal.SIGTERM)
        if signum == submitit.JobEnvironment._usr_sig() and callable(handler):
            try:
                handler(signum, None)  # submitit: checkpoint() -> requeue (scontrol / local restart) -> sys.exit
            except SystemExit as e:  # requeued: leave at once below (interpreter shutdown could outlast KillWait)
                code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        # No result file: submitit's clients read the job's state from Slurm (requeued, cancelled, timed
        # out) or the local controller restarts it, rather than taking this attempt for the job's outcome.
        os._exit(code & 0xFF)

    def checkpoint(self, cfg_dict: dict[str, Any], runs_root: str) -> Any:
        """Resubmit the same cell; run_one resumes from the run folder's checkpoint.pt."""
        import submitit

        return submitit.helpers.DelayedSubmission(CellJob(self.threads, self.progress), cfg_dict, runs_root)


# ---- manifests and cell states ------------------------------------------------------------------------------


def grids_dir(root: Path) -> Path:
    return Path(root) / "_grids"


def _manifests(root: Path, name: str | None = None) -> list[dict[str, Any]]:
    base = grids_dir(root)
    pattern = f"{name}/*.json" if name else "*/*.json"
    out = []
    for p in sorted(base.glob(pattern)):
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        m["_path"] = str(p)
        out.append(m)
    return sorted(out, key=lambda m: m.get("submitted", ""))


def latest_jobs(root: Path) -> dict[str, dict[str, Any]]:
    """Run folder (relative to root) -> its most recent submission {executor, folder, job_id, outcome...}."""
    out: dict[str, dict[str, Any]] = {}
    for m in _manifests(root):
        for c in m.get("cells", []):
            out[c["dir"]] = {"executor": m["executor"], "folder": m["folder"], "submission": m["id"], "grid": m["grid"],
                             **{k: v for k, v in c.items() if k != "dir"}}
    return out


@dataclass
class CellState:
    """What `bench status` prints for one cell."""

    dir: str
    label: str
    state: str  # done, running, pending, failed, incomplete, not started
    progress: str = ""
    job: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _progress(d: Path) -> tuple[int, int]:
    """(last logged iteration, planned iterations) of a run folder."""
    total = 0
    try:
        total = int(json.loads((d / "config.json").read_text())["train"]["iterations"])
    except (OSError, KeyError, ValueError, TypeError, UnicodeDecodeError):
        pass
    last = 0
    p = d / "metrics.jsonl"
    if p.exists():
        with p.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            for line in f.read().decode(errors="ignore").splitlines()[-5:]:
                try:
                    last = max(last, int(json.loads(line).get("iteration", 0)))
                except (ValueError, AttributeError):
                    continue
    return last, total


def _slurm_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm state of each job id (one sacct call); "UNKNOWN" where sacct cannot tell."""
    ids = sorted(set(job_ids))
    if not ids or shutil.which("sacct") is None:
        return {j: "UNKNOWN" for j in ids}
    from submitit.slurm.slurm import SlurmInfoWatcher

    w = SlurmInfoWatcher(delay_s=0)
    for j in ids:
        w.register_job(j)
    w.update()
    return {j: w.get_state(j, mode="cache") for j in ids}


def _result_error(folder: str, job_id: str) -> str | None:
    """Why a Slurm job failed, read through submitit (None if it has no result yet, or succeeded)."""
    import submitit

    job = submitit.SlurmJob(folder=folder, job_id=job_id)
    if not job.paths.result_pickle.exists():  # no result: exception() would wait for one
        return None
    try:
        exc = job.exception()
    except Exception as e:  # an unreadable result file
        return f"unreadable job result ({type(e).__name__})"
    return None if exc is None else _failure(exc)[0]


def cell_states(cells: Sequence[Cell] | None, root: Path) -> list[CellState]:
    """State of each cell (or, with cells=None, of every run folder and submission under root)."""
    root = Path(root)
    jobs = latest_jobs(root)
    if cells is None:
        rels = sorted(set(jobs) | {str(p.parent.relative_to(root)) for p in root.glob("*/*/*/config.json")})
        labels = {r: r for r in rels}
    else:
        rels = [c.rel() for c in cells]
        labels = {c.rel(): c.label for c in cells}
    slurm = _slurm_states(jobs[r]["job_id"] for r in rels if r in jobs and jobs[r]["executor"] == "slurm" and not (root / r / "final.json").exists())
    out = []
    for r in rels:
        d = root / r
        it, total = _progress(d)
        prog = f"{it}/{total}" if total else ""
        job = jobs.get(r)
        jid = job["job_id"] if job else ""
        if (d / "final.json").exists():
            out.append(CellState(r, labels[r], "done", prog, jid))
            continue
        if job is None:
            state = "incomplete" if (d / "checkpoint.pt").exists() or (d / "metrics.jsonl").exists() else "not started"
            out.append(CellState(r, labels[r], state, prog))
            continue
        if job["executor"] == "slurm":
            s = slurm.get(jid, "UNKNOWN")
            base = s.split()[0].upper() if s else "UNKNOWN"
            err = _result_error(job["folder"], jid)
            if err:
                out.append(CellState(r, labels[r], "failed", prog, jid, err))
            elif base in ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING"):
                out.append(CellState(r, labels[r], "running", prog, jid, s))
            elif base in SLURM_LIVE:
                out.append(CellState(r, labels[r], "pending", prog, jid, s))
            elif base == "UNKNOWN":
                out.append(CellState(r, labels[r], job.get("outcome", "unknown"), prog, jid, job.get("error", "Slurm state unknown (sacct)")))
            else:
                out.append(CellState(r, labels[r], "failed", prog, jid, f"Slurm: {s}" + ("" if base != "COMPLETED" else " without final.json")))
            continue
        outcome = job.get("outcome")
        if outcome == "failed":
            out.append(CellState(r, labels[r], "failed", prog, jid, job.get("error", "")))
        elif outcome is None:
            out.append(CellState(r, labels[r], "running", prog, jid, f"{job['executor']} executor (waiting `bench grid`)"))
        else:
            out.append(CellState(r, labels[r], "incomplete", prog, jid, f"{job['executor']} job ended without final.json"))
    return out


def format_states(states: Sequence[CellState]) -> str:
    """A plain-text table of cell states with a count per state."""
    heads = ("state", "progress", "job", "cell", "detail")
    rows = [(s.state, s.progress, s.job, s.label, s.detail) for s in states]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads[:-1], widths)) + "  detail"]
    for r in rows:
        lines.append(("  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1]).rstrip())
    counts: dict[str, int] = {}
    for s in states:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(f"{len(states)} cells: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


# ---- submission --------------------------------------------------------------------------------------------


@dataclass
class GridOutcome:
    """What a submission did: cells submitted, skipped (with why), finished and failed (with why)."""

    submitted: list[Cell]
    skipped: list[tuple[Cell, str]]
    done: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    manifest: Path | None = None
    job_ids: dict[str, str] = field(default_factory=dict)
    bad_input: set[str] = field(default_factory=set)
    "failed cells (Cell.rel()) whose run stopped on bad input (a BenchError: missing weights, a corrupt checkpoint, ...)"

    def discard(self, root: Path) -> None:
        """Remove this submission's manifest and submitit folder, and the folders they alone made
        (when every cell stopped on bad input: the command wrote nothing else)."""
        if self.manifest is None or self.done:
            return
        shutil.rmtree(self.manifest.with_suffix(""), ignore_errors=True)
        self.manifest.unlink(missing_ok=True)
        root = Path(root).resolve()
        for d in (self.manifest.parent, grids_dir(root), root):
            try:
                d.rmdir()  # only if empty
            except OSError:
                break


def plan(cells: Sequence[Cell], root: Path, force: bool = False) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """Split cells into (to submit, skipped with reason): finished ones and ones queued already are skipped."""
    root = Path(root)
    jobs = latest_jobs(root)
    live_ids = [jobs[c.rel()]["job_id"] for c in cells if c.rel() in jobs and jobs[c.rel()]["executor"] == "slurm"]
    states = _slurm_states(live_ids) if live_ids else {}
    todo, skipped = [], []
    for c in cells:
        j = jobs.get(c.rel())
        if j is not None and j["executor"] == "slurm" and states.get(j["job_id"], "").split(" ")[0].upper() in SLURM_LIVE:
            if force:
                raise BenchError(f"{c.label} is queued as Slurm job {j['job_id']}; scancel it before --force")
            skipped.append((c, f"queued as job {j['job_id']} ({states[j['job_id']]})"))
        elif (c.dir(root) / "final.json").exists() and not force:
            skipped.append((c, "finished"))
        else:
            todo.append(c)
    return todo, skipped


def _executor(kind: str, folder: Path, slurm: SlurmParams, name: str, max_parallel: int) -> Any:
    import submitit

    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise BenchError("--executor slurm needs Slurm's sbatch on PATH (scripts/slurm/start.sh starts a local cluster); "
                             "use --executor local on a machine without Slurm")
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=slurm.max_num_timeout)
        ex.update_parameters(**slurm.executor_parameters(name, max_parallel))
        return ex
    ex = submitit.AutoExecutor(folder=folder, cluster=kind)
    ex.update_parameters(timeout_min=slurm.timeout_min, name=name)
    return ex


class _Submission:
    """One submission's bookkeeping: its manifest (which job runs each cell, how each ended), its
    outcome, and the lines it prints (through the progress bar when there is one)."""

    def __init__(self, manifest: dict[str, Any], path: Path, outcome: GridOutcome, echo: Callable[[str], None]) -> None:
        self.manifest, self.path, self.outcome, self.echo = manifest, path, outcome, echo
        self.bar: Any = None

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            self.echo(line)

    def record(self, c: Cell, j: Any) -> None:
        self.outcome.job_ids[c.rel()] = str(j.job_id)
        self.manifest["cells"].append({"dir": c.rel(), "label": c.label, "job_id": str(j.job_id)})
        dump_json(self.manifest, self.path)

    def finished(self, c: Cell, j: Any, run_folder: Path, slurm_state: str | None = None) -> None:
        err = _job_error(j, run_folder, slurm_state)
        entry = next(e for e in self.manifest["cells"] if e["dir"] == c.rel())
        if err is None:
            self.outcome.done.append(c)
            entry["outcome"] = "done"
            self.say(f"done    {c.label}")
        else:
            self.outcome.failed.append((c, err[0]))
            if err[1]:
                self.outcome.bad_input.add(c.rel())
            entry.update(outcome="failed", error=err[0])
            if not (err[1] and len(self.outcome.submitted) == 1):  # a lone cell's bad input is the final error line alone
                self.say(f"FAILED  {c.label}: {err[0]}")
        if self.bar is not None:
            self.bar.update(1)
        dump_json(self.manifest, self.path)

    def interrupted(self) -> None:
        """Ctrl-C: cells without an outcome are marked so (`bench status`: incomplete; a rerun resumes them)."""
        for e in self.manifest["cells"]:
            e.setdefault("outcome", "interrupted")
        dump_json(self.manifest, self.path)


def submit(cells: Sequence[Cell], root: Path, name: str, executor: str = "local", slurm: SlurmParams | None = None,
           max_parallel: int = 0, force: bool = False, wait: bool = True, poll_s: float = 2.0,
           echo: Callable[[str], None] = print, progress: bool = False) -> GridOutcome:
    """Submit the unfinished cells (one submitit job each) and, with `wait`, wait for all of them.

    Args:
        executor: "slurm" (a job array), "local" (subprocesses on this machine, `max_parallel` at a
            time; default max(1, cores // 2)) or "debug" (in this process, one after the other).
        force: delete the cells' run folders first (re-run finished cells from scratch).
        wait: wait for every job (local and debug always wait); otherwise return after submitting.
        progress: a progress bar of cells (and, with the debug executor, of each run).
    Returns:
        A GridOutcome; the manifest records every cell's job id (and, after waiting, its outcome).
    """
    if executor not in EXECUTORS:
        raise BenchError(f"unknown executor {executor!r}; known: {', '.join(EXECUTORS)}")
    slurm = slurm or SlurmParams()
    root = Path(root).resolve()
    todo, skipped = plan(cells, root, force)
    outcome = GridOutcome(list(todo), skipped)
    if not todo:
        return outcome
    if force:
        for c in todo:
            if c.dir(root).exists():
                shutil.rmtree(c.dir(root))
    if max_parallel <= 0:
        max_parallel = len(todo) if executor == "slurm" else max(1, (os.cpu_count() or 2) // 2)
    sub_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    folder = grids_dir(root) / name / sub_id  # fresh for every submission: no stale pickles
    folder.mkdir(parents=True, exist_ok=True)
    ex = _executor(executor, folder, slurm, f"bench-{name}", max_parallel)
    manifest = {"grid": name, "id": sub_id, "executor": executor, "folder": str(folder),
                "submitted": _dt.datetime.now().isoformat(timespec="seconds"), "max_parallel": max_parallel,
                "slurm": asdict(slurm) if executor == "slurm" else None, "cells": []}
    outcome.manifest = folder.with_suffix(".json")
    sub = _Submission(manifest, outcome.manifest, outcome, echo)
    # torch threads: a job's share of the cores (Slurm: its cpus-per-task; debug: this process, untouched)
    threads = max(1, (os.cpu_count() or 1) // min(max_parallel, len(todo))) if executor == "local" else None
    job = CellJob(threads, progress=progress and executor == "debug")
    show_bar = progress and (executor != "slurm" or wait)
    with prog.bar(f"cells ({max_parallel} at a time)" if executor == "local" else "cells", len(todo), show_bar, mininterval=0.1) as sub.bar:
        try:
            if executor == "slurm":
                _run_slurm(sub, ex, job, todo, root, max_parallel, wait, poll_s)
            elif executor == "debug":
                for c in todo:
                    j = ex.submit(job, c.cfg.to_dict(), str(root))
                    sub.record(c, j)
                    sub.finished(c, j, c.dir(root))  # runs it, here
            else:
                _run_local(sub, ex, job, todo, root, max_parallel, poll_s)
        except KeyboardInterrupt:
            if executor != "slurm":
                sub.interrupted()
            raise
    return outcome


def _run_slurm(sub: _Submission, ex: Any, job: CellJob, todo: list[Cell], root: Path, max_parallel: int, wait: bool, poll_s: float) -> None:
    with ex.batch():
        subs = [(c, ex.submit(job, c.cfg.to_dict(), str(root))) for c in todo]
    for c, j in subs:
        sub.record(c, j)
    sub.say(f"submitted {len(todo)} cells as Slurm job array {str(subs[0][1].job_id).split('_')[0]} "
            f"(at most {max_parallel} at once); manifest {sub.path}")
    if wait:
        _wait_slurm(subs, lambda c, j, state: sub.finished(c, j, c.dir(root), state), poll_s)


def _run_local(sub: _Submission, ex: Any, job: CellJob, todo: list[Cell], root: Path, max_parallel: int, poll_s: float) -> None:
    """At most max_parallel cells at once as local subprocesses; on Ctrl-C they are stopped (their checkpoints stay)."""
    queue = list(todo)
    running: list[tuple[Cell, Any]] = []
    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                c = queue.pop(0)
                with _streams_to(sub.path.with_suffix("") / "controllers.log"):
                    j = ex.submit(job, c.cfg.to_dict(), str(root))
                sub.record(c, j)
                running.append((c, j))
            for c, j in list(running):
                if j.done():
                    running.remove((c, j))
                    sub.finished(c, j, c.dir(root))
            time.sleep(min(poll_s, 0.5))
    except BaseException:
        _stop_local([j for _, j in running])
        raise


@contextmanager
def _streams_to(log: Path) -> Iterator[None]:
    """Processes started inside this block write their stdout and stderr to `log`: submitit's local
    controller inherits them, and its traceback on Ctrl-C would otherwise land on the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(log, "a") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _stop_local(jobs: list[Any], grace_s: float = 15.0) -> None:
    """Stop local jobs: SIGINT to each job's controller (which stops its task), then wait; kill what is left."""
    import subprocess

    for j in jobs:
        j.cancel(check=False)
    deadline = time.time() + grace_s
    for j in jobs:
        proc = getattr(j, "_process", None)
        if proc is None:
            continue
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _failure(exc: BaseException) -> tuple[str, bool]:
    """(one line saying why a job failed, whether it failed on bad input: a BenchError)."""
    if isinstance(exc, BenchError):  # the user's one line, whole (it says what is accepted)
        return prog.one_line(exc), True
    msg = str(exc).strip()
    if "has not produced any output" in msg:
        return "the job produced no result (killed or cancelled)", False
    if not type(exc).__module__.startswith("submitit"):  # raised in this process (debug executor)
        return prog.one_line(f"{type(exc).__name__}: {msg}", 300), False
    # submitit wraps the remote traceback: keep its last meaningful line
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    tb = [ln for ln in lines if not ln.startswith(("You can check", "or at paths", "- /", "Job (task"))]
    last = tb[-1] if tb else type(exc).__name__
    head, sep, text = last.partition(": ")
    if sep and head.startswith("bench.core.errors."):
        cls = getattr(errors, head.rsplit(".", 1)[1], None)
        if isinstance(cls, type) and issubclass(cls, BenchError):
            return prog.one_line(text), True
    return prog.one_line(last, 300), False


def _job_error(job: Any, run_folder: Path, slurm_state: str | None = None) -> tuple[str, bool] | None:
    """None if the cell finished (final.json), else (one line saying why not, whether on bad input)."""
    if slurm_state is not None and not job.paths.result_pickle.exists():
        # killed, cancelled or timed out: no result file, Slurm's state says what happened
        return None if (run_folder / "final.json").exists() else (f"Slurm: {slurm_state}", False)
    try:
        exc = job.exception()
    except Exception as e:  # e.g. a debug job that raised BaseException
        exc = e
    if (run_folder / "final.json").exists() and exc is None:
        return None
    if exc is None:
        return "the job ended without final.json", False
    return _failure(exc)


def _wait_slurm(pairs: list[tuple[Cell, Any]], finished: Callable[[Cell, Any, str | None], None], poll_s: float) -> None:
    """Poll Slurm (one sacct call per round) until every job has a result or a final state."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    watcher = SlurmInfoWatcher(delay_s=0)
    for _, j in pairs:
        watcher.register_job(str(j.job_id))
    pending = list(pairs)
    while pending:
        watcher.update()
        for c, j in list(pending):
            jid = str(j.job_id)
            state = watcher.get_state(jid, mode="cache")
            if j.paths.result_pickle.exists() or state.split(" ")[0].upper() not in SLURM_LIVE + ("UNKNOWN",):
                pending.remove((c, j))
                finished(c, j, state)
        if pending:
            time.sleep(poll_s)
