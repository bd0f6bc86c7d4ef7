"""GPU tier (`pytest -m gpu`): the Stable Diffusion path and the throughput benchmark on CUDA.

Skipped without a CUDA device. The full SD1.5-sized measurement is the benchmark script itself
(`bash scripts/gpu_check.sh`, which runs this file first and then `scripts/bench_sd_throughput.py`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bst() -> Any:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_sd_throughput
    finally:
        sys.path.pop(0)
    return bench_sd_throughput


def test_throughput_script_on_cuda_records_the_device_and_peak_memory(bst: Any, tmp_path: Path) -> None:
    out = bst.main(["--tiny", "--device", "cuda", "--dtype", "bf16", "--batch-sizes", "1,2", "--steps", "4", "--repeats", "1",
                    "--methods", "sqdf,draft", "--compare-diffusers", "--matmul-n", "1024", "--budget", "240", "--out", str(tmp_path)])
    res = json.loads(out.read_text())
    assert torch.cuda.get_device_name() in json.dumps(res)
    for m in ("sqdf", "draft"):
        rows = res["methods"][m]
        assert [r["batch"] for r in rows] == [1, 2]
        assert all(r["seconds_per_update"] > 0 for r in rows)
        assert all((r["peak_gib"] or 0) > 0 for r in rows)
    assert res["sampling"][0]["images_per_s"] > 0 and res["sampling_diffusers"][0]["images_per_s"] > 0
    assert res["settings"]["diffusers_schedule_matches"] is True
    assert res["matmul_peak"]["tflops"] > 0
    assert all(p["status"] == "done" for p in res["phases"].values())


def test_our_sampler_matches_the_diffusers_pipeline_on_cuda(bst: Any) -> None:
    """The two samplers the benchmark compares compute the same images (η = 0, CFG 5, fp32): the
    comparison times the same work."""
    from bench.core.diffusion import rollout

    dev = torch.device("cuda")
    bb, _ = bst.build("tiny", dev, torch.float32, 4)
    pipe = bst.diffusers_pipeline(bb)
    steps, w = 4, 5.0
    assert bst.schedules_agree(bb, pipe, steps)
    x_T = torch.randn(2, *bb.sample_shape, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompts([bst.PROMPT] * 2)
    traj = rollout(bb.policy, bb.schedule.grid(steps), cond, x_T, torch.Generator(), eta=0.0, guidance=w,
                   null_cond=bb.null_cond(cond), keep_latents=False)
    with torch.no_grad():
        ours = bb.decode(traj.x0)
    theirs = pipe([bst.PROMPT] * 2, height=bb.resolution, width=bb.resolution, num_inference_steps=steps, guidance_scale=w,
                  eta=0.0, latents=x_T.to(dev), output_type="pt").images
    torch.testing.assert_close(ours, theirs.float().cpu(), rtol=0, atol=2e-3)


def test_a_deadline_stops_a_measurement_that_keeps_the_gpu_busy(bst: Any) -> None:
    a = torch.randn(2048, 2048, device="cuda")
    with pytest.raises(bst.PhaseTimeout):
        with bst.time_limit(0.5):
            while True:
                (a @ a).sum().item()
    row = bst.guarded(lambda: {"never": [(a @ a).sum().item() for _ in iter(int, 1)]}, torch.device("cuda"), 0.5)
    assert row["error"].startswith("timed out")
