"""Image metrics: within-prompt diversity (LPIPS, DreamSim) and held-out reward scores.

Diversity (the protocol of DAS's evaluation, Kim et al. 2025, arXiv:2501.05803; docs/rewards.md §3):
for the n samples of one prompt, the mean perceptual distance over all n(n−1)/2 unordered pairs;
compute_metrics then averages over prompts. Higher is more diverse.
* `lpips_diversity`: LPIPS v0.1 with the AlexNet trunk and the linear heads shipped in the lpips
  package (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
  Metric", arXiv:1801.03924, github.com/richzhang/PerceptualSimilarity), images in [0, 1] with
  normalize=True (i.e. 2x − 1).
* `dreamsim_diversity`: DreamSim's default ensemble (DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP
  ViT-B/16 with LoRA; Fu et al. 2023, "DreamSim: Learning New Dimensions of Human Visual Similarity
  using Synthetic Data", arXiv:2306.09344, github.com/ssundaram21/dreamsim), distance
  1 − cos(embed(a), embed(b)).
Both resize every sample to 224×224 first the way PIL does (rewards/preprocess.py `pil_resize`):
the size DreamSim requires (its own preprocess is a PIL resize) and the one DAS used for LPIPS.

Held-out rewards (`aesthetic_score`, `hps_v2.0_score`, `hps_v2.1_score`, `imagereward_score`,
`clip_score`, `pickscore_score`): the mean score of a prompt's samples under that reward model,
with correct preprocessing (never SQDF's double normalization), whatever the training reward is.

NOTATION
    x_1..x_n   a prompt's samples `s.x` [n, 3, H, W] in [0, 1]
    d(a, b)    LPIPS or DreamSim distance; diversity = 2/(n(n−1)) Σ_{i<j} d(x_i, x_j)
    φ_l        LPIPS: unit-normalized AlexNet activations of layer l; d = Σ_l mean_hw w_l·(φ_l(a) − φ_l(b))²

Models are loaded once per process: through the task's hooks `task.reward_model(name)` and
`task.perceptual_model(name)` when it has them (the SD task returns real or tiny models), else
through this module's own cache of the real loaders. Real weights come from local caches
(bench/core/weights.py); a missing file is a one-line MissingWeightsError, never a random backbone.
Test backbones: `tiny(name)` (lpips: random AlexNet trunk + the real heads; dreamsim: the real
single-backbone code path on synthesized local files with a seeded random ViT-B/32).

DELIBERATE DEVIATIONS
1. LPIPS features of each sample are computed once and reused for all its pairs (LPIPS.forward
   recomputes both images per pair); the distances are the same (tested).
2. DreamSim embeddings likewise: one embed per sample, then 1 − cos per pair (= model(a, b)).
3. SQDF's exact diversity settings are unpublished (backbone, n, image size; docs/tasks/sd.md §7); these
   follow the usual protocol (LPIPS-Alex, normalize=True, 224², DreamSim ensemble, all
   within-prompt pairs).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from bench.core.errors import BenchError
from bench.core.evaluation import EvalContext, PromptSamples
from bench.core.registry import METRICS, REWARDS
from rewards.preprocess import pil_resize
from bench.core.weights import isolated_rng, resolve

SIZE = 224
"side of the square every sample is resized to before LPIPS / DreamSim"
CHUNK = 16
"samples per forward pass (memory bound)"

_MODELS: dict[tuple[str, str, str], Any] = {}
"this process's fallback models, keyed by (kind, name, device): loaded once, reused"


# ---- model access (task hooks first) --------------------------------------------------------------


def _device(ctx: EvalContext) -> str:
    dev = getattr(ctx.task, "torch_device", None) or getattr(ctx.task, "device", "cpu")
    dev = str(dev)
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def reward_model(ctx: EvalContext, name: str) -> Any:
    """The reward model `name` for evaluation: `ctx.task.reward_model(name)` if the task has the
    hook, else the real weights (loaded once per process and device)."""
    canonical = REWARDS.canonical(name)
    hook = getattr(ctx.task, "reward_model", None)
    if callable(hook):
        return hook(canonical)
    key = ("reward", canonical, _device(ctx))
    if key not in _MODELS:
        _MODELS[key] = REWARDS.get(canonical).load(device=key[2])
    return _MODELS[key]


def perceptual_model(ctx: EvalContext, name: str) -> nn.Module:
    """The perceptual model `name` ("lpips" or "dreamsim"): `ctx.task.perceptual_model(name)` if
    the task has the hook, else `load(name)` (once per process and device)."""
    hook = getattr(ctx.task, "perceptual_model", None)
    if callable(hook):
        return hook(name)
    key = ("perceptual", name, _device(ctx))
    if key not in _MODELS:
        _MODELS[key] = load(name, device=key[2])
    return _MODELS[key]


# ---- LPIPS -------------------------------------------------------------------------------------------

# torchvision's AlexNet `features` indices per LPIPS slice (lpips.pretrained_networks.alexnet)
_ALEX_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}


def _lpips_module(seed: int) -> nn.Module:
    """lpips.LPIPS(net="alex") with its shipped v0.1 linear heads and a seeded random trunk: no
    download is ever attempted (pnet_rand=True)."""
    import lpips

    with isolated_rng(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` argument inside lpips
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    return model.eval().requires_grad_(False)


def load_lpips(device: str | torch.device = "cpu", weights: str | None = None) -> nn.Module:
    """LPIPS-Alex with the real ImageNet AlexNet trunk (torchvision's `alexnet-owt-7be5be79.pth`
    from `weights`, $BENCH_LPIPS_ALEXNET_WEIGHTS, $BENCH_WEIGHTS_DIR or the torch hub cache).

    Raises:
        MissingWeightsError: the AlexNet file is not on this machine (it is never downloaded here).
    """
    path = resolve("lpips-alexnet", weights)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = _lpips_module(0)
    trunk = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "features" and int(parts[1]) in _ALEX_SLICES:
            trunk[f"slice{_ALEX_SLICES[int(parts[1])]}.{parts[1]}.{parts[2]}"] = v
    missing = set(model.net.state_dict()) - set(trunk)
    if missing:
        raise BenchError(f"{path} is not torchvision's AlexNet state dict (missing {sorted(missing)[:3]})")
    model.net.load_state_dict(trunk)
    return model.to(device)


def tiny_lpips(seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """LPIPS-Alex with the real linear heads and a random (seeded) AlexNet trunk, for tests."""
    return _lpips_module(seed).to(device)


def lpips_features(model: nn.Module, x: Tensor) -> list[Tensor]:
    """φ_l(x): the unit-normalized AlexNet activations LPIPS compares, one [n, C_l, h_l, w_l] per layer."""
    import lpips

    dev = next(model.parameters()).device
    feats: list[list[Tensor]] = []
    for start in range(0, x.shape[0], CHUNK):
        xc = _to_square(x[start : start + CHUNK].to(dev))
        outs = model.net(model.scaling_layer(2 * xc - 1))  # normalize=True: [0, 1] -> [−1, 1]
        feats.append([lpips.normalize_tensor(o) for o in outs])
    return [torch.cat([f[layer] for f in feats]) for layer in range(len(feats[0]))]


@torch.no_grad()
def pairwise_lpips(model: nn.Module, x: Tensor) -> Tensor:
    """LPIPS distance of every unordered pair (i < j) of x [n, 3, H, W] in [0, 1], in
    torch.triu_indices order: [n(n−1)/2]."""
    n = x.shape[0]
    feats = lpips_features(model, x)
    i, j = torch.triu_indices(n, n, offset=1)
    out = []
    for start in range(0, i.numel(), 4 * CHUNK):
        a, b = i[start : start + 4 * CHUNK], j[start : start + 4 * CHUNK]
        d = sum(model.lins[layer]((f[a] - f[b]) ** 2).mean(dim=(2, 3)) for layer, f in enumerate(feats))
        out.append(d.flatten())  # type: ignore[union-attr]
    return torch.cat(out) if out else torch.zeros(0)


# ---- DreamSim ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_dreamsim() -> Any:
    """dreamsim prints progress and moves torch.hub's folder to its cache dir: silence the one and
    restore the other."""
    hub = getattr(torch.hub, "_hub_dir", None)  # None: follow $TORCH_HOME, as before the call
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.hub._hub_dir = hub  # type: ignore[attr-defined]


def load_dreamsim(device: str | torch.device = "cpu", cache_dir: str | None = None) -> nn.Module:
    """DreamSim's default ensemble with its released weights, from `cache_dir`, $BENCH_DREAMSIM_DIR,
    $BENCH_WEIGHTS_DIR/dreamsim or ~/.cache/dreamsim (the folder `dreamsim(cache_dir=...)` fills:
    the checkpoint zip's content plus torch.hub's facebookresearch_dino_main/ and checkpoints/).

    Raises:
        MissingWeightsError: the folder is missing or incomplete (nothing is downloaded here).
    """
    from dreamsim import dreamsim

    folder = resolve("dreamsim", cache_dir)
    with _quiet_dreamsim(), isolated_rng(0):
        model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=str(folder), dreamsim_type="ensemble")
    return model.eval().requires_grad_(False)


def tiny_dreamsim(seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """DreamSim's real single-backbone code path ("open_clip_vitb32": ViT-B/32 + LoRA on qkv) on
    synthesized local files (docs/rewards.md §4), with seeded random weights.

    The synthesized checkpoint holds stride-0 tensors (a few KB on disk); after dreamsim loads it,
    every backbone weight is re-drawn from `seed` (linear/conv/embedding weights ~
    N(0, 0.02²), LayerNorm 1/0, biases 0, CLIP projection ~ N(0, 1/768)); the LoRA adapters keep
    peft's init (B = 0). The architecture is the real ViT-B/32 (88 M parameters): DreamSim has no
    smaller backbone.
    """
    from dreamsim import dreamsim
    from dreamsim.feature_extraction.vision_transformer import vit_base

    with tempfile.TemporaryDirectory(prefix="bench-dreamsim-") as d, _quiet_dreamsim(), isolated_rng(seed):
        vit = vit_base(patch_size=32)  # only its names and shapes are written
        vit.pos_drop = nn.LayerNorm(vit.embed_dim)  # what dreamsim's open_clip loader expects
        state = {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in vit.state_dict().items()}
        state["proj"] = torch.zeros(1).expand(vit.embed_dim, 512)
        torch.save({"state_dict": state}, os.path.join(d, "open_clip_vitb32_pretrain.pth.tar"))
        os.makedirs(os.path.join(d, "open_clip_vitb32_single_lora"))
        Path(d, "open_clip_vitb32_single_lora", "adapter_config.json").write_text(
            json.dumps({"r": 16, "lora_alpha": 0.5, "lora_dropout": 0.3, "bias": "none", "target_modules": ["qkv"]}))
        model, _ = dreamsim(pretrained=False, device="cpu", cache_dir=d, dreamsim_type="open_clip_vitb32")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for extractor in model.base_model.model.extractor_list:
            extractor.proj = torch.randn(extractor.proj.shape, generator=g) / math.sqrt(extractor.proj.shape[0])
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def dreamsim_embeddings(model: nn.Module, x: Tensor) -> Tensor:
    """DreamSim embeddings [n, D] of x [n, 3, H, W] in [0, 1] (resized to 224²)."""
    dev = next(model.parameters()).device
    out = [model.embed(_to_square(x[s : s + CHUNK].to(dev))) for s in range(0, x.shape[0], CHUNK)]
    return torch.cat([e.reshape(e.shape[0], -1) if e.ndim > 1 else e[None] for e in out])


@torch.no_grad()
def pairwise_dreamsim(model: nn.Module, x: Tensor) -> Tensor:
    """DreamSim distance 1 − cos(embed(x_i), embed(x_j)) of every pair i < j: [n(n−1)/2]."""
    n = x.shape[0]
    e = dreamsim_embeddings(model, x).float()
    i, j = torch.triu_indices(n, n, offset=1)
    return 1 - torch.nn.functional.cosine_similarity(e[i], e[j], dim=-1)


# ---- the "load once" factories the SD task calls -------------------------------------------------

LOADERS: dict[str, Callable[..., nn.Module]] = {"lpips": load_lpips, "dreamsim": load_dreamsim}
TINY: dict[str, Callable[..., nn.Module]] = {"lpips": tiny_lpips, "dreamsim": tiny_dreamsim}


def load(name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The real perceptual model `name` ("lpips" | "dreamsim"); MissingWeightsError when absent."""
    if name not in LOADERS:
        raise BenchError(f"unknown perceptual model {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](device=device)


def tiny(name: str, seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """A random-backbone perceptual model `name` of the real code path, for tests and tiny tasks."""
    if name not in TINY:
        raise BenchError(f"unknown perceptual model {name!r}; known: {', '.join(TINY)}")
    return TINY[name](seed=seed, device=device)


def _to_square(x: Tensor) -> Tensor:
    """[n, 3, H, W] in [0, 1] -> [n, 3, 224, 224] (PIL's bicubic resize, as dreamsim's preprocess)."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise BenchError(f"diversity metrics need images [n, 3, H, W] in [0, 1], got {tuple(x.shape)}")
    return pil_resize(x.float().clamp(0, 1), (SIZE, SIZE))


# ---- metrics -----------------------------------------------------------------------------------------


def _nan() -> float:
    return float("nan")


@METRICS.register("lpips_diversity", direction="max", label="LPIPS div.",
                  doc="mean LPIPS-Alex distance over all pairs of a prompt's samples (224², normalize=True)")
def lpips_diversity(s: PromptSamples, ctx: EvalContext) -> float:
    if s.x.ndim != 4 or s.x.shape[0] < 2:
        return _nan()
    model = perceptual_model(ctx, "lpips")
    return ctx.memo_x("lpips_diversity", s, lambda: float(pairwise_lpips(model, s.x).double().mean()))


@METRICS.register("dreamsim_diversity", direction="max", label="DreamSim div.",
                  doc="mean DreamSim distance over all pairs of a prompt's samples (ensemble, 224²)")
def dreamsim_diversity(s: PromptSamples, ctx: EvalContext) -> float:
    if s.x.ndim != 4 or s.x.shape[0] < 2:
        return _nan()
    model = perceptual_model(ctx, "dreamsim")
    return ctx.memo_x("dreamsim_diversity", s, lambda: float(pairwise_dreamsim(model, s.x).double().mean()))


@torch.no_grad()
def mean_reward(reward: Any, s: PromptSamples) -> float:
    """Mean score of a prompt's samples under `reward` (in chunks, no graph)."""
    scores = [reward(s.x[k : k + CHUNK], [s.prompt] * s.x[k : k + CHUNK].shape[0]).double().cpu() for k in range(0, s.x.shape[0], CHUNK)]
    return float(torch.cat(scores).mean())


def _heldout_reward_metric(reward_name: str) -> Callable[[PromptSamples, EvalContext], float]:
    def metric(s: PromptSamples, ctx: EvalContext) -> float:
        if s.x.ndim != 4:
            return _nan()
        model = reward_model(ctx, reward_name)
        return ctx.memo_x(f"heldout_reward:{reward_name}", s, lambda: mean_reward(model, s))

    metric.__name__ = f"{reward_name}_score"
    metric.__doc__ = f"Mean {reward_name} score of a prompt's samples (held-out reward model, correct preprocessing)."
    return metric


HELDOUT_REWARDS = {
    "aesthetic_score": ("aesthetic", "aesthetic"),
    "hps_v2.0_score": ("hps-v2.0", "HPSv2.0"),
    "hps_v2.1_score": ("hps-v2.1", "HPSv2.1"),
    "imagereward_score": ("imagereward", "ImageReward"),
    "clip_score": ("clip-score", "CLIP score"),
    "pickscore_score": ("pickscore", "PickScore"),
}
"metric name -> (reward name, table label)"

for _metric, (_reward, _label) in HELDOUT_REWARDS.items():
    METRICS.register(_metric, direction="max", label=_label, doc=f"mean {_reward} score of the samples (held-out reward model, correct preprocessing)")(
        _heldout_reward_metric(_reward))
