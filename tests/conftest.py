"""Fixtures shared by several test files.

* `offline`: no network and empty caches for the weight loaders (rewards, perceptual metrics).
* `bench_cache`: a private $BENCH_CACHE_DIR for one test module (bases, references, tokenizers).
* `tiny_gmm`: a mixture task with a tiny residual MLP (analytic base), for method-level tests.
* `contexts`: builds TrainContexts the way the runner does, optionally from one shared
  initial backbone per module.
* `shrink`, `tiny_config`: method configs with their obviously-named size fields shrunk for CPU
  smoke tests.
* `cli`: the `bench` CLI invoked in-process (typer's CliRunner).

Nothing here is autouse: a test file opts in by naming the fixture.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import pytest
import torch


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1; empty HF, torch and home caches under tmp_path; no BENCH_* weight
    variables; every download function replaced by one that fails the test. Returns tmp_path."""
    from bench.core.weights import SPECS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for spec in SPECS.values():
        monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.delenv("BENCH_WEIGHTS_DIR", raising=False)
    _guard_network(monkeypatch)
    return tmp_path


def _guard_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_network(*a: object, **k: object) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$BENCH_CACHE_DIR set to a fresh folder for the whole module, restored afterwards."""
    root = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_gmm() -> Callable[..., Any]:
    """tiny_gmm(name, **task_cfg): the mixture task `name` with a 16-wide, 1-layer residual MLP
    (analytic base: exact target, nothing to pretrain); `task_cfg` overrides GMMConfig fields."""
    from bench.app.runner import build_task
    from bench.tasks.gmm import GMMConfig

    def build(name: str, **task_cfg: Any) -> Any:
        return build_task(name, GMMConfig(**{"hidden": 16, "layers": 1, **task_cfg}))

    return build


class ContextFactory:
    """`contexts(task, reward, sampler=...)`: a TrainContext as the runner builds one (fresh
    backbone, phase clock, counted reward with an optional query budget, the task's training
    prompts). With `shared_init=True` every backbone starts from the weights of the first one this
    factory built, so contexts of one module differ only in what the test changes."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}

    def __call__(self, task: Any, reward: str, *, sampler: Any, seed: int = 0, alpha: float = 1.0,
                 budget: int | None = None, shared_init: bool = False) -> Any:
        from bench.core.clock import PhaseClock
        from bench.core.method import TrainContext
        from bench.core.reward import CountingReward
        from bench.core.task import SamplerConfig

        bb = task.build_backbone()
        if shared_init:
            if not self.initial:
                self.initial.update({k: v.clone() for k, v in bb.state_dict().items()})
            bb.load_state_dict(self.initial)
        clock = PhaseClock()
        counted = CountingReward(task.build_reward(reward), clock, budget)
        sampler = SamplerConfig(steps=sampler) if isinstance(sampler, int) else sampler
        return TrainContext(bb, counted, list(task.train_prompts), alpha, sampler, seed, clock, task)


@pytest.fixture(scope="module")
def contexts() -> ContextFactory:
    """A ContextFactory per test module (its shared initial weights belong to that module)."""
    return ContextFactory()


@pytest.fixture(scope="session")
def shrink() -> Callable[[Any, Mapping[str, int]], Any]:
    """shrink(cfg, sizes): `cfg` with every int field named in `sizes` lowered to that size where
    it is larger (through the config's own validation; a BenchError means the shrunk sizes break
    one of the method's constraints)."""
    from bench.app.config import apply_dict

    def shrunk(cfg: Any, sizes: Mapping[str, int]) -> Any:
        names = {f.name for f in dataclasses.fields(cfg)}
        over = {k: v for k, v in sizes.items() if k in names and isinstance(getattr(cfg, k), int) and getattr(cfg, k) > v}
        return apply_dict(cfg, over, "method.")

    return shrunk


SMOKE_SIZES = {"batch_size": 16, "rollouts_per_step": 16, "buffer_size": 64, "samples_per_iteration": 16, "minibatch_size": 8,
               "num_samples": 16, "value_batch_size": 16, "queries_total": 64, "proxy_epochs": 5}
"size fields of method configs and their CPU smoke-test values (for methods without Config.smoke())"


@pytest.fixture(scope="session")
def tiny_config(shrink: Callable[..., Any]) -> Callable[[str], Any]:
    """tiny_config(method): the method's Config.smoke() when it has one, else its default config
    with SMOKE_SIZES applied: a CPU smoke test on 6-step chains of the mixture or digits tasks."""
    from bench.core.registry import METHODS

    def config(method: str) -> Any:
        cls = METHODS.get(method).Config
        return cls.smoke() if hasattr(cls, "smoke") else shrink(cls(), SMOKE_SIZES)

    return config


@pytest.fixture(scope="session")
def cli() -> Callable[..., Any]:
    """cli(*args): `bench *args` run in-process; returns typer's Result (exit_code, output, exception)."""
    from typer.testing import CliRunner

    from bench.app.cli import app

    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args))

    return invoke
