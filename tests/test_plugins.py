"""A method defined outside methods/ (the documented worked example) runs through `bench run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "adding_a_method.md"


def example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/adding_a_method.md lost its worked example"
    return blocks[0]


def test_documented_example_runs_as_a_plugin(tmp_path: Path) -> None:
    (tmp_path / "my_reinforce.py").write_text(example_source())
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bench.app.cli", "--plugin", "my_reinforce"]
    ls = subprocess.run([*cmd, "ls", "methods"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ls.returncode == 0, ls.stderr
    assert "reinforce-kl v1 [reward queries only]" in ls.stdout and "sqdf" in ls.stdout
    run = subprocess.run(
        [*cmd, "run", "--task", "gmm-ring8", "--methods", "reinforce-kl", "--seeds", "0", "--quiet",
         "--set", "train.iterations=4", "--set", "train.eval_every=0", "--set", "train.eval_samples=64",
         "--set", "train.final_eval_samples=256", "--set", "sampler.steps=8", "--set", "method.batch_size=32"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    final = json.loads(next((tmp_path / "runs" / "gmm-ring8" / "reinforce-kl").glob("*/final.json")).read_text())
    assert final["method"]["name"] == "reinforce-kl" and final["iterations"] == 4
    assert final["budget"]["reward_queries"] == 4 * 32
    assert "reinforce-kl" in (tmp_path / "results" / "gmm-ring8" / "table.md").read_text()


def test_unknown_plugin_is_a_one_line_error(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "bench.app.cli", "--plugin", "no_such_module_xyz", "ls"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: could not import plugin module 'no_such_module_xyz'")
    assert r.stderr.count("\n") == 1
