"""Stable Diffusion 1.5 with LoRA, as reward fine-tuning papers run it (DDPO, DRaFT, ReFL, SQDF).

Model: Rombach et al. "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022,
arXiv:2112.10752; weights `stable-diffusion-v1-5/stable-diffusion-v1-5` (the maintained copy of
runwayml's repository). Trainable part: LoRA (Hu et al., arXiv:2106.09685) on the attention
projections, PEFT `LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian")` as TRL, AlignProp and
SQDF (Shin-woocheol/SQDF @68861b2, `T2I/sd_pipeline.py`) do. SQDF's consistency model f_ψ is
LCM-LoRA (Luo et al., arXiv:2311.05556) fused into a separate frozen UNet (docs/tasks/sd.md §4).

Objective of every run: maximize E_{c, x ~ p_θ(·|c)}[r(decode(x_0), c)] − α·KL(P_θ ‖ P_pre) over the
LoRA weights, with 512² images (4×64×64 latents), 50 DDIM steps, η = 1, CFG w = 5 with the empty
prompt as the unconditional branch (the SQDF code's aesthetic runs; docs/tasks/sd.md §1).

Tasks:
* sd15       the real model (weights from the HF cache, a local folder, or $BENCH_SD15_PATH;
             a missing file is one MissingWeightsError line), rewards aesthetic (default),
             hps-v2.0, hps-v2.1, imagereward, clip-score, pickscore and the noisy black-box
             oracle aesthetic-oracle; trained on the 45 DDPO animals, held-out on 6 unseen ones.
* sd15-tiny  the same code path on a 0.8 M-parameter UNet, tiny VAE and text tower built from
             configs with a fixed seed (docs/tasks/sd.md §8), the offline CLIP tokenizer,
             the rewards' tiny() models, 10 steps, 4×8×8 latents (16² images): the CPU smoke test
             of every method.

Notation (paper -> code):
    ε_θ(x_t, t, c)       -> SDBackbone.policy_eps (UNet with the LoRA adapter on)
    ε_ref = ε_pre        -> SDBackbone.reference_eps (the same UNet, adapter off)
    c, ∅                 -> encode_prompts(prompts) [B, 77, D], null_cond = encoding of ""
    D(x_0)               -> decode: VAE(x_0 / 0.18215) mapped from [−1, 1] to [0, 1]
    f_ψ(x_t) (LCM)       -> consistency_x0: c_out(τ′)·x̂0_LCM(x, τ′) + c_skip(τ′)·x, τ′ = nearest LCM step
    φ(x) (BBO features)  -> task.proxy_features: CLIP ViT-L/14 image embedding [N, 768]
    y = r(x) + ε, ε~N(0, 0.1²) -> the aesthetic-oracle reward (SEIKO/SQDF online BBO, docs/tasks/sd.md §6)

Deliberate deviations from the official code:
1. The reference ε_ref is the policy UNet with its adapters switched off, not a second frozen copy
   (the SQDF code keeps one): bit-identical outputs in the same dtype, one UNet less in memory.
2. Mixed precision without autocast: frozen weights in fp16 (task.dtype), LoRA weights in fp32 (as
   TRL/SQDF), and every UNet output is cast to fp32 before the DDIM step; the official code runs
   the scheduler under fp16 autocast.
3. Latents, noise and conditions handed to methods live on the CPU (methods draw them from their
   own CPU generators); the backbone moves each call's rows to its device and returns results on
   the caller's device. This costs a few MB of host-device traffic per UNet call and keeps every
   method device-agnostic.
4. Gradient checkpointing is on by default for the UNet and the VAE decoder (the SQDF path ran
   without it; its baselines checkpoint every UNet call): identical gradients, bounded memory.
   Checkpointed recomputations replay the adapter state of the original forward.
5. The LCM timestep of x_{t−1} is the nearest point of the LCM grid {19, 39, …, 999} (ties to the
   lower one, which the 50-step grid never hits), as the code: 961 -> 959, 21 -> 19, 1 -> 19.
6. The oracle's label noise is drawn from a generator seeded by the image's bytes (and
   task.oracle_seed), so it is deterministic, batch-independent and survives resumption; SEIKO
   draws it from the global RNG.
7. The T2I code's double normalization of reward inputs (x/2 + 0.5 applied to [0, 1] images,
   docs/tasks/sd.md §5) is off by default; task.double_normalize=true reproduces it for the training
   reward. Held-out metrics always see correctly normalized images.
8. Evaluation uses at most task.eval_prompts prompts per prompt set (a fixed seeded subsample).

Not here: SDXL. Its UNet also needs pooled text embeddings and size/crop time ids; the Backbone's
single `cond` tensor (which methods concatenate and index) would have to pack them, so it waits for
an interface decision. The SD plumbing (configs, weights, tokenizer, LoRA I/O, LCM grid) lives in
bench/tasks/sd_utils.py; this file keeps the backbone, the oracle and the two tasks (hence ~700 lines).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn

from bench.core.diffusion import NoiseSchedule, alpha_nats_from_sqdf
from bench.core.errors import BenchError
from bench.core.registry import METRICS, REWARDS, TASKS
from bench.core.task import Backbone, SamplerConfig, Task
from bench.core.reward import Reward, RewardWrapper

IMAGE_REWARDS = ("aesthetic", "hps-v2.0", "hps-v2.1", "imagereward", "clip-score", "pickscore")
"the differentiable image rewards of the SD tasks (rewards/*.py)"
ORACLE = "aesthetic-oracle"


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------


class SDBackbone(Backbone):
    """SD UNet + LoRA (policy), the same UNet with the adapter off (reference), CLIP text
    encoder, VAE decoder and, on demand, the frozen LCM UNet (SQDF's f_ψ).

    Args:
        components: `bench.tasks.sd_utils.SDComponents` (unet, vae, text_encoder, tokenizer), frozen.
        schedule: the DDIM schedule (SD1.5's).
        lora_rank, lora_targets, lora_seed: the LoRA (B = 0 at init, so ε_θ ≡ ε_ref exactly).
        device, dtype: where and in which precision the frozen parts run (LoRA stays fp32).
        micro_batch: at most this many rows per UNet / VAE call (0 = no split).
        unet_checkpointing, vae_checkpointing: gradient checkpointing of the UNet blocks and the
            VAE decoder blocks (only active when a graph is built).
        lcm_loader: builds the frozen consistency UNet (LCM-LoRA fused) on first use, or None.
        base_model: recorded with saved LoRAs (the weights the adapter applies to).
    """

    def __init__(
        self,
        components: Any,
        schedule: NoiseSchedule,
        *,
        lora_rank: int = 4,
        lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
        lora_seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        micro_batch: int = 0,
        unet_checkpointing: bool = True,
        vae_checkpointing: bool = True,
        lcm_loader: Callable[[], nn.Module] | None = None,
        base_model: str = "",
    ) -> None:
        from bench.tasks.sd_utils import add_lora, lora_layers

        super().__init__()
        self.schedule = schedule
        self.compute_device = torch.device(device)
        self.dtype = dtype
        self.micro_batch = micro_batch
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.base_model = base_model
        self.lora_rank = lora_rank
        self.lora_targets = tuple(lora_targets)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = int(self.unet.config.sample_size) * down
        self.sample_shape = (int(self.unet.config.in_channels), int(self.unet.config.sample_size), int(self.unet.config.sample_size))
        # 1. LoRA on the attention projections, fp32, B = 0
        self._lora_params = add_lora(self.unet, lora_rank, self.lora_targets, lora_seed)
        self._lora_layers = lora_layers(self.unet)
        self._adapters_on = True
        # 2. gradient checkpointing that replays the adapter state of the original forward
        if unet_checkpointing:
            self.unet.enable_gradient_checkpointing(self._checkpoint_fn)
        if vae_checkpointing:
            self.vae.enable_gradient_checkpointing()
        self._lcm_loader = lcm_loader
        self.lcm_unet: nn.Module | None = None
        self._cond_cache: dict[str, Tensor] = {}
        self._null: Tensor | None = None

    # ---- adapters ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def adapters(self, on: bool) -> Iterator[None]:
        """ε_θ (on) or ε_ref (off) for the enclosed UNet calls."""
        from bench.tasks.sd_utils import adapters_enabled

        prev = self._adapters_on
        self._adapters_on = on
        try:
            with adapters_enabled(self._lora_layers, on):
                yield
        finally:
            self._adapters_on = prev

    def _checkpoint_fn(self, module: nn.Module, *args: Any) -> Any:
        """diffusers' block-level checkpoint, with the recomputation run in the adapter state the
        forward saw (the backward pass runs after the reference call has restored it)."""
        state = self._adapters_on
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), self.adapters(state))
        )

    # ---- the denoisers ------------------------------------------------------------------------

    def _chunks(self, n: int) -> list[slice]:
        m = self.micro_batch or n
        return [slice(i, min(i + m, n)) for i in range(0, max(n, 1), m)]

    def _unet(self, unet: nn.Module, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """ε [B, 4, h, w] on x's device and dtype; rows are moved to the compute device in chunks."""
        t = torch.as_tensor(t, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        outs = []
        for sl in self._chunks(x.shape[0]):
            out = unet(
                x[sl].to(self.compute_device, self.dtype), t[sl].to(self.compute_device),
                encoder_hidden_states=cond[sl].to(self.compute_device, self.dtype), return_dict=False,
            )[0]
            outs.append(out.to(x.device, x.dtype))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def policy_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        with self.adapters(True):
            return self._unet(self.unet, x, t, cond)

    def reference_eps(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        with self.adapters(False):
            return self._unet(self.unet, x, t, cond)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._lora_params)

    # ---- conditions ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """CLIP text-encoder last hidden states [B, 77, D] (fp32, CPU), cached per prompt."""
        new = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if new:
            ids = self.tokenizer(list(new), padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            hidden = self.text_encoder(ids.to(self.compute_device), return_dict=False)[0]
            for p, h in zip(new, hidden.float().cpu()):
                self._cond_cache[p] = h
        if not prompts:
            return torch.zeros(0, self.tokenizer.model_max_length, int(self.text_encoder.config.hidden_size))
        return torch.stack([self._cond_cache[p] for p in prompts])

    def null_cond(self, cond: Tensor) -> Tensor:
        """The empty prompt's embedding, one row per condition (SD's unconditional branch)."""
        if self._null is None:
            self._null = self.encode_prompts([""])[0]
        return self._null.to(cond.device, cond.dtype).expand(cond.shape[0], *self._null.shape)

    # ---- decoding ------------------------------------------------------------------------------

    def decode(self, x0: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] (fp32, on x0's device), differentiable in x0."""
        outs = []
        for sl in self._chunks(x0.shape[0]):
            z = x0[sl].to(self.compute_device, self.dtype) / self.scaling_factor + self.shift_factor
            img = self.vae.decode(z, return_dict=False)[0]
            outs.append((img.float() / 2 + 0.5).clamp(0, 1).to(x0.device))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    # ---- SQDF's consistency model ----------------------------------------------------------------

    def _lcm(self) -> nn.Module:
        if self.lcm_unet is None:
            if self._lcm_loader is None:
                raise BenchError("this SD backbone has no consistency model; use method.x0_predictor=tweedie or ddim")
            self.lcm_unet = self._lcm_loader()
        return self.lcm_unet

    @property
    def has_consistency_model(self) -> bool:
        """Loads the LCM UNet (once) so that a missing LCM-LoRA fails when the method is built,
        with the MissingWeightsError naming the file, rather than after the first evaluation."""
        if self._lcm_loader is None:
            return False
        self._lcm()
        return True

    def consistency_x0(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """x̂0 = c_out(τ′)·(x − √(1−ᾱ_τ′) ε_LCM)/√ᾱ_τ′ + c_skip(τ′)·x, τ′ the nearest LCM timestep
        to t (docs/tasks/sd.md §4); conditional branch only (the LCM runs at CFG weight 1). Differentiable
        in x through the frozen LCM UNet.

        Args:
            x: latents [B, 4, h, w] at timesteps t [B] (long). cond: [B, 77, D].
        Returns:
            [B, 4, h, w] on x's device.
        """
        from bench.tasks.sd_utils import lcm_boundary_scalings, lcm_timestep

        lcm = self._lcm()
        self.counter.add("consistency", x.shape[0])
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        tau = lcm_timestep(t)
        a = self.schedule.alpha_bar(tau).to(x.device, x.dtype).reshape(-1, 1, 1, 1)
        eps = self._unet(lcm, x, tau, cond)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        c_skip, c_out = (c.to(x.device, x.dtype).reshape(-1, 1, 1, 1) for c in lcm_boundary_scalings(tau))
        return c_out * x0 + c_skip * x

    # ---- output --------------------------------------------------------------------------------

    def save_trained(self, path: Path) -> Path:
        """The LoRA as diffusers pipelines load it: `pipe.load_lora_weights(path)`."""
        from bench.tasks.sd_utils import save_unet_lora

        info = {"base_model": self.base_model, "lora_rank": self.lora_rank, "lora_targets": list(self.lora_targets),
                "load_with": "StableDiffusionPipeline.from_pretrained(base_model).load_lora_weights(this folder)"}
        return save_unet_lora(self.unet, Path(path), info=info)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_model": self.base_model, "lora_rank": self.lora_rank,
                "lora_targets": list(self.lora_targets), "device": str(self.compute_device), "dtype": str(self.dtype).replace("torch.", ""),
                "resolution": self.resolution}


# --------------------------------------------------------------------------------------------------
# The online black-box oracle
# --------------------------------------------------------------------------------------------------


@REWARDS.register(ORACLE, modality="image", doc="LAION aesthetic score + N(0, 0.1²) label noise: the online BBO oracle (SEIKO/SQDF); query-only")
class NoisyAestheticOracle(Reward):
    """y = r_aes(x) + σ·ε with ε ~ N(0, 1) drawn from a generator seeded by the image's bytes.

    Not differentiable: methods that need reward gradients refuse it; online methods query it
    through the runner's CountingReward (each image is one query).
    """

    name = ORACLE
    version = 1
    differentiable = False

    def __init__(self, aesthetic: Any, noise_std: float = 0.1, seed: int = 0) -> None:
        self.aesthetic = aesthetic
        self.noise_std = noise_std
        self.seed = seed

    def label_noise(self, x: Tensor) -> Tensor:
        """ε [N] (float64): one standard normal per image, a function of its bytes and the seed."""
        xs = x.detach().to("cpu", torch.float32).contiguous()
        out = torch.empty(xs.shape[0], dtype=torch.float64)
        for i in range(xs.shape[0]):
            h = zlib.crc32(xs[i].numpy().tobytes(), self.seed & 0xFFFFFFFF)
            out[i] = torch.randn((), generator=torch.Generator().manual_seed(h), dtype=torch.float64)
        return out

    @torch.no_grad()
    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """y [N] (float32, on x's device) for images x [N, 3, H, W] in [0, 1]."""
        r = self.aesthetic(x, prompts).detach().to(x.device, torch.float32)
        return r + (self.noise_std * self.label_noise(x)).to(x.device, torch.float32)


class OnCallerDevice(RewardWrapper):
    """A reward model seen from the methods: scores come back as float32 on the images' device
    (the models run on the task's device; methods keep their tensors on the CPU, deviation 3)."""

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.inner(x, prompts).to(x.device, torch.float32)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


# --------------------------------------------------------------------------------------------------
# The tasks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDTaskConfig:
    """Options shared by the SD tasks (`--set task.<field>=...`)."""

    lora_rank: int = 4
    "LoRA rank r (lora_alpha = r, so the adapter's scale is 1); the paper: 4 (aesthetic), 32 (HPS)"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    "UNet module names that get a LoRA (default: every attention projection)"
    lora_seed: int = 0
    "seed of the LoRA A initialization (B = 0, so the model at init does not depend on it)"
    prompts: str = "animals"
    "training / held-out prompts: animals (45 DDPO animals / 6 unseen) or hpsv2 (benchmark styles, needs task.hpsv2_dir)"
    hpsv2_dir: str = ""
    "folder with the HPSv2 benchmark prompt files <style>.json|.txt (or $BENCH_HPSV2_PROMPTS)"
    hpsv2_train_styles: tuple[str, ...] = ("anime", "concept-art", "paintings")
    "HPSv2 styles trained on (task.prompts=hpsv2)"
    hpsv2_heldout_styles: tuple[str, ...] = ("photo",)
    "HPSv2 styles held out (the @heldout metrics)"
    eval_prompts: int = 48
    "at most this many prompts per evaluation set (a fixed seeded subsample; 0 = all)"
    device: str = "auto"
    "where the models run: auto (cuda if available), cpu, cuda, cuda:<i>"
    dtype: str = "auto"
    "precision of the frozen UNet/VAE/text encoder and reward models: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16"
    micro_batch: int = 16
    "at most this many rows per UNet / VAE call (0 = no split); results do not depend on it beyond kernel rounding"
    unet_checkpointing: bool = True
    "gradient checkpointing of the UNet blocks (policy and LCM)"
    vae_checkpointing: bool = True
    "gradient checkpointing of the VAE decoder blocks"
    double_normalize: bool = False
    "reproduce the SQDF/AlignProp T2I quirk: the training reward sees x/2 + 0.5 of the [0, 1] image (docs/tasks/sd.md §5)"
    oracle_noise: float = 0.1
    "label-noise std of the aesthetic-oracle reward (SEIKO/SQDF: 0.1)"
    oracle_seed: int = 0
    "seed of the oracle's label noise"
    heldout_metrics: tuple[str, ...] = ("aesthetic_score", "hps_v2.0_score", "imagereward_score", "lpips_diversity", "dreamsim_diversity")
    "metrics computed besides reward, path KL and objective (metrics/perceptual.py; each needs its model's weights)"

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise BenchError(f"task.lora_rank must be >= 1, got {self.lora_rank}")
        if not self.lora_targets:
            raise BenchError("task.lora_targets must name at least one module, e.g. to_q,to_k,to_v,to_out.0")
        if self.prompts not in ("animals", "hpsv2"):
            raise BenchError(f"task.prompts must be animals or hpsv2, got {self.prompts!r}")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise BenchError(f"task.dtype must be auto, fp32, fp16 or bf16; got {self.dtype!r}")
        for f in ("eval_prompts", "micro_batch"):
            if getattr(self, f) < 0:
                raise BenchError(f"task.{f} must be >= 0, got {getattr(self, f)}")
        if self.oracle_noise < 0:
            raise BenchError(f"task.oracle_noise must be >= 0, got {self.oracle_noise}")
        unknown = [m for m in self.heldout_metrics if m not in METRICS]
        if unknown:
            raise BenchError(f"task.heldout_metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS.names())}")


@dataclass(frozen=True)
class SD15Config(SDTaskConfig):
    """Options of the sd15 task."""

    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    "diffusers repository id (HF cache) or local folder; at the default, $BENCH_SD15_PATH takes precedence when set"
    variant: str = ""
    "diffusers weight variant to load (\"\" = full-precision files, fp16 = the *.fp16.safetensors files)"
    lcm_lora: str = "latent-consistency/lcm-lora-sdv1-5"
    "LCM-LoRA (SQDF's consistency model): repository id, folder or .safetensors file; $BENCH_LCM_LORA_PATH overrides the default"
    resolution: int = 0
    "image side in pixels: 0 = the model's own (SD1.5: 512), else a multiple of 64"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in ("", "fp16"):
            raise BenchError(f"task.variant must be '' or fp16, got {self.variant!r}")
        if self.resolution < 0 or self.resolution % 64:
            raise BenchError(f"task.resolution must be 0 (the model's own) or a positive multiple of 64, got {self.resolution}")


@dataclass(frozen=True)
class SD15TinyConfig(SDTaskConfig):
    """Options of the sd15-tiny task (random-init models: nothing to download)."""

    eval_prompts: int = 4
    "at most this many prompts per evaluation set (a fixed seeded subsample; 0 = all)"
    micro_batch: int = 0
    "at most this many rows per UNet / VAE call (0 = no split)"
    init_seed: int = 0
    "seed of the random UNet / VAE / text encoder (and of the stand-in LCM-LoRA)"
    heldout_metrics: tuple[str, ...] = ("aesthetic_score", "hps_v2.0_score", "imagereward_score", "lpips_diversity")
    "metrics besides reward, path KL and objective (dreamsim_diversity is left out by default: its test model is a full ViT-B/32)"


class SDTask(Task):
    """Shared machinery of the SD tasks; subclasses say where the components come from."""

    modality = "image"
    default_reward = "aesthetic"
    rewards = IMAGE_REWARDS + (ORACLE,)
    metrics = ("reward", "path_kl", "objective") + SDTaskConfig.heldout_metrics
    "the defaults; an instance computes reward, path_kl, objective + its task.heldout_metrics"
    table_metrics = ("reward", "path_kl", "aesthetic_score", "hps_v2.0_score", "imagereward_score", "lpips_diversity", "dreamsim_diversity")
    sampler_defaults = SamplerConfig(steps=50, eta=1.0, guidance=5.0)
    default_alpha = alpha_nats_from_sqdf(2.0, 4 * 64 * 64)
    "α = 2 on the SQDF code's KL scale (its aesthetic runs; docs/tasks/sd.md §2), in nats: 2·2/16384"
    default_alphas = tuple(alpha_nats_from_sqdf(a, 4 * 64 * 64) for a in (0.5, 1.0, 2.0, 4.0))

    def __init__(self, cfg: SDTaskConfig, device: str = "cpu") -> None:
        from bench.tasks.sd_utils import resolve_device, resolve_dtype, sd15_schedule

        super().__init__(cfg, device)
        self.torch_device = resolve_device(cfg.device)
        self.device = str(self.torch_device)
        self.dtype = resolve_dtype(cfg.dtype, self.torch_device)
        self.schedule = sd15_schedule()
        self.metrics = ("reward", "path_kl", "objective") + tuple(m for m in cfg.heldout_metrics if m not in ("reward", "path_kl", "objective"))
        self._train, self._eval = self._prompt_sets()
        self._models: dict[tuple[str, str, bool], Any] = {}

    # ---- prompts -------------------------------------------------------------------------------

    def _prompt_sets(self) -> tuple[list[str], dict[str, list[str]]]:
        from bench.tasks.sd_utils import PROMPT_DIR, load_hpsv2_prompts, read_prompt_file

        if self.cfg.prompts == "animals":
            train = read_prompt_file(PROMPT_DIR / "simple_animals.txt")
            held = read_prompt_file(PROMPT_DIR / "simple_animals_heldout.txt")
        else:
            tr = load_hpsv2_prompts(self.cfg.hpsv2_dir, self.cfg.hpsv2_train_styles)
            ho = load_hpsv2_prompts(self.cfg.hpsv2_dir, self.cfg.hpsv2_heldout_styles)
            train = list(dict.fromkeys(p for ps in tr.values() for p in ps))
            held = [p for p in dict.fromkeys(p for ps in ho.values() for p in ps) if p not in set(train)]
        return train, {"train": _subsample(train, self.cfg.eval_prompts), "heldout": _subsample(held, self.cfg.eval_prompts)}

    @property
    def train_prompts(self) -> list[str]:
        return list(self._train)

    @property
    def eval_prompt_sets(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self._eval.items()}

    # ---- backbone ------------------------------------------------------------------------------

    @abstractmethod
    def _components(self) -> Any:
        """Fresh frozen SD components (`bench.tasks.sd_utils.SDComponents`)."""

    @abstractmethod
    def _lcm_unet(self, comps: Any) -> nn.Module:
        """A fresh frozen UNet with the LCM-LoRA fused (SQDF's f_ψ); `comps` are the backbone's
        components (their VAE / text encoder serve the pipeline the LoRA is loaded through)."""

    def build_backbone(self) -> SDBackbone:
        comps = self._components()
        lcm_ckpt = self.cfg.unet_checkpointing

        def lcm_loader() -> nn.Module:
            unet = self._lcm_unet(comps)
            if lcm_ckpt:
                unet.enable_gradient_checkpointing()
            return unet

        return SDBackbone(
            comps, self.schedule, lora_rank=self.cfg.lora_rank, lora_targets=tuple(self.cfg.lora_targets), lora_seed=self.cfg.lora_seed,
            device=self.torch_device, dtype=self.dtype, micro_batch=self.cfg.micro_batch, unet_checkpointing=self.cfg.unet_checkpointing,
            vae_checkpointing=self.cfg.vae_checkpointing, lcm_loader=lcm_loader, base_model=comps.source,
        )

    # ---- rewards and perceptual models ---------------------------------------------------------

    @abstractmethod
    def _load_reward(self, name: str, double_normalize: bool) -> Any:
        """A reward model object: the real weights (sd15) or the tiny() factory (sd15-tiny)."""

    def reward_model(self, name: str) -> Any:
        """The (correctly normalized) reward model `name`, loaded once per task: what held-out
        reward metrics and the oracle use."""
        name = REWARDS.canonical(name) if name in REWARDS else name
        key = ("reward", name, False)
        if key not in self._models:
            if name not in IMAGE_REWARDS:
                raise BenchError(f"task {self.name} has no reward model {name!r}; known: {', '.join(IMAGE_REWARDS)}")
            self._models[key] = self._load_reward(name, False)
        return self._models[key]

    def perceptual_model(self, name: str) -> Any:
        """A perceptual distance model (lpips, dreamsim) for diversity metrics, loaded once per task."""
        key = ("perceptual", name, False)
        if key not in self._models:
            self._models[key] = self._load_perceptual(name)
        return self._models[key]

    @abstractmethod
    def _load_perceptual(self, name: str) -> Any:
        """A perceptual model: the real weights (sd15) or a tiny random one (sd15-tiny)."""

    def build_reward(self, name: str) -> Any:
        name = REWARDS.canonical(name) if name in REWARDS else name
        if name == ORACLE:
            return NoisyAestheticOracle(self.reward_model("aesthetic"), self.cfg.oracle_noise, self.cfg.oracle_seed)
        if name not in IMAGE_REWARDS:
            raise BenchError(f"task {self.name} has no reward {name!r}; its rewards: {', '.join(self.rewards)}")
        if not self.cfg.double_normalize:
            return OnCallerDevice(self.reward_model(name))
        key = ("reward", name, True)
        if key not in self._models:
            self._models[key] = self._load_reward(name, True)
        return OnCallerDevice(self._models[key])

    def proxy_features(self, images: Tensor) -> Tensor:
        """φ(x): the L2-normalized CLIP ViT-L/14 image embedding the aesthetic head reads [N, 768]
        (float32, on the images' device), differentiable in the images [N, 3, H, W] in [0, 1]:
        what the online-BBO proxy models are fitted on (docs/tasks/sd.md §6)."""
        return self.reward_model("aesthetic").embed(images).to(images.device, torch.float32)

    # ---- output --------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "prompts": {"train": len(self._train), **{k: len(v) for k, v in self._eval.items()}}}

    def plot_samples(self, samples: dict[str, Tensor], reward: str, alpha: float, path: Path, title: str) -> None:
        """A grid: one row per prompt (at most 8), up to 8 images each."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        prompts = list(samples)[:8]
        cols = max(1, min(8, max(samples[p].shape[0] for p in prompts)))
        fig, axes = plt.subplots(len(prompts), cols, figsize=(1.6 * cols, 1.7 * len(prompts)), squeeze=False)
        for i, p in enumerate(prompts):
            imgs = samples[p].detach().float().clamp(0, 1).cpu()
            for j in range(cols):
                ax = axes[i][j]
                ax.axis("off")
                if j < imgs.shape[0]:
                    ax.imshow(imgs[j].permute(1, 2, 0).numpy())
            axes[i][0].set_title(p[:40], fontsize=7, loc="left")
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _subsample(prompts: list[str], n: int) -> list[str]:
    """At most n prompts: a fixed seeded subsample, in the original order (all if n = 0 or fewer)."""
    if n == 0 or len(prompts) <= n:
        return list(prompts)
    keep = sorted(torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0))[:n].tolist())
    return [prompts[i] for i in keep]


@TASKS.register("sd15", default_for_rewards=True, doc="Stable Diffusion 1.5 + LoRA at 512², 50 DDIM steps, CFG 5; animals prompts; image rewards (needs weights)")
class SD15Task(SDTask):
    name = "sd15"
    version = 1
    Config = SD15Config

    def _root(self) -> Path:
        from bench.core.weights import resolve_sd_weights
        from bench.tasks.sd_utils import SD15_REPO

        return resolve_sd_weights(self.cfg.model, f"task {self.name} (Stable Diffusion v1.5)", "BENCH_SD15_PATH", SD15_REPO, self.cfg.variant)

    def _components(self) -> Any:
        from bench.tasks.sd_utils import load_components

        comps = load_components(self._root(), self.dtype, self.torch_device, self.cfg.variant)
        if self.cfg.resolution:
            down = 2 ** (len(comps.vae.config.block_out_channels) - 1)
            comps.unet.register_to_config(sample_size=self.cfg.resolution // down)
        return comps

    def _lcm_unet(self, comps: Any) -> nn.Module:
        from bench.core.weights import resolve_lora_file
        from bench.tasks.sd_utils import LCM_LORA_REPO, fuse_lora_into, load_unet

        lora = resolve_lora_file(self.cfg.lcm_lora, f"sqdf's consistency model on task {self.name} (LCM-LoRA)", "BENCH_LCM_LORA_PATH", LCM_LORA_REPO)
        unet = load_unet(self._root(), self.dtype, self.torch_device, self.cfg.variant)
        fuse_lora_into(comps, unet, lora)
        return unet

    def _load_reward(self, name: str, double_normalize: bool) -> Any:
        return REWARDS.get(name).load(device=self.torch_device, dtype=self.dtype, double_normalize=double_normalize)

    def _load_perceptual(self, name: str) -> Any:
        from metrics import perceptual

        return perceptual.load(name, device=self.torch_device)


@TASKS.register("sd15-tiny", doc="the sd15 code path on a 0.8 M-parameter random-init SD (10 steps, 16² images) and tiny reward models: CPU smoke test")
class SD15TinyTask(SDTask):
    name = "sd15-tiny"
    version = 1
    Config = SD15TinyConfig
    sampler_defaults = SamplerConfig(steps=10, eta=1.0, guidance=5.0)
    default_alpha = alpha_nats_from_sqdf(2.0, 4 * 8 * 8)
    default_alphas = tuple(alpha_nats_from_sqdf(a, 4 * 8 * 8) for a in (0.5, 1.0, 2.0, 4.0))

    metrics = ("reward", "path_kl", "objective") + SD15TinyConfig.heldout_metrics
    TINY_LCM_TARGETS: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")

    def _components(self) -> Any:
        from bench.tasks.sd_utils import random_components

        return random_components("tiny", seed=self.cfg.init_seed, dtype=self.dtype, device=self.torch_device)

    def _lcm_unet(self, comps: Any) -> nn.Module:
        """The tiny base UNet with a fixed random LoRA fused through the LCM-LoRA loading path."""
        from bench.core.cache import cache_dir
        from bench.core.weights import LORA_FILE
        from bench.tasks.sd_utils import fuse_lora_into, random_components, tiny_unet_config, write_random_lora

        folder = cache_dir() / "tiny-lcm-lora" / f"seed{self.cfg.init_seed}"
        f = folder / LORA_FILE
        if not f.exists():
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            write_random_lora(tiny_unet_config(), tmp, 4, 1000 + self.cfg.init_seed, self.TINY_LCM_TARGETS)
            if not folder.exists():
                os.replace(tmp, folder)
        unet = random_components("tiny", seed=self.cfg.init_seed, dtype=self.dtype, device=self.torch_device).unet
        fuse_lora_into(comps, unet, f)
        return unet

    def _load_reward(self, name: str, double_normalize: bool) -> Any:
        return REWARDS.get(name).tiny(seed=0, device=self.torch_device, dtype=self.dtype, double_normalize=double_normalize)

    def _load_perceptual(self, name: str) -> Any:
        from metrics import perceptual

        return perceptual.tiny(name, device=self.torch_device)
