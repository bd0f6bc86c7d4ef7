"""Human Preference Score v2 (v2.0 and v2.1): a preference-tuned open_clip ViT-H/14.

Citation: Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating Human
Preferences of Text-to-Image Synthesis", arXiv:2306.09341 (github.com/tgxs002/HPSv2,
`hpsv2/img_score.py`). Checkpoints on the hub repo `xswu/HPSv2`: `HPS_v2_compressed.pt` (v2.0, the
reward SQDF trains on, docs/rewards.md §1) and `HPS_v2.1_compressed.pt` (v2.1). They are two
rewards with two names, `hps-v2.0` (alias `hps`) and `hps-v2.1`, never mixed in one table.

Objective: r(x, c) = cos(E_I(x), E_T(c)): the diagonal of image_features @ text_featuresᵀ with
unit-norm features and no logit scale (typical values 0.2–0.35).

NOTATION
    E_I(x)   `model.encode_image(pixels, normalize=True)` [N, 1024]
    E_T(c)   `model.encode_text(tokens, normalize=True)` [N, 1024], open_clip's SimpleTokenizer (77 tokens)

The model is built as the authors' loader does, minus the wasted download: open_clip's ViT-H-14
architecture with pretrained=None, then `load_state_dict(checkpoint["state_dict"])`; the `hpsv2`
package is not used (docs/rewards.md §1: its vendored open_clip and open_clip 3.x have the same
686 keys and shapes, and the same tokenizer ids).

Preprocessing (hpsv2's `preprocess_val`): ToTensor, then torchvision Resize(224, bicubic) of the
float tensor (no clipping), CenterCrop(224), OpenAI CLIP mean/std; on torchvision >= 0.17 that
resize is `F.interpolate(bicubic, antialias=True)`, exactly what rewards/preprocess.py computes
with pil=False.

DELIBERATE DEVIATIONS
1. The authors score under `torch.cuda.amp.autocast()` (fp16 matmuls, fp32 weights); here the
   model runs in the dtype passed to `load` (fp32 by default) with scores returned in fp32.
2. No uint8 quantization of the input before the tensor ops (differentiability): at most half a
   uint8 level per input pixel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from bench.core.errors import BenchError
from bench.core.registry import REWARDS
from rewards.preprocess import ImageModelReward, ImagePreprocess, PromptCache, freeze, unit
from bench.core.weights import isolated_rng, resolve

ARCH = "ViT-H-14"
"open_clip's architecture name of both HPS v2 checkpoints"

TINY_ARCH: dict[str, Any] = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=4, layers=2),
)
"the ViT-H-14 config's keys at toy size (about 1.7 M parameters): the same open_clip CLIP class"


def build_open_clip(arch: str | dict[str, Any], seed: int = 0) -> nn.Module:
    """open_clip.CLIP from a model-config name (e.g. "ViT-H-14") or a config dict; random init
    under `seed` (the caller loads weights on top)."""
    import open_clip

    cfg = open_clip.get_model_config(arch) if isinstance(arch, str) else dict(arch)
    if cfg is None:
        raise BenchError(f"unknown open_clip architecture {arch!r}; e.g. {ARCH}")
    with isolated_rng(seed):
        return open_clip.CLIP(**cfg)


class HPSReward(ImageModelReward):
    """Cosine similarity of HPS-tuned ViT-H/14 image and prompt embeddings (subclassed per version).

    Factories (stable; the SD task calls them):
        <cls>.load(device="cpu", dtype=torch.float32, weights=None, double_normalize=False, arch="ViT-H-14")
            `weights`: the version's checkpoint (a torch file holding {"state_dict": ...}); default
            $BENCH_HPS_V2_0_WEIGHTS / $BENCH_HPS_V2_1_WEIGHTS, $BENCH_WEIGHTS_DIR, the HF cache of
            xswu/HPSv2, else downloaded unless HF_HUB_OFFLINE=1. `arch` is for tests only (a tiny
            open_clip config dict). MissingWeightsError when absent.
        <cls>.tiny(seed=0, device="cpu", dtype=torch.float32, double_normalize=False)
            a random-init open_clip CLIP of config TINY_ARCH, deterministic in `seed`.
    """

    name: ClassVar[str] = "hps"
    version: ClassVar[int] = 1
    weight_key: ClassVar[str] = ""

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 double_normalize: bool = False, source: dict[str, str] | None = None) -> None:
        size = model.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        super().__init__(ImagePreprocess(size=size, crop_rounding="round", pil=False, double_normalize=double_normalize), device, dtype, source or {})
        self.model = freeze(model, self.device, dtype)
        self.tokenizer = tokenizer
        self.text_features = PromptCache(self._encode_text)

    def image_features(self, x: Tensor) -> Tensor:
        """E_I(x) [N, D] (unit norm, float32), differentiable in x."""
        return unit(self.model.encode_image(self.prepare(x)).float())

    def _encode_text(self, prompts: list[str]) -> Tensor:
        return unit(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float())

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(E_I(x), E_T(c)) [N]."""
        img = self.image_features(x)
        return (img * self.text_features(list(prompts)).to(img.device)).sum(-1)

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights: str | None = None,
             double_normalize: bool = False, arch: str | dict[str, Any] = ARCH) -> "HPSReward":
        """The real checkpoint (see the class docstring); MissingWeightsError when absent."""
        import open_clip

        path = resolve(cls.weight_key, weights, what=f"reward {cls.name!r}")
        model = build_open_clip(arch)
        model.load_state_dict(read_state_dict(path))
        return cls(model, open_clip.get_tokenizer(ARCH), device=device, dtype=dtype, double_normalize=double_normalize,
                   source={"checkpoint": str(path), "arch": arch if isinstance(arch, str) else "custom"})

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             double_normalize: bool = False) -> "HPSReward":
        """A random-init model of the same family, small enough for CPU tests."""
        import open_clip

        return cls(build_open_clip(TINY_ARCH, seed), open_clip.get_tokenizer(ARCH), device=device, dtype=dtype,
                   double_normalize=double_normalize, source={"checkpoint": f"random-init:tiny:seed={seed}"})


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """checkpoint["state_dict"] of an HPS file (the released format, as hpsv2 reads it)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise BenchError(f"{path} is not an HPS checkpoint (expected a dict with a 'state_dict' entry)")
    return ckpt["state_dict"]


@REWARDS.register("hps-v2.0", aliases=("hps",), modality="image", doc="HPS v2.0 (HPS_v2_compressed.pt): cos of preference-tuned ViT-H/14 embeddings; SQDF's reward")
class HPSv20Reward(HPSReward):
    __doc__ = HPSReward.__doc__
    name: ClassVar[str] = "hps-v2.0"
    weight_key: ClassVar[str] = "hps-v2.0"


@REWARDS.register("hps-v2.1", modality="image", doc="HPS v2.1 (HPS_v2.1_compressed.pt): cos of preference-tuned ViT-H/14 embeddings")
class HPSv21Reward(HPSReward):
    __doc__ = HPSReward.__doc__
    name: ClassVar[str] = "hps-v2.1"
    weight_key: ClassVar[str] = "hps-v2.1"
