"""Checkpoints and cache entries: they never run code, belong to one run, and resume bit-exactly.

* a crafted pickle (checkpoint.pt or a cache entry) is not executed: one-line BenchError / rebuild;
* a checkpoint of another run (method, lr, network size) or of the old unversioned format is
  refused with a message naming --force;
* a run stopped (runner hook) or killed (SIGKILL) and resumed ends exactly as an uninterrupted one;
* a bad run folder fails before the build and leaves nothing behind; evaluations show progress.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.app.config import RunConfig, resolve
from bench.app.runner import load_checkpoint, run_dir, run_one
from bench.core import cache
from bench.core.errors import BenchError
from bench.core.io import atomic_torch_save, check_plain

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": {"iterations": 4, "checkpoint_every": 1, "eval_every": 2, "eval_samples": 16, "final_eval_samples": 32, "plot": False},
        "sampler": {"steps": 4}}
METHOD_SETS = {"sqdf": {"batch_size": 8, "rollouts_per_step": 4, "buffer_size": 16}, "draft": {"batch_size": 8},
               "ddpo": {"samples_per_iteration": 8, "minibatch_size": 4, "gradient_accumulation_steps": 1, "stat_min_count": 2}}


def tiny(method: str, extra: dict[str, Any] | None = None) -> RunConfig:
    layers = [TINY, {"method": METHOD_SETS.get(method, {})}, extra or {}]
    return resolve("gmm-ring8", method, 0, layers=layers)


class Payload:
    """Unpickling this (with an unrestricted unpickler) creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, Path]:
    """A draft run stopped after one iteration (with its checkpoint); tests work on copies of it."""
    cfg, root = tiny("draft"), tmp_path_factory.mktemp("stopped")
    assert run_one(cfg, root, progress=False, stop_after=1) == {}
    return cfg, root


def _copy(stopped: tuple[RunConfig, Path], to: Path) -> Path:
    shutil.copytree(stopped[1], to)
    return run_dir(to, stopped[0]) / "checkpoint.pt"


def _log(d: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in (d / "metrics.jsonl").read_text().splitlines()]


def _same_run(a: dict[str, Any], b: dict[str, Any], da: Path, db: Path) -> None:
    assert a["metrics"] == b["metrics"] and a["budget"] == b["budget"] and a["iterations"] == b["iterations"]
    assert _log(da) == _log(db)


# ---- (a) crafted pickles are never executed --------------------------------------------------------


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_crafted_checkpoint_is_not_executed(tmp_path: Path, kind: str, stopped: tuple[RunConfig, Path]) -> None:
    cfg, ckpt = stopped[0], _copy(stopped, tmp_path / "runs")
    marker = tmp_path / "marker"
    evil = {"method": Payload(marker), "iteration": 1}
    if kind == "torch-zip":
        torch.save(evil, ckpt)
    else:
        import pickle

        ckpt.write_bytes(pickle.dumps(evil))
    with pytest.raises(BenchError) as e:
        run_one(cfg, tmp_path / "runs", progress=False)
    assert not marker.exists()
    msg = str(e.value)
    assert "\n" not in msg and "--force" in msg
    if kind == "torch-zip":
        assert "does not load" in msg and ".open" in msg


def test_crafted_cache_entry_is_rebuilt_not_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path / "cache"))
    builds = []

    def build() -> dict[str, Any]:
        builds.append(1)
        return {"w": torch.arange(3.0), "loss": 0.5}

    key = {"a": 1, "shape": (3,)}
    assert torch.equal(cache.cached("toy", key, build)["w"], torch.arange(3.0))
    path = cache.cache_path("toy", key)
    marker = tmp_path / "marker"
    torch.save({"__config_hash__": path.stem, "w": Payload(marker)}, path)
    again = cache.cached("toy", key, build)
    assert not marker.exists() and len(builds) == 2 and torch.equal(again["w"], torch.arange(3.0))
    assert cache.cached("toy", key, build)["loss"] == 0.5 and len(builds) == 2  # the rebuilt entry loads


def test_only_plain_values_are_written(tmp_path: Path) -> None:
    import numpy as np

    check_plain({"a": [torch.zeros(2), 1, 2.0, "s", None, (True,)], "b": {"c": torch.Size([2])}})
    for bad, where in ((np.float64(1.0), "state.x"), ({"y": np.zeros(2)}, "state.x.y"), (Path("p"), "state.x")):
        with pytest.raises(TypeError, match=where.replace(".", r"\.")):
            atomic_torch_save({"x": bad}, tmp_path / "f.pt")
    assert not (tmp_path / "f.pt").exists()


# ---- (b) a checkpoint belongs to one run --------------------------------------------------------------


@pytest.mark.parametrize("other, expect", [
    (("ddpo", {}), "method name is 'ddpo' there, 'draft' here"),
    (("draft", {"method": {"lr": 0.5}}), "method_cfg.lr is 0.5 there"),
    (("draft", {"task": {"hidden": 32}}), "task_cfg.hidden is 32 there, 128 here"),
])
def test_foreign_checkpoint_is_refused(tmp_path: Path, other: tuple[str, dict[str, Any]], expect: str, stopped: tuple[RunConfig, Path]) -> None:
    foreign = tiny(*other)
    run_one(foreign, tmp_path / "other", progress=False, stop_after=1)
    cfg, ckpt = stopped[0], _copy(stopped, tmp_path / "runs")
    shutil.copy(run_dir(tmp_path / "other", foreign) / "checkpoint.pt", ckpt)
    with pytest.raises(BenchError) as e:
        run_one(cfg, tmp_path / "runs", progress=False)
    msg = str(e.value)
    assert expect in msg and "--force" in msg and "\n" not in msg, msg


def test_unversioned_checkpoint_is_refused(tmp_path: Path, stopped: tuple[RunConfig, Path]) -> None:
    cfg, ckpt = stopped[0], _copy(stopped, tmp_path / "runs")
    state = load_checkpoint(ckpt)
    del state["header"]  # what earlier releases wrote (then loaded with weights_only=False)
    torch.save(state, ckpt)
    with pytest.raises(BenchError, match="no run header .*--force"):
        run_one(cfg, tmp_path / "runs", progress=False)


# ---- (c) stopped or killed, then resumed: bit-exact ----------------------------------------------------


@pytest.mark.parametrize("method", ["sqdf", "ddpo", "draft"])
def test_stop_and_resume_is_bit_exact(tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny(method, {"train": {"checkpoint_every": 2}})
    full = run_one(cfg, tmp_path / "a", progress=True)
    err = capsys.readouterr().err  # progress bars (stderr) for the training loop and every evaluation
    assert all(phase in err for phase in ("evaluation at iteration 0", "evaluation at iteration 2", "final evaluation", f"gmm-ring8 {method} α=1"))
    assert run_one(cfg, tmp_path / "b", progress=False, stop_after=3) == {}  # checkpoint at 2, stopped (and saved) at 3
    assert load_checkpoint(run_dir(tmp_path / "b", cfg) / "checkpoint.pt")["iteration"] == 3
    resumed = run_one(cfg, tmp_path / "b", progress=False)
    assert capsys.readouterr().err == ""  # progress=False (--quiet): nothing on stderr
    _same_run(full, resumed, run_dir(tmp_path / "a", cfg), run_dir(tmp_path / "b", cfg))


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
from bench.app.config import config_from_dict
from bench.app.runner import run_one
import json
cfg = config_from_dict(json.loads(sys.argv[1]))
seen = []
def kill_at_3():
    seen.append(1)
    if len(seen) == 3:  # after iteration 3 was logged; the last checkpoint is at iteration 2
        os.kill(os.getpid(), signal.SIGKILL)
    return False
run_one(cfg, Path(sys.argv[2]), progress=False, stop_when=kill_at_3)
"""


def test_sigkill_and_resume_is_bit_exact(tmp_path: Path) -> None:
    cfg = tiny("sqdf", {"train": {"checkpoint_every": 2, "iterations": 5}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), str(tmp_path / "b")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    d = run_dir(tmp_path / "b", cfg)
    assert not (d / "final.json").exists() and load_checkpoint(d / "checkpoint.pt")["iteration"] == 2
    assert len(_log(d)) > load_checkpoint(d / "checkpoint.pt")["log_lines"]  # iteration 3 was logged, then lost
    resumed = run_one(cfg, tmp_path / "b", progress=False)
    full = run_one(cfg, tmp_path / "a", progress=False)
    _same_run(full, resumed, run_dir(tmp_path / "a", cfg), d)


# ---- the run folder; progress -----------------------------------------------------------------------


def test_bad_run_folder_fails_before_the_build_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.app.runner as runner

    built = []

    def failing_build(*args: Any, **kwargs: Any) -> None:
        built.append(1)
        raise BenchError("bad input")

    monkeypatch.setattr(runner, "build_task", failing_build)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BenchError, match="is a file, not a folder"):
        run_one(tiny("draft"), tmp_path / "file", progress=False)
    assert not built
    with pytest.raises(BenchError, match="bad input"):  # the build fails: the folders created for the run are gone
        run_one(tiny("draft"), tmp_path / "runs", progress=False)
    assert built and not (tmp_path / "runs").exists()
