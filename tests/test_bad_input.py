"""Malformed input, end to end: every way a user can hand `bench` something wrong.

The contract (bench/app/cli.py; docs/architecture.md, "Conventions"):

* `bench.app.cli.main(argv)` always ends with `SystemExit(code)`: 2 for usage errors and bad input
  or a missing resource, 130 for Ctrl-C (with the line "interrupted; rerun the same command to
  resume"), 1 for failed cells (listed) and for an unexpected error (one line naming the file that
  holds the full traceback).
* An error is exactly one non-empty line on stderr, starting with "error: ", naming what is wrong
  and what is accepted; no "Traceback" anywhere in stdout or stderr.
* A failing call leaves nothing behind: the working folder (runs, results) and the cache are
  unchanged (paths, sizes, modification times), except the log file of an internal error.
* Files the harness reads back (checkpoints, cache entries) never run code when read, and a
  checkpoint of another run placed in a run folder is refused on resume (the line mentions --force).

Almost every case calls `main` in this process (a subprocess costs seconds importing torch); a few
need a real process: Ctrl-C (SIGINT to the process group, as a terminal sends it) during `bench run`
and `bench prepare digits`, and the console entry point.

One tiny finished run (gmm-ring8, DRaFT, 2 iterations) is made once per module and copied into each
case that corrupts a run folder; checkpoints of three other runs (another method, another network
width, another learning rate) serve as foreign checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import yaml

from bench.app.cli import main

INTERRUPTED = "interrupted; rerun the same command to resume"
BINARY = bytes(range(256))  # every byte 0x00-0xff: not UTF-8, not YAML, not JSON, not a torch file
TINY_SETS = ["train.iterations=2", "train.eval_every=0", "train.eval_samples=32", "train.final_eval_samples=32"]
TINY = [x for s in TINY_SETS for x in ("--set", s)]
TINY_DOTTED = {s.split("=")[0]: int(s.split("=")[1]) for s in TINY_SETS}
TINY_NESTED = {"train": {k.split(".")[1]: v for k, v in TINY_DOTTED.items()}}
SHARED = ["--task", "gmm-ring8", "--methods", "draft", "--seeds", "0", *TINY]
DIRS = ["--runs-dir", "runs", "--results-dir", "results"]
RERUN = ["run", *SHARED, *DIRS, "--quiet"]  # the command that made the shared run, in a case's folder
BENCH_EXE = Path(sys.executable).with_name("bench")


# ---- calling the CLI and checking what it did ----------------------------------------------------------------


@dataclass
class Result:
    code: Any
    out: str
    err: str

    def tail(self) -> str:
        return f"exit code {self.code!r}\n--- stderr (tail) ---\n{self.err[-3000:]}\n--- stdout (tail) ---\n{self.out[-1500:]}"


def invoke(capsys: pytest.CaptureFixture[str], argv: list[str]) -> Result:
    """`bench argv` in this process; the contract says main always ends with SystemExit."""
    capsys.readouterr()
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code
    except Exception as e:
        out, err = capsys.readouterr()
        pytest.fail(f"main({argv}) raised {type(e).__name__}: {e} instead of SystemExit\n--- stderr ---\n{err[-3000:]}")
    else:
        pytest.fail(f"main({argv}) returned instead of raising SystemExit")
    out, err = capsys.readouterr()
    return Result(code, out, err)


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def error_problems(r: Result, words: list[str], code: int = 2) -> list[str]:
    """What is wrong with `r` as an error: one line "error: ..." on stderr naming every word
    (case-insensitive), exit `code`, no traceback."""
    problems = []
    if r.code != code:
        problems.append(f"exit code {r.code!r}, expected {code}")
    if "Traceback" in r.out + r.err:
        problems.append("a Traceback was printed")
    lines = lines_of(r.err)
    if len(lines) != 1:
        problems.append(f"{len(lines)} non-empty stderr lines, expected exactly 1")
    elif not lines[0].startswith("error: "):
        problems.append("the stderr line does not start with 'error: '")
    else:
        missing = [w for w in words if w.lower() not in lines[0].lower()]
        if missing:
            problems.append(f"the line does not name {missing}")
    return problems


def check_error(r: Result, words: list[str], code: int = 2) -> str:
    problems = error_problems(r, words, code)
    assert not problems, "; ".join(problems) + "\n" + r.tail()
    return lines_of(r.err)[0]


def tree(*roots: Path) -> dict[str, Any]:
    """Every path under `roots` with (size, mtime) for files and symlinks ('dir' for folders)."""
    snap: dict[str, Any] = {}
    for root in roots:
        if not os.path.lexists(root):
            snap[str(root)] = "absent"
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = p.lstat()
            snap[str(p)] = "dir" if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns)
    return snap


def changes(before: dict[str, Any], after: dict[str, Any], allow: Callable[[str], bool] = lambda p: False) -> list[str]:
    """What a call left behind: paths added, removed or changed (size or mtime), except those `allow`ed."""
    added = sorted(p for p in after if p not in before and after[p] != "absent" and not allow(p))
    removed = sorted(p for p in before if before[p] != "absent" and after.get(p, "absent") == "absent" and not allow(p))
    changed = sorted(p for p in before if p in after and before[p] != after[p] and before[p] != "absent"
                     and after[p] != "absent" and not allow(p))
    if added or removed or changed:
        return [f"left behind: added {added[:6]}, removed {removed[:6]}, changed {changed[:6]}"]
    return []


def check_unchanged(before: dict[str, Any], after: dict[str, Any], allow: Callable[[str], bool] = lambda p: False) -> None:
    problems = changes(before, after, allow)
    assert not problems, problems[0]


@dataclass
class Workspace:
    """A case's folder (the working directory of every call), its cache and home."""

    path: Path
    cache: Path
    home: Path
    tmp: Path

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    def snap(self) -> dict[str, Any]:
        return tree(self.path, self.cache)

    def write(self, name: str, content: Any) -> Path:
        """content: bytes, str, DIR (a folder), MISSING (nothing), or a YAML-able object."""
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if content is DIR:
            p.mkdir()
        elif content is MISSING:
            pass
        elif isinstance(content, bytes):
            p.write_bytes(content)
        elif isinstance(content, str):
            p.write_text(content)
        else:
            p.write_text(yaml.safe_dump(content, sort_keys=False))
        return p


DIR, MISSING = object(), object()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread: these runs are tiny, and on a shared 2-core machine thread spinning makes
    them many times slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> Workspace:
    w, cache, home = tmp_path / "w", tmp_path / "cache", tmp_path / "home"
    w.mkdir()
    home.mkdir()
    monkeypatch.chdir(w)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("BENCH_PLUGINS", raising=False)
    return Workspace(w, cache, home, tmp_path)


def expect_error(ws: Workspace, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str], code: int = 2) -> str:
    """Run argv; one-line error with `words`, exit `code`, nothing left behind in ws."""
    before = ws.snap()
    r = invoke(capsys, argv)
    problems = error_problems(r, words, code) + changes(before, ws.snap())
    assert not problems, "; ".join(problems) + "\n" + r.tail()
    return lines_of(r.err)[0]


# ---- one shared tiny run, and foreign checkpoints ------------------------------------------------------------


@dataclass
class Shared:
    runs: Path
    "a runs folder: one finished run (gmm-ring8/draft/...) and its reference cache (_reference/)"
    rel: Path
    "the run folder, relative to runs"
    foreign: dict[str, bytes]
    "checkpoint.pt of a run with another method / network width / learning rate"


def _must_run(argv: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code: Any = "returned"
        except SystemExit as e:
            code = e.code
    if code != 0:
        raise RuntimeError(f"setting up: bench {' '.join(argv)} ended with {code!r}:\n{err.getvalue()[-3000:]}")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Shared:
    root = tmp_path_factory.mktemp("shared-run")
    foreign_args = {
        "method": ["--methods", "sqdf"],
        "width": ["--methods", "draft", "--set", "task.hidden=64"],
        "lr": ["--methods", "draft", "--set", "method.lr=1e-2"],
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("BENCH_CACHE_DIR", str(root / "cache"))
        mp.delenv("BENCH_PLUGINS", raising=False)
        _must_run(RERUN)
        foreign = {}
        for kind, args in foreign_args.items():
            _must_run(["run", "--task", "gmm-ring8", "--seeds", "0", *TINY, *args, "--runs-dir", f"f-{kind}", "--results-dir", "f-results", "--quiet"])
            (ckpt,) = sorted((root / f"f-{kind}").glob("gmm-ring8/*/*/checkpoint.pt"))
            foreign[kind] = ckpt.read_bytes()
    (final,) = sorted((root / "runs").glob("gmm-ring8/draft/*/final.json"))
    assert sorted((root / "runs" / "_reference").glob("*.json")), "the shared run's table left no reference cache"
    return Shared(root / "runs", final.parent.relative_to(root / "runs"), foreign)


def copy_run(shared: Shared, ws: Workspace) -> Path:
    """The shared runs folder copied to ws/runs; returns the run folder."""
    shutil.copytree(shared.runs, ws.runs)
    return ws.runs / shared.rel


# ---- 1. options, names, --set values ---------------------------------------------------------------------------


def run_argv(*extra: str, task: str | None = "gmm-ring8", methods: str | None = "draft", seeds: str | None = "0") -> list[str]:
    """`bench run` of the tiny config (so an input wrongly accepted costs seconds, not minutes) plus `extra`."""
    argv = ["run"]
    for opt, val in (("--task", task), ("--methods", methods), ("--seeds", seeds)):
        if val is not None:
            argv += [opt, val]
    return [*argv, *TINY, *DIRS, *extra]


def sets(*items: str, methods: str = "draft") -> list[str]:
    return run_argv(*[x for s in items for x in ("--set", s)], methods=methods)


OPTION_CASES = {
    # usage errors
    "unknown-option": (run_argv("--out", "X"), ["--out"]),
    "unknown-command": (["nope"], ["nope", "run"]),
    "jobs-negative": (run_argv("--jobs", "-1"), ["--jobs", "0"]),
    "jobs-not-int": (run_argv("--jobs", "x"), ["--jobs", "integer"]),
    "alpha-not-number": (run_argv("--alpha", "abc"), ["--alpha", "abc"]),
    "alpha-list-not-number": (run_argv("--alpha", "1,abc"), ["--alpha", "abc"]),
    "alpha-zero": (run_argv("--alpha", "0"), ["alpha"]),
    "alpha-inf": (run_argv("--alpha", "inf"), ["alpha"]),
    "seeds-negative": (run_argv(seeds="-1"), ["--seeds", "-1"]),
    "seeds-beyond-64-bits": (run_argv(seeds=str(2**64)), ["--seeds"]),
    "seeds-empty-list": (run_argv(seeds=","), ["--seeds"]),
    "seeds-not-int": (run_argv(seeds="0.5"), ["--seeds"]),
    "seeds-word": (run_argv(seeds="x"), ["--seeds"]),
    "methods-empty-list": (run_argv(methods=","), ["--methods"]),
    "methods-empty": (run_argv(methods=""), ["--methods"]),
    "executor-unknown": (run_argv("--executor", "nope"), ["nope", "local", "slurm"]),
    # unknown names: the message lists the known ones
    "task-unknown": (run_argv(task="nope"), ["nope", "gmm-ring8"]),
    "method-unknown": (run_argv(methods="nope"), ["nope", "draft", "sqdf"]),
    "method-unknown-in-list": (run_argv(methods="draft,nope"), ["nope", "sqdf"]),
    "reward-unknown": (run_argv("--reward", "nope"), ["nope", "quadratic"]),
    "reward-unknown-no-task": (run_argv("--reward", "nope", task=None), ["nope"]),
    "suite-unknown": (["run", "--suite", "nope", *DIRS], ["nope", "default"]),
    "ls-unknown": (["ls", "nope"], ["nope", "methods"]),
    "prepare-unknown-task": (["prepare", "nope"], ["nope", "digits"]),
    "prepare-method-set": (["prepare", "digits", "--set", "method.lr=1"], ["task"]),
    "prepare-bad-task-set": (["prepare", "digits", "--set", "task.nope=1"], ["task.nope"]),
    # --set
    "set-no-equals": (sets("foo"), ["foo", "key=value"]),
    "set-empty-key": (sets("=1"), ["--set"]),
    "set-three-parts": (sets("a.b.c=1"), ["a.b.c"]),
    "set-unknown-method-key": (sets("method.nope=1"), ["method.nope", "method.lr"]),
    "set-unknown-top-key": (sets("nope=1"), ["nope", "alpha"]),
    "set-unknown-section": (sets("nope.x=1"), ["nope"]),
    "set-unknown-task-key": (sets("task.nope=1"), ["task.nope", "task.hidden"]),
    "set-unknown-sampler-key": (sets("sampler.nope=1"), ["sampler.nope", "sampler.steps"]),
    "set-unknown-train-key": (sets("train.nope=1"), ["train.nope", "train.iterations"]),
    "set-section-scalar": (sets("method=5"), ["method"]),
    "set-iterations-overflow": (sets("train.iterations=1e999"), ["train.iterations"]),
    "set-iterations-negative": (sets("train.iterations=-3"), ["train.iterations", "-3"]),
    "set-iterations-zero": (sets("train.iterations=0"), ["train.iterations"]),
    "set-iterations-fraction": (sets("train.iterations=2.5"), ["train.iterations"]),
    "set-iterations-word": (sets("train.iterations=abc"), ["train.iterations", "abc"]),
    "set-iterations-empty": (sets("train.iterations="), ["train.iterations"]),
    "set-iterations-nan": (sets("train.iterations=nan"), ["train.iterations"]),
    "set-eval-every-negative": (sets("train.eval_every=-1"), ["train.eval_every"]),
    "set-final-eval-samples-zero": (sets("train.final_eval_samples=0"), ["train.final_eval_samples"]),
    "set-checkpoint-every-zero": (sets("train.checkpoint_every=0"), ["train.checkpoint_every"]),
    "set-plot-not-bool": (sets("train.plot=maybe"), ["train.plot", "maybe"]),
    "set-alpha-inf": (sets("alpha=inf"), ["alpha"]),
    "set-alpha-overflow": (sets("alpha=1e999"), ["alpha"]),
    "set-alpha-nan": (sets("alpha=nan"), ["alpha"]),
    "set-alpha-zero": (sets("alpha=0"), ["alpha"]),
    "set-alpha-negative": (sets("alpha=-1"), ["alpha"]),
    "set-alpha-word": (sets("alpha=abc"), ["alpha", "abc"]),
    "set-reward-unknown": (sets("reward=nope"), ["nope", "quadratic"]),
    "set-lr-word": (sets("method.lr=abc"), ["method.lr", "abc"]),
    "set-lr-negative": (sets("method.lr=-1"), ["method.lr"]),
    "set-lr-zero": (sets("method.lr=0"), ["method.lr"]),
    "set-lr-nan": (sets("method.lr=nan"), ["method.lr"]),
    "set-lr-inf": (sets("method.lr=inf"), ["method.lr"]),
    "set-batch-zero": (sets("method.batch_size=0"), ["method.batch_size"]),
    "set-batch-fraction": (sets("method.batch_size=1.5"), ["method.batch_size"]),
    "set-sqdf-gamma-2": (sets("method.gamma=2", methods="sqdf"), ["method.gamma"]),
    "set-sqdf-gamma-0": (sets("method.gamma=0", methods="sqdf"), ["method.gamma"]),
    "set-sqdf-gamma-word": (sets("method.gamma=abc", methods="sqdf"), ["method.gamma", "abc"]),
    "set-sampler-steps-zero": (sets("sampler.steps=0"), ["sampler.steps"]),
    "set-sampler-steps-word": (sets("sampler.steps=abc"), ["sampler.steps"]),
    "set-sampler-eta-negative": (sets("sampler.eta=-1"), ["sampler.eta"]),
    "set-task-hidden-zero": (sets("task.hidden=0"), ["task.hidden"]),
    "set-task-base-unknown": (sets("task.base=nope"), ["task.base", "analytic"]),
}


@pytest.mark.parametrize("argv,words", list(OPTION_CASES.values()), ids=list(OPTION_CASES))
def test_bad_option_or_name_is_one_line_exit_2(ws: Workspace, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]) -> None:
    expect_error(ws, capsys, argv, words)


# ---- 2. --config files ------------------------------------------------------------------------------------------


CONFIG_CASES = {
    "directory": (DIR, ["c.yaml"]),
    "binary": (BINARY, ["c.yaml"]),
    "missing": (MISSING, ["c.yaml"]),
    "malformed-yaml": ("method: [1, 2\n", ["c.yaml"]),
    "top-level-list": ([1, 2], ["mapping"]),
    "top-level-scalar": ("5\n", ["mapping"]),
    "section-not-mapping": ({"method": 5}, ["method"]),
    "unknown-top-key": ({"learning_rate": 3}, ["learning_rate", "alpha"]),
    "unknown-method-key": ({"method": {"nope": 1}}, ["method.nope"]),
    # (not train.iterations & co: the tiny run's --set layer comes after --config and wins)
    "checkpoint-every-word": ({"train": {"checkpoint_every": "abc"}}, ["train.checkpoint_every"]),
    "checkpoint-every-overflow": ("train: {checkpoint_every: 1.0e999}\n", ["train.checkpoint_every"]),
    "alpha-list": ({"alpha": [1, 2]}, ["alpha"]),
    "lr-nan": ("method: {lr: .nan}\n", ["method.lr"]),
    "reward-unknown": ({"reward": "nope"}, ["nope", "quadratic"]),
}


@pytest.mark.parametrize("content,words", list(CONFIG_CASES.values()), ids=list(CONFIG_CASES))
def test_bad_config_file(ws: Workspace, capsys: pytest.CaptureFixture[str], content: Any, words: list[str]) -> None:
    ws.write("c.yaml", content)
    expect_error(ws, capsys, run_argv("--config", "c.yaml"), words)


# ---- 3. grid files ----------------------------------------------------------------------------------------------


GRID = {"methods": ["draft"], "seeds": [0], "set": dict(TINY_DOTTED)}


def grid(**changes: Any) -> dict[str, Any]:
    return {**GRID, **changes}


GRID_CASES = {
    "directory": (DIR, ["g.yaml"]),
    "binary": (BINARY, ["g.yaml"]),
    "missing": (MISSING, ["g.yaml"]),
    "top-level-list": (["draft"], ["mapping"]),
    "set-is-list": (grid(set=[1, 2]), ["set"]),
    "slurm-is-number": (grid(slurm=5), ["slurm"]),
    "unknown-key": (grid(nope=1), ["nope", "methods"]),
    "methods-empty": (grid(methods=[]), ["methods"]),
    "methods-missing": ({"seeds": [0]}, ["methods"]),
    "method-unknown": (grid(methods=["nope"]), ["nope", "draft"]),
    "task-unknown": (grid(tasks=["nope"]), ["nope", "gmm-ring8"]),
    "task-and-tasks": (grid(task="gmm-ring8", tasks=["gmm-ring8"]), ["task"]),
    "reward-unknown": (grid(rewards=["nope"]), ["nope", "quadratic"]),
    "alphas-word": (grid(alphas="abc"), ["alphas"]),
    "alphas-zero": (grid(alphas=[0]), ["alpha"]),
    "seeds-word": (grid(seeds=["a"]), ["seeds"]),
    "seeds-negative": (grid(seeds=[-1]), ["seeds"]),
    "seeds-mapping": (grid(seeds={"a": 1}), ["seeds"]),
    "max-parallel-word": (grid(max_parallel="x"), ["max_parallel"]),
    "method-sets-number": (grid(method_sets=5), ["method_sets"]),
    "method-sets-entry-number": (grid(method_sets={"draft": 5}), ["method_sets"]),
    "set-lr-word": (grid(set={**TINY_DOTTED, "method.lr": "abc"}), ["method.lr"]),
    "set-three-parts": (grid(set={**TINY_DOTTED, "a.b.c": 1}), ["a.b.c"]),
    "set-alpha-sweep-zero": (grid(set={**TINY_DOTTED, "alpha": [1, 0]}), ["alpha"]),
    "slurm-unknown-key": (grid(slurm={"nope": 1}), ["nope", "partition"]),
    "slurm-timeout-zero": (grid(slurm={"timeout_min": 0}), ["timeout_min"]),
    "slurm-timeout-word": (grid(slurm={"timeout_min": "abc"}), ["timeout_min"]),
    "slurm-additional-list": (grid(slurm={"additional": [1]}), ["additional"]),
}


@pytest.mark.parametrize("content,words", list(GRID_CASES.values()), ids=list(GRID_CASES))
def test_bad_grid_file(ws: Workspace, capsys: pytest.CaptureFixture[str], content: Any, words: list[str]) -> None:
    ws.write("g.yaml", content)
    expect_error(ws, capsys, ["grid", "g.yaml", "--executor", "debug", *DIRS], words)


GRID_OPTION_CASES = {
    "set-no-equals": (["--set", "foo"], ["foo"]),
    "set-bad-sweep": (["--set", "alpha=[1,"], ["alpha"]),
    "executor-unknown": (["--executor", "nope"], ["nope", "local"]),
    "jobs-negative": (["--jobs", "-1"], ["--jobs"]),
    "sbatch-no-flag": (["--sbatch", "=x"], ["--sbatch"]),
    "gpus-negative": (["--gpus", "-1"], ["gpus"]),
    "time-zero": (["--time", "0"], ["time"]),
}


@pytest.mark.parametrize("extra,words", list(GRID_OPTION_CASES.values()), ids=list(GRID_OPTION_CASES))
def test_bad_grid_option(ws: Workspace, capsys: pytest.CaptureFixture[str], extra: list[str], words: list[str]) -> None:
    ws.write("g.yaml", GRID)
    expect_error(ws, capsys, ["grid", "g.yaml", "--executor", "debug", *DIRS, *extra], words)


# ---- 4. suite files (bench run --suite FILE.yaml) ---------------------------------------------------------------


ENTRY = {"task": "gmm-ring8", "methods": ["draft"], "seeds": [0], "set": TINY_NESTED}


def suite(*entries: Any, **top: Any) -> dict[str, Any]:
    return {"name": "qa", **top, "runs": list(entries) if entries else [ENTRY]}


SUITE_CASES = {
    "directory": (DIR, ["s.yaml"]),
    "binary": (BINARY, ["s.yaml"]),
    "top-level-list": ([ENTRY], ["mapping"]),
    "runs-number": ({"name": "qa", "runs": 5}, ["runs"]),
    "runs-empty": ({"name": "qa", "runs": []}, ["runs"]),
    "runs-entry-number": (suite(5), ["runs"]),
    "entry-without-methods": (suite({"task": "gmm-ring8", "seeds": [0], "set": TINY_NESTED}), ["methods"]),
    "entry-unknown-key": (suite({**ENTRY, "nope": 1}), ["nope", "methods"]),
    "top-unknown-key": (suite(nope=1), ["nope"]),
    "entry-task-unknown": (suite({**ENTRY, "task": "nope"}), ["nope", "gmm-ring8"]),
    "entry-method-unknown": (suite({**ENTRY, "methods": ["nope"]}), ["nope", "draft"]),
    "entry-set-list": (suite({**ENTRY, "set": [1, 2]}), ["set"]),
    "entry-method-sets-number": (suite({**ENTRY, "method_sets": 5}), ["method_sets"]),
    "entry-seeds-word": (suite({**ENTRY, "seeds": ["a"]}), ["seeds"]),
    "entry-alphas-word": (suite({**ENTRY, "alphas": ["abc"]}), ["alpha"]),
    "entry-lr-word": (suite({**ENTRY, "set": {**TINY_NESTED, "method": {"lr": "abc"}}}), ["method.lr"]),
    "jobs-word": (suite(jobs="x"), ["jobs"]),
}


@pytest.mark.parametrize("content,words", list(SUITE_CASES.values()), ids=list(SUITE_CASES))
def test_bad_suite_file(ws: Workspace, capsys: pytest.CaptureFixture[str], content: Any, words: list[str]) -> None:
    ws.write("s.yaml", content)
    expect_error(ws, capsys, ["run", "--suite", "s.yaml", *DIRS, "--quiet"], words)


# A scalar where a list is expected must not be read letter by letter ("unknown method 'd'"): either
# it is taken as a one-element list, or it is an error naming the field.
SCALAR_CASES = {
    "grid-methods-string": ("grid", grid(methods="sqdf"), "methods", "sqdf"),
    "grid-seeds-int": ("grid", grid(seeds=0), "seeds", "draft"),
    "grid-alphas-number": ("grid", grid(alphas=1), "alphas", "draft"),
    "grid-tasks-string": ("grid", grid(tasks="gmm-ring8"), "tasks", "draft"),
    "grid-rewards-string": ("grid", grid(rewards="quadratic"), "rewards", "draft"),
    "suite-methods-string": ("suite", suite({**ENTRY, "methods": "sqdf"}), "methods", "sqdf"),
    "suite-seeds-int": ("suite", suite({**ENTRY, "seeds": 0}), "seeds", "draft"),
    "suite-alphas-number": ("suite", suite({**ENTRY, "alphas": 1}), "alphas", "draft"),
}


@pytest.mark.parametrize("kind,content,field,method", list(SCALAR_CASES.values()), ids=list(SCALAR_CASES))
def test_scalar_where_a_list_is_expected(ws: Workspace, capsys: pytest.CaptureFixture[str], kind: str, content: Any, field: str,
                                         method: str) -> None:
    ws.write("f.yaml", content)
    argv = ["grid", "f.yaml", *DIRS, "--dry-run"] if kind == "grid" else ["run", "--suite", "f.yaml", *DIRS, "--dry-run"]
    before = ws.snap()
    r = invoke(capsys, argv)
    text = r.out + r.err
    assert "Traceback" not in text, r.tail()
    for letter in "sqdfragm":
        assert f"unknown method '{letter}'" not in text and f"unknown task '{letter}'" not in text, "read letter by letter\n" + r.tail()
    if r.code == 0:
        assert method in r.out, f"accepted, but the dry run does not list the {method} cell\n" + r.tail()
    else:
        check_error(r, [field])
    check_unchanged(before, ws.snap())


# ---- 5. files inside a run folder ----------------------------------------------------------------------------


def _garbage(p: Path) -> None:
    p.write_text("this is not what the harness wrote {\n")


def _empty(p: Path) -> None:
    p.write_bytes(b"")


def _truncated(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _binary(p: Path) -> None:
    p.write_bytes(BINARY)


def _json(obj: Any) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(obj))


def _torch(obj: Any) -> Callable[[Path], None]:
    return lambda p: torch.save(obj, p)


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()
    (p / "x").write_text("x")


# (file, how it is damaged, whether final.json is removed first so that the run resumes, command, words)
RUN_FILE_CASES = {
    "config-garbage-rerun": ("config.json", _garbage, False, "rerun", ["config.json"]),
    "config-garbage-table": ("config.json", _garbage, False, "table", ["config.json"]),
    "config-garbage-resume": ("config.json", _garbage, True, "rerun", ["config.json"]),
    "config-list-table": ("config.json", _json([1, 2]), False, "table", ["config.json"]),
    "config-empty-resume": ("config.json", _empty, True, "rerun", ["config.json"]),
    "config-binary-resume": ("config.json", _binary, True, "rerun", ["config.json"]),
    "config-other-run-resume": ("config.json", "other-config", True, "rerun", ["--force"]),
    "final-garbage-table": ("final.json", _garbage, False, "table", ["final.json"]),
    "final-empty-table": ("final.json", _empty, False, "table", ["final.json"]),
    "final-truncated-table": ("final.json", _truncated, False, "table", ["final.json"]),
    "final-binary-table": ("final.json", _binary, False, "table", ["final.json"]),
    "final-list-table": ("final.json", _json([]), False, "table", ["final.json"]),
    "final-empty-object-table": ("final.json", _json({}), False, "table", ["final.json"]),
    "final-metrics-strings-table": ("final.json", "metrics-strings", False, "table", ["final.json"]),
    "final-garbage-plot": ("final.json", _garbage, False, "plot", ["final.json"]),
    "final-empty-plot": ("final.json", _empty, False, "plot", ["final.json"]),
    "final-garbage-rerun": ("final.json", _garbage, False, "rerun", ["final.json"]),
    "final-empty-rerun": ("final.json", _empty, False, "rerun", ["final.json"]),
    "metrics-garbage-plot": ("metrics.jsonl", _garbage, False, "plot", ["metrics.jsonl"]),
    "metrics-binary-plot": ("metrics.jsonl", _binary, False, "plot", ["metrics.jsonl"]),
    "metrics-garbage-rerun": ("metrics.jsonl", _garbage, False, "rerun", ["metrics.jsonl"]),
    "checkpoint-garbage": ("checkpoint.pt", _garbage, True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-truncated": ("checkpoint.pt", _truncated, True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-empty": ("checkpoint.pt", _empty, True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-binary": ("checkpoint.pt", _binary, True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-a-list": ("checkpoint.pt", _torch([1, 2, 3]), True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-wrong-types": ("checkpoint.pt", _torch({"iteration": "x", "method": 5, "clock": 1}), True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-directory": ("checkpoint.pt", _directory, True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-foreign-method": ("checkpoint.pt", "foreign:method", True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-foreign-width": ("checkpoint.pt", "foreign:width", True, "rerun", ["checkpoint", "--force"]),
    "checkpoint-foreign-lr": ("checkpoint.pt", "foreign:lr", True, "rerun", ["checkpoint", "--force"]),
}


def _command(kind: str) -> list[str]:
    return {"rerun": RERUN, "table": ["table", "runs"], "plot": ["plot", "runs", "--out", "figs", "--kind", "training,curves"]}[kind]


def _damage(run: Path, name: str, how: Any, shared: Shared) -> None:
    p = run / name
    if how == "other-config":
        d = json.loads(p.read_text())
        d["method_cfg"]["lr"] = 0.5
        p.write_text(json.dumps(d))
    elif how == "metrics-strings":
        d = json.loads(p.read_text())
        d["metrics"] = {k: "high" for k in d["metrics"]}
        p.write_text(json.dumps(d))
    elif isinstance(how, str) and how.startswith("foreign:"):
        p.write_bytes(shared.foreign[how.split(":")[1]])
    else:
        how(p)


@pytest.mark.parametrize("name,how,resume,command,words", list(RUN_FILE_CASES.values()), ids=list(RUN_FILE_CASES))
def test_corrupt_file_in_run_folder(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared, name: str, how: Any,
                                   resume: bool, command: str, words: list[str]) -> None:
    run = copy_run(shared, ws)
    if resume:
        (run / "final.json").unlink()
    _damage(run, name, how, shared)
    expect_error(ws, capsys, _command(command), words)


def test_own_checkpoint_resumes(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared) -> None:
    """The control for the foreign-checkpoint cases: the run's own checkpoint resumes (to the end)."""
    run = copy_run(shared, ws)
    final = json.loads((run / "final.json").read_text())
    (run / "final.json").unlink()
    r = invoke(capsys, RERUN)
    assert r.code == 0 and "Traceback" not in r.out + r.err, r.tail()
    again = json.loads((run / "final.json").read_text())
    assert again["iterations"] == final["iterations"] and again["metrics"] == final["metrics"]


# ---- 6. reference caches under <runs>/_reference/ --------------------------------------------------------------


REFERENCE_CASES = {
    "garbage": _garbage,
    "empty": _empty,
    "binary": _binary,
    "a-list": _json([]),
    "rows-not-mapping": _json({"key": {}, "rows": 5}),
    "no-rows": _json({"key": {}}),
}


@pytest.mark.parametrize("command", ["table", "plot"])
@pytest.mark.parametrize("how", list(REFERENCE_CASES.values()), ids=list(REFERENCE_CASES))
def test_corrupt_reference_cache(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared, how: Callable[[Path], None], command: str) -> None:
    """A damaged cache entry is rebuilt (exit 0, the table/figures made) or refused in one line naming it."""
    copy_run(shared, ws)
    refs = sorted((ws.runs / "_reference").glob("*.json"))
    assert refs
    for p in refs:
        how(p)
    r = invoke(capsys, _command(command))
    assert "Traceback" not in r.out + r.err, r.tail()
    if r.code == 0:
        if command == "table":
            assert "draft" in r.out, r.tail()
        else:
            assert sorted((ws.path / "figs").rglob("*.png")), r.tail()
    else:
        line = check_error(r, [])
        assert "_reference" in line or any(p.name in line for p in refs), f"the error does not name the cache file: {line}"


# ---- 7. output folders that are files, unwritable, or missing input ------------------------------------------


def _grid_file(ws: Workspace) -> None:
    ws.write("g.yaml", GRID)


OUTPUT_CASES = {
    "run-runs-dir-is-file": (False, run_argv("--runs-dir", "afile"), ["afile"]),
    "run-runs-dir-under-file": (False, run_argv("--runs-dir", "afile/runs"), ["afile"]),
    "run-results-dir-is-file": (False, run_argv("--results-dir", "afile"), ["afile"]),
    "run-results-dir-under-file": (False, run_argv("--results-dir", "afile/results"), ["afile"]),
    "grid-runs-dir-is-file": (False, ["grid", "g.yaml", "--executor", "debug", *DIRS, "--runs-dir", "afile"], ["afile"]),
    "grid-results-dir-under-file": (False, ["grid", "g.yaml", "--executor", "debug", *DIRS, "--results-dir", "afile/r"], ["afile"]),
    "plot-out-is-file": (True, ["plot", "runs", "--out", "afile"], ["afile"]),
    "plot-out-under-file": (True, ["plot", "runs", "--out", "afile/figs"], ["afile"]),
    "table-out-under-file": (True, ["table", "runs", "--out", "afile/t.md"], ["afile"]),
    "table-out-is-folder": (True, ["table", "runs", "--out", "tdir"], ["tdir"]),
}


@pytest.mark.parametrize("needs_run,argv,words", list(OUTPUT_CASES.values()), ids=list(OUTPUT_CASES))
def test_output_folder_is_a_file(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared, needs_run: bool, argv: list[str],
                                 words: list[str]) -> None:
    """A runs/results/--out folder that is a file (or under one: fails even for root) fails before any work."""
    if needs_run:
        copy_run(shared, ws)
    ws.write("afile", "a file, not a folder\n")
    ws.write("tdir", DIR)
    _grid_file(ws)
    expect_error(ws, capsys, argv, words)


def test_prepare_cache_dir_under_a_file(ws: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    ws.write("afile", "a file\n")
    monkeypatch.setenv("BENCH_CACHE_DIR", str(ws.path / "afile" / "cache"))
    expect_error(ws, capsys, ["prepare", "digits", "--quiet"], ["afile"])


@pytest.mark.parametrize("which", ["runs", "results"])
def test_unwritable_output_folder_fails_before_training(ws: Workspace, capsys: pytest.CaptureFixture[str], which: str) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (the under-a-file cases cover this)")
    locked = ws.path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        argv = run_argv(f"--{which}-dir", "locked/x")
        expect_error(ws, capsys, argv, ["locked"])
        assert not (ws.runs).exists(), "training wrote a run folder before the unwritable folder was noticed"
    finally:
        locked.chmod(0o700)


MISSING_INPUT_CASES = {
    "table-empty-folder": (False, ["table", "emptydir"], ["emptydir"]),
    "plot-empty-folder": (False, ["plot", "emptydir", "--out", "figs"], ["emptydir"]),
    "table-missing-folder": (False, ["table", "missing"], ["missing"]),
    "plot-missing-folder": (False, ["plot", "missing", "--out", "figs"], ["missing"]),
    "table-a-file": (False, ["table", "afile"], ["afile"]),
    "status-missing": (False, ["status", "missing"], ["missing"]),
    "status-binary-grid": (False, ["status", "bin.yaml"], ["bin.yaml"]),
    "table-format-unknown": (True, ["table", "runs", "--format", "nope"], ["nope", "markdown", "latex", "csv"]),
    "plot-format-unknown": (True, ["plot", "runs", "--out", "figs", "--format", "nope"], ["nope", "png"]),
    "plot-kind-unknown": (True, ["plot", "runs", "--out", "figs", "--kind", "nope"], ["nope", "training"]),
    "plot-kind-empty": (True, ["plot", "runs", "--out", "figs", "--kind", ","], ["--kind"]),
    "plot-x-unknown": (True, ["plot", "runs", "--out", "figs", "--x", "nope"], ["nope", "reward"]),
    "plot-y-unknown": (True, ["plot", "runs", "--out", "figs", "--y", "nope"], ["nope", "reward"]),
    "table-paper-file-missing": (True, ["table", "runs", "--paper-file", "missing.yaml"], ["missing.yaml"]),
    "table-paper-file-binary": (True, ["table", "runs", "--paper-file", "bin.yaml"], ["bin.yaml"]),
    "table-paper-file-folder": (True, ["table", "runs", "--paper-file", "tdir"], ["tdir"]),
    "table-paper-file-list": (True, ["table", "runs", "--paper-file", "list.yaml"], ["list.yaml"]),
    "table-paper-file-bad-rows": (True, ["table", "runs", "--paper-file", "rows.yaml"], ["rows.yaml"]),
}


@pytest.mark.parametrize("needs_run,argv,words", list(MISSING_INPUT_CASES.values()), ids=list(MISSING_INPUT_CASES))
def test_table_plot_status_bad_input(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared, needs_run: bool, argv: list[str],
                                     words: list[str]) -> None:
    if needs_run:
        copy_run(shared, ws)
    ws.write("emptydir", DIR)
    ws.write("tdir", DIR)
    ws.write("afile", "a file\n")
    ws.write("bin.yaml", BINARY)
    ws.write("list.yaml", [1, 2])
    ws.write("rows.yaml", {"tables": [{"id": "t", "source": "s", "tasks": ["gmm-ring8"], "reward": "quadratic", "rows": 5}]})
    expect_error(ws, capsys, argv, words)


# ---- 8. crafted pickles: reading must never run code ----------------------------------------------------------


class _RunsCode:
    """Unpickling an instance calls open(marker, "w"): the marker file's existence proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


class _RunsShell:
    """Unpickling an instance runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def write_crafted(path: Path, marker: Path, fmt: str) -> None:
    """A file whose unpickling would create `marker`: a torch zip archive, or a bare pickle (torch's legacy format)."""
    payload = {"iteration": 1, "method": _RunsCode(marker), "clock": {}, "log_lines": 0, "__config_hash__": "x"}
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps({**payload, "method": _RunsShell(marker)}, protocol=2))


@pytest.mark.parametrize("fmt", ["torch-zip", "bare-pickle"])
def test_crafted_checkpoint_is_not_executed(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared, fmt: str) -> None:
    run = copy_run(shared, ws)
    (run / "final.json").unlink()
    marker = ws.tmp / "code-ran"
    write_crafted(run / "checkpoint.pt", marker, fmt)
    before = ws.snap()
    r = invoke(capsys, RERUN)
    assert not marker.exists(), "resuming unpickled the crafted checkpoint and ran its code"
    problems = error_problems(r, ["checkpoint", "--force"]) + changes(before, ws.snap())
    assert not problems, "; ".join(problems) + "\n" + r.tail()


@pytest.mark.parametrize("fmt", ["torch-zip", "bare-pickle"])
def test_crafted_cache_entry_is_not_executed_and_is_rebuilt(ws: Workspace, fmt: str) -> None:
    from bench.core.cache import cache_path, cached

    key = {"qa": "crafted entry", "fmt": fmt}
    path = cache_path("qa-crafted", key)
    assert ws.cache in path.parents, "the cache is not under $BENCH_CACHE_DIR"
    path.parent.mkdir(parents=True)
    marker = ws.tmp / "code-ran"
    write_crafted(path, marker, fmt)
    built: list[int] = []
    obj = cached("qa-crafted", key, lambda: built.append(1) or {"x": torch.arange(3)})
    assert not marker.exists(), "reading the cache unpickled the crafted entry and ran its code"
    assert built == [1] and torch.equal(obj["x"], torch.arange(3))
    again = cached("qa-crafted", key, lambda: pytest.fail("the rebuilt entry was not stored"))
    assert torch.equal(again["x"], torch.arange(3)) and not marker.exists()


# ---- 9. a failing cell, an internal error --------------------------------------------------------------------


def test_grid_with_a_failing_cell_exits_1_and_lists_it(ws: Workspace, capsys: pytest.CaptureFixture[str], shared: Shared) -> None:
    """Seed 0's folder (the shared run, unfinished) holds a corrupt checkpoint: that cell fails, seed 1 runs."""
    run = copy_run(shared, ws)
    (run / "final.json").unlink()
    _garbage(run / "checkpoint.pt")
    ws.write("g.yaml", grid(seeds=[0, 1]))
    r = invoke(capsys, ["grid", "g.yaml", "--executor", "debug", *DIRS])
    text = r.out + r.err
    assert r.code == 1, r.tail()
    assert "Traceback" not in text, r.tail()
    failed = [line for line in lines_of(text) if "fail" in line.lower() and ("seed=0" in line or run.name in line)]
    assert failed, "the failing cell (seed 0) is not listed\n" + r.tail()
    assert not any("seed=1" in line for line in lines_of(text) if "fail" in line.lower()), "seed 1 is listed as failed\n" + r.tail()
    assert (run.parent / run.name.replace("_s0_", "_s1_") / "final.json").exists(), "the other cell did not finish\n" + r.tail()


def test_internal_error_is_one_line_naming_a_traceback_file(ws: Workspace, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.core.registry import Registry

    def boom(self: Any) -> Iterator[Any]:
        raise RuntimeError("qa-boom: a bug")

    monkeypatch.setattr(Registry, "__iter__", boom)
    ws.runs.mkdir()
    before = ws.snap()
    r = invoke(capsys, ["ls"])
    line = check_error(r, ["internal error", "full traceback in"], code=1)
    log = Path(line.rsplit("full traceback in", 1)[1].strip().rstrip("."))
    try:
        assert log.is_file(), f"the named log {log} does not exist"
        assert "Traceback" in log.read_text() and "qa-boom" in log.read_text()
        logs = {str(log.resolve()), *map(str, log.resolve().parents)}
        check_unchanged(before, ws.snap(), allow=lambda p: str(Path(p).resolve()) in logs)
    finally:
        if log.is_file() and ws.tmp not in log.resolve().parents:
            log.unlink()


# ---- 10. real processes: the console entry point, Ctrl-C -------------------------------------------------------


def _env(ws: Workspace) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "BENCH_CACHE_DIR": str(ws.cache), "HOME": str(ws.home),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def started(argv: list[str], ws: Workspace) -> Iterator[subprocess.Popen]:
    """`bench argv` in its own process group (Ctrl-C in a terminal signals the whole group); killed at the end if still alive."""
    proc = subprocess.Popen([str(BENCH_EXE), *argv], cwd=ws.path, env=_env(ws), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"bench ended (exit {proc.returncode}) before {what}\n{err[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def interrupt(proc: subprocess.Popen, within: float) -> tuple[int, str, str, float]:
    t = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bench was still running {within:.0f}s after Ctrl-C")
    return proc.returncode, out, err, time.monotonic() - t


def check_interrupted(code: int, out: str, err: str) -> None:
    assert code == 130, f"exit {code} after Ctrl-C, expected 130\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    assert INTERRUPTED in lines_of(err), f"the line {INTERRUPTED!r} is missing\n{err[-3000:]}"


def test_console_entry_point_bad_input(ws: Workspace) -> None:
    before = ws.snap()
    r = subprocess.run([str(BENCH_EXE), "run", "--task", "nope", "--methods", "draft", *DIRS], cwd=ws.path, env=_env(ws),
                       capture_output=True, text=True, timeout=300)
    check_error(Result(r.returncode, r.stdout, r.stderr), ["nope", "gmm-ring8"])
    check_unchanged(before, ws.snap())


def _train_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def test_ctrl_c_during_run_exits_130_and_the_rerun_resumes(ws: Workspace) -> None:
    """Ctrl-C mid-training: exit 130, the message, a consistent folder; the same command resumes
    (the log lines written before the interrupt are kept as they were, iterations continue)."""
    argv = ["run", "--task", "gmm-ring8", "--methods", "draft", "--seeds", "0", "--set", "train.iterations=5000",
            "--set", "train.checkpoint_every=1", "--set", "train.eval_every=0", "--set", "train.eval_samples=16",
            "--set", "train.final_eval_samples=16", "--set", "method.batch_size=4", "--set", "sampler.steps=8", *DIRS, "--quiet"]
    logs = lambda: sorted(ws.runs.glob("gmm-ring8/draft/*/metrics.jsonl"))  # noqa: E731
    with started(argv, ws) as proc:
        wait_for(lambda: bool(logs()) and len(lines_of(logs()[0].read_text())) >= 4, proc, 180, "four log lines")
        code, out, err, took = interrupt(proc, within=30)
    check_interrupted(code, out, err)
    run = logs()[0].parent
    assert (run / "checkpoint.pt").is_file() and not (run / "final.json").exists()
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name], "temporary files left in the run folder"
    first = _train_lines(run / "metrics.jsonl")
    with started(argv, ws) as proc:
        wait_for(lambda: len(lines_of((run / "metrics.jsonl").read_text())) >= len(first) + 2, proc, 180, "the rerun to log two more lines")
        code, out, err, took = interrupt(proc, within=30)
    check_interrupted(code, out, err)
    second = _train_lines(run / "metrics.jsonl")
    assert second[:3] == first[:3], "the rerun rewrote the log from the start instead of resuming"
    its = [rec["iteration"] for rec in second if not any(k.startswith("eval/") for k in rec)]
    assert its == list(range(1, len(its) + 1)) and len(its) > len(first) - 1, f"iterations after the resume: {its}"
    assert sum(1 for rec in second if rec["iteration"] == 0) == 1, "the iteration-0 evaluation was redone"


def test_ctrl_c_during_prepare_digits_exits_130_and_leaves_no_lock(ws: Workspace) -> None:
    with started(["prepare", "digits", "--quiet"], ws) as proc:
        wait_for(lambda: bool(list(ws.cache.rglob("*.lock"))), proc, 180, "a cache lock")
        time.sleep(2.0)  # inside the build
        code, out, err, took = interrupt(proc, within=30)
    check_interrupted(code, out, err)
    assert took < 10, f"bench prepare took {took:.1f}s to stop after Ctrl-C"
    assert not list(ws.cache.rglob("*.lock")), f"lock files left: {list(ws.cache.rglob('*.lock'))}"
    assert not [p for p in ws.cache.rglob("*") if ".tmp" in p.name], "temporary files left in the cache"
