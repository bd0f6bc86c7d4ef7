"""CLIP score: prompt–image agreement as scaled cosine similarity of CLIP embeddings.

Citation: Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning",
arXiv:2104.08718 (github.com/jmhessel/clipscore). The text-to-image literature uses the
torchmetrics variant (Lightning-AI/torchmetrics `functional/multimodal/clip_score.py`): OpenAI CLIP
ViT-L/14 (`openai/clip-vit-large-patch14`) and a scale of 100. DAS/SQDF's `clip_score` hooks load
the same checkpoint (docs/rewards.md §1).

Objective: r(x, c) = w · cos(E_I(x), E_T(c)), w = 100, with E_I, E_T the projected CLIP image and
text embeddings.

NOTATION
    x       images [N, 3, H, W] in [0, 1]                E_I(x)  `image_features` [N, D] (unit norm)
    c       prompts (N strings)                           E_T(c)  `text_features` [N, D] (unit norm)
    w       `scale` (100 here; exp(logit_scale) for PickScore, which subclasses this class)

Preprocessing (transformers' CLIPProcessor, which torchmetrics and PickScore call): shortest side
-> 224 bicubic (PIL, antialiased), center crop 224 with (H − 224) // 2 offsets, OpenAI CLIP mean/std;
here differentiable on tensors (rewards/preprocess.py). Text: the CLIP BPE tokenizer, truncated to
77 tokens; the pooled text feature is read at the end-of-text token, so padding cannot change it.

DELIBERATE DEVIATIONS
1. No clamp at 0. torchmetrics clamps the *mean* score at 0 (Hessel's max(cos, 0)); a reward
   keeps the raw per-sample value so that its gradient never vanishes.
2. No uint8 quantization of the image (PIL); PIL's two clipped resize passes are reproduced, so
   inputs differ by at most about one uint8 level per pixel (preprocess.py).
3. Weights must already be local (bench/core/weights.py); a download happens only when HF_HUB_OFFLINE
   is unset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from bench.core.registry import REWARDS
from rewards.preprocess import ImageModelReward, ImagePreprocess, PromptCache, freeze, unit
from bench.core.weights import isolated_rng, resolve

TINY_CLIP = dict(
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                     max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
    vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8),
)
"a transformers CLIPConfig of the ViT-L/14 family at toy size (real BPE vocabulary; 32-px images)"


def tiny_clip_model(seed: int, projection_dim: int = 32) -> nn.Module:
    """A random-init transformers CLIPModel of config TINY_CLIP (about 1.7 M parameters)."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=TINY_CLIP["text_config"], vision_config=TINY_CLIP["vision_config"], projection_dim=projection_dim)
    with isolated_rng(seed):
        return CLIPModel(cfg)


def load_clip_folder(folder: Path) -> nn.Module:
    """A transformers CLIPModel from a local model folder (config.json + weights); never downloads."""
    from transformers import CLIPModel

    with isolated_rng(0):  # from_pretrained may initialize buffers/unloaded weights with the global RNG
        return CLIPModel.from_pretrained(str(folder), local_files_only=True)


def load_tokenizer(folder: Path) -> Any:
    """The CLIP tokenizer saved in a local folder (tokenizer.json or vocab.json + merges.txt)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@REWARDS.register("clip-score", modality="image", doc="100·cos(CLIP ViT-L/14 image, prompt) embeddings (Hessel et al. 2021, torchmetrics scale)")
class ClipScoreReward(ImageModelReward):
    """100 · cosine similarity of OpenAI CLIP ViT-L/14 image and prompt embeddings.

    Factories (stable; the SD task calls them):
        ClipScoreReward.load(device="cpu", dtype=torch.float32, weights=None, double_normalize=False)
            `weights`: a local transformers CLIP folder (config.json, model.safetensors or
            pytorch_model.bin, tokenizer files); default: $BENCH_CLIP_L14_WEIGHTS,
            $BENCH_WEIGHTS_DIR/clip-vit-large-patch14, the HF cache of openai/clip-vit-large-patch14.
            MissingWeightsError when absent.
        ClipScoreReward.tiny(seed=0, device="cpu", dtype=torch.float32, double_normalize=False)
            a random-init CLIP of the same family (TINY_CLIP), deterministic in `seed`.
    """

    name: ClassVar[str] = "clip-score"
    version: ClassVar[int] = 1
    weight_key: ClassVar[str] = "clip-vit-l14"
    crop_rounding: ClassVar[str] = "floor"

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 double_normalize: bool = False, source: dict[str, str] | None = None) -> None:
        image_size = int(model.config.vision_config.image_size)
        pre = ImagePreprocess(size=image_size, crop_rounding=self.crop_rounding, double_normalize=double_normalize)  # type: ignore[arg-type]
        super().__init__(pre, device, dtype, source or {})
        self.model = freeze(model, self.device, dtype)
        self.tokenizer = tokenizer
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.text_features = PromptCache(self._encode_text)

    # ---- the score ---------------------------------------------------------------------------------

    @property
    def scale(self) -> float:
        """w in w · cos (100 for CLIP score)."""
        return 100.0

    def image_features(self, x: Tensor) -> Tensor:
        """E_I(x): unit-norm projected image embeddings [N, D] (float32), differentiable in x."""
        pooled = self.model.vision_model(pixel_values=self.prepare(x)).pooler_output
        return unit(self.model.visual_projection(pooled).float())

    def _encode_text(self, prompts: list[str]) -> Tensor:
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return unit(self.model.text_projection(out.pooler_output).float())

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """w · cos(E_I(x), E_T(c)) [N]."""
        img = self.image_features(x)
        txt = self.text_features(list(prompts)).to(img.device)
        return self.scale * (img * txt).sum(-1)

    # ---- factories ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights: str | None = None,
             double_normalize: bool = False) -> "ClipScoreReward":
        """The real checkpoint (see the class docstring); MissingWeightsError when absent."""
        folder = resolve(cls.weight_key, weights, what=f"reward {cls.name!r}")
        return cls(load_clip_folder(folder), load_tokenizer(folder), device=device, dtype=dtype,
                   double_normalize=double_normalize, source={"model": str(folder)})

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             double_normalize: bool = False) -> "ClipScoreReward":
        """A random-init model of the same family, small enough for CPU tests."""
        from bench.core.weights import offline_clip_tokenizer

        return cls(tiny_clip_model(seed), offline_clip_tokenizer(), device=device, dtype=dtype,
                   double_normalize=double_normalize, source={"model": f"random-init:tiny:seed={seed}"})
