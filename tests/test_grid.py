"""Grids (bench/app/grid.py): expansion, dry run, skipping finished cells, the local and debug
executors, cell states, a failing cell that does not stop the others, and preemption: a run
stopped and resumed (runner hook, and submitit's preemption signal through the local executor)
ends with exactly the final metrics of an uninterrupted run.

The real-Slurm version of the preemption test is tests/test_slurm.py (`-m slurm`)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from typer.testing import CliRunner

from bench.app.cli import app
from bench.app.config import resolve
from bench.core.errors import BenchError
from bench.app.grid import CellJob, cell_states, expand, load_grid, plan, submit
from bench.app.runner import MetricLog, run_dir, run_one

TINY = {
    "train.iterations": 3,
    "train.eval_every": 0,
    "train.eval_samples": 16,
    "train.final_eval_samples": 32,
    "train.checkpoint_every": 1,
    "train.plot": False,
    "method.batch_size": 4,
}


def write_grid(path: Path, **data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_expand_is_the_cartesian_product(tmp_path: Path) -> None:
    g = write_grid(tmp_path / "g.yaml", name="sweep", tasks=["gmm-ring8"], methods=["draft", "sqdf"], alphas=[1.0, 0.3], seeds=[0, 1],
                   set={"train.iterations": 2, "method.lr": [1e-3, 3e-4]}, method_sets={"sqdf": {"method": {"gamma": [0.9, 1.0]}}})
    spec = load_grid(g)
    cells = expand(spec)
    # draft: 2 α × 2 lr × 2 seeds; sqdf: 2 α × 2 lr × 2 γ × 2 seeds
    assert len(cells) == 8 + 16
    assert len({c.rel() for c in cells}) == len(cells)
    sq = [c for c in cells if c.cfg.method == "sqdf"]
    assert {(c.cfg.alpha, c.cfg.method_cfg.lr, c.cfg.method_cfg.gamma, c.cfg.seed) for c in sq} == {
        (a, lr, gm, s) for a in (1.0, 0.3) for lr in (1e-3, 3e-4) for gm in (0.9, 1.0) for s in (0, 1)}
    assert all(c.cfg.train.iterations == 2 for c in cells)
    assert dict(sq[0].sweep).keys() == {"method.lr", "method.gamma"}
    assert "method.gamma=" in sq[0].label and "seed=" in sq[0].label
    # a --set sweep of α on the command line is the same grid as an `alphas` list
    g2 = write_grid(tmp_path / "g2.yaml", methods=["draft", "sqdf"], seeds=[0, 1],
                    set={"train.iterations": 2, "method.lr": [1e-3, 3e-4]}, method_sets={"sqdf": {"method.gamma": [0.9, 1.0]}})
    cells2 = expand(load_grid(g2, ["alpha=[1, 0.3]"]))
    assert {c.rel() for c in cells2} == {c.rel() for c in cells}
    # --set without brackets fixes a value
    assert {c.cfg.method_cfg.lr for c in expand(load_grid(g2, ["method.lr=5e-4", "alpha=1"]))} == {5e-4}


@pytest.mark.parametrize("data, message", [
    ({"methods": ["draft"], "seedz": [0]}, "unknown keys"),
    ({"methods": []}, "'methods' must list"),
    ({"methods": ["draft"], "alphas": [1], "set": {"alpha": [1, 2]}}, "not both"),
    ({"methods": ["draft"], "rewards": ["aesthetic"]}, "task gmm-ring8 has no reward 'aesthetic'"),
    ({"methods": ["draft"], "tasks": ["gmm-ring8", "gmm-trap"], "rewards": ["aesthetic"]}, "no task of this grid offers reward"),
    ({"methods": ["draft"], "set": [1, 2]}, "set must be a mapping"),
    ({"methods": ["draft"], "slurm": 5}, "'slurm' must be a mapping"),
    ({"methods": ["draft"], "slurm": {"timeout_min": "abc"}}, "slurm.timeout_min expects int"),
    ({"methods": ["draft"], "seeds": [-1]}, r"seeds must be an integer in \[0, 2\*\*63\)"),
    ({"methods": ["draft"], "seeds": [1.5]}, "seeds expects int"),
    ({"methods": ["draft"], "seeds": []}, "'seeds' must list at least one value"),
    ({"methods": ["draft"], "alphas": [float("inf")]}, "alphas must be a finite number"),
    ({"methods": ["draft"], "set": {"method.lr": []}}, "a sweep lists at least one value"),
    ({"methods": ["draft"], "set": {"seedz": 1}}, "malformed key 'seedz'"),
    ({"methods": [{"a": 1}]}, "'methods' must be names"),
    ({"methods": ["draft"], "max_parallel": -1}, "max_parallel must be >= 0"),
    ({"methods": ["draft"], "name": "../up"}, "'name' must be a folder name"),
    ({"runs": 5}, "'runs' must be a non-empty list"),
    ({"runs": [{"methods": ["draft"], "foo": 1}]}, r"runs\[0\]: unknown keys \['foo'\]"),
    ({"methods": ["draft"], "set": {"method.gamma": 0.9}}, "unknown key method.gamma"),
    ({"methods": ["nosuch"]}, "unknown method"),
    ({"methods": ["draft"], "slurm": {"gpus": 1}}, "unknown slurm keys"),
])
def test_bad_grid_files_fail_with_one_line(tmp_path: Path, data: dict, message: str) -> None:
    g = write_grid(tmp_path / "g.yaml", **data)
    with pytest.raises(BenchError, match=message):
        expand(load_grid(g))


def test_not_a_mapping_folder_or_binary_grid_file(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    for path, message in ((tmp_path / "list.yaml", "expected a mapping"), (tmp_path, "is a folder"), (tmp_path / "bin.yaml", "not a text")):
        with pytest.raises(BenchError, match=message):
            load_grid(path)


def test_a_scalar_where_a_list_is_expected_is_a_one_element_list(tmp_path: Path) -> None:
    g = write_grid(tmp_path / "g.yaml", methods="draft", task="gmm-ring8", seeds=4, alphas=0.3)
    assert [(c.cfg.method, c.cfg.seed, c.cfg.alpha) for c in expand(load_grid(g))] == [("draft", 4, 0.3)]


def test_blocks_share_top_level_keys_and_a_repeated_cell_runs_once(tmp_path: Path) -> None:
    g = write_grid(tmp_path / "g.yaml", name="blocks", methods=["draft"], seeds=[0], set={"train.iterations": 2},
                   runs=[{"task": "gmm-ring8"}, {"task": "gmm-ring8", "set": {"method.lr": 5e-4}}, {"task": "gmm-ring8"},
                         {"task": "gmm-trap", "methods": ["sqdf", "draft"], "seeds": [1]}])
    cells = expand(load_grid(g))
    assert [(c.cfg.task, c.cfg.method, c.cfg.seed) for c in cells] == [
        ("gmm-ring8", "draft", 0), ("gmm-ring8", "draft", 0), ("gmm-trap", "sqdf", 1), ("gmm-trap", "draft", 1)]
    assert all(c.cfg.train.iterations == 2 for c in cells) and cells[1].cfg.method_cfg.lr == 5e-4
    assert cells[1].label.endswith("method.lr=0.0005") and cells[1].sweep == ()
    # the command line wins over the file: --set over set and method_sets, and --seeds replaces every block's seeds
    from bench.app.grid import Overrides

    over = load_grid(g, ["method.lr=1e-3"], Overrides(seeds=(7,)))
    assert {(c.cfg.method_cfg.lr, c.cfg.seed) for c in expand(over) if c.cfg.method == "draft"} == {(1e-3, 7)}


def test_status_reads_a_slurm_jobs_failure_through_submitit(tmp_path: Path) -> None:
    from submitit.core.utils import cloudpickle_dump

    from bench.app.grid import _result_error

    cloudpickle_dump(("error", "Traceback (most recent call last):\n  ...\nValueError: boom"), tmp_path / "123_0_0_result.pkl")
    cloudpickle_dump(("success", {"dir": "x"}), tmp_path / "124_0_0_result.pkl")
    assert _result_error(str(tmp_path), "123_0") == "ValueError: boom"
    assert _result_error(str(tmp_path), "124_0") is None
    assert _result_error(str(tmp_path), "125_0") is None  # no result yet


def test_dry_run_lists_cells_and_skips_finished(tmp_path: Path) -> None:
    g = write_grid(tmp_path / "g.yaml", name="dry", methods=["draft"], seeds=[0, 1], set=TINY)
    cells = expand(load_grid(g))
    runs = tmp_path / "runs"
    done = cells[1].dir(runs)
    done.mkdir(parents=True)
    (done / "final.json").write_text("{}")
    todo, skipped = plan(cells, runs)
    assert [c.rel() for c in todo] == [cells[0].rel()]
    assert [(c.rel(), why) for c, why in skipped] == [(cells[1].rel(), "finished")]
    res = CliRunner().invoke(app, ["grid", str(g), "--runs-dir", str(runs), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "gmm-ring8" in ln]
    assert lines[0].startswith("run ") and "seed=0" in lines[0]
    assert lines[1].startswith("skip") and "seed=1" in lines[1] and "(finished)" in lines[1]
    assert not (runs / "_grids").exists(), "a dry run submits nothing"
    states = {s.dir: s.state for s in cell_states(cells, runs)}
    assert states == {cells[0].rel(): "not started", cells[1].rel(): "done"}


def test_debug_executor_runs_cells_and_status_reports_them(tmp_path: Path) -> None:
    g = write_grid(tmp_path / "g.yaml", name="dbg", methods=["draft"], seeds=[0, 1], set=TINY)
    runs = tmp_path / "runs"
    res = CliRunner().invoke(app, ["grid", str(g), "--executor", "debug", "--runs-dir", str(runs), "--no-report"])
    assert res.exit_code == 0, res.output
    assert "2 of 2 cells finished, 0 failed" in res.output
    cells = expand(load_grid(g))
    assert all((c.dir(runs) / "final.json").exists() for c in cells)
    res = CliRunner().invoke(app, ["status", str(g), "--runs-dir", str(runs), "--json"])
    states = [json.loads(ln) for ln in res.output.splitlines()]
    assert [s["state"] for s in states] == ["done", "done"] and all(s["progress"] == "3/3" for s in states)
    # the manifest names each cell's job; a second submission skips everything
    manifest = json.loads(next((runs / "_grids" / "dbg").glob("*.json")).read_text())
    assert sorted(c["dir"] for c in manifest["cells"]) == sorted(c.rel() for c in cells)
    assert all(c["outcome"] == "done" for c in manifest["cells"])
    again = submit(cells, runs, "dbg", "debug", echo=lambda s: None)
    assert again.submitted == [] and [w for _, w in again.skipped] == ["finished", "finished"]
    # folder mode: every run and submission under runs/
    res = CliRunner().invoke(app, ["status", str(runs)])
    assert res.exit_code == 0 and "2 cells: 2 done" in res.output


def test_local_executor_reports_a_failing_cell_and_finishes_the_others(tmp_path: Path) -> None:
    """`bench grid --executor local` (subprocesses, no Slurm): one cell's folder holds a corrupt
    checkpoint, so that cell fails with its one-line reason; the other cell still finishes."""
    g = write_grid(tmp_path / "g.yaml", name="loc", methods=["draft"], seeds=[0, 1], set=TINY)
    runs = tmp_path / "runs"
    cells = expand(load_grid(g))
    bad = cells[1].dir(runs)
    bad.mkdir(parents=True)
    (bad / "config.json").write_text(json.dumps(cells[1].cfg.to_dict()))
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(app, ["grid", str(g), "--executor", "local", "--runs-dir", str(runs), "--no-report", "--jobs", "2"])
    assert res.exit_code == 1, res.output
    assert "1 of 2 cells finished, 1 failed" in res.output
    assert (cells[0].dir(runs) / "final.json").exists()
    failed = [ln for ln in res.output.splitlines() if ln.startswith("FAILED")]
    assert len(failed) == 1 and "seed=1" in failed[0] and "corrupt" in failed[0]
    states = {s.dir: s for s in cell_states(cells, runs)}
    assert states[cells[0].rel()].state == "done"
    assert states[cells[1].rel()].state == "failed" and "corrupt" in states[cells[1].rel()].detail


def _cfg(method: str, iterations: int, **method_sets: object) -> object:
    sets = {"train": {"iterations": iterations, "eval_every": 2, "eval_samples": 16, "final_eval_samples": 32, "checkpoint_every": 3,
                      "plot": False}, "method": {"batch_size": 4, **method_sets}}
    return resolve("gmm-ring8", method, 0, alpha=1.0, layers=[sets])


def _train_records(d: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in MetricLog(d / "metrics.jsonl").read()]


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    """SQDF (replay buffer, generator, optimizer): stopped after 2 and 3 more iterations (between
    checkpoints), resumed, it ends with the uninterrupted run's final metrics and log, bit for bit."""
    cfg = _cfg("sqdf", 7, rollouts_per_step=4, buffer_size=16)
    full = run_one(cfg, tmp_path / "a", progress=False)
    assert run_one(cfg, tmp_path / "b", progress=False, stop_after=2) == {}
    flags = iter([False, False, True])  # the stop_when path a preemption signal takes
    assert run_one(cfg, tmp_path / "b", progress=False, stop_when=lambda: next(flags)) == {}
    resumed = run_one(cfg, tmp_path / "b", progress=False)
    assert resumed["metrics"] == full["metrics"]
    assert resumed["budget"] == full["budget"]
    assert _train_records(run_dir(tmp_path / "b", cfg)) == _train_records(run_dir(tmp_path / "a", cfg))


def test_preemption_signal_checkpoints_requeues_and_resumes(tmp_path: Path) -> None:
    """The local executor delivers submitit's preemption signal (USR2) mid-run: the job stops at the
    end of the iteration with a checkpoint, requeues itself through CellJob.checkpoint, the restarted
    job resumes, and the final metrics equal those of an uninterrupted run (same thread count)."""
    import submitit

    cfg = _cfg("draft", 40)
    root = tmp_path / "runs"
    ex = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="local")
    ex.update_parameters(timeout_min=10)
    job = ex.submit(CellJob(threads=1), cfg.to_dict(), str(root))
    log = run_dir(root, cfg) / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and len(MetricLog(log).read()) < 4 and not job.done():
        time.sleep(0.2)
    assert not job.done(), "the run finished before it could be interrupted"
    # SIGUSR2 to the task (the local controller's child), as Slurm's --signal before a time limit
    # or a preemption delivers it
    tasks = psutil.Process(job._process.pid).children()
    assert len(tasks) == 1
    tasks[0].send_signal(signal.SIGUSR2)
    result = job.result()
    assert result["iterations"] == 40
    err = Path(job.paths.stderr).read_text()
    assert "caught SIGUSR2" in err and "resuming from checkpoint.pt" in err
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = run_one(cfg, tmp_path / "ref", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result["metrics"] == ref["metrics"]


def test_bench_run_with_an_executor_writes_the_report(tmp_path: Path) -> None:
    args = ["run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0", "--executor", "debug", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--name", "ex"]
    for k, v in TINY.items():
        args += ["--set", f"{k}={v}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    table = (tmp_path / "results" / "ex" / "table.md").read_text()
    assert "| draft | 1 |" in table


def test_slurm_parameters_from_the_grid_file_and_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sbatch script a cell's job gets: grid-file `slurm:` values, overridden by command-line options."""
    import submitit.slurm.slurm as sl

    from bench.app import grid as grid_mod
    from bench.app.cli import _slurm_cli

    g = write_grid(tmp_path / "g.yaml", methods=["draft"], slurm={
        "partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 32, "timeout_min": 240, "account": "proj",
        "additional": {"qos": "low"}, "setup": ["module load cuda/12.4"]})
    spec = load_grid(g)
    slurm = spec.slurm.merged(_slurm_cli(None, 2, None, None, None, None, ["qos=high", "constraint=a100"]))
    monkeypatch.setattr(grid_mod.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sl.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    ex = grid_mod._executor("slurm", tmp_path / "sub", slurm, "bench-g", 4)
    text = ex._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB", "--time=240", "--account=proj",
                 "--qos=high", "--constraint=a100", "--signal=USR2@120", "--job-name=bench-g"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert "module load cuda/12.4" in text
    with pytest.raises(BenchError, match="--executor slurm needs Slurm's sbatch"):
        monkeypatch.setattr(grid_mod.shutil, "which", lambda name: None)
        grid_mod._executor("slurm", tmp_path / "sub2", slurm, "bench-g", 4)
