"""Diversity (LPIPS, DreamSim) and held-out reward metrics: equivalence with the packages' own
distance functions, the properties of a mean pairwise distance, model loading once through the
task hooks, and the offline errors of the real loaders."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

lpips = pytest.importorskip("lpips")
pytest.importorskip("dreamsim")
pytest.importorskip("open_clip")

from bench.core.errors import BenchError, MissingWeightsError  # noqa: E402
from bench.core.evaluation import EvalContext, PromptSamples  # noqa: E402
from bench.core.registry import METRICS, REWARDS  # noqa: E402
from metrics import perceptual as P  # noqa: E402


def _images(n: int, seed: int, h: int = 40, w: int = 40) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def lp() -> torch.nn.Module:
    return P.tiny("lpips", seed=0)


@pytest.fixture(scope="module")
def ds() -> torch.nn.Module:
    return P.tiny("dreamsim", seed=0)


class FakeTask:
    """The hooks an image task offers: reward_model(name) and perceptual_model(name), counted."""

    def __init__(self, perceptual: dict[str, Any]) -> None:
        self.perceptual = perceptual
        self.rewards: dict[str, Any] = {}
        self.calls: list[str] = []
        self.device = "cpu"

    def build_reward(self, name: str) -> Any:
        return self.reward_model(name)

    def reward_model(self, name: str) -> Any:
        self.calls.append(name)
        if name not in self.rewards:
            self.rewards[name] = REWARDS.get(name).tiny(seed=0)
        return self.rewards[name]

    def perceptual_model(self, name: str) -> Any:
        self.calls.append(name)
        return self.perceptual[name]


# ---- LPIPS -------------------------------------------------------------------------------------------


def test_lpips_uses_the_shipped_heads_and_a_seeded_trunk(lp: torch.nn.Module) -> None:
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu")
    for k, v in shipped.items():
        torch.testing.assert_close(lp.state_dict()[k], v)
    again, other = P.tiny("lpips", seed=0), P.tiny("lpips", seed=1)
    w = "net.slice1.0.weight"
    assert torch.equal(lp.state_dict()[w], again.state_dict()[w]) and not torch.equal(lp.state_dict()[w], other.state_dict()[w])


def test_pairwise_lpips_equals_lpips_forward(lp: torch.nn.Module) -> None:
    x = _images(4, seed=1, h=48, w=56)
    got = P.pairwise_lpips(lp, x)
    sq = P._to_square(x)
    i, j = torch.triu_indices(4, 4, offset=1)
    with torch.no_grad():
        ref = torch.stack([lp(sq[a : a + 1], sq[b : b + 1], normalize=True).flatten()[0] for a, b in zip(i.tolist(), j.tolist())])
    assert got.shape == (6,)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_lpips_diversity_properties(lp: torch.nn.Module) -> None:
    task = FakeTask({"lpips": lp})
    ctx = EvalContext(task, "aesthetic", 1.0)  # type: ignore[arg-type]
    x = _images(5, seed=2)
    div = P.lpips_diversity(PromptSamples("p", x), ctx)
    same = P.lpips_diversity(PromptSamples("p", x[:1].repeat(5, 1, 1, 1)), ctx)
    shuffled = P.lpips_diversity(PromptSamples("p", x[torch.tensor([3, 0, 4, 1, 2])]), ctx)
    assert same == pytest.approx(0.0, abs=1e-7) and div > 0
    assert shuffled == pytest.approx(div, rel=1e-6)  # a mean over unordered pairs: order-free, symmetric
    pair_ab = P.lpips_diversity(PromptSamples("p", x[[0, 1]]), ctx)
    pair_ba = P.lpips_diversity(PromptSamples("p", x[[1, 0]]), ctx)
    assert pair_ab == pytest.approx(pair_ba, rel=1e-6) and pair_ab > 0
    assert math.isnan(P.lpips_diversity(PromptSamples("p", x[:1]), ctx))
    # the mean of the pair distances, each pair once
    d = P.pairwise_lpips(lp, x)
    assert div == pytest.approx(float(d.double().mean()), rel=1e-6) and d.numel() == 10


def test_load_lpips_reads_torchvisions_alexnet_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(3)
        alex = torchvision.models.alexnet()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(alex.state_dict(), hub / "alexnet-owt-7be5be79.pth")  # torchvision's own file format
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("BENCH_LPIPS_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.delenv("BENCH_WEIGHTS_DIR", raising=False)
    model = P.load("lpips")
    x = _images(2, seed=4, h=64, w=64)
    with torch.no_grad():
        ours = model.net(x)  # the 5 ReLU outputs LPIPS compares
        ref, h = [], x
        for k, layer in enumerate(alex.features):
            h = layer(h)
            if k in (1, 4, 7, 9, 11):
                ref.append(h)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


# ---- DreamSim ----------------------------------------------------------------------------------------


def test_pairwise_dreamsim_equals_dreamsim_forward_and_is_a_distance(ds: torch.nn.Module) -> None:
    x = _images(3, seed=5, h=30, w=36)
    x[1] = x[0]
    d = P.pairwise_dreamsim(ds, x)  # pairs (0, 1), (0, 2), (1, 2)
    assert d[0] == pytest.approx(0.0, abs=1e-5) and d[1] > 1e-4
    assert d[1] == pytest.approx(float(d[2]), abs=1e-5)  # d(a, b) = d(a', b) for a' = a
    sq = P._to_square(x)
    with torch.no_grad():
        ref = ds(sq[0:1], sq[2:3])
        rev = ds(sq[2:3], sq[0:1])
    assert float(ref) == pytest.approx(float(d[1]), rel=1e-4, abs=1e-6)
    assert float(rev) == pytest.approx(float(ref), rel=1e-5, abs=1e-7)


def test_dreamsim_diversity_metric_and_tiny_model_is_seeded(ds: torch.nn.Module) -> None:
    task = FakeTask({"dreamsim": ds})
    ctx = EvalContext(task, "aesthetic", 1.0)  # type: ignore[arg-type]
    x = _images(3, seed=6)
    div = P.dreamsim_diversity(PromptSamples("p", x), ctx)
    assert div > 0 and P.dreamsim_diversity(PromptSamples("p", x[:1].repeat(2, 1, 1, 1)), ctx) == pytest.approx(0.0, abs=1e-5)
    assert task.calls.count("dreamsim") == 2
    base = ds.base_model.model.extractor_list[0]
    assert sum(p.numel() for p in ds.parameters()) > 80_000_000  # the real ViT-B/32 architecture
    assert base.proj.shape == (768, 512) and base.proj.std() > 0.01


# ---- held-out rewards and the task hooks --------------------------------------------------------------


def test_heldout_reward_metrics_use_the_task_hook_and_canonical_names(lp: torch.nn.Module) -> None:
    task = FakeTask({"lpips": lp})
    ctx = EvalContext(task, "aesthetic", 1.0)  # type: ignore[arg-type]
    s = PromptSamples("a photo of a cat", _images(3, seed=7))
    for metric, reward in P.HELDOUT_REWARDS.items():
        entry = METRICS.entry(metric)
        assert entry.meta["direction"] == "max" and REWARDS.canonical(reward[0]) == reward[0]
        value = entry.obj(s, ctx)
        expected = float(task.rewards[reward[0]](s.x, [s.prompt] * 3).double().mean())
        assert value == pytest.approx(expected, rel=1e-5)
    def fail(*a: object) -> None:
        raise AssertionError("scored twice")

    task.rewards["hps-v2.0"].score = fail
    METRICS.get("hps_v2.0_score")(s, ctx)  # memoized per sample set: no second scoring
    for name in ("lpips_diversity", "dreamsim_diversity"):
        assert METRICS.entry(name).meta["direction"] == "max"


def test_fallback_loads_each_real_model_once_per_process(monkeypatch: pytest.MonkeyPatch, lp: torch.nn.Module) -> None:
    """A task without hooks: the metrics load real models themselves, once (here a counting stub)."""

    class NoHooks:
        device = "cpu"

        def build_reward(self, name: str) -> Any:
            return None

    loads: list[str] = []

    def fake_load(name: str, device: str = "cpu") -> torch.nn.Module:
        loads.append(name)
        return lp

    monkeypatch.setattr(P, "_MODELS", {})
    monkeypatch.setattr(P, "load", fake_load)
    for seed in (8, 9):
        ctx = EvalContext(NoHooks(), "none", 1.0)  # type: ignore[arg-type]
        assert P.lpips_diversity(PromptSamples("p", _images(3, seed=seed)), ctx) > 0
    assert loads == ["lpips"]


# ---- offline errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,file,env", [("lpips", "alexnet-owt-7be5be79.pth", "BENCH_LPIPS_ALEXNET_WEIGHTS"),
                                           ("dreamsim", "dreamsim", "BENCH_DREAMSIM_DIR")])
def test_real_perceptual_models_missing_is_one_line(offline: Path, name: str, file: str, env: str) -> None:
    with pytest.raises(MissingWeightsError) as info:
        P.load(name)
    msg = str(info.value)
    assert "\n" not in msg and file in msg and env in msg and isinstance(info.value, BenchError)


def test_incomplete_dreamsim_folder_names_the_missing_file(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = offline / "dreamsim"
    (folder / "ensemble_lora").mkdir(parents=True)
    for f in ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "ensemble_lora/adapter_config.json"):
        (folder / f).write_bytes(b"")
    monkeypatch.setenv("BENCH_DREAMSIM_DIR", str(folder))
    with pytest.raises(MissingWeightsError, match="clip_vitb16_pretrain.pth.tar"):
        P.load("dreamsim")
    with pytest.raises(BenchError, match="unknown perceptual model"):
        P.load("ssim")
