"""The input side every image reward shares: checks, differentiable preprocessing, text caching.

All five image rewards here (LAION aesthetic, HPS v2.0/v2.1, ImageReward, CLIP score, PickScore)
were published with the same OpenAI-CLIP style pipeline on PIL images:

    resize the shortest side to S (bicubic)  ->  center crop S×S  ->  to [0, 1]  ->  (x − mean) / std

with S = 224 and the OpenAI CLIP mean/std. `ImagePreprocess` applies it to a batch of tensors in
[0, 1] with differentiable ops only (F.interpolate, slicing, affine), so gradients reach the pixels.

Interpolation. PIL's bicubic resize (Keys kernel with a = −0.5, support widened by the
downscale factor) is what `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`
computes: on float images the two agree to ~1e-5 (checked in tests), and torchvision's tensor
`Resize` (antialias=True since torchvision 0.17) is the same call. On uint8 images PIL resizes in
two passes (horizontal, then vertical) and stores the intermediate image as uint8, clipping the
bicubic overshoot; `pil_resize` does the same two passes with the clip (without it, noisy images
differ by up to ~20 uint8 levels). The one unavoidable difference from the official PIL pipelines
is quantization: they round the input and both passes to uint8, which here would block the
gradient, so results differ by at most about one uint8 level per pixel (checked against PIL and
transformers' PIL image processor in tests). HPS's official transform resizes a float tensor
(ToTensor before Resize, no clipping), so it uses pil=False and, on torchvision >= 0.17, matches
exactly; with torchvision < 0.17 that resize would have used antialias=False.

Center-crop offsets. torchvision (OpenAI CLIP, open_clip/HPS, ImageReward) uses round((H − S)/2),
transformers' CLIPImageProcessor (CLIP score, PickScore) used (H − S) // 2; both are offered.
Square inputs (SD's 512×512 samples) need no crop, so the rule only matters for other shapes.

The SQDF text-to-image code applies (x/2 + 0.5) to images that are already in [0, 1]
(docs/tasks/sd.md §5); `double_normalize=True` reproduces that before everything else.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.core.errors import BenchError
from bench.core.reward import Reward

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"per-channel mean of OpenAI CLIP's training images (used by all five rewards)"
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"per-channel std of OpenAI CLIP's training images"


def check_images(x: Tensor, who: str) -> None:
    """Refuse anything but a float batch [N, 3, H, W] (values are expected in [0, 1])."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise BenchError(f"{who}: expected images [N, 3, H, W] in [0, 1], got {shape}")
    if not x.is_floating_point():
        raise BenchError(f"{who}: expected floating-point images in [0, 1], got dtype {x.dtype}")


def resize(x: Tensor, size: tuple[int, int], antialias: bool = True) -> Tensor:
    """Bicubic resize of [N, C, H, W] to `size` (= PIL's BICUBIC when antialias=True); identity
    when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=antialias, align_corners=False)


def pil_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize as PIL does it on uint8 images: a horizontal pass, clipped to [0, 1], then a
    vertical pass, clipped (PIL stores the intermediate image as uint8). Without the intermediate
    clip, bicubic overshoot on high-frequency content differs from PIL by up to ~20 uint8 levels;
    with it, by at most ~1 level (PIL's rounding). Differentiable (zero gradient where clipped,
    as in PIL)."""
    h, w = size
    if x.shape[-1] != w:
        x = F.interpolate(x, size=(x.shape[-2], w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    if x.shape[-2] != h:
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return x


def shortest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(H', W') with the shorter side = size and the longer one int(size · long / short), the rule
    of torchvision's Resize(int) and transformers' `shortest_edge`."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def center_crop(x: Tensor, size: int, rounding: Literal["round", "floor"] = "round") -> Tensor:
    """The central size×size window of [N, C, H, W] (H, W >= size)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if rounding == "round":  # torchvision: int(round((H - S) / 2.0)), Python's banker's rounding
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:  # transformers: (H - S) // 2
        top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


@dataclass(frozen=True)
class ImagePreprocess:
    """Images [N, 3, H, W] in [0, 1] -> the normalized S×S input of a CLIP-style image tower."""

    size: int = 224
    "side S of the square the model sees (224 for every released checkpoint used here)"
    crop_rounding: Literal["round", "floor"] = "round"
    "center-crop offset rule: 'round' (torchvision) or 'floor' (transformers' image processors)"
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    "per-channel mean subtracted after resizing"
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    "per-channel std divided by after subtracting the mean"
    pil: bool = True
    "resize like PIL on uint8 (two clipped passes, `pil_resize`); False: one unclipped tensor resize (HPS)"
    antialias: bool = True
    "tensor resize only (pil=False): antialiased bicubic; False reproduces torchvision < 0.17"
    double_normalize: bool = False
    "apply x/2 + 0.5 first, the SQDF text-to-image code's quirk (docs/tasks/sd.md §5); False is correct"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise BenchError(f"preprocess size must be >= 1, got {self.size}")
        if self.crop_rounding not in ("round", "floor"):
            raise BenchError(f"crop_rounding must be 'round' or 'floor', got {self.crop_rounding!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise BenchError(f"mean/std must be 3 numbers (std > 0), got {self.mean} / {self.std}")

    def __call__(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 3, S, S], float32, differentiable in x."""
        x = x.float()
        if self.double_normalize:
            x = x / 2 + 0.5
        target = shortest_side_size(x.shape[-2], x.shape[-1], self.size)
        x = pil_resize(x, target) if self.pil else resize(x, target, self.antialias)
        x = center_crop(x, self.size, self.crop_rounding)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


class PromptCache:
    """Memoized per-prompt text features (the text side never needs a gradient).

    Prompts repeat across training batches, so each distinct prompt is encoded once; at most
    `max_size` entries are kept (least recently used evicted).
    """

    def __init__(self, encode: Callable[[list[str]], Tensor], max_size: int = 4096) -> None:
        self.encode = encode
        self.max_size = max_size
        self._store: OrderedDict[str, Tensor] = OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """Features [N, ...] of the prompts, in order."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._store]
        if missing:
            with torch.no_grad():
                feats = self.encode(missing)
            for p, f in zip(missing, feats):
                self._store[p] = f.detach()
        out = []
        for p in prompts:
            self._store.move_to_end(p)
            out.append(self._store[p])
        while len(self._store) > self.max_size:
            self._store.popitem(last=False)
        return torch.stack(out)

    def clear(self) -> None:
        self._store.clear()


class ImageModelReward(Reward):
    """Shared plumbing of the image rewards: device, dtype, preprocessing and provenance.

    Subclasses hold their frozen torch modules (eval mode, requires_grad False) and implement
    `score`; `prepare(x)` turns the caller's images into the model's input on its device/dtype.
    """

    differentiable: ClassVar[bool] = True

    def __init__(self, preprocess: ImagePreprocess, device: str | torch.device, dtype: torch.dtype, source: dict[str, str]) -> None:
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = dict(source)

    @property
    def double_normalize(self) -> bool:
        """Whether inputs get the SQDF code's extra x/2 + 0.5 (docs/tasks/sd.md §5)."""
        return self.preprocess.double_normalize

    @double_normalize.setter
    def double_normalize(self, value: bool) -> None:
        self.preprocess = replace(self.preprocess, double_normalize=bool(value))

    def prepare(self, x: Tensor) -> Tensor:
        """Images [N, 3, H, W] in [0, 1] -> preprocessed model input [N, 3, S, S] (model dtype)."""
        check_images(x, f"reward {self.name!r}")
        return self.preprocess(x.to(self.device)).to(self.dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "double_normalize": self.double_normalize, "preprocess": asdict(self.preprocess),
                "dtype": str(self.dtype).replace("torch.", ""), "weights": self.source}


def freeze(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """Eval mode, no parameter gradients, moved to device/dtype (gradients still flow to inputs)."""
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def unit(x: Tensor, dim: int = -1) -> Tensor:
    """x / ‖x‖ along dim (the L2 normalization every CLIP-style score applies to embeddings)."""
    return x / x.norm(dim=dim, keepdim=True)
