"""GPU tier (`pytest -m gpu`): the Stable Diffusion path and the throughput benchmark on CUDA.

Skipped without a CUDA device. The full SD1.5-sized measurement is the benchmark script itself
(`python scripts/bench_sd_throughput.py`), which writes its figures to results/benchmarks/."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]


def test_throughput_script_on_cuda_records_the_device_and_peak_memory(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_sd_throughput as bst
    finally:
        sys.path.pop(0)
    out = bst.main(["--tiny", "--device", "cuda", "--dtype", "fp16", "--batch-sizes", "1,2", "--steps", "4", "--repeats", "1",
                    "--methods", "sqdf,draft", "--out", str(tmp_path)])
    res = json.loads(out.read_text())
    assert torch.cuda.get_device_name() in json.dumps(res)
    for m in ("sqdf", "draft"):
        rows = res["methods"][m]
        assert [r["batch"] for r in rows] == [1, 2]
        assert all(r["seconds_per_update"] > 0 for r in rows)
        assert all((r["peak_gib"] or 0) > 0 for r in rows)
    assert res["sampling"][0]["images_per_s"] > 0
