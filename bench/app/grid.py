"""Grids of runs on a cluster: expansion, submission through submitit, preemption, cell states.

    bench grid my_grid.yaml --dry-run                          # the cells, and which would run
    bench grid my_grid.yaml --executor slurm --partition gpu --gpus 1 --time 240
    bench grid my_grid.yaml --executor local                   # no Slurm: processes on this machine
    bench status my_grid.yaml                                  # done / running / pending / failed

A grid file (YAML; every key but `methods` optional):

    name: ring8-sweep              # results/<name>/ and the manifest folder (default: the file's stem)
    description: one paragraph for results/<name>/table.md
    tasks: [gmm-ring8]             # or `task: gmm-ring8` (default gmm-ring8)
    methods: [sqdf, draft]
    rewards: [quadratic]           # default: each task's default reward (a reward a task lacks is skipped for it)
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

Cells are tasks × rewards × methods × alphas × sweeps × seeds, each a resolved RunConfig (bad
keys fail before anything is submitted). `set` keys are dotted (`method.lr`) or nested
(`method: {lr: ...}`); on the command line `--set 'alpha=[1,0.3]'` sweeps and `--set alpha=1`
fixes. A field that itself holds a list is given as a string ("a,b") or swept as a list of lists.

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
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from bench.app.config import RunConfig, config_from_dict, load_yaml, resolve
from bench.core.io import dump_json
from bench.core.errors import BenchError
from bench.core.registry import METHODS, TASKS

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
    def from_dict(cls, d: dict[str, Any] | None) -> "SlurmParams":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BenchError(f"unknown slurm keys {unknown}; accepted: {', '.join(sorted(names))}")
        if "setup" in d:
            d["setup"] = tuple(d["setup"] if isinstance(d["setup"], (list, tuple)) else [d["setup"]])
        try:
            return cls(**d)
        except TypeError as e:
            raise BenchError(f"invalid slurm settings: {e}") from None

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


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file (see the module docstring)."""

    name: str
    "results/<name>/ and the manifest folder runs/_grids/<name>/"
    description: str = ""
    "a paragraph for the results page"
    tasks: tuple[str, ...] = ("gmm-ring8",)
    "task names (canonical)"
    methods: tuple[str, ...] = ()
    "method names (canonical)"
    rewards: tuple[str, ...] = ()
    "training rewards; empty: each task's default"
    alphas: tuple[float, ...] = ()
    "KL weights α in nats; empty: each task's default"
    seeds: tuple[int, ...] = (0, 1, 2)
    "seeds of every configuration"
    sets: dict[str, Any] = field(default_factory=dict)
    "dotted key -> value, or -> list of values (a sweep), for every cell"
    method_sets: dict[str, dict[str, Any]] = field(default_factory=dict)
    "method -> dotted key -> value or sweep, for that method's cells"
    max_parallel: int = 0
    "cells running at once (0: the executor's default)"
    slurm: SlurmParams = field(default_factory=SlurmParams)
    "each cell's Slurm job"


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its resolved config and the swept values that single it out."""

    cfg: RunConfig
    sweep: tuple[tuple[str, Any], ...] = ()

    def dir(self, root: Path) -> Path:
        from bench.app.runner import run_dir

        return run_dir(root, self.cfg)

    def rel(self) -> str:
        return f"{self.cfg.task}/{self.cfg.method}/{self.cfg.run_name()}"

    @property
    def label(self) -> str:
        c = self.cfg
        extra = "".join(f" {k}={v}" for k, v in self.sweep)
        return f"{c.task} {c.method} {c.reward} α={c.alpha:g} seed={c.seed}{extra}"


def _flatten(d: dict[str, Any], where: str) -> dict[str, Any]:
    """{"method": {"lr": x}, "train.iterations": y} -> {"method.lr": x, "train.iterations": y}."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                out[f"{k}.{kk}"] = vv
        else:
            out[str(k)] = v
    for k in out:
        if k.count(".") > 1:
            raise BenchError(f"{where}: malformed key {k!r}; use alpha, reward or <section>.<field>")
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


def parse_cli_sets(items: Iterable[str]) -> dict[str, Any]:
    """`--set key=value` for grids: a value written as a YAML list (`[1, 0.3]`) is a sweep."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"malformed --set {item!r}: expected key=value, e.g. method.lr=1e-3 or 'alpha=[1,0.3]'")
        val = val.strip()
        if val.startswith("[") and val.endswith("]"):
            try:
                out[key] = list(yaml.safe_load(val))
            except yaml.YAMLError:
                raise BenchError(f"malformed sweep in --set {item!r}: expected a YAML list, e.g. [1, 0.3]") from None
        else:
            out[key] = val
    return out


def _as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def load_grid(path: Path, cli_sets: Iterable[str] = ()) -> GridSpec:
    """Read and check a grid file; `cli_sets` (`--set`) override its `set:` entries."""
    data = load_yaml(path)
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise BenchError(f"malformed grid {path}: unknown keys {unknown}; accepted: {', '.join(GRID_KEYS)}")
    if "task" in data and "tasks" in data:
        raise BenchError(f"malformed grid {path}: give 'task' or 'tasks', not both")
    methods = data.get("methods")
    if not methods:
        raise BenchError(f"malformed grid {path}: 'methods' must list at least one method (bench ls methods)")
    tasks = _as_list(data.get("tasks", data.get("task", "gmm-ring8")))
    try:
        seeds = tuple(int(s) for s in _as_list(data.get("seeds", [0, 1, 2])))
        alphas = tuple(float(a) for a in _as_list(data.get("alphas", [])))
        max_parallel = int(data.get("max_parallel", 0))
    except (TypeError, ValueError):
        raise BenchError(f"malformed grid {path}: seeds must be integers, alphas numbers, max_parallel an integer") from None
    sets = {**_flatten(data.get("set") or {}, f"grid {path}: set"), **_flatten(parse_cli_sets(cli_sets), "--set")}
    method_sets = {}
    for m, s in (data.get("method_sets") or {}).items():
        if not isinstance(s, dict):
            raise BenchError(f"malformed grid {path}: method_sets.{m} must be a mapping")
        method_sets[METHODS.canonical(str(m))] = _flatten(s, f"grid {path}: method_sets.{m}")
    if alphas and ("alpha" in sets or any("alpha" in s for s in method_sets.values())):
        raise BenchError(f"malformed grid {path}: give α either as 'alphas' or as a 'set: alpha' sweep, not both")
    return GridSpec(
        name=str(data.get("name", Path(path).stem)),
        description=str(data.get("description", "")),
        tasks=tuple(TASKS.canonical(str(t)) for t in tasks),
        methods=tuple(METHODS.canonical(str(m)) for m in _as_list(methods)),
        rewards=tuple(str(r) for r in _as_list(data.get("rewards", []))),
        alphas=alphas,
        seeds=seeds,
        sets=sets,
        method_sets=method_sets,
        max_parallel=max_parallel,
        slurm=SlurmParams.from_dict(data.get("slurm")),
    )


def expand(spec: GridSpec) -> list[Cell]:
    """The cells of a grid, in a stable order; each config resolved and validated (BenchError on bad input)."""
    cells: list[Cell] = []
    seen: set[str] = set()
    offered = {r for t in spec.tasks for r in TASKS.get(t).rewards}
    for r in spec.rewards:
        if r not in offered:
            raise BenchError(f"no task of this grid offers reward {r!r}; rewards of {', '.join(spec.tasks)}: {', '.join(sorted(offered))}")
    for task in spec.tasks:
        task_cls = TASKS.get(task)
        rewards: list[str | None] = [r for r in spec.rewards if r in task_cls.rewards] if spec.rewards else [None]
        for reward in rewards:
            for method in spec.methods:
                flat = {**spec.sets, **spec.method_sets.get(method, {})}
                swept = [k for k, v in flat.items() if isinstance(v, list)]
                for alpha in spec.alphas or [None]:
                    for combo in itertools.product(*(flat[k] for k in swept)):
                        chosen = {**flat, **dict(zip(swept, combo))}
                        layer = _unflatten(chosen)
                        for seed in spec.seeds:
                            cfg = resolve(task, method, seed, alpha=alpha, reward=reward, layers=[layer])
                            cell = Cell(cfg, tuple((k, v) for k, v in zip(swept, combo)))
                            if cell.rel() not in seen:
                                seen.add(cell.rel())
                                cells.append(cell)
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
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

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
            print(f"bench: {cfg.task}/{cfg.method}/{cfg.run_name()}: resuming from checkpoint.pt (log at iteration {_progress(d)[0]})", file=sys.stderr, flush=True)
        try:
            result = run_one(cfg, Path(runs_root), progress=False, stop_when=stop.requested)
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

        return submitit.helpers.DelayedSubmission(CellJob(self.threads), cfg_dict, runs_root)


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
    except (OSError, KeyError, ValueError):
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
    """The last line of a failed job's traceback from its submitit result pickle (None if absent or a success)."""
    p = Path(folder) / f"{job_id}_0_result.pkl"
    if not p.exists():
        return None
    try:
        import pickle

        with p.open("rb") as f:
            outcome, payload = pickle.load(f)
    except Exception:
        return None
    if outcome != "error":
        return None
    lines = [ln for ln in str(payload).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "error"


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


def submit(cells: Sequence[Cell], root: Path, name: str, executor: str = "local", slurm: SlurmParams | None = None,
           max_parallel: int = 0, force: bool = False, wait: bool = True, poll_s: float = 2.0,
           echo: Callable[[str], None] = print) -> GridOutcome:
    """Submit the unfinished cells (one submitit job each) and, with `wait`, wait for all of them.

    Args:
        executor: "slurm" (a job array), "local" (subprocesses on this machine, `max_parallel` at a
            time; default max(1, cores // 2)) or "debug" (in this process, one after the other).
        force: delete the cells' run folders first (re-run finished cells from scratch).
        wait: wait for every job (local and debug always wait); otherwise return after submitting.
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
    sub_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    folder = grids_dir(root) / name / sub_id  # fresh for every submission: no stale pickles
    folder.mkdir(parents=True, exist_ok=True)
    if max_parallel <= 0:
        max_parallel = len(todo) if executor == "slurm" else max(1, (os.cpu_count() or 2) // 2)
    threads = None if executor == "slurm" else max(1, (os.cpu_count() or 1) // min(max_parallel, len(todo)))
    ex = _executor(executor, folder, slurm, f"bench-{name}", max_parallel)
    manifest = {"grid": name, "id": sub_id, "executor": executor, "folder": str(folder),
                "submitted": _dt.datetime.now().isoformat(timespec="seconds"), "max_parallel": max_parallel,
                "slurm": asdict(slurm) if executor == "slurm" else None, "cells": []}
    mpath = folder.with_suffix(".json")
    outcome.manifest = mpath
    job = CellJob(threads)
    jobs: dict[str, Any] = {}

    def record(c: Cell, j: Any) -> None:
        jobs[c.rel()] = j
        outcome.job_ids[c.rel()] = str(j.job_id)
        manifest["cells"].append({"dir": c.rel(), "label": c.label, "job_id": str(j.job_id)})
        dump_json(manifest, mpath)

    def finished(c: Cell, j: Any, slurm_state: str | None = None) -> None:
        err = _job_error(j, c.dir(root), slurm_state)
        entry = next(e for e in manifest["cells"] if e["dir"] == c.rel())
        if err is None:
            outcome.done.append(c)
            entry["outcome"] = "done"
            echo(f"done    {c.label}")
        else:
            outcome.failed.append((c, err))
            entry.update(outcome="failed", error=err)
            echo(f"FAILED  {c.label}: {err}")
        dump_json(manifest, mpath)

    if executor == "slurm":
        with ex.batch():
            subs = [(c, ex.submit(job, c.cfg.to_dict(), str(root))) for c in todo]
        for c, j in subs:
            record(c, j)
        echo(f"submitted {len(todo)} cells as Slurm job array {str(subs[0][1].job_id).split('_')[0]} "
             f"(at most {max_parallel} at once); manifest {mpath}")
        if wait:
            _wait_slurm([(c, jobs[c.rel()]) for c in todo], finished, poll_s)
        return outcome
    if executor == "debug":
        for c in todo:
            j = ex.submit(job, c.cfg.to_dict(), str(root))
            record(c, j)
            finished(c, j)  # runs it, here
        return outcome
    queue = list(todo)
    running: list[tuple[Cell, Any]] = []
    try:
        while queue or running:
            while queue and len(running) < max_parallel:
                c = queue.pop(0)
                j = ex.submit(job, c.cfg.to_dict(), str(root))
                record(c, j)
                running.append((c, j))
            for c, j in list(running):
                if j.done():
                    running.remove((c, j))
                    finished(c, j)
            time.sleep(min(poll_s, 0.5))
    except KeyboardInterrupt:  # local jobs are this process's children: stop them (their checkpoints stay)
        for _, j in running:
            j.cancel(check=False)
        raise
    return outcome


def _job_error(job: Any, run_folder: Path, slurm_state: str | None = None) -> str | None:
    """None if the cell finished (final.json), else one line saying why not."""
    if slurm_state is not None and not job.paths.result_pickle.exists():
        # killed, cancelled or timed out: no result file, Slurm's state says what happened
        return None if (run_folder / "final.json").exists() else f"Slurm: {slurm_state}"
    try:
        exc = job.exception()
    except Exception as e:  # e.g. a debug job that raised BaseException
        exc = e
    if (run_folder / "final.json").exists() and exc is None:
        return None
    if exc is None:
        return "the job ended without final.json"
    msg = str(exc).strip()
    # submitit wraps the remote traceback: keep its last meaningful line
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    tb = [ln for ln in lines if not ln.startswith(("You can check", "or at paths", "- /", "Job (task"))]
    if "has not produced any output" in msg:
        return "the job produced no result (killed or cancelled)"
    return (tb[-1] if tb else type(exc).__name__)[:300]


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
