"""PickScore: a CLIP-H/14 fine-tuned on Pick-a-Pic human preferences.

Citation: Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation", arXiv:2305.01569 (github.com/yuvalkirstain/PickScore). Weights
`yuvalkirstain/PickScore_v1` (transformers CLIPModel, ViT-H/14); processor (tokenizer and image
settings) from `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, as in the authors' inference snippet.

Objective: r(x, c) = exp(s) · cos(E_I(x), E_T(c)), s = the checkpoint's learned `logit_scale`
(the authors' score is `logit_scale.exp() * text_embs @ image_embs.T`).

NOTATION
    E_I, E_T   unit-norm projected image / text embeddings (rewards/clip_score.py)
    s          `model.logit_scale` (scalar parameter of the checkpoint); `scale` = exp(s)

Preprocessing: the laion processor (CLIPImageProcessor): shortest side -> 224 bicubic, center crop
224 with (H − 224) // 2 offsets, OpenAI CLIP mean/std; differentiable on tensors here.

DELIBERATE DEVIATIONS
1. No uint8 quantization (differentiability); PIL's two clipped resize passes are reproduced, so
   inputs differ by at most about one uint8 level per pixel (rewards/preprocess.py).
2. Scores are returned per (image, its own prompt) pair; the authors' snippet scores one prompt
   against a list of images, the same numbers.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.core.registry import REWARDS
from rewards.clip_score import ClipScoreReward, load_clip_folder, load_tokenizer, tiny_clip_model
from bench.core.weights import resolve


@REWARDS.register("pickscore", modality="image", doc="PickScore_v1: exp(logit_scale)·cos of a preference-tuned CLIP-H/14 (Kirstain et al. 2023)")
class PickScoreReward(ClipScoreReward):
    """exp(logit_scale) · cosine similarity of PickScore_v1's image and prompt embeddings.

    Factories (stable; the SD task calls them):
        PickScoreReward.load(device="cpu", dtype=torch.float32, weights=None, double_normalize=False, processor=None)
            `weights`: a local transformers folder of yuvalkirstain/PickScore_v1 (config.json +
            model.safetensors/pytorch_model.bin), default $BENCH_PICKSCORE_WEIGHTS,
            $BENCH_WEIGHTS_DIR/PickScore_v1 or the HF cache; `processor`: a folder with the tokenizer
            of laion/CLIP-ViT-H-14-laion2B-s32B-b79K (default $BENCH_PICKSCORE_PROCESSOR, ... , HF
            cache). MissingWeightsError when absent.
        PickScoreReward.tiny(seed=0, device="cpu", dtype=torch.float32, double_normalize=False)
            a random-init CLIP of the same family, deterministic in `seed`.
    """

    name: ClassVar[str] = "pickscore"
    version: ClassVar[int] = 1
    weight_key: ClassVar[str] = "pickscore"
    crop_rounding: ClassVar[str] = "floor"

    @property
    def scale(self) -> float:
        """exp(s), the checkpoint's temperature (about 100 for PickScore_v1)."""
        return float(self.model.logit_scale.detach().float().exp())

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights: str | None = None,
             double_normalize: bool = False, processor: str | None = None) -> "PickScoreReward":
        """The real checkpoint and processor (see the class docstring); MissingWeightsError when absent."""
        folder = resolve(cls.weight_key, weights, what=f"reward {cls.name!r}")
        proc = resolve("pickscore-processor", processor, what=f"reward {cls.name!r}")
        return cls(load_clip_folder(folder), load_tokenizer(proc), device=device, dtype=dtype,
                   double_normalize=double_normalize, source={"model": str(folder), "processor": str(proc)})

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             double_normalize: bool = False) -> "PickScoreReward":
        """A random-init model of the same family, small enough for CPU tests."""
        from bench.core.weights import offline_clip_tokenizer

        return cls(tiny_clip_model(seed), offline_clip_tokenizer(), device=device, dtype=dtype,
                   double_normalize=double_normalize, source={"model": f"random-init:tiny:seed={seed}"})
