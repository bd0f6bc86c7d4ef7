"""Stable Diffusion plumbing shared by the SD tasks and the throughput benchmark.

What lives here (and not in `bench/tasks/sd.py`, which reads top to bottom as the task):
* the SD1.5 noise schedule (scaled-linear β 0.00085 … 0.012, "leading" spacing, steps_offset 1,
  set_alpha_to_one False: the DDIM settings of every SD1.5 alignment code, docs/tasks/sd.md §1);
* component configs: the real SD1.5 architecture (UNet 860 M, VAE, CLIP ViT-L/14 text tower) for
  random-init benchmarks, and the tiny test architecture (docs/tasks/sd.md §8);
* the CLIP BPE tokenizer built offline from open_clip's bundled vocabulary (docs/tasks/sd.md §8),
  cached on disk: SD1.x's tokenizer is exactly this vocabulary, padded with <|endoftext|>;
* weight resolution (a local folder, $ENV, or the Hugging Face cache; never a download when
  HF_HUB_OFFLINE=1), raising `MissingWeightsError` with one line naming the missing file;
* LoRA I/O in the format diffusers pipelines load (`StableDiffusionPipeline.load_lora_weights`);
* the Latent Consistency Model's timestep grid and boundary scalings (Luo et al. 2023, "Latent
  Consistency Models", arXiv:2310.04378; diffusers `LCMScheduler`), used by SQDF's f_ψ.

diffusers, transformers, peft and open_clip are imported inside functions only, so importing this
module (and `bench ls`, and the mixture tasks) never loads them.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor

from bench.core.diffusion import NoiseSchedule
from bench.core.errors import BenchError
from bench.core.weights import LORA_FILE, offline_clip_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
"the maintained SD1.5 repository (runwayml/stable-diffusion-v1-5 was taken down in 2024)"
LCM_LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"
"LCM-LoRA for SD1.5 (Luo et al. 2023, arXiv:2311.05556), SQDF's consistency model f_ψ"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"attention projections of every self- and cross-attention block (TRL/AlignProp/SQDF; docs/tasks/sd.md §3)"


# --------------------------------------------------------------------------------------------------
# Schedule, devices, dtypes
# --------------------------------------------------------------------------------------------------


def sd15_schedule() -> NoiseSchedule:
    """SD1.5's DDIM schedule: scaled-linear β 0.00085 … 0.012 over 1000 steps, leading, offset 1, ᾱ_final = ᾱ_0."""
    return NoiseSchedule.make("scaled_linear", 0.00085, 0.012, 1000, set_alpha_to_one=False, steps_offset=1, spacing="leading")


def check_scheduler_config(root: Path) -> None:
    """Refuse a model folder whose scheduler config differs from the schedule the task assumes."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    expect = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    bad = {k: cfg[k] for k, v in expect.items() if k in cfg and cfg[k] != v}
    if bad:
        raise BenchError(f"{path} has {bad}; the sd15 task assumes SD1.5's schedule {expect}")


def resolve_device(spec: str) -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise BenchError(f"task.device must be auto, cpu, cuda or cuda:<i>; got {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"task.device={spec} but CUDA is not available; use task.device=cpu")
    return dev


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """"auto" -> fp16 on CUDA (the paper's setting), fp32 on CPU; else fp32 / fp16 / bf16."""
    if spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise BenchError(f"task.dtype must be auto, fp32, fp16 or bf16; got {spec!r}")
    return _DTYPES[spec]


# --------------------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------------------


def sd15_unet_config() -> dict[str, Any]:
    """The SD1.5 UNet2DConditionModel architecture (860 M parameters, 4×64×64 latents)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False, mid_block_scale_factor=1,
    )


def sd15_vae_config() -> dict[str, Any]:
    """The SD1.x AutoencoderKL (×8 downsampling, 4 latent channels, scaling factor 0.18215)."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
        act_fn="silu", sample_size=512, scaling_factor=0.18215,
    )


def sd15_text_config() -> dict[str, Any]:
    """The CLIP ViT-L/14 text tower SD1.x conditions on (123 M parameters, hidden 768)."""
    return dict(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def tiny_unet_config() -> dict[str, Any]:
    """A 0.8 M-parameter UNet of the same family (docs/tasks/sd.md §8, at 4×8×8 latents instead of
    4×16×16: a quarter of the CPU time, the same code path)."""
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8,
    )


def tiny_vae_config() -> dict[str, Any]:
    """A 0.7 M-parameter AutoencoderKL (×2 downsampling): 4×8×8 latents <-> 3×16×16 images."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )


def tiny_text_config() -> dict[str, Any]:
    """A 1.6 M-parameter CLIP text tower (hidden 32, 2 layers) over the real 49408-token vocabulary."""
    return dict(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
    )


@dataclass
class SDComponents:
    """The pieces of an SD pipeline the backbone uses (no scheduler: bench.core.diffusion is the sampler)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    source: str
    "where the weights came from (a folder, or 'random-init:<size>:seed=<s>')"


def random_components(size: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDComponents:
    """Random-init components built from configs, deterministically from `seed` (no download).

    Args:
        size: "tiny" (docs/tasks/sd.md §8) or "sd15" (the real SD1.5 architecture).
        seed: initializes every weight (the global RNG is forked, not touched).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size == "tiny":
        cfgs = tiny_unet_config(), tiny_vae_config(), tiny_text_config()
    elif size == "sd15":
        cfgs = sd15_unet_config(), sd15_vae_config(), sd15_text_config()
    else:
        raise BenchError(f"unknown SD component size {size!r}; known: tiny, sd15")
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs[0])
        vae = AutoencoderKL(**cfgs[1])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs[2]))
    with quiet_diffusers():
        for m in (unet, vae, text_encoder):
            m.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, offline_clip_tokenizer(), f"random-init:{size}:seed={seed}")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' info/warning chatter (casting notes, unused text-encoder LoRA keys)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def load_unet(root: Path, dtype: torch.dtype, device: torch.device, variant: str = "") -> Any:
    """The frozen UNet of a local diffusers SD folder, in `dtype` on `device`."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=dtype, **({"variant": variant} if variant else {}))
    return unet.to(device).requires_grad_(False).eval()


def load_components(root: Path, dtype: torch.dtype, device: torch.device, variant: str = "") -> SDComponents:
    """UNet, VAE, text encoder and tokenizer of a local diffusers SD folder, frozen, in `dtype`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    check_scheduler_config(root)
    var = {"variant": variant} if variant else {}
    unet = load_unet(root, dtype, device, variant)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=dtype, **var)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", dtype=dtype, **var)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    for m in (vae, text_encoder):
        m.to(device).requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, str(root))


# --------------------------------------------------------------------------------------------------
# LoRA I/O in the diffusers pipeline format
# --------------------------------------------------------------------------------------------------


def add_lora(unet: "nn.Module", rank: int, targets: tuple[str, ...], seed: int) -> list[torch.nn.Parameter]:
    """Attach a trainable PEFT LoRA (A Gaussian, B = 0, scale lora_alpha/r = 1) and return its
    parameters, upcast to fp32 while the frozen base keeps its dtype (TRL/SQDF; docs/tasks/sd.md §3).
    A's initialization draws from a forked RNG seeded with `seed`."""
    from peft import LoraConfig

    device = next(unet.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    params = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
        else:
            p.requires_grad_(False)
    if not params:
        raise BenchError(f"task.lora_targets {targets} matched no module of the UNet")
    return params


def lora_layers(unet: "nn.Module") -> list[Any]:
    """The PEFT tuner layers of a UNet (what `adapters_enabled` switches)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_enabled(layers: list[Any], on: bool) -> Iterator[None]:
    """Switch LoRA adapters on/off for a block of code, restoring the previous state.

    Sets each layer's `_disable_adapters` flag directly: peft's public `enable_adapters()` also
    flips `requires_grad` of the LoRA weights, which must not happen while an autograd graph that
    holds them is alive (e.g. the reference call between a policy forward and its backward).
    """
    prev = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = not on
    try:
        yield
    finally:
        for layer, p in zip(layers, prev):
            layer._disable_adapters = p


def save_unet_lora(unet: "nn.Module", path: Path, adapter: str = "default", info: dict[str, Any] | None = None) -> Path:
    """Write the UNet's LoRA where `StableDiffusionPipeline.load_lora_weights(path)` finds it.

    Returns the folder. `info` (base model, task, rank) goes to `bench_lora.json` beside it.
    """
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # PEFT key names (lora_A / lora_B), which diffusers loads natively; the legacy conversion
    # (convert_state_dict_to_diffusers) renames only attention keys and leaves a mixed format
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    meta = unet.peft_config[adapter].to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=state, safe_serialization=True, unet_lora_adapter_metadata=meta)
    if info is not None:
        (path / "bench_lora.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    return path


def fuse_lora_into(components: SDComponents, unet: "nn.Module", lora_file: Path, adapter: str = "fused") -> None:
    """Load a LoRA file (any format diffusers reads: its own, kohya's, PEFT) into `unet` through
    the pipeline API and fuse it into the weights (scale 1), then drop the adapter layers."""
    import safetensors.torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    state = safetensors.torch.load_file(str(lora_file))
    with quiet_diffusers():
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.load_lora_weights(state, adapter_name=adapter)
        pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=[adapter])
        pipe.unload_lora_weights()
    unet.requires_grad_(False).eval()


def write_random_lora(unet_config: dict[str, Any], path: Path, rank: int, seed: int, targets: tuple[str, ...], scale: float = 0.05) -> Path:
    """A random LoRA (both A and B nonzero) for a UNet architecture, in the pipeline format: the
    stand-in for LCM-LoRA on the tiny task (its consistency model is a fixed perturbation of the
    base UNet, loaded and fused through the same code path as the real LCM-LoRA)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        add_lora(unet, rank, targets, seed)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, scale)
    save_unet_lora(unet, path)
    return path / LORA_FILE


# --------------------------------------------------------------------------------------------------
# Latent Consistency Model timesteps
# --------------------------------------------------------------------------------------------------


def lcm_timesteps(num_train_timesteps: int = 1000, original_steps: int = 50) -> Tensor:
    """The LCM distillation grid: k·(1..original_steps) − 1 with k = N / original_steps
    (SD1.5 LCM-LoRA: 19, 39, …, 999), ascending, long."""
    k = num_train_timesteps // original_steps
    return torch.arange(1, original_steps + 1, dtype=torch.long) * k - 1


def lcm_timestep(t: Tensor, grid: Tensor | None = None) -> Tensor:
    """The nearest LCM timestep to each DDIM timestep t (ties go to the lower one), as the SQDF
    code feeds x_{t−1} to the LCM: 961 -> 959, 21 -> 19, 1 -> 19 (docs/tasks/sd.md §4)."""
    grid = lcm_timesteps() if grid is None else grid
    t = torch.as_tensor(t, dtype=torch.long)
    d = (t.reshape(-1, 1) - grid.to(t.device).reshape(1, -1)).abs()
    return grid.to(t.device)[d.argmin(dim=1)].reshape(t.shape)


def lcm_boundary_scalings(t: Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[Tensor, Tensor]:
    """c_skip(t) = σ_d² / ((s t)² + σ_d²), c_out(t) = s t / √((s t)² + σ_d²) (LCM's boundary
    condition, diffusers LCMScheduler with timestep_scaling s = 10, σ_d = 0.5). float64 [B]."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


# --------------------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------------------

PROMPT_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"


def read_prompt_file(path: Path) -> list[str]:
    """Non-empty, stripped lines of a text file (a JSON list of strings is accepted too)."""
    path = Path(path)
    if not path.exists():
        raise BenchError(f"prompt file {path} not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise BenchError(f"{path}: expected a JSON list of prompt strings")
        return [p.strip() for p in data if p.strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
"the four styles of the HPSv2 benchmark prompt set (Wu et al. 2023, arXiv:2306.09341), 800 prompts each"


def load_hpsv2_prompts(folder: str, styles: tuple[str, ...]) -> dict[str, list[str]]:
    """The HPSv2 benchmark prompts of `styles` from a user-supplied folder.

    The folder holds one file per style, `<style>.json` (a JSON list, as the hpsv2 package ships
    them under `hpsv2/benchmark_prompts/`) or `<style>.txt` (one prompt per line). Set it with
    `--set task.hpsv2_dir=...` or $BENCH_HPSV2_PROMPTS. The prompts are not redistributed here.
    """
    folder = folder or os.environ.get("BENCH_HPSV2_PROMPTS", "")
    if not folder:
        raise BenchError("task.prompts=hpsv2 needs the HPSv2 benchmark prompt files: set task.hpsv2_dir=<folder> or $BENCH_HPSV2_PROMPTS "
                         "(a folder with anime.json, concept-art.json, paintings.json, photo.json, e.g. hpsv2/benchmark_prompts)")
    out = {}
    for s in styles:
        if s not in HPSV2_STYLES:
            raise BenchError(f"unknown HPSv2 style {s!r}; known: {', '.join(HPSV2_STYLES)}")
        cands = [Path(folder) / f"{s}.json", Path(folder) / f"{s}.txt"]
        hit = next((c for c in cands if c.exists()), None)
        if hit is None:
            raise BenchError(f"HPSv2 prompt file for style {s!r} not found: expected {cands[0]} or {cands[1]}")
        out[s] = read_prompt_file(hit)
    return out
