"""Image rewards: real loading paths on tiny checkpoints in the released formats, preprocessing,
gradients, and the missing-weights errors (offline; the network is guarded)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")
TF = pytest.importorskip("torchvision.transforms.functional")

from bench.core.errors import BenchError, MissingWeightsError  # noqa: E402
from bench.core.registry import REWARDS  # noqa: E402
from rewards import hps as hps_mod  # noqa: E402
from rewards import imagereward as ir_mod  # noqa: E402
from rewards.preprocess import ImagePreprocess, center_crop, resize  # noqa: E402
from bench.core.weights import SPECS, resolve  # noqa: E402

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_REWARDS = ("aesthetic", "hps-v2.0", "hps-v2.1", "imagereward", "clip-score", "pickscore")
PROMPTS = ["a photo of a cat", "an oil painting of a red fox in the snow", "a photo of a cat"]


def _images(n: int = 3, h: int = 48, w: int = 40, seed: int = 0) -> torch.Tensor:
    """Random images with values in [0.25, 0.75]: bicubic overshoot stays inside [0, 1], so PIL's
    clipping never triggers and the torchvision tensor pipeline is an exact reference."""
    return 0.25 + 0.5 * torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _tv_preprocess(x: torch.Tensor, size: int, crop: str = "round") -> torch.Tensor:
    """The published pipelines' tensor form, written with torchvision: Resize(size) of the shortest
    side (bicubic, antialiased), center crop (torchvision or transformers offsets), CLIP mean/std."""
    x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    if crop == "round":
        x = TF.center_crop(x, [size, size])
    else:
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def _features(out: object) -> torch.Tensor:
    """transformers 5 get_*_features return a ModelOutput; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def _tiny_clip_folder(folder: Path, projection_dim: int, seed: int, logit_scale: float | None = None) -> Path:
    """A transformers CLIP folder in the hub layout (config.json, model.safetensors, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from bench.core.weights import offline_clip_tokenizer

    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=24, intermediate_size=40, num_attention_heads=3, num_hidden_layers=2,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_attention_heads=3, num_hidden_layers=2, image_size=24, patch_size=6),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    model.save_pretrained(folder)
    offline_clip_tokenizer().save_pretrained(folder)
    return folder


def _mlp_state(input_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LAION-head state dict with the released keys: layers.{0,2,4,6,7}.{weight,bias}."""
    g = torch.Generator().manual_seed(seed)
    dims = [(0, input_size, 1024), (2, 1024, 128), (4, 128, 64), (6, 64, 16), (7, 16, 1)]
    state = {}
    for i, fan_in, fan_out in dims:
        state[f"layers.{i}.weight"] = torch.randn(fan_out, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"layers.{i}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    return state


def _mlp_apply(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i in (0, 2, 4, 6, 7):  # linear layers, no activations (dropouts are inactive)
        x = F.linear(x, state[f"layers.{i}.weight"], state[f"layers.{i}.bias"])
    return x.squeeze(-1)


# ---- registry and factories -------------------------------------------------------------------------


def test_registry_names_meta_and_factories() -> None:
    import inspect

    for name in IMAGE_REWARDS:
        entry = REWARDS.entry(name)
        assert entry.meta["modality"] == "image" and entry.meta["doc"]
        cls = entry.obj
        assert cls.name == name and cls.differentiable
        load = inspect.signature(cls.load).parameters
        assert list(load)[:4] == ["device", "dtype", "weights", "double_normalize"]
        tiny = inspect.signature(cls.tiny).parameters
        assert list(tiny)[:4] == ["seed", "device", "dtype", "double_normalize"]
    assert REWARDS.canonical("hps") == "hps-v2.0"
    assert REWARDS.get("hps").name == "hps-v2.0"  # results record the canonical name
    assert REWARDS.get("hps-v2.0") is not REWARDS.get("hps-v2.1")
    assert SPECS["hps-v2.0"].filename == "HPS_v2_compressed.pt" and SPECS["hps-v2.1"].filename == "HPS_v2.1_compressed.pt"


def test_importing_the_packages_stays_light() -> None:
    code = ("import sys, rewards, metrics; heavy = ('open_clip', 'transformers', 'timm', 'lpips', 'dreamsim', 'torchvision'); "
            "print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", IMAGE_REWARDS)
def test_tiny_models_are_small_deterministic_and_leave_the_global_rng_alone(name: str) -> None:
    cls = REWARDS.get(name)
    state = torch.get_rng_state()
    a = cls.tiny(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    n_params = sum(p.numel() for m in vars(a).values() if isinstance(m, nn.Module) for p in m.parameters())
    assert n_params < 5_000_000
    x = _images()
    b, c = cls.tiny(seed=0), cls.tiny(seed=1)
    sa, sb, sc = a(x, PROMPTS), b(x, PROMPTS), c(x, PROMPTS)
    assert sa.shape == (3,) and sa.dtype == torch.float32 and torch.isfinite(sa).all()
    assert torch.equal(sa, sb)
    assert not torch.allclose(sa, sc)


@pytest.mark.parametrize("name", IMAGE_REWARDS)
def test_gradients_reach_the_pixels(name: str) -> None:
    reward = REWARDS.get(name).tiny(seed=0)
    x = _images(h=64, w=64).requires_grad_(True)
    reward(x, PROMPTS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for m in vars(reward).values() if isinstance(m, nn.Module) for p in m.parameters())


def test_text_cache_is_consistent_and_prompt_sensitive() -> None:
    reward = REWARDS.get("hps-v2.0").tiny(seed=0)
    x = _images(n=1).expand(3, -1, -1, -1)
    s = reward(x, PROMPTS)
    assert s[0] == s[2] and s[0] != s[1]
    torch.testing.assert_close(reward(x[:1], [PROMPTS[1]]), s[1:2])  # cached features = fresh ones


# ---- preprocessing -----------------------------------------------------------------------------------


def test_resize_is_pils_bicubic_on_float_images() -> None:
    import numpy as np
    from PIL import Image

    a = torch.rand(60, 90, generator=torch.Generator().manual_seed(3))
    for h, w in [(24, 36), (37, 55), (80, 120)]:
        pil = np.asarray(Image.fromarray(a.numpy(), mode="F").resize((w, h), Image.BICUBIC))
        ours = resize(a[None, None], (h, w))[0, 0].numpy()
        assert np.abs(pil - ours).max() < 1e-4


def test_center_crop_offset_rules() -> None:
    x = torch.arange(24 * 31, dtype=torch.float32).view(1, 1, 24, 31)  # margin 7: round(3.5) = 4, floor 3
    assert torch.equal(center_crop(x, 24, "round"), TF.center_crop(x, [24, 24]))
    assert torch.equal(center_crop(x, 24, "floor"), x[..., :, 3:27])
    assert not torch.equal(center_crop(x, 24, "round"), center_crop(x, 24, "floor"))


@pytest.mark.parametrize("shape", [(2, 3, 300, 400), (2, 3, 512, 512), (2, 3, 97, 61)])
@pytest.mark.parametrize("crop", ["round", "floor"])
def test_preprocess_equals_the_torchvision_pipeline(shape: tuple[int, ...], crop: str) -> None:
    """Tensor mode (HPS) is torchvision's tensor pipeline exactly; PIL mode equals it whenever the
    bicubic overshoot stays inside [0, 1] (here: values in [0.25, 0.75])."""
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    ours = ImagePreprocess(size=224, crop_rounding=crop, pil=False)(x)  # type: ignore[arg-type]
    assert ours.shape == (2, 3, 224, 224)
    torch.testing.assert_close(ours, _tv_preprocess(x, 224, crop), atol=1e-5, rtol=1e-5)
    mid = 0.25 + x / 2
    torch.testing.assert_close(ImagePreprocess(size=224, crop_rounding=crop)(mid), _tv_preprocess(mid, 224, crop), atol=1e-5, rtol=1e-5)  # type: ignore[arg-type]
    quirk = ImagePreprocess(size=224, crop_rounding=crop, double_normalize=True)(mid)  # type: ignore[arg-type]
    torch.testing.assert_close(quirk, _tv_preprocess(mid / 2 + 0.5, 224, crop), atol=1e-5, rtol=1e-5)


def _uint8_images(shapes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]


def _official_pil(name: str, size: int) -> object:
    """The authors' PIL preprocessing at `size`: torchvision on PIL (OpenAI CLIP's preprocess for
    the aesthetic head, ImageReward's _transform) or transformers' PIL CLIP processor (CLIP score,
    PickScore)."""
    from torchvision import transforms as T

    if name in ("aesthetic", "imagereward"):
        tv = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])
        return lambda img: tv(img)
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: the default CLIP processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    proc = Processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return lambda img: proc(images=img, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("name", ["aesthetic", "imagereward", "clip-score", "pickscore"])
def test_pil_mode_matches_the_official_pil_preprocessing(name: str) -> None:
    """On uint8 noise (the worst case for resampling), the preprocessed input is within ~1 uint8
    level of the authors' PIL pipeline (their rounding); a single unclipped resize is not."""
    from PIL import Image

    reward = REWARDS.get(name).tiny(seed=0)
    size = reward.preprocess.size
    official = _official_pil(name, size)
    level = 1 / 255 / min(CLIP_STD)  # one uint8 level in normalized units
    for img in _uint8_images([(45, 71), (60, 52), (32, 32), (100, 64)], seed=4):
        x = img[None].float() / 255
        ref = official(Image.fromarray(img.permute(1, 2, 0).numpy()))
        assert (reward.preprocess(x)[0] - ref).abs().max() < 1.2 * level
    one_pass = dataclasses.replace(reward.preprocess, pil=False)
    x = _uint8_images([(60, 52)], seed=4)[0][None].float() / 255
    ref = official(Image.fromarray(_uint8_images([(60, 52)], seed=4)[0].permute(1, 2, 0).numpy()))
    assert (one_pass(x)[0] - ref).abs().max() > 3 * level


def test_bad_image_input_is_a_one_line_error() -> None:
    reward = REWARDS.get("aesthetic").tiny(seed=0)
    for bad in (torch.rand(2, 1, 32, 32), torch.rand(3, 32, 32), torch.zeros(2, 3, 32, 32, dtype=torch.uint8)):
        with pytest.raises(BenchError, match="reward 'aesthetic'"):
            reward(bad, ["a"] * bad.shape[0])


# the module whose forward receives the preprocessed pixels, per reward, and its expected input
_TOWER = {
    "aesthetic": (lambda r: r.vision, "round"),
    "clip-score": (lambda r: r.model.vision_model, "floor"),
    "pickscore": (lambda r: r.model.vision_model, "floor"),
    "hps-v2.0": (lambda r: r.model.visual, "round"),
    "hps-v2.1": (lambda r: r.model.visual, "round"),
    "imagereward": (lambda r: r.net.visual_encoder.patch_embed, "round"),
}


@pytest.mark.parametrize("double_normalize", [False, True])
@pytest.mark.parametrize("name", IMAGE_REWARDS)
def test_each_reward_sees_its_authors_input(name: str, double_normalize: bool) -> None:
    """What the image tower receives = the published pipeline (torchvision form) of the image, at
    the tower's size, with the reward's crop rule; double_normalize feeds x/2 + 0.5 instead."""
    reward = REWARDS.get(name).tiny(seed=0, double_normalize=double_normalize)
    tower, crop = _TOWER[name]
    seen: list[torch.Tensor] = []
    handle = tower(reward).register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["pixel_values"]), with_kwargs=True)
    try:
        x = _images(n=2, h=45, w=71)
        reward(x, PROMPTS[:2])
    finally:
        handle.remove()
    size = reward.preprocess.size
    src = x / 2 + 0.5 if double_normalize else x
    torch.testing.assert_close(seen[0], _tv_preprocess(src, size, crop), atol=1e-5, rtol=1e-5)
    assert reward.describe()["double_normalize"] is double_normalize
    assert reward.preprocess.mean == tuple(CLIP_MEAN) and reward.preprocess.std == tuple(CLIP_STD) and reward.preprocess.antialias


def test_double_normalize_changes_the_score_and_can_be_toggled() -> None:
    reward = REWARDS.get("clip-score").tiny(seed=0)
    x = _images()
    plain = reward(x, PROMPTS)
    reward.double_normalize = True
    assert reward.double_normalize and not torch.allclose(reward(x, PROMPTS), plain)
    torch.testing.assert_close(reward(x, PROMPTS), REWARDS.get("clip-score").tiny(seed=0)(x / 2 + 0.5, PROMPTS))


def test_real_architectures_use_224_pixels() -> None:
    """The released towers are 224-pixel models (the tiny ones inherit the size from their configs)."""
    cfg = open_clip.get_model_config(hps_mod.ARCH)
    assert hps_mod.ARCH == "ViT-H-14" and cfg["vision_cfg"]["image_size"] == 224 and cfg["vision_cfg"]["patch_size"] == 14
    assert ir_mod.VIT_LARGE == dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)
    assert ir_mod.MAX_TOKENS == 35 and (ir_mod.MEAN, ir_mod.STD) == (0.16717362830052426, 1.0333394966054072)


# ---- real load paths on tiny checkpoints in the released formats ------------------------------------


def test_aesthetic_load_matches_reference(offline: Path) -> None:
    from transformers import CLIPModel

    folder = _tiny_clip_folder(offline / "clip-l14", projection_dim=768, seed=1)
    state = _mlp_state(768, seed=2)
    head = offline / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, head)
    reward = REWARDS.get("aesthetic").load(weights=str(head), clip_weights=str(folder))
    x = _images()
    clip = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        e = _features(clip.get_image_features(pixel_values=_tv_preprocess(x, 24, "round")))
        expected = _mlp_apply(state, e / e.norm(dim=-1, keepdim=True))
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert reward.describe()["weights"] == {"mlp": str(head), "clip": str(folder)}


def test_weights_found_by_env_var_weights_dir_and_hf_cache(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tiny files through every lookup place give the same scores."""
    folder = _tiny_clip_folder(offline / "src" / "clip-vit-large-patch14", projection_dim=768, seed=1)
    head = offline / "src" / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(_mlp_state(768, seed=2), head)
    x = _images()
    explicit = REWARDS.get("aesthetic").load(weights=str(head), clip_weights=str(folder))(x, PROMPTS)

    monkeypatch.setenv("BENCH_AESTHETIC_WEIGHTS", str(head))
    monkeypatch.setenv("BENCH_CLIP_L14_WEIGHTS", str(folder))
    torch.testing.assert_close(REWARDS.get("aesthetic").load()(x, PROMPTS), explicit)
    monkeypatch.delenv("BENCH_AESTHETIC_WEIGHTS")
    monkeypatch.delenv("BENCH_CLIP_L14_WEIGHTS")

    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(offline / "src"))
    torch.testing.assert_close(REWARDS.get("aesthetic").load()(x, PROMPTS), explicit)
    monkeypatch.delenv("BENCH_WEIGHTS_DIR")

    # the Hugging Face cache layout: models--<org>--<name>/{refs/main, snapshots/<rev>/...}
    repo = offline / "hf" / "hub" / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots").mkdir()
    os.replace(folder, repo / "snapshots" / "0123abcd")
    monkeypatch.setenv("BENCH_AESTHETIC_WEIGHTS", str(head))
    reward = REWARDS.get("aesthetic").load()
    torch.testing.assert_close(reward(x, PROMPTS), explicit)
    assert reward.source["clip"] == str(repo / "snapshots" / "0123abcd")


def test_clip_score_load_matches_reference(offline: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    folder = _tiny_clip_folder(offline / "clip", projection_dim=16, seed=3)
    reward = REWARDS.get("clip-score").load(weights=str(folder))
    x = _images()
    model, tok = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=_tv_preprocess(x, 24, "floor")))
        txt = _features(model.get_text_features(**tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")))
        expected = 100 * F.cosine_similarity(img, txt, dim=-1)
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_pickscore_load_matches_reference(offline: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    folder = _tiny_clip_folder(offline / "PickScore_v1", projection_dim=16, seed=4, logit_scale=math.log(42.0))
    processor = offline / "processor"
    processor.mkdir()
    for f in folder.iterdir():  # the processor repo: tokenizer files only are read
        if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
            (processor / f.name).write_bytes(f.read_bytes())
            f.unlink()
    reward = REWARDS.get("pickscore").load(weights=str(folder), processor=str(processor))
    assert reward.scale == pytest.approx(42.0, rel=1e-5)
    x = _images()
    model, tok = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(processor)
    with torch.no_grad():
        img = _features(model.get_image_features(pixel_values=_tv_preprocess(x, 24, "floor")))
        txt = _features(model.get_text_features(**tok(PROMPTS, padding=True, max_length=77, truncation=True, return_tensors="pt")))
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * (txt @ img.T).diagonal()
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


TEST_HPS_ARCH = dict(embed_dim=16, vision_cfg=dict(image_size=28, layers=2, width=32, head_width=16, patch_size=7),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=2, layers=1))


def _hps_checkpoint(path: Path, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TEST_HPS_ARCH)
    state = model.state_dict()
    torch.save({"state_dict": state}, path)  # the released format: checkpoint["state_dict"]
    return state


@pytest.mark.parametrize("name", ["hps-v2.0", "hps-v2.1"])
def test_hps_load_matches_reference(offline: Path, name: str) -> None:
    path = offline / SPECS[name].filename
    _hps_checkpoint(path, seed=5)
    reward = REWARDS.get(name).load(weights=str(path), arch=TEST_HPS_ARCH)
    x = _images()
    model = open_clip.CLIP(**TEST_HPS_ARCH)
    model.load_state_dict(torch.load(path)["state_dict"])
    model.eval()
    with torch.no_grad():
        img = model.encode_image(_tv_preprocess(x, 28, "round"), normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer("ViT-H-14")(PROMPTS), normalize=True)
        expected = (img @ txt.T).diagonal()
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_hps_versions_read_their_own_files(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hps_checkpoint(offline / "HPS_v2_compressed.pt", seed=6)
    _hps_checkpoint(offline / "HPS_v2.1_compressed.pt", seed=7)
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(offline))
    v20, v21 = REWARDS.get("hps").load(arch=TEST_HPS_ARCH), REWARDS.get("hps-v2.1").load(arch=TEST_HPS_ARCH)
    assert v20.name == "hps-v2.0" and v20.source["checkpoint"].endswith("HPS_v2_compressed.pt")
    assert v21.name == "hps-v2.1" and v21.source["checkpoint"].endswith("HPS_v2.1_compressed.pt")
    x = _images()
    assert not torch.allclose(v20(x, PROMPTS), v21(x, PROMPTS))


def test_hps_rejects_a_file_without_state_dict(offline: Path) -> None:
    path = offline / "HPS_v2_compressed.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(BenchError, match="not an HPS checkpoint"):
        REWARDS.get("hps-v2.0").load(weights=str(path), arch=TEST_HPS_ARCH)


# ImageReward: the checkpoint's key layout written out by hand, and BLIP's forward in plain torch

IR_VISION = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=4.0)
IR_TEXT = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1,
               hidden_size=20, initializer_range=0.02, intermediate_size=40, layer_norm_eps=1e-12, max_position_embeddings=40,
               model_type="bert", num_attention_heads=2, num_hidden_layers=2, pad_token_id=0, type_vocab_size=2, vocab_size=30524,
               encoder_width=20, add_cross_attention=True)


def _blip_state(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's names: blip.visual_encoder.* (BLIP's ViT),
    blip.text_encoder.* (BLIP's med BertModel, cross-attention width = the ViT's), mlp.layers.*,
    plus the entries the score does not use (vision_proj, text_proj, position_ids)."""
    g = torch.Generator().manual_seed(seed)
    d, p, t, ti = IR_VISION["embed_dim"], IR_VISION["patch_size"], IR_TEXT["hidden_size"], IR_TEXT["intermediate_size"]
    n_tok = (IR_VISION["img_size"] // p) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, n_tok, d), "patch_embed.proj.weight": (d, 3, p, p),
                                          "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(IR_VISION["depth"]):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                       b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                       b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    state = {"blip.visual_encoder." + k: torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1) for k, s in shapes.items()}
    text: dict[str, tuple[int, ...]] = {"embeddings.word_embeddings.weight": (IR_TEXT["vocab_size"], t),
                                        "embeddings.position_embeddings.weight": (IR_TEXT["max_position_embeddings"], t),
                                        "embeddings.LayerNorm.weight": (t,), "embeddings.LayerNorm.bias": (t,)}
    for i in range(IR_TEXT["num_hidden_layers"]):
        layer = f"encoder.layer.{i}."
        for att, kv in (("attention.", t), ("crossattention.", d)):
            text.update({layer + att + "self.query.weight": (t, t), layer + att + "self.query.bias": (t,),
                         layer + att + "self.key.weight": (t, kv), layer + att + "self.key.bias": (t,),
                         layer + att + "self.value.weight": (t, kv), layer + att + "self.value.bias": (t,),
                         layer + att + "output.dense.weight": (t, t), layer + att + "output.dense.bias": (t,),
                         layer + att + "output.LayerNorm.weight": (t,), layer + att + "output.LayerNorm.bias": (t,)})
        text.update({layer + "intermediate.dense.weight": (ti, t), layer + "intermediate.dense.bias": (ti,),
                     layer + "output.dense.weight": (t, ti), layer + "output.dense.bias": (t,),
                     layer + "output.LayerNorm.weight": (t,), layer + "output.LayerNorm.bias": (t,)})
    state.update({"blip.text_encoder." + k: torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1) for k, s in text.items()})
    for k in list(state):
        if k.endswith(("norm1.weight", "norm2.weight", "norm.weight", "LayerNorm.weight")):
            state[k] = 1 + state[k]
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(IR_TEXT["max_position_embeddings"])[None]
    state["blip.vision_proj.weight"], state["blip.vision_proj.bias"] = torch.randn(8, d, generator=g), torch.zeros(8)
    state["blip.text_proj.weight"], state["blip.text_proj.bias"] = torch.randn(8, t, generator=g), torch.zeros(8)
    state.update({"mlp." + k: v for k, v in _mlp_state(t, seed + 1).items()})
    return state


def _blip_reference(sd: dict[str, torch.Tensor], pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward's score in plain torch from the checkpoint tensors (BLIP's vit.py + med.py math)."""
    n, d, heads = pixels.shape[0], IR_VISION["embed_dim"], IR_VISION["num_heads"]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, bias: torch.Tensor | float = 0.0) -> torch.Tensor:
        split = lambda z: z.view(z.shape[0], z.shape[1], h, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
        return (a @ v).transpose(1, 2).reshape(q.shape[0], -1, h * q.shape[-1])

    V = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[V + "patch_embed.proj.weight"], sd[V + "patch_embed.proj.bias"], stride=IR_VISION["patch_size"])
    x = torch.cat([sd[V + "cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + sd[V + "pos_embed"]
    for i in range(IR_VISION["depth"]):
        b = f"{V}blocks.{i}."
        h = F.layer_norm(x, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        x = x + F.linear(attention(q, k, v, heads), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])), sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    image = F.layer_norm(x, (d,), sd[V + "norm.weight"], sd[V + "norm.bias"], eps=1e-6)

    T, t = "blip.text_encoder.", IR_TEXT["hidden_size"]
    ln = lambda z, p: F.layer_norm(z, (t,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-12)  # noqa: E731
    lin = lambda z, p: F.linear(z, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    e = sd[T + "embeddings.word_embeddings.weight"][ids] + sd[T + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    e = ln(e, T + "embeddings.LayerNorm")
    pad_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(IR_TEXT["num_hidden_layers"]):
        L = f"{T}encoder.layer.{i}."
        for att, kv, bias in (("attention.", None, pad_bias), ("crossattention.", image, 0.0)):
            src = e if kv is None else kv
            ctx = attention(lin(e, L + att + "self.query"), lin(src, L + att + "self.key"), lin(src, L + att + "self.value"), IR_TEXT["num_attention_heads"], bias)
            e = ln(lin(ctx, L + att + "output.dense") + e, L + att + "output.LayerNorm")
        e = ln(lin(F.gelu(lin(e, L + "intermediate.dense")), L + "output.dense") + e, L + "output.LayerNorm")
    raw = _mlp_apply({k[4:]: v for k, v in sd.items() if k.startswith("mlp.")}, e[:, 0])
    return (raw - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_load_matches_plain_torch_blip(offline: Path) -> None:
    from transformers import BertTokenizer

    ckpt, cfg = offline / "ImageReward.pt", offline / "med_config.json"
    state = _blip_state(seed=8)
    torch.save(state, ckpt)
    cfg.write_text(json.dumps(IR_TEXT))
    reward = REWARDS.get("imagereward").load(weights=str(ckpt), config=str(cfg), vision=IR_VISION)
    assert "blip.vision_proj.weight" in reward.source["unused_keys"]
    x = _images()
    vocab = resolve("bert-vocab")
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = _blip_reference(state, _tv_preprocess(x, 32, "round"), enc["input_ids"], enc["attention_mask"])
        got = reward(x, PROMPTS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got[0], got[1])


def test_imagereward_refuses_a_checkpoint_missing_weights(offline: Path) -> None:
    state = _blip_state(seed=9)
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, offline / "ImageReward.pt")
    (offline / "med_config.json").write_text(json.dumps(IR_TEXT))
    with pytest.raises(BenchError, match="lacks 1 weights"):
        REWARDS.get("imagereward").load(weights=str(offline / "ImageReward.pt"), config=str(offline / "med_config.json"), vision=IR_VISION)


def test_imagereward_tokenizer_is_bert_base_uncased_with_blip_tokens() -> None:
    tok = ir_mod.bert_tokenizer(resolve("bert-vocab"))
    assert len(tok) == 30524 and tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    ids = tok("A photo of a Cat", padding="max_length", truncation=True, max_length=35)["input_ids"]
    assert ids[:7] == [101, 1037, 6302, 1997, 1037, 4937, 102] and len(ids) == 35 and ids[7:] == [0] * 28


# ---- missing weights ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,file,env", [
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "BENCH_AESTHETIC_WEIGHTS"),
    ("hps-v2.0", "HPS_v2_compressed.pt", "BENCH_HPS_V2_0_WEIGHTS"),
    ("hps", "HPS_v2_compressed.pt", "BENCH_HPS_V2_0_WEIGHTS"),
    ("hps-v2.1", "HPS_v2.1_compressed.pt", "BENCH_HPS_V2_1_WEIGHTS"),
    ("imagereward", "ImageReward.pt", "BENCH_IMAGEREWARD_WEIGHTS"),
    ("clip-score", "clip-vit-large-patch14", "BENCH_CLIP_L14_WEIGHTS"),
    ("pickscore", "PickScore_v1", "BENCH_PICKSCORE_WEIGHTS"),
])
def test_missing_weights_is_one_line_and_downloads_nothing(offline: Path, monkeypatch: pytest.MonkeyPatch, name: str, file: str, env: str) -> None:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(offline / "bench-cache"))
    with pytest.raises(MissingWeightsError) as info:
        REWARDS.get(name).load()
    msg = str(info.value)
    assert isinstance(info.value, BenchError)  # the CLI prints it as one line and exits 2
    assert "\n" not in msg and file in msg and env in msg and "HF_HUB_OFFLINE=1" in msg
    assert f"reward '{REWARDS.canonical(name)}'" in msg


def test_wrong_explicit_path_is_reported_not_replaced(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hps_checkpoint(offline / "HPS_v2_compressed.pt", seed=1)
    monkeypatch.setenv("BENCH_WEIGHTS_DIR", str(offline))  # a valid file elsewhere must not be used instead
    with pytest.raises(MissingWeightsError, match="no/such/HPS.pt"):
        REWARDS.get("hps-v2.0").load(weights=str(offline / "no" / "such" / "HPS.pt"), arch=TEST_HPS_ARCH)


def test_download_only_when_online_and_failures_are_one_line(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, **kw: object) -> str:
        calls.append((repo_id, filename))
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(MissingWeightsError, match=r"download failed: OSError") as info:
        REWARDS.get("hps-v2.1").load()
    assert calls == [("xswu/HPSv2", "HPS_v2.1_compressed.pt")] and "\n" not in str(info.value)


def test_snapshot_download_fetches_small_files_then_the_first_weight_alternative(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    snap = offline / "snapshot"
    fetched: list[tuple[str, ...]] = []

    def fake_snapshot(repo_id: str, allow_patterns: list[str], **kw: object) -> str:
        fetched.append(("snapshot", repo_id, *allow_patterns))
        snap.mkdir(exist_ok=True)
        (snap / "config.json").write_text("{}")
        return str(snap)

    def fake_file(repo_id: str, filename: str, **kw: object) -> str:
        fetched.append(("file", filename))
        if filename == "model.safetensors":
            raise FileNotFoundError(filename)  # the repository only has the .bin
        (snap / filename).write_bytes(b"weights")
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("pickscore") == snap
    assert fetched == [("snapshot", "yuvalkirstain/PickScore_v1", "config.json"), ("file", "model.safetensors"), ("file", "pytorch_model.bin")]
