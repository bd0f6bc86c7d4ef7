"""A grid on a real Slurm cluster through submitit (`-m slurm`; scripts/ci_slurm.sh starts the
single-node cluster of scripts/slurm/ and runs this file).

A 3-cell grid on gmm-ring8 is submitted as a job array. Mid-run, one job is requeued
(`scontrol requeue`: Slurm sends SIGTERM, the cell checkpoints at the end of its iteration and
exits; Slurm starts it again and it resumes) and one is cancelled (`scancel`). The requeued cell
ends with exactly the final metrics of an uninterrupted run of that cell, the cancelled one is
reported as failed, a second `bench grid` runs only the cancelled cell (resuming it), and
`bench table` over the Slurm runs equals the table of the same grid run with `--executor local`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml

from bench.app.grid import expand, load_grid
from bench.app.runner import MetricLog

pytestmark = pytest.mark.slurm

BENCH = [sys.executable, "-m", "bench.app.cli"]
GRID = {
    "name": "slurm-it",
    "tasks": ["gmm-ring8"],
    "methods": ["draft"],
    "seeds": [0, 1, 2],
    "set": {"train.iterations": 80, "train.eval_every": 40, "train.eval_samples": 32, "train.final_eval_samples": 64,
            "train.checkpoint_every": 20, "train.plot": False, "method.batch_size": 8},
    "max_parallel": 3,
    "slurm": {"cpus_per_task": 1, "timeout_min": 15},
}


def sh(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def wait_until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{sh('squeue', check=False).stdout}")


def iteration(run: Path) -> int:
    recs = MetricLog(run / "metrics.jsonl").read() if (run / "metrics.jsonl").exists() else []
    return max((r.get("iteration", 0) for r in recs), default=0)


def queue_is_empty() -> bool:
    res = sh("squeue", "-h", check=False)  # a failed squeue (controller busy) is not an empty queue
    return res.returncode == 0 and not res.stdout.strip()


def queue_state(job: str) -> str:
    return sh("squeue", "-h", "-j", job, "-o", "%T %r", check=False).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    if shutil.which("sbatch") is None or not os.environ.get("SLURM_CONF"):
        pytest.fail("no Slurm cluster: run this tier with scripts/ci_slurm.sh (it starts one and sets SLURM_CONF)")
    assert "idle" in sh("sinfo", "-h", "-o", "%T", timeout=20).stdout or "mix" in sh("sinfo", "-h", "-o", "%T").stdout


def test_grid_survives_requeue_and_cancel_and_matches_a_local_run(tmp_path: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID, sort_keys=False))
    sruns, lruns = tmp_path / "slurm_runs", tmp_path / "local_runs"
    cells = expand(load_grid(grid))
    a, b, c = (cell.dir(sruns) for cell in cells)

    out = sh(*BENCH, "grid", str(grid), "--executor", "slurm", "--runs-dir", str(sruns), "--no-wait").stdout
    assert "submitted 3 cells as Slurm job array" in out
    manifest = json.loads(next((sruns / "_grids" / "slurm-it").glob("*.json")).read_text())
    jobs = {e["dir"]: e["job_id"] for e in manifest["cells"]}
    job_a, job_b = jobs[cells[0].rel()], jobs[cells[1].rel()]

    # requeue A and cancel B, each after its 10th iteration
    wait_until(lambda: iteration(a) >= 10, 240, "cell A to reach iteration 10")
    assert iteration(a) < 80
    sh("scontrol", "requeue", job_a)
    wait_until(lambda: iteration(b) >= 10, 240, "cell B to reach iteration 10")
    assert iteration(b) < 80
    sh("scancel", job_b)
    # Slurm holds a requeued job (BeginTime) until its revoked credential expires (cred_expire + 1 s,
    # 11 s on the test cluster; lifting the hold earlier gets the restart killed at launch)
    wait_until(lambda: queue_state(job_a).startswith("PENDING"), 60, "job A to be pending again")
    wait_until(queue_is_empty, 400, "the queue to empty", every=2)

    states = {s["dir"]: s for s in map(json.loads, sh(*BENCH, "status", str(grid), "--runs-dir", str(sruns), "--json").stdout.splitlines())}
    assert states[cells[0].rel()]["state"] == "done", states[cells[0].rel()]
    assert states[cells[1].rel()]["state"] == "failed" and "CANCELLED" in states[cells[1].rel()]["detail"]
    assert states[cells[2].rel()]["state"] == "done"
    folder = Path(manifest["folder"])
    err_a = (folder / f"{job_a}_0_log.err").read_text()
    assert "caught SIGTERM; checkpointing" in err_a and "resuming from checkpoint.pt" in err_a, err_a[-2000:]

    # the same grid, uninterrupted, with the local executor (one thread per cell, as the Slurm jobs)
    sh(*BENCH, "grid", str(grid), "--executor", "local", "--runs-dir", str(lruns), "--jobs", "2", "--no-report")
    final_a = json.loads((a / "final.json").read_text())
    local_a = json.loads((cells[0].dir(lruns) / "final.json").read_text())
    assert final_a["metrics"] == local_a["metrics"]
    assert final_a["budget"] == local_a["budget"] and final_a["iterations"] == 80

    # a second submission runs only the cancelled cell, which resumes from its checkpoint
    out = sh(*BENCH, "grid", str(grid), "--executor", "slurm", "--runs-dir", str(sruns), "--no-report").stdout
    assert "submitted 1 cells" in out and "2 of 3 cells finished earlier (skipped" in out and "3 of 3 cells finished, 0 failed" in out
    second = sorted((sruns / "_grids" / "slurm-it").glob("*.json"))[-1]
    job_b2 = json.loads(second.read_text())["cells"][0]["job_id"]
    assert "resuming from checkpoint.pt" in (Path(json.loads(second.read_text())["folder"]) / f"{job_b2}_0_log.err").read_text()

    # tables of the Slurm grid and of the local grid are identical (wall time left out)
    t_slurm = sh(*BENCH, "table", str(sruns), "--no-time").stdout
    t_local = sh(*BENCH, "table", str(lruns), "--no-time").stdout
    assert "| draft | 3 |" in t_slurm
    assert t_slurm == t_local
