"""The `bench` CLI end to end: runs, tables, resume, and its one error path (docs/cli.md): usage
errors and bad input one line with exit 2, failed cells exit 1, Ctrl-C exit 130, anything else one
line naming a traceback log with exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.app.config import parse_sets, resolve
from bench.core.errors import BenchError
from bench.app.runner import run_dir, run_one

BENCH = [sys.executable, "-m", "bench.app.cli"]
TINY = ["--set", "train.iterations=3", "--set", "train.eval_every=2", "--set", "train.eval_samples=64",
        "--set", "train.final_eval_samples=256", "--set", "sampler.steps=6", "--set", "method.batch_size=16"]


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*BENCH, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--task", "nope", "--methods", "sqdf"], "unknown task 'nope'; known tasks: digits, gmm-grid25"),
        (["--task", "gmm-ring8", "--methods", "sqdf,nope"], "unknown method 'nope'; known methods:"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--reward", "nope"], "has no reward 'nope'; its rewards: quadratic"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "method.gamma=0"], "method.gamma must be in (0.0, 1.0], got 0.0"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "method.gamma=1.5"], "method.gamma must be in (0.0, 1.0]"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--alpha", "0"], "alpha must be > 0"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--alpha", "-1"], "alpha must be > 0"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "gamma"], "malformed --set 'gamma': expected key=value"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "method.gamma=abc"], "method.gamma expects float, got 'abc'"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "method.nope=1"], "unknown key method.nope; method keys: method.gamma"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "a.b.c=1"], "malformed --set key 'a.b.c'"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--seeds", "x"], "--seeds must be comma-separated integers"),
        (["--suite", "nope"], "unknown suite 'nope'; known suites: ablations-sqdf, alpha-sweep, baselines, default"),
        (["--seeds", ","], "--seeds must list at least one value"),
        (["--task", "gmm-ring8", "--methods", ","], "--methods must list at least one value"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--seeds", "-1"], "--seeds must be comma-separated integers in [0, 2**63)"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--seeds", str(2**63)], "--seeds must be comma-separated integers in [0, 2**63)"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "train.iterations=1e999"], "train.iterations must be a finite number"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "alpha=inf"], "alpha must be a finite number"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--alpha", "nan"], "--alpha must be comma-separated finite numbers"),
        (["--task", "gmm-ring8", "--methods", "sqdf", "--set", "method.lr=[]"], "a sweep lists at least one value"),
        (["--suite", "default", "--methods", "sqdf"], "--suite runs the suite's own tasks and methods"),
        (["--suite", "default", "--set", "alpha=0.3"], "replace them with --alpha"),
        (["--config", "."], "config file '.' is a folder"),
        (["--out", "x"], "No such option: --out"),
        (["--jobs", "-1"], "Invalid value for '--jobs'"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    code, out, err = in_process(["run", *args, "--runs-dir", "r", "--results-dir", "out"], tmp_path, monkeypatch, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert needle in err, err
    assert not any(tmp_path.iterdir()), "bad input wrote something"


def in_process(argv: list[str], cwd: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`bench *argv` through bench.app.cli.main in this process: (exit code, stdout, stderr)."""
    from bench.app.cli import main

    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("argv,needle", [
    (["nope"], "error: No such command 'nope' (commands: grid, ls, plot, prepare, run, status, table); see 'bench --help'"),
    (["grid"], "error: Missing argument 'path'; see 'bench grid --help'"),
    (["run", "--jobs", "x"], "see 'bench run --help'"),
    (["ls", "nope"], "error: unknown registry 'nope'"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, argv: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    code, out, err = in_process(argv, tmp_path, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert "Usage:" not in err and "╭" not in err
    code, out, _ = in_process(["--help"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "run" in out and "grid" in out


def test_internal_error_names_a_traceback_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import bench.app.cli as cli

    class Broken:
        def __iter__(self):
            raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "METHODS", Broken())
    (tmp_path / "runs").mkdir()
    code, _, err = in_process(["ls", "methods"], tmp_path, monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: internal error (ZeroDivisionError: boom); full traceback in "), err
    log = Path(err.strip().rsplit(" ", 1)[1])
    assert log.parent == Path("runs/_logs") and "Traceback" in (tmp_path / log).read_text()


def test_ctrl_c_in_process_is_exit_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import bench.app.runner as runner

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_one", interrupted)
    code, _, err = in_process(["run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0", "--quiet"], tmp_path, monkeypatch, capsys)
    assert code == 130 and err == "interrupted; rerun the same command to resume\n"
    manifest = json.loads(next((tmp_path / "runs" / "_grids" / "gmm-ring8").glob("*.json")).read_text())
    assert [c["outcome"] for c in manifest["cells"]] == ["interrupted"]


def test_ctrl_c_stops_local_workers(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's process group) during `bench run --jobs 2`: exit 130, one
    line, no worker process left, and a rerun resumes."""
    import signal
    import time

    import psutil

    args = [*BENCH, "run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0,1", "--jobs", "2", "--quiet",
            "--set", "train.iterations=400", "--set", "train.checkpoint_every=5", "--set", "method.batch_size=16"]
    p = subprocess.Popen(args, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while time.time() < deadline and len(list(tmp_path.glob("runs/gmm-ring8/draft/*/checkpoint.pt"))) < 2 and p.poll() is None:
        time.sleep(0.5)
    workers = psutil.Process(p.pid).children(recursive=True)
    assert len(workers) == 4, "two local jobs: a controller and a task each"
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err == "interrupted; rerun the same command to resume\n"
    time.sleep(0.5)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


def test_output_folders_that_are_files_fail_before_training(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for opt, value, needle in (("--runs-dir", "afile", "--runs-dir afile is not a folder"),
                               ("--results-dir", "afile/sub", "its parent afile is a file")):
        r = bench("run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0", opt, value, *TINY, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_malformed_config_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("method: [1, 2\n")
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--config", "bad.yaml", "--runs-dir", "r", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: malformed YAML in bad.yaml")
    (tmp_path / "bad2.yaml").write_text("learning_rate: 3\n")
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--config", "bad2.yaml", "--runs-dir", "r", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key 'learning_rate'" in r.stderr
    assert not (tmp_path / "r").exists()
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--config", "bin.yaml", "--runs-dir", "r", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: config file 'bin.yaml' is not a text") and r.stderr.count("\n") == 1


def test_ls_lists_every_registry(tmp_path: Path) -> None:
    r = bench("ls", cwd=tmp_path)
    assert r.returncode == 0
    for word in ("methods:", "sqdf", "draft", "rewards:", "quadratic", "metrics:", "gap ↓", "tasks:", "gmm-ring8"):
        assert word in r.stdout
    assert bench("ls", "nope", cwd=tmp_path).returncode == 2


def test_run_end_to_end_writes_runs_and_a_table(tmp_path: Path) -> None:
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf,draft", "--seeds", "0,1", *TINY, "--jobs", "2",
              "--runs-dir", "runs", "--results-dir", "results", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(next((tmp_path / "runs" / "_grids" / "gmm-ring8").glob("*.json")).read_text())
    assert manifest["executor"] == "local" and manifest["max_parallel"] == 2  # --jobs: the grid's local executor
    table = (tmp_path / "results" / "gmm-ring8" / "table.md").read_text()
    assert "| sqdf | 2 |" in table and "| draft | 2 |" in table
    assert "*p\\* (closed form)*" in table and "-1.340" in table  # E*[r] of ring8 at α = 1
    assert "E[r] ↑" in table and "gap ↓" in table and "KL ≈" in table
    runs = sorted((tmp_path / "runs" / "gmm-ring8").glob("*/*/final.json"))
    assert len(runs) == 4
    final = json.loads(runs[0].read_text())
    for key in ("metrics", "provenance", "budget", "time", "method", "reward", "alpha", "alpha_sqdf", "seed", "config_hash"):
        assert key in final
    for key in ("git_sha", "versions", "device", "time"):
        assert key in final["provenance"]
    assert {"sampling", "reward", "update", "evaluation"} <= set(final["time"]) or {"update", "evaluation"} <= set(final["time"])
    assert final["budget"]["reward_queries"] > 0 and final["budget"]["denoiser_calls"] > 0
    run = runs[0].parent
    assert (run / "config.json").exists() and (run / "samples.png").stat().st_size > 1000
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines if "eval/reward" in l] == [0, 2, 3]
    # a second invocation skips finished runs (nothing retrained) and rewrites the same table
    r2 = bench("run", "--task", "gmm-ring8", "--methods", "sqdf,draft", "--seeds", "0,1", *TINY,
               "--runs-dir", "runs", "--results-dir", "results", "--quiet", cwd=tmp_path)
    assert r2.returncode == 0
    assert (tmp_path / "results" / "gmm-ring8" / "table.md").read_text().split("\n", 3)[3] == table.split("\n", 3)[3]
    t = bench("table", "runs/gmm-ring8", "--format", "csv", cwd=tmp_path)
    assert t.returncode == 0 and t.stdout.startswith("task,reward,alpha,row,metric,mean,std,n")


def test_resume_from_checkpoint_equals_uninterrupted(tmp_path: Path) -> None:
    sets = parse_sets(["train.iterations=6", "train.checkpoint_every=2", "train.eval_every=3", "train.eval_samples=64",
                       "train.final_eval_samples=128", "sampler.steps=6", "method.batch_size=16", "method.rollouts_per_step=8"])
    cfg = resolve("gmm-ring8", "sqdf", 0, layers=[sets])
    full = run_one(cfg, tmp_path / "a", progress=False)
    assert run_one(cfg, tmp_path / "b", progress=False, stop_after=4) == {}  # "preempted" after 4 iterations
    d = run_dir(tmp_path / "b", cfg)
    assert (d / "checkpoint.pt").exists() and not (d / "final.json").exists()
    resumed = run_one(cfg, tmp_path / "b", progress=False)
    assert resumed["metrics"] == full["metrics"]
    assert resumed["budget"] == full["budget"]
    la = (run_dir(tmp_path / "a", cfg) / "metrics.jsonl").read_text().splitlines()
    lb = (d / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if not k.startswith("time/")} for l in ls]  # noqa: E731
    assert strip(la) == strip(lb)


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    sets = parse_sets(["train.iterations=4", "train.checkpoint_every=1", "train.eval_samples=32", "train.final_eval_samples=32",
                       "sampler.steps=4", "method.batch_size=8"])
    cfg = resolve("gmm-ring8", "draft", 0, layers=[sets])
    run_one(cfg, tmp_path, progress=False, stop_after=2)
    d = run_dir(tmp_path, cfg)
    (d / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="checkpoint .* is corrupt or unreadable"):
        run_one(cfg, tmp_path, progress=False)
    assert (d / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing lost
    r = bench("run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0", "--runs-dir", str(tmp_path), "--quiet",
              *[a for kv in sets_to_args(sets) for a in kv], cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "corrupt" in r.stderr
    assert not (tmp_path / "_grids").exists(), "a run stopped by bad input leaves no submission behind"
    # with a second cell that finishes, the corrupt one is a failed cell: listed, then a summary, exit 1
    r = bench("run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0,1", "--runs-dir", str(tmp_path), "--quiet",
              "--results-dir", str(tmp_path / "results"), *[a for kv in sets_to_args(sets) for a in kv], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("failed: gmm-ring8 draft quadratic α=1 seed=0: checkpoint") and "corrupt" in lines[0]
    assert lines[1] == "error: 1 of 2 cells failed; rerun the same command to retry them (finished cells are skipped)"
    assert "1 of 2 cells finished, 1 failed" in r.stdout


def sets_to_args(sets: dict) -> list[tuple[str, str]]:
    return [("--set", f"{sect}.{k}={v}") for sect, kv in sets.items() for k, v in kv.items()]


def test_dry_run_prints_resolved_configs(tmp_path: Path) -> None:
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--alpha", "1,0.3", "--seeds", "0", "--dry-run",
              "--set", "method.gamma=0.9", cwd=tmp_path)
    assert r.returncode == 0
    cfgs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [c["alpha"] for c in cfgs] == [1.0, 0.3] and all(c["method_cfg"]["gamma"] == 0.9 for c in cfgs)
    assert not any(tmp_path.iterdir())


def test_a_suite_is_a_grid_of_the_same_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`bench run` (the default suite) resolves exactly the runs of the same blocks given on the command line."""
    _, suite, _ = in_process(["run", "--dry-run"], tmp_path, monkeypatch, capsys)
    _, adhoc, _ = in_process(["run", "--task", "gmm-ring8", "--methods", "sqdf,draft,draft-lv,draft-kl,refl,alignprop,ddpo,ddpo-kl,ppo-kl",
                              "--alpha", "1", "--seeds", "0,1,2", "--dry-run"], tmp_path, monkeypatch, capsys)
    assert suite == adhoc and len(suite.splitlines()) == 27


def test_every_shipped_suite_expands() -> None:
    from bench.app.cli import suite_path
    from bench.app.config import CONFIG_DIR
    from bench.app.grid import expand, load_grid

    for path in sorted((CONFIG_DIR / "suites").glob("*.yaml")):
        spec = load_grid(suite_path(path.stem), what="suite")
        cells = expand(spec)
        assert spec.name == path.stem and spec.max_parallel == 2 and spec.description
        assert len({c.rel() for c in cells}) == len(cells) > 0
    ablations = expand(load_grid(suite_path("ablations-sqdf")))
    assert len(ablations) == 60 and ablations[3].label == "gmm-ring8 sqdf quadratic α=1 seed=0 method.gamma=0.99"

