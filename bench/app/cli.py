"""`bench`: run methods on tasks, list what is registered, make tables.

    bench run                                   # the embedded default suite -> results/default/
    bench run --task gmm-ring8 --methods sqdf,draft --seeds 0,1,2 --set method.lr=1e-3
    bench ls [methods|rewards|metrics|tasks]
    bench table runs/gmm-ring8                  # tables of finished runs (--paper: published numbers beside them)
    bench grid my_grid.yaml --executor slurm    # a grid of runs as Slurm jobs (bench/app/grid.py); local, debug without Slurm
    bench status my_grid.yaml                   # done / running / pending / failed per cell
    bench plot runs/gmm-ring8                   # paper figures (PNG, PDF): metrics vs reward, α fronts, curves, samples
    bench prepare digits                        # train and cache a task's local pieces (base, rewards, judges, references)

`bench run` and `bench grid` share one path: the command line or the file becomes a grid
(bench/app/grid.py: one format for suites and grids), expanded into resolved cells before anything
is written, then run through one executor layer (debug: in this process; local: processes here;
slurm). Exit codes and the error format are in docs/cli.md: 0 done, 1 failed cells or an internal
error (traceback in a log file), 2 bad input (one line "error: ..."), 130 interrupted.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, List, Optional

import typer

from bench.app.config import CONFIG_DIR, check_layer, check_seed, coerce, load_yaml, merge, parse_sets
from bench.core import progress as prog
from bench.core.errors import BenchError
from bench.core.registry import METHODS, METRICS, REWARDS, TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="diffusion-alignment-bench: reward fine-tuning of diffusion models, compared fairly.")

DEFAULT_TASK = "gmm-ring8"
INTERRUPTED = "interrupted; rerun the same command to resume"


@app.callback()
def _global_options(
    plugin: List[str] = typer.Option([], "--plugin", help="import this module first (it registers its own methods, rewards, metrics or tasks); repeatable"),
) -> None:
    """diffusion-alignment-bench: reward fine-tuning of diffusion models, compared fairly."""
    if plugin:
        from bench.core.registry import PLUGIN_ENV

        names = [n for n in os.environ.get(PLUGIN_ENV, "").split(",") if n] + list(plugin)
        os.environ[PLUGIN_ENV] = ",".join(dict.fromkeys(names))  # spawned workers inherit it


# ---- parsing and checks (all before anything is written) --------------------------------------------------


def _csv(s: str | None, what: str | None = None) -> list[str]:
    """"a, b" -> ["a", "b"]; with `what`, an option that lists nothing (e.g. --seeds ,) is an error."""
    out = [x.strip() for x in s.split(",") if x.strip()] if s else []
    if what and not out:
        raise BenchError(f"{what} must list at least one value (comma-separated), got {s!r}")
    return out


def _ints(s: str, what: str) -> list[int]:
    """--seeds: comma-separated integers in [0, 2**63)."""
    items = _csv(s, what)
    try:
        return [check_seed(x, what) for x in items]
    except BenchError:
        raise BenchError(f"{what} must be comma-separated integers in [0, 2**63), e.g. 0,1,2; got {s!r}") from None


def _floats(s: str, what: str) -> list[float]:
    """--alpha: comma-separated finite numbers."""
    items = _csv(s, what)
    try:
        return [coerce(x, float, what) for x in items]
    except BenchError:
        raise BenchError(f"{what} must be comma-separated finite numbers, e.g. 1,0.3; got {s!r}") from None


def check_output_dir(path: Path, option: str) -> None:
    """A folder the command will write into: it (or, if missing, its nearest existing parent) must be
    a writable folder. Checked before anything runs, so that nothing is trained and then lost."""
    p = Path(path)
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "" if probe == p else f" (its parent {probe} is a file)"
        raise BenchError(f"{option} {p} is not a folder{where}; give a folder to write into")
    if not os.access(probe if probe.exists() else Path.cwd(), os.W_OK | os.X_OK):
        raise BenchError(f"{option} {p} is not writable (no write permission on {probe}); give a writable folder")


def task_for_reward(reward: str) -> str:
    """The task a reward name selects when no task is named (e.g. --reward hps -> sd15)."""
    hits = [e.name for e in TASKS if reward in e.obj.rewards or (reward in REWARDS and REWARDS.canonical(reward) in e.obj.rewards)]
    preferred = [h for h in hits if TASKS.entry(h).meta.get("default_for_rewards")]
    if preferred:
        return preferred[0]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        known = sorted({r for e in TASKS for r in e.obj.rewards})
        raise BenchError(f"unknown reward {reward!r}; known rewards: {', '.join(known)}")
    raise BenchError(f"reward {reward!r} is offered by several tasks ({', '.join(hits)}); name one with --task")


def suite_path(suite: str | None) -> Path:
    """A suite name (bench/configs/suites/<name>.yaml) or a YAML path; None: the default suite."""
    if suite and suite.endswith((".yaml", ".yml")):
        return Path(suite)
    path = CONFIG_DIR / "suites" / f"{suite or 'default'}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "suites").glob("*.yaml")))
        raise BenchError(f"unknown suite {suite!r}; known suites: {known}")
    return path


def _run_spec(task: str | None, methods: str | None, reward: str | None, alphas: str | None, seeds: str | None,
              sets: list[str], config: Path | None, suite: str | None) -> Any:
    """`bench run`'s options as a grid: a suite file, or one block from --task/--methods; --seeds,
    --alpha and --reward replace the blocks' lists, --config and --set override every cell."""
    from bench.app.grid import Overrides, _flatten, grid_from_dict, load_grid

    layer = load_yaml(config) if config is not None else {}
    check_layer(layer, f"config file {config}")
    over = Overrides(sets=_flatten(parse_sets(sets), "--set"), layer=layer,
                     seeds=tuple(_ints(seeds, "--seeds")) if seeds is not None else None,
                     alphas=tuple(_floats(alphas, "--alpha")) if alphas is not None else None,
                     rewards=(reward,) if reward is not None else None)
    if suite or not (task or methods or reward):
        if task or methods:
            raise BenchError("--suite runs the suite's own tasks and methods; drop --task/--methods, or drop --suite")
        return load_grid(suite_path(suite), overrides=over, what="suite")
    names = _csv(methods, "--methods") if methods is not None else []
    if not names:
        raise BenchError(f"--methods is required with --task/--reward; known methods: {', '.join(METHODS.names())}")
    task = TASKS.canonical(task or (task_for_reward(reward) if reward else DEFAULT_TASK))
    return grid_from_dict({"task": task, "methods": names}, "the command line", task, over)


# ---- executors (bench/app/grid.py): options shared by `run` and `grid` ------------------------------------------

PARTITION_OPT = typer.Option(None, "--partition", help="Slurm partition")
GPUS_OPT = typer.Option(None, "--gpus", min=0, help="Slurm: GPUs per job")
CPUS_OPT = typer.Option(None, "--cpus", min=1, help="Slurm: CPU cores per job")
MEM_OPT = typer.Option(None, "--mem", min=0, help="Slurm: memory per job, GB")
TIME_OPT = typer.Option(None, "--time", min=1, help="Slurm: time limit per job, minutes (jobs checkpoint and requeue at the limit)")
ACCOUNT_OPT = typer.Option(None, "--account", help="Slurm account")
SBATCH_OPT = typer.Option([], "--sbatch", help="extra sbatch flag, key=value (e.g. qos=high); repeatable")
WAIT_OPT = typer.Option(True, "--wait/--no-wait", help="Slurm: wait for the jobs (else submit and return; see bench status)")
QUIET_OPT = typer.Option(False, "--quiet", help="no progress bars (there are none when stderr is not a terminal)")


def _slurm_cli(partition: str | None, gpus: int | None, cpus: int | None, mem: float | None, time_min: int | None,
               account: str | None, sbatch: list[str]) -> dict[str, Any]:
    from bench.app.grid import parse_sbatch

    if mem is not None:
        coerce(mem, float, "--mem")  # finite
    return {"partition": partition, "gpus_per_node": gpus, "cpus_per_task": cpus, "mem_gb": mem, "timeout_min": time_min,
            "account": account, "additional": parse_sbatch(sbatch) or None}


def _submit_cells(cells: list[Any], name: str, description: str, executor: str, runs_dir: Path, results_dir: Path,
                  max_parallel: int, slurm: Any, force: bool, wait: bool, report: bool, progress: bool) -> None:
    """Run cells through bench.app.grid.submit, write results/<name>/ for the finished ones, and end
    as docs/cli.md says: failed cells listed, exit 1; every cell failed on the same bad input: exit 2."""
    from bench.app.grid import submit
    from bench.app.table import load_results

    outcome = submit(cells, runs_dir, name, executor, slurm, max_parallel, force, wait, echo=typer.echo, progress=progress)
    finished = [c for c, why in outcome.skipped if why == "finished"]
    if finished:
        typer.echo(f"{len(finished)} of {len(cells)} cells finished earlier (skipped; --force reruns them)")
    for c, why in outcome.skipped:
        if why != "finished":
            typer.echo(f"skipped {c.label}: {why}")
    if executor == "slurm" and not wait:
        typer.echo(f"{len(outcome.submitted)} cells submitted; follow them with `bench status`")
        return
    reasons = {why for _, why in outcome.failed}
    if outcome.failed and not outcome.done and len(reasons) == 1 and {c.rel() for c, _ in outcome.failed} <= outcome.bad_input:
        outcome.discard(runs_dir)
        raise BenchError(reasons.pop())  # the same bad input stopped every cell: one line, exit 2
    results = load_results([c.dir(runs_dir) for c in cells])
    if report and results:
        from bench.app.report import write_report

        out = write_report(name, results, runs_dir, results_dir, description)
        typer.echo(f"table: {out / 'table.md'}")
    typer.echo(f"{len(results)} of {len(cells)} cells finished, {len(outcome.failed)} failed")
    if outcome.failed:
        for c, why in outcome.failed:
            typer.echo(f"failed: {c.label}: {why}", err=True)
        typer.echo(f"error: {len(outcome.failed)} of {len(cells)} cells failed; rerun the same command to retry them "
                   "(finished cells are skipped)", err=True)
        raise typer.Exit(1)


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@app.command()
def run(
    task: Optional[str] = typer.Option(None, "--task", help="task name (bench ls tasks); default: the one the reward selects, else gmm-ring8"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated method names (bench ls methods)"),
    reward: Optional[str] = typer.Option(None, "--reward", help="training reward (default: the task's; with --suite: replaces the suite's)"),
    alphas: Optional[str] = typer.Option(None, "--alpha", help="comma-separated KL weights α in nats (default: the task's, or the suite's)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds in [0, 2**63) (default 0,1,2, or the suite's)"),
    sets: List[str] = typer.Option([], "--set", help="override, key=value (alpha, method.X, task.X, sampler.X, train.X); a YAML list sweeps, e.g. 'method.lr=[1e-3,3e-4]'; repeatable"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of overrides (same keys as --set, nested; --set wins)"),
    suite: Optional[str] = typer.Option(None, "--suite", help="a suite name (bench/configs/suites) or a grid YAML path; plain `bench run` runs 'default'"),
    name: Optional[str] = typer.Option(None, "--name", help="results folder name (default: the suite's or the task's)"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where run folders go"),
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="where tables and figures go"),
    jobs: int = typer.Option(0, "--jobs", min=0, help="runs at once (0: the suite's max_parallel, else 1); above 1 they run as local processes"),
    force: bool = typer.Option(False, "--force", help="re-run finished runs from scratch"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved runs (one JSON config a line) and exit"),
    quiet: bool = QUIET_OPT,
    executor: Optional[str] = typer.Option(None, "--executor", help="debug (this process), local (processes here) or slurm; default: debug, local with --jobs above 1"),
    partition: Optional[str] = PARTITION_OPT,
    gpus: Optional[int] = GPUS_OPT,
    cpus: Optional[int] = CPUS_OPT,
    mem: Optional[float] = MEM_OPT,
    time_min: Optional[int] = TIME_OPT,
    account: Optional[str] = ACCOUNT_OPT,
    sbatch: List[str] = SBATCH_OPT,
    wait: bool = WAIT_OPT,
) -> None:
    """Run every (method × α × seed) combination and write a paper-style table under results/."""
    from bench.app.grid import expand

    spec = _run_spec(task, methods, reward, alphas, seeds, sets, config, suite)
    cells = expand(spec)
    name = name or spec.name
    if dry_run:
        for c in cells:
            typer.echo(json.dumps(c.cfg.to_dict()))
        typer.echo(f"{len(cells)} runs; results -> {results_dir / name}", err=True)
        return
    check_output_dir(runs_dir, "--runs-dir")
    check_output_dir(results_dir, "--results-dir")
    max_parallel = jobs or spec.max_parallel
    slurm = spec.slurm.merged(_slurm_cli(partition, gpus, cpus, mem, time_min, account, sbatch))
    _submit_cells(cells, name, spec.description, executor or ("local" if max_parallel > 1 else "debug"), runs_dir, results_dir,
                  max_parallel, slurm, force, wait, report=True, progress=_progress(quiet))


@app.command("ls")
def ls(what: str = typer.Argument("all", help="methods, rewards, metrics, tasks, or all")) -> None:
    """List the registered methods, rewards, metrics and tasks."""
    regs = {"methods": METHODS, "rewards": REWARDS, "metrics": METRICS, "tasks": TASKS}
    if what != "all" and what not in regs:
        raise BenchError(f"unknown registry {what!r}; known: all, {', '.join(regs)}")
    for key, reg in regs.items():
        if what not in ("all", key):
            continue
        typer.echo(f"{key}:")
        for e in reg:
            obj = e.obj
            version = getattr(obj, "version", None)
            doc = e.meta.get("doc") or next(iter((obj.__doc__ or "").strip().splitlines()), "")
            extra = ""
            if key == "metrics":
                extra = {"max": " ↑", "min": " ↓", "target": " ≈"}.get(e.meta.get("direction", ""), "")
            if key == "methods":
                extra = " [reward gradient]" if obj.needs_reward_grad else " [reward queries only]"
            aliases = [a for a, n in reg.aliases().items() if n == e.name]
            al = f" (alias: {', '.join(aliases)})" if aliases else ""
            v = f" v{version}" if isinstance(version, int) else ""
            typer.echo(f"  {e.name}{v}{al}{extra}  {doc}")


@app.command()
def table(
    paths: List[Path] = typer.Argument(..., help="run folders, or folders containing them (e.g. runs/gmm-ring8)"),
    fmt: str = typer.Option("markdown", "--format", help="markdown, latex or csv"),
    out: Optional[Path] = typer.Option(None, "--out", help="write here instead of stdout"),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="include the exact-target, floor and base rows"),
    paper: bool = typer.Option(False, "--paper", help="add the published numbers (results/paper.yaml) beside each metric"),
    paper_file: Optional[Path] = typer.Option(None, "--paper-file", help="published numbers from this YAML instead (implies --paper)"),
    time: bool = typer.Option(True, "--time/--no-time", help="include the wall-time column (--no-time: comparable across machines)"),
) -> None:
    """Tables (mean ± std over seeds with n) of finished runs."""
    from bench.app.table import check_table_format, collect_runs, load_paper, render_tables
    from bench.core.io import write_text

    check_table_format(fmt)
    if out is not None:
        if out.is_dir():
            raise BenchError(f"--out {out} is a folder; give a file path for the table")
        check_output_dir(out.parent, "--out's folder")
    published = load_paper(paper_file) if (paper or paper_file) else None
    text = render_tables(collect_runs(paths), fmt, reference=reference, paper=published, time=time)
    if out is not None:
        write_text(out, text)
    else:
        typer.echo(text)


@app.command()
def prepare(
    task: str = typer.Argument(..., help="task name (bench ls tasks), e.g. digits"),
    sets: List[str] = typer.Option([], "--set", help="task.X=value overrides of the task config (as in bench run); repeatable"),
    quiet: bool = QUIET_OPT,
) -> None:
    """Train and cache a task's local pieces (e.g. digits: base model, rewards, judges, SIR pool)."""
    from bench.app.config import apply_dict

    name = TASKS.canonical(task)
    task_cls = TASKS.get(name)
    over = parse_sets(sets, sweeps=False)
    if set(over) - {"task"}:
        raise BenchError(f"bench prepare accepts only task.X overrides, got {', '.join(sorted(set(over) - {'task'}))}")
    preset_path = CONFIG_DIR / "tasks" / f"{name}.yaml"
    preset = (load_yaml(preset_path).get("task") or {}) if preset_path.exists() else {}
    task_cfg = apply_dict(task_cls.Config(), merge({"task": preset}, over).get("task", {}), "task.")
    obj = task_cls(task_cfg)
    if not hasattr(obj, "prepare"):
        obj.build_backbone()
        typer.echo(f"{name}: backbone built; nothing else to prepare")
        return
    summary = obj.prepare(progress=_progress(quiet))
    for k, v in summary.items():
        if isinstance(v, dict):
            typer.echo(f"{k}:")
            for kk, vv in v.items():
                typer.echo(f"  {kk}: {vv}")
        else:
            typer.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


@app.command()
def grid(
    path: Path = typer.Argument(..., help="grid YAML: tasks, methods, rewards, alphas, seeds, set sweeps, runs (blocks), slurm (see bench/app/grid.py)"),
    executor: str = typer.Option("local", "--executor", help="slurm (one job per cell, a job array), local (processes here) or debug (in this process)"),
    sets: List[str] = typer.Option([], "--set", help="override key=value for every cell; a YAML list sweeps, e.g. 'alpha=[1,0.3]'; repeatable"),
    name: Optional[str] = typer.Option(None, "--name", help="results folder and manifest name (default: the grid's)"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where run folders go"),
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="where tables and figures go"),
    jobs: int = typer.Option(0, "--jobs", min=0, help="cells running at once (0: the grid's max_parallel; Slurm: all, local: cores/2)"),
    partition: Optional[str] = PARTITION_OPT,
    gpus: Optional[int] = GPUS_OPT,
    cpus: Optional[int] = CPUS_OPT,
    mem: Optional[float] = MEM_OPT,
    time_min: Optional[int] = TIME_OPT,
    account: Optional[str] = ACCOUNT_OPT,
    sbatch: List[str] = SBATCH_OPT,
    wait: bool = WAIT_OPT,
    report: bool = typer.Option(True, "--report/--no-report", help="write results/<name>/ (tables, figures) when the cells are done"),
    force: bool = typer.Option(False, "--force", help="delete the cells' run folders and run them from scratch"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells (run / skipped, and why) and exit"),
    quiet: bool = QUIET_OPT,
) -> None:
    """Run a grid (blocks of tasks × rewards × methods × α × --set sweeps × seeds); finished cells are skipped."""
    from bench.app.grid import expand, load_grid, plan

    spec = load_grid(path, sets)
    cells = expand(spec)
    name = name or spec.name
    if dry_run:
        todo, skipped = plan(cells, runs_dir, force)
        why = {c.rel(): w for c, w in skipped}
        for c in cells:
            typer.echo(f"{'run ' if c.rel() not in why else 'skip'}  {c.label}  -> {runs_dir / c.rel()}" + (f"  ({why[c.rel()]})" if c.rel() in why else ""))
        typer.echo(f"{len(cells)} cells: {len(todo)} to run, {len(skipped)} skipped; executor {executor}", err=True)
        return
    check_output_dir(runs_dir, "--runs-dir")
    if report:
        check_output_dir(results_dir, "--results-dir")
    slurm = spec.slurm.merged(_slurm_cli(partition, gpus, cpus, mem, time_min, account, sbatch))
    _submit_cells(cells, name, spec.description, executor, runs_dir, results_dir, jobs or spec.max_parallel, slurm, force, wait, report,
                  progress=_progress(quiet))


@app.command()
def status(
    target: Path = typer.Argument(..., help="a grid or suite YAML (its cells), or a runs folder (every run and submission in it)"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where the grid's run folders are (with a grid YAML)"),
    sets: List[str] = typer.Option([], "--set", help="the --set overrides the grid was submitted with"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per cell"),
) -> None:
    """State of each cell: done, running, pending, failed (with why), incomplete or not started."""
    from bench.app.grid import cell_states, expand, format_states, load_grid

    if not target.exists():
        raise BenchError(f"{target} does not exist")
    if target.is_dir():
        states = cell_states(None, target)
    else:
        states = cell_states(expand(load_grid(target, sets)), runs_dir)
    if as_json:
        for s in states:
            typer.echo(json.dumps(s.to_dict()))
    else:
        typer.echo(format_states(states))


@app.command()
def plot(
    paths: List[Path] = typer.Argument(..., help="run folders, or folders containing them"),
    out: Path = typer.Option(Path("results/figures"), "--out", help="folder for the figures"),
    kinds: str = typer.Option("training,pareto,curves,samples", "--kind", help="comma-separated: training (Fig. 3), pareto (Fig. 4), curves, samples, queries (online runs: metrics against oracle queries)"),
    formats: str = typer.Option("png,pdf", "--format", help="comma-separated: png, pdf, svg"),
    x_metric: str = typer.Option("path_kl", "--x", help="pareto: metric on the x axis"),
    y_metric: str = typer.Option("reward", "--y", help="pareto: metric on the y axis"),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="reference points (p* draw, base model) and exact-target lines"),
) -> None:
    """Paper figures of finished runs: held-out metrics vs training reward, α-sweep fronts, learning curves, sample grids."""
    from bench.app.plots import check_figure_args, make_figures
    from bench.app.table import collect_runs

    kinds_list, formats_list = _csv(kinds, "--kind"), _csv(formats, "--format")
    check_figure_args(out, kinds_list, formats_list)
    check_output_dir(out, "--out")
    results = collect_runs(paths)
    for m in (x_metric, y_metric):
        if m.split("@")[0] not in METRICS:
            raise BenchError(f"unknown metric {m!r}; known: {', '.join(METRICS.names())}")
    written = make_figures(results, out, kinds_list, formats_list, x_metric=x_metric, y_metric=y_metric, reference=reference)
    for kind, files in written.items():
        for f in files:
            typer.echo(f"{kind}: {f}")



# ---- the entry point: one error path (docs/cli.md) ---------------------------------------------------------------


def _click_exceptions(name: str) -> tuple[type, ...]:
    """Exception class `name` of click and of typer's bundled copy of click (whichever exist)."""
    out = []
    for mod in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in out:
            out.append(cls)
    return tuple(out)


def _log_traceback(args: list[str]) -> Path:
    """Write the current exception's traceback to <runs-dir>/_logs/<time>.log (a temp folder if that is
    not a writable folder) and return the file."""
    runs = Path("runs")
    for i, a in enumerate(args):
        if a == "--runs-dir" and i + 1 < len(args):
            runs = Path(args[i + 1])
        elif a.startswith("--runs-dir="):
            runs = Path(a.split("=", 1)[1])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    text = f"bench {' '.join(args)}\n\n{traceback.format_exc()}"
    for folder in ((runs / "_logs") if runs.is_dir() else None, Path(tempfile.gettempdir()) / "bench-logs"):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stamp}.log"
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("(unwritable: no log)")


def _run_app(args: list[str]) -> int:
    """Run the typer app on `args`; every way it can end becomes an exit code, with at most one line on stderr."""
    usage, exits, aborts = _click_exceptions("UsageError"), _click_exceptions("Exit"), _click_exceptions("Abort")
    no_args, clicks = _click_exceptions("NoArgsIsHelpError"), _click_exceptions("ClickException")
    cmd = typer.main.get_command(app)
    try:
        with cmd.make_context("bench", list(args)) as ctx:
            cmd.invoke(ctx)
        return 0
    except exits as e:  # --help, typer.Exit(code)
        return int(getattr(e, "exit_code", 0) or 0)
    except no_args as e:  # plain `bench`: the help
        typer.echo(e.format_message())
        return 0
    except usage as e:
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else "bench"
        msg = prog.one_line(e.format_message()).rstrip(".")
        if msg.startswith("No such command"):
            msg += f" (commands: {', '.join(sorted(cmd.commands))})"
        prog.final_line(f"error: {msg}; see '{where} --help'")
        return 2
    except clicks as e:  # e.g. a file option that cannot be opened
        prog.final_line(f"error: {prog.one_line(e.format_message())}")
        return 2
    except BenchError as e:
        prog.final_line(f"error: {prog.one_line(e)}")
        return 2
    except (KeyboardInterrupt, *aborts):
        prog.final_line(INTERRUPTED)
        return 130
    except Exception as e:
        path = _log_traceback(args)
        msg = prog.one_line(e)[:300]
        prog.final_line(f"error: internal error ({type(e).__name__}: {msg}); full traceback in {path}")
        return 1


def main(argv: list[str] | None = None) -> None:
    """The `bench` console entry point; callable in-process. Always ends with SystemExit: 0 done,
    1 failed cells or an internal error, 2 bad input (one line "error: ..."), 130 interrupted (docs/cli.md)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _run_app(args)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        prog.final_line(INTERRUPTED)
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
