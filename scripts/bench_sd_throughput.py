"""Throughput of Stable Diffusion 1.5 fine-tuning at the paper's settings, on random weights.

Builds SD1.5-sized models from the real configs (UNet 860 M, VAE, CLIP ViT-L/14 text tower, LoRA
rank 4 on the attention projections; random init, nothing downloaded), a full-size LAION-aesthetic
reward (CLIP ViT-L/14 vision tower + MLP, random init) and runs, at 512², 50 DDIM steps, η = 1,
CFG 5, in fp16 (or bf16):

* sampling: images/s of the no-grad 50-step CFG sampler plus VAE decode, at a few batch sizes;
* one update of each registered method among SQDF, DRaFT-1, ReFL and DDPO (their own train_step,
  through the same backbone the sd15 task builds): wall time split into the runner's phases
  (sampling, reward, update) and the peak GPU memory, at a few batch sizes (batch = rollouts
  and transitions per update); a method that is not registered is skipped with a note;
* the UNet's FLOPs per call (torch.utils.flop_counter), so that the sampler's achieved FLOP/s can
  be set against the GPU's peak.

Writes results/benchmarks/sd15_throughput_<device>.json and .md.

    python scripts/bench_sd_throughput.py                       # GPU, fp16, batch sizes 1,2,4
    python scripts/bench_sd_throughput.py --dtype bf16 --batch-sizes 1,4,8
    python scripts/bench_sd_throughput.py --tiny                # CPU smoke run on the tiny models

`--tiny` swaps in the tiny test models (bench/tasks/sd_utils.py) at 10 steps on the CPU: those numbers
only show that the script works; they say nothing about SD1.5 throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.core.clock import PhaseClock  # noqa: E402
from bench.core.diffusion import draw_noise, rollout  # noqa: E402
from bench.core.provenance import snapshot  # noqa: E402
from bench.core.registry import METHODS  # noqa: E402
from bench.core.task import SamplerConfig  # noqa: E402
from bench.core.reward import CountingReward  # noqa: E402

PAPER_METHODS = {"sqdf": "SQDF", "draft": "DRaFT-1", "refl": "ReFL", "ddpo": "DDPO"}
"registry name -> label (the methods of SQDF's Fig. 3 whose update cost differs most)"

PEAK_TFLOPS = {  # dense tensor-core peak, fp16/bf16 with fp32 accumulate (vendor data sheets)
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 756.0,
    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A6000": 155.0, "A10": 125.0, "V100": 125.0, "L4": 121.0, "T4": 65.0,
}
"GPU name fragment -> peak dense fp16/bf16 TFLOP/s (first match wins; more specific names first)"


def peak_tflops(name: str) -> float | None:
    for frag, tf in PEAK_TFLOPS.items():
        if frag.lower() in name.lower():
            return tf
    return None


# ---- models --------------------------------------------------------------------------------------


def build(size: str, device: torch.device, dtype: torch.dtype, rank: int) -> tuple[Any, Any]:
    """(SDBackbone with a LoRA and a random 'LCM' UNet of the same architecture, aesthetic reward)."""
    from bench.tasks.sd_utils import random_components, sd15_schedule
    from bench.tasks.sd import OnCallerDevice, SDBackbone

    comps = random_components(size, seed=0, dtype=dtype, device=device)

    def lcm() -> Any:  # SQDF's f_ψ costs one more frozen UNet; random weights cost the same
        unet = random_components(size, seed=1, dtype=dtype, device=device).unet
        unet.enable_gradient_checkpointing()
        return unet

    backbone = SDBackbone(comps, sd15_schedule(), lora_rank=rank, device=device, dtype=dtype, micro_batch=0,
                          unet_checkpointing=True, vae_checkpointing=True, lcm_loader=lcm, base_model=comps.source)
    return backbone, OnCallerDevice(aesthetic_reward(size, device, dtype))


def aesthetic_reward(size: str, device: torch.device, dtype: torch.dtype) -> Any:
    """LAION aesthetic on a random CLIP ViT-L/14 vision tower (size="sd15") or the tiny test model."""
    from rewards.aesthetic import AestheticMLP, AestheticReward

    if size == "tiny":
        return AestheticReward.tiny(seed=0, device=device, dtype=dtype)
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           patch_size=14, image_size=224, projection_dim=768, hidden_act="quick_gelu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        clip = CLIPVisionModelWithProjection(cfg)
        mlp = AestheticMLP(768)
    return AestheticReward(clip.vision_model, clip.visual_projection, mlp, image_size=224, device=device, dtype=dtype,
                           source={"clip": "random-init:ViT-L/14", "mlp": "random-init"})


# ---- measurements --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def unet_flops(backbone: Any) -> tuple[int, int]:
    """(FLOPs of one UNet row, FLOPs of one VAE decode), counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    cond = backbone.encode_prompts(["a photo of a cat"])
    x = torch.zeros(1, *backbone.sample_shape)
    t = torch.tensor([500])
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        backbone.policy_eps(x, t, cond)
    unet = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        backbone.decode(x)
    return unet, fc.get_total_flops()


def sd15_meta_flops(steps: int) -> dict[str, float]:
    """FLOPs of the real SD1.5 UNet (one row, 4×64×64) and VAE decode (512²), counted on the meta
    device (shapes only: no memory, no compute, so it runs anywhere)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.tasks.sd_utils import sd15_unet_config, sd15_vae_config

    with torch.device("meta"), torch.no_grad():
        unet, vae = UNet2DConditionModel(**sd15_unet_config()), AutoencoderKL(**sd15_vae_config())
        x = torch.zeros(1, 4, 64, 64)
        with FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor([500]), encoder_hidden_states=torch.zeros(1, 77, 768))
        u = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            vae.decode(x)
        v = fc.get_total_flops()
    return {"unet_gflops_per_row": u / 1e9, "vae_decode_gflops": v / 1e9, "sampling_gflops_per_image": (2 * steps * u + v) / 1e9,
            "unet_params_millions": sum(p.numel() for p in unet.parameters()) / 1e6}


def time_sampling(backbone: Any, sampler: SamplerConfig, batch: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Images/s of the no-grad CFG sampler + VAE decode (policy UNet with its LoRA, as in training)."""
    grid = backbone.schedule.grid(sampler.steps)
    g = torch.Generator().manual_seed(0)
    cond = backbone.encode_prompts(["a photo of a cat"] * batch)

    def once() -> None:
        x_T, z = draw_noise(g, batch, sampler.steps, backbone.sample_shape)
        traj = rollout(backbone.policy, grid, cond, x_T, z, eta=sampler.eta, guidance=sampler.guidance,
                       null_cond=backbone.null_cond(cond), keep_latents=False)
        with torch.no_grad():
            backbone.decode(traj.x0)

    once()  # warm-up (kernels, allocator)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    sync(device)
    dt = (time.perf_counter() - t0) / repeats
    return {"batch": batch, "seconds_per_batch": dt, "images_per_s": batch / dt, "peak_gib": peak_gib(device)}


def method_config(name: str, batch: int) -> Any:
    """The method's defaults (the paper's settings) with the batch fields set to `batch`."""
    cls = METHODS.get(name).Config
    names = {f.name for f in fields(cls)}
    over: dict[str, Any] = {}
    for f in ("batch_size", "rollouts_per_step"):
        if f in names:
            over[f] = batch
    if "samples_per_iteration" in names:  # DDPO: B fresh trajectories, one minibatch of B, no accumulation
        over.update(samples_per_iteration=batch, minibatch_size=batch, gradient_accumulation_steps=1, stat_min_count=1)
    return cls(**{k: v for k, v in over.items() if k in names})


def time_method(name: str, backbone: Any, reward: Any, sampler: SamplerConfig, batch: int, repeats: int,
                device: torch.device) -> dict[str, Any]:
    """Seconds per train_step (split by phase) and peak memory of one registered method."""
    from bench.core.method import TrainContext

    clock = PhaseClock()
    ctx = TrainContext(backbone, CountingReward(reward, clock), ["a photo of a cat", "a dog"], 2.44e-4, sampler, 0, clock, None)
    method = METHODS.get(name)(method_config(name, batch), ctx)
    method.train_step()  # warm-up; SQDF also loads its LCM UNet here
    reset_peak(device)
    clock.seconds.clear()
    t0 = time.perf_counter()
    for _ in range(repeats):
        with clock("other"):
            method.train_step()
    sync(device)
    dt = (time.perf_counter() - t0) / repeats
    phases = {k: v / repeats for k, v in clock.state_dict().items()}
    del method
    return {"batch": batch, "seconds_per_update": dt, "phases": phases, "peak_gib": peak_gib(device)}


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Run a measurement; an out-of-memory error becomes a row instead of a crash."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # record and go on with the next measurement
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "trace": traceback.format_exc(limit=3)}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---- report --------------------------------------------------------------------------------------


def write_markdown(res: dict[str, Any], path: Path) -> None:
    s = res["settings"]
    lines = [f"# SD1.5 fine-tuning throughput: {res['device_label']}", ""]
    if s["tiny"]:
        lines += ["**CPU smoke run on the tiny test models (`--tiny`): these numbers only show that the script runs; "
                  "they say nothing about SD1.5 throughput.**", ""]
    lines += [f"Models: {s['models']}. {s['resolution']}² images, {s['steps']} DDIM steps, η = {s['eta']}, CFG {s['guidance']}, "
              f"LoRA rank {s['lora_rank']}, {s['dtype']}, gradient checkpointing of UNet and VAE decoder on. "
              f"Mean of {s['repeats']} repeats after one warm-up. Generated at git `{res['provenance']['git_sha']}` "
              f"({res['provenance']['time']}, torch {res['provenance']['versions'].get('torch')}, {s['torch_threads']} CPU threads, "
              f"load average {s['load_average_at_start'][0]:.1f} at the start, {s['load_average_at_end'][0]:.1f} at the end).", ""]
    f = res["flops"]
    lines += [f"UNet: {f['unet_gflops_per_row']:.4g} GFLOP per row (one CFG step of one image = 2 rows); VAE decode "
              f"{f['vae_decode_gflops']:.4g} GFLOP per image; sampling one image = {f['sampling_gflops_per_image']:.4g} GFLOP "
              "(torch.utils.flop_counter; a multiply-add counts 2)."]
    if f.get("peak_tflops"):
        lines.append(f"GPU peak (dense fp16/bf16): {f['peak_tflops']:.0f} TFLOP/s.")
    m = res.get("flops_sd15_architecture")
    if m:
        h100 = PEAK_TFLOPS["H100 SXM"] * 1e3 / m["sampling_gflops_per_image"]
        lines += ["", f"For reference, the real SD1.5 architecture (counted on the meta device, whatever ran above): UNet "
                  f"{m['unet_params_millions']:.0f} M parameters, {m['unet_gflops_per_row']:.1f} GFLOP per row at 4×64×64; VAE decode "
                  f"{m['vae_decode_gflops']:.0f} GFLOP per 512² image; 50-step CFG sampling {m['sampling_gflops_per_image'] / 1e3:.1f} TFLOP "
                  f"per image, i.e. at most {h100:.1f} images/s on an H100 SXM at 100 % of its {PEAK_TFLOPS['H100 SXM']:.0f} TFLOP/s."]
    lines += ["", "## Sampling (no grad, CFG, + VAE decode)", "", "| batch | s / batch | images / s | achieved TFLOP/s | % of peak | peak GiB |",
              "|---|---|---|---|---|---|"]
    for r in res["sampling"]:
        if "error" in r:
            lines.append(f"| {r.get('batch', '')} | {r['error']} | | | | |")
            continue
        tf = r["images_per_s"] * f["sampling_gflops_per_image"] / 1e3
        pct = f"{100 * tf / f['peak_tflops']:.1f}" if f.get("peak_tflops") else "—"
        lines.append(f"| {r['batch']} | {r['seconds_per_batch']:.3f} | {r['images_per_s']:.3f} | {tf:.3g} | {pct} | {_gib(r['peak_gib'])} |")
    lines += ["", "## One update per method", "",
              "Batch = trajectories and transitions per update (each method's batch fields; other settings are its defaults). "
              "Phases as the runner's clock splits them (a method that samples with gradients, such as DRaFT, books its rollout "
              "under update). The methods train one shared LoRA one after the other; timings do not depend on its values.", "",
              "| method | batch | s / update | sampling s | reward s | update s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for name, rows in res["methods"].items():
        if isinstance(rows, str):
            lines.append(f"| {name} | — | {rows} | | | | |")
            continue
        for r in rows:
            if "error" in r:
                lines.append(f"| {name} | {r.get('batch', '')} | {r['error']} | | | | |")
                continue
            ph = r["phases"]
            lines.append(f"| {name} | {r['batch']} | {r['seconds_per_update']:.3f} | {ph.get('sampling', 0):.3f} | "
                         f"{ph.get('reward', 0):.3f} | {ph.get('update', 0):.3f} | {_gib(r['peak_gib'])} |")
    path.write_text("\n".join(lines) + "\n")


def _gib(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny test models on the CPU, 10 steps (a smoke run)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="fp16 (GPU default) or bf16; fp32 with --tiny")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,2,4; --tiny: 1,2)")
    ap.add_argument("--methods", default=",".join(PAPER_METHODS), help="registered method names to time")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --tiny: 10)")
    ap.add_argument("--repeats", type=int, default=2, help="timed repetitions after one warm-up")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    size = "tiny" if args.tiny else "sd15"
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; run on a GPU, or use --tiny for the CPU smoke run")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if device.type == "cpu" else "fp16")]
    batches = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,2,4")).split(",")]
    sampler = SamplerConfig(steps=args.steps or (10 if args.tiny else 50), eta=1.0, guidance=5.0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the SQDF code (accelerate's TF32 default)
        torch.backends.cudnn.allow_tf32 = True

    t0 = time.perf_counter()
    backbone, reward = build(size, device, dtype, args.lora_rank)
    build_s = time.perf_counter() - t0
    unet_f, vae_f = unet_flops(backbone)
    label = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu") + ("-tiny" if args.tiny else "")
    peak = peak_tflops(label) if device.type == "cuda" else None
    res: dict[str, Any] = {
        "device_label": label,
        "settings": {"tiny": args.tiny, "models": "tiny test models (bench/tasks/sd_utils.py)" if args.tiny else
                     "SD1.5 architecture, random init (UNet 860 M, VAE 84 M, CLIP-L text 123 M) + LAION aesthetic on a random CLIP ViT-L/14",
                     "resolution": backbone.resolution, "steps": sampler.steps, "eta": sampler.eta, "guidance": sampler.guidance,
                     "lora_rank": args.lora_rank, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                     "batch_sizes": batches, "repeats": args.repeats, "build_seconds": build_s, "torch_threads": torch.get_num_threads(),
                     "load_average_at_start": list(os.getloadavg()),
                     "trainable_params": sum(p.numel() for p in backbone.trainable_parameters())},
        "flops": {"unet_gflops_per_row": unet_f / 1e9, "vae_decode_gflops": vae_f / 1e9,
                  "sampling_gflops_per_image": (2 * sampler.steps * unet_f + vae_f) / 1e9, "peak_tflops": peak},
        "flops_sd15_architecture": sd15_meta_flops(50),
        "sampling": [],
        "methods": {},
        "provenance": snapshot(str(device)),
    }
    for b in batches:
        row = guarded(lambda: time_sampling(backbone, sampler, b, args.repeats, device), device)
        res["sampling"].append({"batch": b, **row})
        print(f"sampling b={b}: {row}", flush=True)
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in METHODS:
            res["methods"][name] = f"skipped: method {name!r} is not registered (known: {', '.join(METHODS.names())})"
            continue
        rows = []
        for b in batches:
            row = guarded(lambda: time_method(name, backbone, reward, sampler, b, args.repeats, device), device)
            for p in backbone.trainable_parameters():
                p.grad = None
            rows.append({"batch": b, **row})
            print(f"{name} b={b}: {row}", flush=True)
        res["methods"][name] = rows
    res["settings"]["load_average_at_end"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    out = args.out / f"sd15_throughput_{slug}.json"
    out.write_text(json.dumps(res, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)) + "\n")
    write_markdown(res, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
