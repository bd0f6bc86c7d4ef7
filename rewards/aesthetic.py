"""LAION aesthetic predictor v2: a linear MLP on normalized CLIP ViT-L/14 image embeddings.

Citation: C. Schuhmann, "LAION-Aesthetics Predictor V2" (LAION blog, 2022),
github.com/christophschuhmann/improved-aesthetic-predictor (`simple_inference.py`; head
`sac+logos+ava1-l14-linearMSE.pth`, trained on SAC + LAION-Logos + AVA ratings with an MSE loss).
The reward of DDPO (Black et al. 2023, arXiv:2305.13301), AlignProp, DRaFT and SQDF
(Kang et al. 2025, arXiv:2512.04559; docs/rewards.md §1), where it scores roughly 1–10.

Objective: r(x) = MLP(e / ‖e‖), e = CLIP ViT-L/14 projected image embedding of x; the prompt is
ignored.

NOTATION
    x     images [N, 3, H, W] in [0, 1]
    e     `emb`: `visual_projection(vision_model(x).pooler_output)` [N, 768], OpenAI CLIP's encode_image
    MLP   768 -> 1024 -> 128 -> 64 -> 16 -> 1 linear layers, dropouts 0.2/0.2/0.1 (inactive in
          eval) and no activations (the authors commented the ReLUs out): an affine map of e/‖e‖

Preprocessing (OpenAI CLIP's `preprocess`, which the authors call): PIL resize of the shortest side
to 224 (bicubic, antialiased), center crop 224 (torchvision offsets), OpenAI CLIP mean/std; here
differentiable on tensors (rewards/preprocess.py).

DELIBERATE DEVIATIONS
1. CLIP ViT-L/14 comes from transformers' `openai/clip-vit-large-patch14` (as in DDPO and the SQDF
   code) instead of the `clip` package's ViT-L-14.pt: the same weights.
2. No uint8 quantization (it would stop the gradient); PIL's two clipped resize passes are
   reproduced, so inputs differ by at most about one uint8 level per pixel (preprocess.py).
3. The MLP runs in float32 whatever the tower's dtype (the authors feed it float32 numpy arrays).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Sequence

import torch
from torch import Tensor, nn

from bench.core.errors import BenchError
from bench.core.registry import REWARDS
from rewards.clip_score import load_clip_folder, tiny_clip_model
from rewards.preprocess import ImageModelReward, ImagePreprocess, freeze, unit
from bench.core.weights import isolated_rng, resolve


class AestheticMLP(nn.Module):
    """The LAION head: 5 linear layers with dropouts and no activations (keys `layers.{0,2,4,6,7}.*`).

    ImageReward reuses it verbatim on a 768-d BLIP feature (rewards/imagereward.py).
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        """[N, input_size] -> [N, 1]."""
        return self.layers(x)


def load_mlp(path: Path, input_size: int = 768) -> AestheticMLP:
    """The head from its state-dict file (the released format: a plain state dict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise BenchError(f"{path} is not an aesthetic-MLP state dict (expected keys layers.0.weight ... layers.7.bias)")
    mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
    if mlp.input_size != input_size:
        raise BenchError(f"{path}: the MLP takes {mlp.input_size}-d embeddings but the CLIP tower gives {input_size}-d")
    mlp.load_state_dict(state)
    return mlp


@REWARDS.register("aesthetic", modality="image", doc="LAION aesthetic predictor v2: linear MLP on normalized CLIP ViT-L/14 embeddings (≈1–10)")
class AestheticReward(ImageModelReward):
    """LAION aesthetic score of images (prompts are ignored).

    Factories (stable; the SD task calls them):
        AestheticReward.load(device="cpu", dtype=torch.float32, weights=None, double_normalize=False, clip_weights=None)
            `weights`: the head `sac+logos+ava1-l14-linearMSE.pth` (default $BENCH_AESTHETIC_WEIGHTS,
            $BENCH_WEIGHTS_DIR, <bench cache>/weights, else downloaded from GitHub unless
            HF_HUB_OFFLINE=1); `clip_weights`: a local openai/clip-vit-large-patch14 folder (default
            $BENCH_CLIP_L14_WEIGHTS, $BENCH_WEIGHTS_DIR/clip-vit-large-patch14, the HF cache).
            MissingWeightsError when either is absent.
        AestheticReward.tiny(seed=0, device="cpu", dtype=torch.float32, double_normalize=False)
            a random-init toy CLIP tower (768-d projection) + a random head of the real shape.
    """

    name: ClassVar[str] = "aesthetic"
    version: ClassVar[int] = 1

    def __init__(self, vision: nn.Module, projection: nn.Module, mlp: AestheticMLP, *, image_size: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, double_normalize: bool = False,
                 source: dict[str, str] | None = None) -> None:
        super().__init__(ImagePreprocess(size=image_size, crop_rounding="round", double_normalize=double_normalize), device, dtype, source or {})
        self.vision = freeze(vision, self.device, dtype)
        self.projection = freeze(projection, self.device, dtype)
        self.mlp = freeze(mlp, self.device, torch.float32)

    def embed(self, x: Tensor) -> Tensor:
        """e/‖e‖ [N, 768] (float32): the normalized CLIP ViT-L/14 image embedding the head reads,
        differentiable in x (also the feature space of the online-BBO proxies, docs/tasks/sd.md §6)."""
        emb = self.projection(self.vision(pixel_values=self.prepare(x)).pooler_output)
        return unit(emb.float())

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """MLP(e/‖e‖) [N] for images x [N, 3, H, W] in [0, 1]."""
        return self.mlp(self.embed(x)).squeeze(-1)

    @classmethod
    def _from_clip(cls, clip: nn.Module, mlp: AestheticMLP, **kw: object) -> "AestheticReward":
        dim = int(clip.config.projection_dim)
        if mlp.input_size != dim:
            raise BenchError(f"reward 'aesthetic': the MLP takes {mlp.input_size}-d embeddings but the CLIP tower gives {dim}-d")
        return cls(clip.vision_model, clip.visual_projection, mlp, image_size=int(clip.config.vision_config.image_size), **kw)  # type: ignore[arg-type]

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights: str | None = None,
             double_normalize: bool = False, clip_weights: str | None = None) -> "AestheticReward":
        """The real head and CLIP ViT-L/14 (see the class docstring); MissingWeightsError when absent."""
        head = resolve("aesthetic-mlp", weights, what="reward 'aesthetic'")
        folder = resolve("clip-vit-l14", clip_weights, what="reward 'aesthetic'")
        clip = load_clip_folder(folder)
        return cls._from_clip(clip, load_mlp(head, int(clip.config.projection_dim)), device=device, dtype=dtype,
                              double_normalize=double_normalize, source={"mlp": str(head), "clip": str(folder)})

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             double_normalize: bool = False) -> "AestheticReward":
        """A random-init model of the same family, small enough for CPU tests."""
        clip = tiny_clip_model(seed, projection_dim=768)
        with isolated_rng(seed + 1):
            mlp = AestheticMLP(768)
        return cls._from_clip(clip, mlp, device=device, dtype=dtype, double_normalize=double_normalize,
                              source={"mlp": f"random-init:seed={seed + 1}", "clip": f"random-init:tiny:seed={seed}"})
