"""The `bench` CLI end to end: runs, tables, resume, and one-line errors for bad input."""

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
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path: Path, args: list[str], needle: str) -> None:
    r = bench("run", *args, "--runs-dir", "r", "--results-dir", "out", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "out").exists()


def test_malformed_config_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("method: [1, 2\n")
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--config", "bad.yaml", "--runs-dir", "r", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("error: malformed YAML in bad.yaml")
    (tmp_path / "bad2.yaml").write_text("learning_rate: 3\n")
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--config", "bad2.yaml", "--runs-dir", "r", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key 'learning_rate'" in r.stderr
    assert not (tmp_path / "r").exists()


def test_ls_lists_every_registry(tmp_path: Path) -> None:
    r = bench("ls", cwd=tmp_path)
    assert r.returncode == 0
    for word in ("methods:", "sqdf", "draft", "rewards:", "quadratic", "metrics:", "gap ↓", "tasks:", "gmm-ring8"):
        assert word in r.stdout
    assert bench("ls", "nope", cwd=tmp_path).returncode == 2


def test_run_end_to_end_writes_runs_and_a_table(tmp_path: Path) -> None:
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf,draft", "--seeds", "0,1", *TINY,
              "--runs-dir", "runs", "--results-dir", "results", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
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


def sets_to_args(sets: dict) -> list[tuple[str, str]]:
    return [("--set", f"{sect}.{k}={v}") for sect, kv in sets.items() for k, v in kv.items()]


def test_dry_run_prints_resolved_configs(tmp_path: Path) -> None:
    r = bench("run", "--task", "gmm-ring8", "--methods", "sqdf", "--alpha", "1,0.3", "--seeds", "0", "--dry-run",
              "--set", "method.gamma=0.9", cwd=tmp_path)
    assert r.returncode == 0
    cfgs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [c["alpha"] for c in cfgs] == [1.0, 0.3] and all(c["method_cfg"]["gamma"] == 0.9 for c in cfgs)
    assert not any(tmp_path.iterdir())
