"""Throughput of Stable Diffusion 1.5 fine-tuning at the paper's settings, on random weights.

Builds SD1.5-sized models from the real configs (UNet 860 M, VAE, CLIP ViT-L/14 text tower, LoRA
rank 4 on the attention projections; random init, nothing downloaded), a full-size LAION-aesthetic
reward (CLIP ViT-L/14 vision tower + MLP, random init) and runs, at 512², 50 DDIM steps, η = 1,
CFG 5, in fp16 (or bf16):

* matmul peak (`--matmul-n N`): the GPU's achieved dense matmul rate in the run's dtype, timed on
  one N³ product (mean of 10 after 3 warm-ups), the measured ceiling the sampler is set against
  (the data-sheet peak is kept as a second reference);
* sampling: images/s of the no-grad 50-step CFG sampler plus VAE decode, at a few batch sizes; with
  `--compare-diffusers`, diffusers' `StableDiffusionPipeline` built from the SAME modules (UNet with
  the same LoRA, VAE, text encoder, tokenizer) and a DDIMScheduler with SD1.5's settings runs the
  same batches in the same process, interleaved with ours (ABBA order), each after a short warm-up
  at the same shapes;
* one update of each method (`--methods all`: every registered one; default SQDF, DRaFT-1, ReFL,
  DDPO; their own train_step, through the same backbone the sd15 task builds): wall time split into
  the runner's phases (sampling, reward, update) and the peak GPU memory, at a few batch sizes
  (batch = rollouts and transitions per update), all methods at the smallest batch first; a method
  that is not registered, or that fails (out of memory, an online method that needs its task's
  oracle features), is recorded and the others go on;
* the UNet's FLOPs per call (torch.utils.flop_counter), so that the sampler's achieved FLOP/s can
  be set against the peak.

`--budget S` gives the whole run S seconds: each phase gets a deadline (a SIGALRM stops a
measurement that outruns it), a measurement whose estimate does not fit is skipped, and both are
recorded. The JSON and Markdown are rewritten after every measurement, so a killed run leaves what
it measured. Writes <out>/sd15_throughput_<device>.json and .md (`--out`, default results/benchmarks).

    python scripts/bench_sd_throughput.py                       # GPU, fp16, batch sizes 1,2,4
    python scripts/bench_sd_throughput.py --dtype bf16 --batch-sizes 1,4,8
    python scripts/bench_sd_throughput.py --tiny                # CPU smoke run on the tiny models
    bash scripts/gpu_check.sh                                   # the whole GPU check (see its header)

`--tiny` swaps in the tiny test models (bench/tasks/sd_utils.py) at 10 steps on the CPU: those numbers
only show that the script works; they say nothing about SD1.5 throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.core.clock import PhaseClock  # noqa: E402
from bench.core.diffusion import draw_noise, rollout  # noqa: E402
from bench.core.io import write_text  # noqa: E402
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

PROMPT = "a photo of a cat"


def peak_tflops(name: str) -> float | None:
    for frag, tf in PEAK_TFLOPS.items():
        if frag.lower() in name.lower():
            return tf
    return None


# ---- deadlines -----------------------------------------------------------------------------------


class PhaseTimeout(BaseException):
    """A measurement ran past its deadline (a BaseException, so that no library's `except Exception`
    swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise PhaseTimeout in the enclosed code after `seconds` (SIGALRM; main thread only, else no limit).
    A running C/CUDA call finishes first: the limit is checked between Python bytecodes."""
    usable = seconds is not None and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    assert seconds is not None
    if seconds <= 0:
        raise PhaseTimeout("no time left")

    def on_alarm(signum: int, frame: Any) -> None:
        raise PhaseTimeout(f"stopped at its {seconds:.0f} s deadline")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Budget:
    """The run's wall-clock allowance: `end` on the monotonic clock, or None (no limit)."""

    end: float | None = None

    def left(self) -> float:
        return math.inf if self.end is None else self.end - time.monotonic()

    def share(self, frac: float) -> "Budget":
        """A phase budget: `frac` of what is left now."""
        return Budget(None if self.end is None else time.monotonic() + frac * max(self.left(), 0.0))

    def limit(self, cap: float | None = None) -> float | None:
        """Seconds one measurement may take: what is left, at most `cap`."""
        left = self.left()
        lim = min(left, cap) if cap else left
        return None if math.isinf(lim) else lim

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


def matmul_peak(device: torch.device, n: int, dtype: torch.dtype, warmup: int = 3, repeats: int = 10) -> dict[str, Any]:
    """Achieved dense matmul rate: one n×n @ n×n product (2n³ FLOP) in `dtype`, timed `repeats`
    times after `warmup` untimed ones (CUDA events on a GPU); the mean time gives `tflops`."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(warmup):
        torch.matmul(a, b)
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t0)
    flop = 2.0 * n**3
    mean = sum(times) / len(times)
    del a, b
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "warmup": warmup, "repeats": repeats, "seconds_mean": mean,
            "tflops": flop / mean / 1e12, "tflops_best": flop / min(times) / 1e12, "tflops_worst": flop / max(times) / 1e12}


def diffusers_pipeline(backbone: Any) -> Any:
    """diffusers' StableDiffusionPipeline over the backbone's own modules (the UNet keeps its LoRA,
    so both samplers run the same network) and a DDIMScheduler with SD1.5's settings
    (bench/tasks/sd_utils.py: sd15_schedule)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from bench.tasks.sd_utils import quiet_diffusers

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                          prediction_type="epsilon")
    with quiet_diffusers():
        pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                       unet=backbone.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def schedules_agree(backbone: Any, pipe: Any, steps: int) -> bool:
    """Whether the pipeline's DDIM timesteps and ᾱ equal the ones our sampler uses."""
    grid = backbone.schedule.grid(steps)
    pipe.scheduler.set_timesteps(steps)
    ts = pipe.scheduler.timesteps.cpu().long()
    ac = pipe.scheduler.alphas_cumprod.double()
    return bool(torch.equal(ts, grid.timesteps.cpu().long())
                and torch.allclose(ac[ts], grid.alpha_bars.cpu().double(), rtol=1e-6, atol=0))


def bench_sampler(backbone: Any, sampler: SamplerConfig, batch: int) -> Callable[[int], None]:
    """One call = our training-time sampler: noise from a CPU generator, the CFG rollout with the
    policy (UNet + LoRA), VAE decode to [0, 1] images."""
    g = torch.Generator().manual_seed(0)

    def run(steps: int) -> None:
        cond = backbone.encode_prompts([PROMPT] * batch)  # cached per prompt after the first call
        x_T, z = draw_noise(g, batch, steps, backbone.sample_shape)
        traj = rollout(backbone.policy, backbone.schedule.grid(steps), cond, x_T, z, eta=sampler.eta,
                       guidance=sampler.guidance, null_cond=backbone.null_cond(cond), keep_latents=False)
        with torch.no_grad():
            backbone.decode(traj.x0)

    return run


def diffusers_sampler(pipe: Any, backbone: Any, sampler: SamplerConfig, batch: int, device: torch.device) -> Callable[[int], None]:
    """One call = StableDiffusionPipeline(prompt, η, CFG, steps) to [0, 1] image tensors."""
    g = torch.Generator(device=device).manual_seed(0)

    def run(steps: int) -> None:
        pipe([PROMPT] * batch, height=backbone.resolution, width=backbone.resolution, num_inference_steps=steps,
             guidance_scale=sampler.guidance, eta=sampler.eta, generator=g, output_type="pt")

    return run


def time_samplers(runners: dict[str, Callable[[int], None]], steps: int, batch: int, repeats: int,
                  warmup_steps: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Images/s of each sampler at one batch size, in the same process: one warm-up call each at the
    same shapes (`warmup_steps` steps), then `repeats` timed calls each, interleaved A B B A …"""
    for run in runners.values():
        run(warmup_steps)
    times: dict[str, list[float]] = {k: [] for k in runners}
    peaks: dict[str, float | None] = {k: None for k in runners}
    for r in range(repeats):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            reset_peak(device)
            t0 = time.perf_counter()
            runners[name](steps)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            p = peak_gib(device)
            peaks[name] = p if peaks[name] is None else max(peaks[name] or 0.0, p or 0.0)
    out = {}
    for name, ts in times.items():
        dt = sum(ts) / len(ts)
        out[name] = {"batch": batch, "seconds_per_batch": dt, "images_per_s": batch / dt, "peak_gib": peaks[name],
                     "seconds_each": ts}
    return out


def time_sampling(backbone: Any, sampler: SamplerConfig, batch: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Images/s of our sampler alone (full-length warm-up), as earlier versions of this script."""
    return time_samplers({"bench": bench_sampler(backbone, sampler, batch)}, sampler.steps, batch, repeats,
                         sampler.steps, device)["bench"]


def sampling_phase(backbone: Any, sampler: SamplerConfig, batches: list[int], args: argparse.Namespace, device: torch.device,
                   budget: Budget, res: dict[str, Any], save: Callable[[], None]) -> None:
    """Fill res["sampling"] (ours) and, with --compare-diffusers, res["sampling_diffusers"], smallest
    batch first; a batch size whose estimate (last one's time scaled by the batch) does not fit is skipped."""
    pipe = diffusers_pipeline(backbone) if args.compare_diffusers else None
    if pipe is not None:
        res["settings"]["diffusers_schedule_matches"] = schedules_agree(backbone, pipe, sampler.steps)
        res["sampling_diffusers"] = []
    warm = min(args.warmup_steps, sampler.steps)
    last: tuple[int, float] | None = None
    for b in batches:
        runners = {"bench": bench_sampler(backbone, sampler, b)}
        if pipe is not None:
            runners["diffusers"] = diffusers_sampler(pipe, backbone, sampler, b, device)
        est = None if last is None else last[1] * b / last[0]
        if est is not None and est > budget.left():
            rows: dict[str, Any] = {k: {"skipped": f"estimated {est:.0f} s, {max(budget.left(), 0):.0f} s left"} for k in runners}
        else:
            t0 = time.perf_counter()
            rows = guarded_many(lambda: time_samplers(runners, sampler.steps, b, args.repeats, warm, device), list(runners),
                                device, budget.limit(args.measure_cap))
            last = (b, time.perf_counter() - t0)
        res["sampling"].append({"batch": b, **rows["bench"]})
        if pipe is not None:
            res["sampling_diffusers"].append({"batch": b, **rows["diffusers"]})
        print(f"sampling b={b}: " + "; ".join(f"{k}: {_brief(v)}" for k, v in rows.items()), flush=True)
        save()
    del pipe

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
                device: torch.device, warmup: int = 1, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seconds per train_step (split by phase) and peak memory of one registered method, after
    `warmup` untimed steps (the first one also loads kernels and, for SQDF, its LCM UNet). The
    warm-up's time also goes to `progress` as soon as it is known (kept if the timed steps fail)."""
    from bench.core.method import TrainContext

    clock = PhaseClock()
    ctx = TrainContext(backbone, CountingReward(reward, clock), [PROMPT, "a dog"], 2.44e-4, sampler, 0, clock, None)
    method = METHODS.get(name)(method_config(name, batch), ctx)
    t0 = time.perf_counter()
    for _ in range(warmup):
        method.train_step()
    sync(device)
    warm_s = time.perf_counter() - t0
    if progress is not None and warmup:
        progress.update(warmup_steps=warmup, warmup_seconds=warm_s)
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
    return {"batch": batch, "seconds_per_update": dt, "phases": phases, "peak_gib": peak_gib(device),
            "warmup_steps": warmup, "warmup_seconds": warm_s, "repeats": repeats}


def guarded(fn: Callable[[], dict[str, Any]], device: torch.device, limit: float | None = None) -> dict[str, Any]:
    """Run a measurement within `limit` seconds; a timeout, an out-of-memory error or any other
    failure becomes a row instead of a crash."""
    try:
        with time_limit(limit):
            return fn()
    except PhaseTimeout as e:
        return {"error": f"timed out: {e}"}
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # record and go on with the next measurement
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "trace": traceback.format_exc(limit=3)}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()


def guarded_many(fn: Callable[[], dict[str, dict[str, Any]]], keys: list[str], device: torch.device,
                 limit: float | None) -> dict[str, dict[str, Any]]:
    """`guarded` for a measurement that returns one row per key (a failure is copied to every key)."""
    box: dict[str, Any] = {}

    def one() -> dict[str, Any]:
        box.update(fn())
        return {}

    err = guarded(one, device, limit)
    return {k: dict(err) if err else box[k] for k in keys}


def methods_phase(names: list[str], backbone: Any, reward: Any, sampler: SamplerConfig, batches: list[int],
                  args: argparse.Namespace, device: torch.device, budget: Budget, res: dict[str, Any],
                  save: Callable[[], None]) -> None:
    """Fill res["methods"][name] with one row per batch size: every method at the smallest batch
    first, then the next batch (the cheapest methods first), so that a short budget still covers every method once. A method
    warms up (`--method-warmup` steps) at its first batch only; a batch whose estimate (the method's
    last time scaled by the batch) does not fit, or that follows a timeout or out-of-memory error,
    is recorded as skipped."""
    last: dict[str, tuple[int, float]] = {}
    stop: dict[str, str] = {}
    for name in names:
        res["methods"][name] = []
    for i, b in enumerate(batches):
        order = names if i == 0 else sorted(names, key=lambda n: last[n][1] if n in last else math.inf)  # cheapest first
        for name in order:
            warm = args.method_warmup if name not in last else 0
            est = None if name not in last else last[name][1] * b / last[name][0] * (args.method_repeats + warm) / args.method_repeats
            if name in stop:
                row: dict[str, Any] = {"skipped": stop[name]}
            elif budget.left() < 1 or (est is not None and est > budget.left()):
                why = f"estimated {est:.0f} s, " if est is not None else ""
                row = {"skipped": f"{why}{max(budget.left(), 0):.0f} s left in the phase"}
            else:
                progress: dict[str, Any] = {}
                row = guarded(lambda: time_method(name, backbone, reward, sampler, b, args.method_repeats, device, warm, progress),
                              device, budget.limit(args.measure_cap))
                row = {**progress, **row}
            for p in backbone.trainable_parameters():
                p.grad = None
            if "seconds_per_update" in row:
                last[name] = (b, row["seconds_per_update"])
            elif row.get("error", "").startswith(("timed out", "out of memory")):
                stop[name] = f"after {row['error']!r} at batch {b}"
            res["methods"][name].append({"batch": b, **row})
            print(f"{name} b={b}: {_brief(row)}", flush=True)
            save()


def _brief(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                     if k not in ("trace", "phases", "seconds_each"))

# ---- report --------------------------------------------------------------------------------------


def write_markdown(res: dict[str, Any], path: Path) -> None:
    s = res["settings"]
    lines = [f"# SD1.5 fine-tuning throughput: {res['device_label']}", ""]
    if s["tiny"]:
        lines += ["**CPU smoke run on the tiny test models (`--tiny`): these numbers only show that the script runs; "
                  "they say nothing about SD1.5 throughput.**", ""]
    end = s.get("load_average_at_end") or s["load_average_at_start"]
    lines += [f"Models: {s['models']}. {s['resolution']}² images, {s['steps']} DDIM steps, η = {s['eta']}, CFG {s['guidance']}, "
              f"LoRA rank {s['lora_rank']}, {s['dtype']}, gradient checkpointing of UNet and VAE decoder on. "
              f"Sampling: mean of {s['repeats']} repeats after a warm-up; updates: mean of {s.get('method_repeats', s['repeats'])} "
              f"after {s.get('method_warmup', 1)} warm-up step(s) at each method's first batch. Generated at git "
              f"`{res['provenance']['git_sha']}` ({res['provenance']['time']}, torch {res['provenance']['versions'].get('torch')}, "
              f"diffusers {res['provenance']['versions'].get('diffusers')}, {s['torch_threads']} CPU threads, load average "
              f"{s['load_average_at_start'][0]:.1f} at the start, {end[0]:.1f} at the end).", ""]
    lines += _flops_lines(res) + _sampling_lines(res) + _method_lines(res) + _phase_lines(res)
    write_text(path, "\n".join(lines) + "\n")


def _flops_lines(res: dict[str, Any]) -> list[str]:
    f = res["flops"]
    lines = [f"UNet: {f['unet_gflops_per_row']:.4g} GFLOP per row (one CFG step of one image = 2 rows); VAE decode "
             f"{f['vae_decode_gflops']:.4g} GFLOP per image; sampling one image = {f['sampling_gflops_per_image']:.4g} GFLOP "
             "(torch.utils.flop_counter; a multiply-add counts 2)."]
    mm = res.get("matmul_peak") or {}
    if "tflops" in mm:
        lines.append(f"Measured matmul peak: {mm['tflops']:.4g} TFLOP/s ({mm['n']}³ {mm['dtype']} product, mean of {mm['repeats']} "
                     f"after {mm['warmup']} warm-ups; fastest {mm['tflops_best']:.4g}, slowest {mm['tflops_worst']:.4g}).")
    elif mm:
        lines.append(f"Measured matmul peak: not measured ({mm.get('error') or mm.get('skipped')}).")
    if f.get("peak_tflops"):
        lines.append(f"Data-sheet peak (dense fp16/bf16): {f['peak_tflops']:.0f} TFLOP/s.")
    m = res.get("flops_sd15_architecture")
    if m:
        h100 = PEAK_TFLOPS["H100 SXM"] * 1e3 / m["sampling_gflops_per_image"]
        lines += ["", f"For reference, the real SD1.5 architecture (counted on the meta device, whatever ran above): UNet "
                  f"{m['unet_params_millions']:.0f} M parameters, {m['unet_gflops_per_row']:.1f} GFLOP per row at 4×64×64; VAE decode "
                  f"{m['vae_decode_gflops']:.0f} GFLOP per 512² image; 50-step CFG sampling {m['sampling_gflops_per_image'] / 1e3:.1f} TFLOP "
                  f"per image, i.e. at most {h100:.1f} images/s on an H100 SXM at 100 % of its {PEAK_TFLOPS['H100 SXM']:.0f} TFLOP/s."]
    return lines


def _pct(tf: float, peak: float | None) -> str:
    return f"{100 * tf / peak:.1f}" if peak else "—"


def _sampling_lines(res: dict[str, Any]) -> list[str]:
    f = res["flops"]
    mm = (res.get("matmul_peak") or {}).get("tflops")
    diff = {r["batch"]: r for r in res.get("sampling_diffusers", [])}
    lines = ["", "## Sampling (no grad, CFG, + VAE decode)", ""]
    if diff:
        lines += ["`bench` is our sampler (bench/core/diffusion.py rollout, latents on the CPU as in training); `diffusers` is "
                  "StableDiffusionPipeline over the same modules and SD1.5's DDIM schedule "
                  f"(schedules identical: {res['settings'].get('diffusers_schedule_matches')}), timed interleaved in the same "
                  "process. ratio = bench images/s ÷ diffusers images/s (above 1: ours is faster). TFLOP/s = images/s × FLOP "
                  "per image; % of the measured matmul peak and of the data-sheet peak.", ""]
    lines += ["| batch | sampler | s / batch | images / s | ratio | achieved TFLOP/s | % measured peak | % data-sheet peak | peak GiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["sampling"]:
        rows = [("bench", r)] + ([("diffusers", diff[r["batch"]])] if r["batch"] in diff else [])
        for name, row in rows:
            if "images_per_s" not in row:
                lines.append(f"| {row['batch']} | {name} | {row.get('error') or row.get('skipped')} | | | | | | |")
                continue
            tf = row["images_per_s"] * f["sampling_gflops_per_image"] / 1e3
            d = diff.get(row["batch"], {})
            ratio = f"{r['images_per_s'] / d['images_per_s']:.3f}" if name == "bench" and "images_per_s" in d and "images_per_s" in r else ""
            lines.append(f"| {row['batch']} | {name} | {row['seconds_per_batch']:.3f} | {row['images_per_s']:.3f} | {ratio} | {tf:.3g} | "
                         f"{_pct(tf, mm)} | {_pct(tf, f.get('peak_tflops'))} | {_gib(row['peak_gib'])} |")
    return lines


def _method_lines(res: dict[str, Any]) -> list[str]:
    lines = ["", "## One update per method", "",
             "Batch = trajectories and transitions per update (each method's batch fields; other settings are its defaults). "
             "Phases as the runner's clock splits them (a method that samples with gradients, such as DRaFT, books its rollout "
             "under update). The methods train one shared LoRA one after the other; timings do not depend on its values. "
             "Online methods (seiko-*, sqdf-online) need their task's oracle features, which this script does not build.", "",
             "| method | batch | s / update | sampling s | reward s | update s | peak GiB |", "|---|---|---|---|---|---|---|"]
    for name, rows in res["methods"].items():
        if isinstance(rows, str):
            lines.append(f"| {name} | — | {rows} | | | | |")
            continue
        for r in rows:
            if "seconds_per_update" not in r:
                note = r.get("error") or f"skipped: {r.get('skipped')}"
                if "warmup_seconds" in r:
                    note += f" (after a {r['warmup_seconds']:.2f} s warm-up step)"
                lines.append(f"| {name} | {r.get('batch', '')} | {note} | | | | |")
                continue
            ph = r["phases"]
            lines.append(f"| {name} | {r['batch']} | {r['seconds_per_update']:.3f} | {ph.get('sampling', 0):.3f} | "
                         f"{ph.get('reward', 0):.3f} | {ph.get('update', 0):.3f} | {_gib(r['peak_gib'])} |")
    return lines


def _phase_lines(res: dict[str, Any]) -> list[str]:
    ph = res.get("phases") or {}
    if not ph:
        return []
    lines = ["", "## Phases", "", f"Budget: {res['settings'].get('budget_seconds') or 'none'} s.", "",
             "| phase | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', 0):.1f} |" for k, v in ph.items()]
    return lines


def _gib(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def save_results(res: dict[str, Any], out: Path) -> None:
    """Rewrite the JSON and the Markdown (atomically), as they stand."""
    res["settings"]["load_average_at_end"] = list(os.getloadavg())
    write_text(out, json.dumps(res, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)) + "\n")
    write_markdown(res, out.with_suffix(".md"))

# ---- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny test models on the CPU, 10 steps (a smoke run)")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (default with --tiny)")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="fp16 (GPU default) or bf16; fp32 with --tiny")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated sampling batch sizes (default 1,2,4; --tiny: 1,2)")
    ap.add_argument("--method-batch-sizes", default=None, help="batch sizes of the method updates (default: --batch-sizes)")
    ap.add_argument("--methods", default=",".join(PAPER_METHODS), help="registered method names to time, or 'all'")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; --tiny: 10)")
    ap.add_argument("--repeats", type=int, default=2, help="timed sampling repetitions after the warm-up")
    ap.add_argument("--method-repeats", type=int, default=None, help="timed train_steps per method and batch (default: --repeats)")
    ap.add_argument("--method-warmup", type=int, default=1, help="untimed train_steps at each method's first batch size")
    ap.add_argument("--warmup-steps", type=int, default=None, help="steps of the sampling warm-up call (default: all of them)")
    ap.add_argument("--compare-diffusers", action="store_true", help="also time diffusers' StableDiffusionPipeline on the same modules")
    ap.add_argument("--matmul-n", type=int, default=0, help="measure the matmul peak on an N³ product in the run's dtype (0: skip)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole run; phases get deadlines (0: no limit)")
    ap.add_argument("--deadline", type=float, default=0, help="end the run by this Unix time (seconds; with --budget, the earlier wins)")
    ap.add_argument("--sampling-share", type=float, default=0.3, help="share of the time left that the sampling phase may use")
    ap.add_argument("--measure-cap", type=float, default=0, help="at most this many seconds per measurement (0: no cap)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; run on a GPU, or use --tiny for the CPU smoke run")
    args.method_repeats = args.method_repeats or args.repeats
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,2,4")).split(",")]
    args.method_batch_sizes = [int(b) for b in args.method_batch_sizes.split(",")] if args.method_batch_sizes else args.batch_sizes
    args.steps = args.steps or (10 if args.tiny else 50)
    args.warmup_steps = args.warmup_steps or args.steps
    return args


def initial_results(args: argparse.Namespace, backbone: Any, sampler: SamplerConfig, dtype: torch.dtype, build_s: float) -> dict[str, Any]:
    device = args.device
    unet_f, vae_f = unet_flops(backbone)
    label = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu") + ("-tiny" if args.tiny else "")
    return {
        "device_label": label,
        "settings": {"tiny": args.tiny, "models": "tiny test models (bench/tasks/sd_utils.py)" if args.tiny else
                     "SD1.5 architecture, random init (UNet 860 M, VAE 84 M, CLIP-L text 123 M) + LAION aesthetic on a random CLIP ViT-L/14",
                     "resolution": backbone.resolution, "steps": sampler.steps, "eta": sampler.eta, "guidance": sampler.guidance,
                     "lora_rank": args.lora_rank, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
                     "batch_sizes": args.batch_sizes, "method_batch_sizes": args.method_batch_sizes, "repeats": args.repeats,
                     "method_repeats": args.method_repeats, "method_warmup": args.method_warmup, "warmup_steps": args.warmup_steps,
                     "budget_seconds": args.budget or None, "build_seconds": build_s, "torch_threads": torch.get_num_threads(),
                     "load_average_at_start": list(os.getloadavg()),
                     "trainable_params": sum(p.numel() for p in backbone.trainable_parameters())},
        "flops": {"unet_gflops_per_row": unet_f / 1e9, "vae_decode_gflops": vae_f / 1e9,
                  "sampling_gflops_per_image": (2 * sampler.steps * unet_f + vae_f) / 1e9,
                  "peak_tflops": peak_tflops(label) if device.type == "cuda" else None},
        "flops_sd15_architecture": sd15_meta_flops(50),
        "matmul_peak": None,
        "sampling": [],
        "methods": {},
        "phases": {},
        "provenance": snapshot(str(device)),
    }


@contextlib.contextmanager
def phase(res: dict[str, Any], name: str, save: Callable[[], None]) -> Iterator[None]:
    """Record a phase's wall time and status in res["phases"]; an exception is recorded, not raised."""
    t0 = time.perf_counter()
    res["phases"][name] = {"status": "running"}
    try:
        yield
        res["phases"][name] = {"status": "done", "seconds": time.perf_counter() - t0}
    except Exception as e:  # recorded; the next phase still runs
        traceback.print_exc()
        res["phases"][name] = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                               "seconds": time.perf_counter() - t0}
    finally:
        save()


def method_names(spec: str, res: dict[str, Any]) -> list[str]:
    """The registered names asked for ('all': every one); the others are recorded as skipped."""
    asked = METHODS.names() if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    names = []
    for name in asked:
        if name in METHODS:
            names.append(name)
        else:
            res["methods"][name] = f"skipped: method {name!r} is not registered (known: {', '.join(METHODS.names())})"
    return names


def main(argv: list[str] | None = None) -> Path:
    start = time.monotonic()
    args = parse_args(argv)
    ends = [start + args.budget] if args.budget else []
    ends += [start + args.deadline - time.time()] if args.deadline else []
    budget = Budget(min(ends) if ends else None)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if device.type == "cpu" else "fp16")]
    sampler = SamplerConfig(steps=args.steps, eta=1.0, guidance=5.0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the SQDF code (accelerate's TF32 default)
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.perf_counter()
    backbone, reward = build("tiny" if args.tiny else "sd15", device, dtype, args.lora_rank)
    res = initial_results(args, backbone, sampler, dtype, time.perf_counter() - t0)
    res["settings"]["budget_seconds"] = None if budget.end is None else round(budget.end - start)
    slug = "".join(c if c.isalnum() else "-" for c in res["device_label"].lower()).strip("-")
    out = args.out / f"sd15_throughput_{slug}.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        save_results(res, out)

    if args.matmul_n:
        with phase(res, "matmul_peak", save):
            res["matmul_peak"] = guarded(lambda: matmul_peak(device, args.matmul_n, dtype), device, budget.limit(60))
            print(f"matmul peak: {_brief(res['matmul_peak'])}", flush=True)
    with phase(res, "sampling", save):
        sampling_phase(backbone, sampler, args.batch_sizes, args, device, budget.share(args.sampling_share), res, save)
    with phase(res, "methods", save):
        names = method_names(args.methods, res)
        methods_phase(names, backbone, reward, sampler, args.method_batch_sizes, args, device, budget, res, save)
    res["settings"]["total_seconds"] = time.monotonic() - start
    save()
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
