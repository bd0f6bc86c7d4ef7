"""`bench`: run methods on tasks, list what is registered, make tables.

    bench run                                   # the embedded default suite -> results/default/
    bench run --task gmm-ring8 --methods sqdf,draft --seeds 0,1,2 --set method.lr=1e-3
    bench ls [methods|rewards|metrics|tasks]
    bench table runs/gmm-ring8                  # tables of finished runs (--paper: published numbers beside them)
    bench grid my_grid.yaml --executor slurm    # a grid of runs as Slurm jobs (bench/app/grid.py); local, debug without Slurm
    bench status my_grid.yaml                   # done / running / pending / failed per cell
    bench plot runs/gmm-ring8                   # paper figures (PNG, PDF): metrics vs reward, α fronts, curves, samples
    bench prepare digits                        # train and cache a task's local pieces (base, rewards, judges, references)

Bad input (unknown names, out-of-range values, malformed --set, corrupt checkpoints, missing
weights) prints one line starting with "error:" and exits with code 2, having written nothing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer

from bench.app.config import CONFIG_DIR, RunConfig, load_yaml, merge, parse_sets, resolve
from bench.core.errors import BenchError
from bench.core.registry import METHODS, METRICS, REWARDS, TASKS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="diffusion-alignment-bench: reward fine-tuning of diffusion models, compared fairly.")

DEFAULT_TASK = "gmm-ring8"


@app.callback()
def _global_options(
    plugin: List[str] = typer.Option([], "--plugin", help="import this module first (it registers its own methods, rewards, metrics or tasks); repeatable"),
) -> None:
    """diffusion-alignment-bench: reward fine-tuning of diffusion models, compared fairly."""
    if plugin:
        from bench.core.registry import PLUGIN_ENV

        names = [n for n in os.environ.get(PLUGIN_ENV, "").split(",") if n] + list(plugin)
        os.environ[PLUGIN_ENV] = ",".join(dict.fromkeys(names))  # spawned workers inherit it


def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def _ints(s: str, what: str) -> list[int]:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise BenchError(f"{what} must be comma-separated integers, e.g. 0,1,2; got {s!r}") from None


def _floats(s: str, what: str) -> list[float]:
    try:
        return [float(x) for x in _csv(s)]
    except ValueError:
        raise BenchError(f"{what} must be comma-separated numbers, e.g. 1,0.3; got {s!r}") from None


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


def expand_suite(path: Path, extra: dict[str, Any], seeds: list[int] | None = None) -> tuple[str, str, list[RunConfig], dict[str, Any]]:
    """A suite YAML -> (name, description, run configs, options)."""
    data = load_yaml(path)
    name = str(data.get("name", path.stem))
    entries = data.get("runs")
    if not isinstance(entries, list) or not entries:
        raise BenchError(f"malformed suite {path}: expected a non-empty 'runs' list")
    cfgs: list[RunConfig] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "task" not in e or "methods" not in e:
            raise BenchError(f"malformed suite {path}: runs[{i}] needs 'task' and 'methods'")
        unknown = set(e) - {"task", "methods", "alphas", "seeds", "reward", "set", "method_sets"}
        if unknown:
            raise BenchError(f"malformed suite {path}: runs[{i}] has unknown keys {sorted(unknown)}; accepted: task, methods, alphas, seeds, reward, set, method_sets")
        task_cls = TASKS.get(e["task"])
        for m in e["methods"]:
            for a in e.get("alphas", [task_cls.default_alpha]):
                for s in seeds if seeds is not None else e.get("seeds", [0, 1, 2]):
                    layers = [e.get("set", {}) or {}, (e.get("method_sets", {}) or {}).get(m, {}) or {}, extra]
                    cfgs.append(resolve(e["task"], m, s, alpha=a, reward=e.get("reward"), layers=layers))
    return name, str(data.get("description", "")), cfgs, {k: data[k] for k in ("jobs",) if k in data}


def _run_parallel(cfgs: list[RunConfig], root: Path, jobs: int, force: bool, progress: bool) -> list[dict[str, Any]]:
    from bench.app.runner import run_many

    if jobs <= 1 or len(cfgs) <= 1:
        return run_many(cfgs, root, force=force, progress=progress)
    import concurrent.futures as cf
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // jobs)
    results: list[Any] = [None] * len(cfgs)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cfgs), desc=f"runs ({jobs} at a time)", dynamic_ncols=True)
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(threads,)) as ex:
        futs = {ex.submit(_worker_run, c.to_dict(), str(root), force): i for i, c in enumerate(cfgs)}
        for f in cf.as_completed(futs):
            results[futs[f]] = f.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return results


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _worker_run(cfg_dict: dict[str, Any], root: str, force: bool) -> dict[str, Any]:
    from bench.app.config import config_from_dict
    from bench.app.runner import run_one

    return run_one(config_from_dict(cfg_dict), Path(root), force=force, progress=False)


# ---- executors (bench/app/grid.py): options shared by `run` and `grid` ------------------------------------------

PARTITION_OPT = typer.Option(None, "--partition", help="Slurm partition")
GPUS_OPT = typer.Option(None, "--gpus", help="Slurm: GPUs per job")
CPUS_OPT = typer.Option(None, "--cpus", help="Slurm: CPU cores per job")
MEM_OPT = typer.Option(None, "--mem", help="Slurm: memory per job, GB")
TIME_OPT = typer.Option(None, "--time", help="Slurm: time limit per job, minutes (jobs checkpoint and requeue at the limit)")
ACCOUNT_OPT = typer.Option(None, "--account", help="Slurm account")
SBATCH_OPT = typer.Option([], "--sbatch", help="extra sbatch flag, key=value (e.g. qos=high); repeatable")
WAIT_OPT = typer.Option(True, "--wait/--no-wait", help="Slurm: wait for the jobs (else submit and return; see bench status)")


def _slurm_cli(partition: str | None, gpus: int | None, cpus: int | None, mem: float | None, time_min: int | None,
               account: str | None, sbatch: list[str]) -> dict[str, Any]:
    from bench.app.grid import parse_sbatch

    return {"partition": partition, "gpus_per_node": gpus, "cpus_per_task": cpus, "mem_gb": mem, "timeout_min": time_min,
            "account": account, "additional": parse_sbatch(sbatch) or None}


def _submit_cells(cells: list[Any], name: str, description: str, executor: str, runs_dir: Path, results_dir: Path,
                  max_parallel: int, slurm: Any, force: bool, wait: bool, report: bool) -> None:
    """Submit cells through bench.app.grid, wait, report failures, write results/<name>/ for the finished ones."""
    from bench.app.grid import submit
    from bench.app.table import load_results

    outcome = submit(cells, runs_dir, name, executor, slurm, max_parallel, force, wait, echo=typer.echo)
    for c, why in outcome.skipped:
        typer.echo(f"skipped {c.label}: {why}")
    if executor == "slurm" and not wait:
        typer.echo(f"{len(outcome.submitted)} cells submitted; follow them with `bench status`")
        return
    results = load_results([c.dir(runs_dir) for c in cells])
    if report and results:
        from bench.app.report import write_report

        out = write_report(name, results, runs_dir, results_dir, description)
        typer.echo(f"table: {out / 'table.md'}")
    typer.echo(f"{len(results)} of {len(cells)} cells finished, {len(outcome.failed)} failed")
    if outcome.failed:
        for c, why in outcome.failed:
            typer.echo(f"failed: {c.label}: {why}", err=True)
        raise typer.Exit(1)


@app.command()
def run(
    task: Optional[str] = typer.Option(None, "--task", help="task name (bench ls tasks); default: the one the reward selects, else gmm-ring8"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated method names (bench ls methods)"),
    reward: Optional[str] = typer.Option(None, "--reward", help="training reward (default: the task's)"),
    alphas: Optional[str] = typer.Option(None, "--alpha", help="comma-separated KL weights α in nats (default: the task's)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds (default 0,1,2, or the suite's)"),
    sets: List[str] = typer.Option([], "--set", help="override, key=value (alpha, method.X, task.X, sampler.X, train.X); repeatable"),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of overrides (same keys as --set, nested)"),
    suite: Optional[str] = typer.Option(None, "--suite", help="a suite name (bench/configs/suites) or YAML path; plain `bench run` runs 'default'"),
    name: Optional[str] = typer.Option(None, "--name", help="results folder name (default: the suite's or the task's)"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where run folders go"),
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="where tables and figures go"),
    jobs: int = typer.Option(0, "--jobs", help="runs in parallel processes (0: the suite's setting, else 1)"),
    force: bool = typer.Option(False, "--force", help="re-run finished runs from scratch"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved runs and exit"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
    executor: Optional[str] = typer.Option(None, "--executor", help="run each run as a submitit job: slurm, local or debug (default: in this process)"),
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
    extra = merge(load_yaml(config) if config else {}, parse_sets(sets))
    seed_list = _ints(seeds or "0,1,2", "--seeds")
    description = ""
    opts: dict[str, Any] = {}
    if suite or not (task or methods or reward):
        path = Path(suite) if suite and suite.endswith((".yaml", ".yml")) else CONFIG_DIR / "suites" / f"{suite or 'default'}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "suites").glob("*.yaml")))
            raise BenchError(f"unknown suite {suite!r}; known suites: {known}")
        explicit_seeds = seed_list if seeds else None
        suite_name, description, cfgs, opts = expand_suite(path, extra, explicit_seeds)
        name = name or suite_name
    else:
        if not methods:
            raise BenchError(f"--methods is required with --task/--reward; known methods: {', '.join(METHODS.names())}")
        task = task or (task_for_reward(reward) if reward else DEFAULT_TASK)
        task = TASKS.canonical(task)
        alpha_list = _floats(alphas, "--alpha") if alphas else [None]
        cfgs = [resolve(task, m, s, alpha=a, reward=reward, layers=[extra]) for m in _csv(methods) for a in alpha_list for s in seed_list]
        name = name or task
    if dry_run:
        for c in cfgs:
            typer.echo(json.dumps(c.to_dict()))
        typer.echo(f"{len(cfgs)} runs; results -> {results_dir / name}", err=True)
        return
    from bench.app.report import write_report
    from bench.app.runner import run_dir

    if executor:  # bench/app/grid.py: one submitit job per run
        from bench.app.grid import Cell, SlurmParams

        slurm = SlurmParams().merged(_slurm_cli(partition, gpus, cpus, mem, time_min, account, sbatch))
        _submit_cells([Cell(c) for c in cfgs], name, description, executor, runs_dir, results_dir, jobs or int(opts.get("jobs", 0)),
                      slurm, force, wait, report=True)
        return
    n_jobs = jobs or int(opts.get("jobs", 1))
    results = _run_parallel(cfgs, runs_dir, n_jobs, force, progress=not quiet)
    for c, r in zip(cfgs, results):
        r["_dir"] = str(run_dir(runs_dir, c))
    out = write_report(name, results, runs_dir, results_dir, description)
    typer.echo(f"{len(results)} runs done; table: {out / 'table.md'}")


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
    from bench.app.table import find_runs, groups, load_paper, load_results, long_rows, make_table

    published = load_paper(paper_file) if (paper or paper_file) else None

    dirs: list[Path] = []
    for p in paths:
        if not p.exists():
            raise BenchError(f"{p} does not exist")
        if (p / "final.json").exists():
            dirs.append(p)
        else:
            dirs += sorted(q.parent for q in p.rglob("final.json") if "_reference" not in q.parts)
    results = load_results(dirs)
    if not results:
        raise BenchError(f"no finished runs (final.json) under {', '.join(map(str, paths))}")
    if fmt not in ("markdown", "latex", "csv"):
        raise BenchError(f"unknown format {fmt!r}; known: markdown, latex, csv")
    chunks = []
    csv_rows = []
    for (task, reward, alpha), runs in groups(results).items():
        ref = None
        if reference:
            from bench.app.config import config_from_dict
            from bench.app.runner import reference_rows

            cfg0 = config_from_dict(json.loads((Path(runs[0]["_dir"]) / "config.json").read_text()))
            root = Path(runs[0]["_dir"]).parents[2]
            ref = reference_rows(task, cfg0.task_cfg, reward, alpha, cfg0.sampler, cfg0.train.final_eval_samples, root)
        if fmt == "csv":
            csv_rows += long_rows(runs, ref, paper=published, time=time)
        else:
            chunks.append(make_table(runs, ref, fmt=fmt, paper=published, time=time))
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(csv_rows[0]))
        w.writeheader()
        w.writerows(csv_rows)
        text = buf.getvalue()
    else:
        text = "\n".join(chunks)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    else:
        typer.echo(text)


@app.command()
def prepare(
    task: str = typer.Argument(..., help="task name (bench ls tasks), e.g. digits"),
    sets: List[str] = typer.Option([], "--set", help="task.X=value overrides of the task config (as in bench run); repeatable"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Train and cache a task's local pieces (e.g. digits: base model, rewards, judges, SIR pool)."""
    from bench.app.config import apply_dict

    name = TASKS.canonical(task)
    task_cls = TASKS.get(name)
    over = parse_sets(sets)
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
    summary = obj.prepare(progress=not quiet)
    for k, v in summary.items():
        if isinstance(v, dict):
            typer.echo(f"{k}:")
            for kk, vv in v.items():
                typer.echo(f"  {kk}: {vv}")
        else:
            typer.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")


@app.command()
def grid(
    path: Path = typer.Argument(..., help="grid YAML: tasks, methods, rewards, alphas, seeds, set sweeps, slurm (see bench/app/grid.py)"),
    executor: str = typer.Option("local", "--executor", help="slurm (one job per cell, a job array), local (processes here) or debug (in this process)"),
    sets: List[str] = typer.Option([], "--set", help="override key=value for every cell; a YAML list sweeps, e.g. 'alpha=[1,0.3]'; repeatable"),
    name: Optional[str] = typer.Option(None, "--name", help="results folder and manifest name (default: the grid's)"),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="where run folders go"),
    results_dir: Path = typer.Option(Path("results"), "--results-dir", help="where tables and figures go"),
    jobs: int = typer.Option(0, "--jobs", help="cells running at once (0: the grid's max_parallel; Slurm: all, local: cores/2)"),
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
) -> None:
    """Run a grid (tasks × rewards × methods × α × --set sweeps × seeds); finished cells are skipped."""
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
    slurm = spec.slurm.merged(_slurm_cli(partition, gpus, cpus, mem, time_min, account, sbatch))
    _submit_cells(cells, name, spec.description, executor, runs_dir, results_dir, jobs or spec.max_parallel, slurm, force, wait, report)


@app.command()
def status(
    target: Path = typer.Argument(..., help="a grid YAML (its cells), or a runs folder (every run and submission in it)"),
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
    formats: str = typer.Option("png,pdf", "--format", help="comma-separated file formats"),
    x_metric: str = typer.Option("path_kl", "--x", help="pareto: metric on the x axis"),
    y_metric: str = typer.Option("reward", "--y", help="pareto: metric on the y axis"),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="reference points (p* draw, base model) and exact-target lines"),
) -> None:
    """Paper figures of finished runs: held-out metrics vs training reward, α-sweep fronts, learning curves, sample grids."""
    from bench.app.plots import make_figures
    from bench.app.table import load_results

    dirs: list[Path] = []
    for p in paths:
        if not p.exists():
            raise BenchError(f"{p} does not exist")
        dirs += [p] if (p / "final.json").exists() else sorted(q.parent for q in p.rglob("final.json") if "_reference" not in q.parts)
    results = load_results(dirs)
    if not results:
        raise BenchError(f"no finished runs (final.json) under {', '.join(map(str, paths))}")
    for m in (x_metric, y_metric):
        if m.split("@")[0] not in METRICS:
            raise BenchError(f"unknown metric {m!r}; known: {', '.join(METRICS.names())}")
    written = make_figures(results, out, _csv(kinds), _csv(formats), x_metric=x_metric, y_metric=y_metric, reference=reference)
    for kind, files in written.items():
        for f in files:
            typer.echo(f"{kind}: {f}")


def main() -> None:
    """Entry point: BenchError -> one line on stderr, exit code 2, no traceback."""
    try:
        app(standalone_mode=False)
    except BenchError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
