"""The Stable Diffusion tasks on tiny random-init models (CPU, offline).

* the Backbone contract: ε_θ ≡ ε_ref bit-for-bit at init (and ≡ the UNet without LoRA), KL 0,
  CFG with the empty prompt, decode in [0, 1], gradients reach the LoRA and nothing else,
  checkpointed recomputation replays the adapter state, micro-batching does not change results;
* SQDF's LCM consistency model: timestep mapping (docs/tasks/sd.md §4), boundary scalings (diffusers);
* the real sd15 loading path on a local folder (tiny weights saved in the diffusers layout), and the
  one-line MissingWeightsError (exit code 2) when the weights are absent;
* every registered method runs one train_step on sd15-tiny;
* `bench run --task sd15-tiny --methods sqdf,draft` end to end; its LoRA loads into a diffusers
  StableDiffusionPipeline and changes its output;
* prompts, rewards, the noisy oracle, proxy features, the throughput script.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from bench.app.config import resolve  # noqa: E402
from bench.core.diffusion import ddim_step, draw_noise, guided_eps, rollout  # noqa: E402
from bench.core.errors import BenchError, MissingWeightsError  # noqa: E402
from bench.core.registry import METHODS, TASKS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def _offline_single_thread(bench_cache: Path) -> Iterator[None]:
    """No network, a private cache, and one intra-op thread (the tiny models are overhead-bound;
    two threads on a shared 2-core machine are much slower than one)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def task() -> Any:
    from bench.app.runner import build_task

    return build_task("sd15-tiny", TASKS.get("sd15-tiny").Config())


@pytest.fixture(scope="module")
def bb(task: Any) -> Any:
    return task.build_backbone()


def _inputs(bb: Any, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *bb.sample_shape, generator=g)
    t = torch.tensor([981, 501, 1][:n])
    return x, t, bb.encode_prompts(["cat", "dog", "snail"][:n])


def _perturb(bb: Any, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Move the LoRA away from init; returns the previous values."""
    g = torch.Generator().manual_seed(seed)
    old = {}
    with torch.no_grad():
        for i, p in enumerate(bb.trainable_parameters()):
            old[str(i)] = p.detach().clone()
            p.add_(scale * torch.randn(p.shape, generator=g))
    return old


def _restore(bb: Any, old: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, p in enumerate(bb.trainable_parameters()):
            p.copy_(old[str(i)])


# ---- the Backbone contract ----------------------------------------------------------------------


def test_policy_is_reference_and_base_at_init(bb: Any) -> None:
    from bench.tasks.sd_utils import random_components

    x, t, c = _inputs(bb)
    with torch.no_grad():
        pol, ref = bb.policy_eps(x, t, c), bb.reference_eps(x, t, c)
        base = random_components("tiny", seed=0).unet(x, t, encoder_hidden_states=c).sample
    assert torch.equal(pol, ref)
    assert torch.equal(ref, base)  # adapter off = the pretrained UNet exactly
    lora_b = [p for n, p in bb.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(bool((p == 0).all()) for p in lora_b)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in bb.trainable_parameters())


def test_path_kl_is_zero_at_init_with_cfg(bb: Any) -> None:
    grid = bb.schedule.grid(4)
    cond = bb.encode_prompts(["cat", "dog"])
    x_T, z = draw_noise(torch.Generator().manual_seed(0), 2, 4, bb.sample_shape)
    traj = rollout(bb.policy, grid, cond, x_T, z, eta=1.0, guidance=5.0, null_cond=bb.null_cond(cond), reference=bb.reference)
    assert traj.kl is not None and bool((traj.kl == 0).all())


def test_adapter_switch_and_checkpoint_replay(task: Any, bb: Any) -> None:
    """After training moves the LoRA: ε_θ ≠ ε_ref, ε_ref is still the base UNet, and gradients
    through checkpointed UNet blocks equal the uncheckpointed ones for both (the recomputation
    replays the adapter state of the forward)."""
    from bench.tasks.sd_utils import sd15_schedule
    from bench.tasks.sd import SDBackbone

    plain = SDBackbone(task._components(), sd15_schedule(), unet_checkpointing=False, vae_checkpointing=False)
    old = _perturb(bb)
    try:
        with torch.no_grad():
            for p, q in zip(plain.trainable_parameters(), bb.trainable_parameters()):
                p.copy_(q)
        x, t, c = _inputs(bb)
        with torch.no_grad():
            assert not torch.equal(bb.policy_eps(x, t, c), bb.reference_eps(x, t, c))
            assert torch.equal(bb.reference_eps(x, t, c), plain.reference_eps(x, t, c))
        for fn in ("policy_eps", "reference_eps"):
            grads = []
            for model in (bb, plain):
                xx = x.clone().requires_grad_(True)
                out = getattr(model, fn)(xx, t, c)
                # interleave the other adapter state between forward and backward
                with torch.no_grad():
                    model.reference_eps(x, t, c) if fn == "policy_eps" else model.policy_eps(x, t, c)
                (out**2).sum().backward()
                grads.append(xx.grad)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    finally:
        _restore(bb, old)
        for p in bb.trainable_parameters():
            p.grad = None


def test_micro_batching_does_not_change_results(task: Any, bb: Any) -> None:
    from bench.tasks.sd_utils import sd15_schedule
    from bench.tasks.sd import SDBackbone

    split = SDBackbone(task._components(), sd15_schedule(), micro_batch=1)
    x, t, c = _inputs(bb)
    with torch.no_grad():
        torch.testing.assert_close(split.policy_eps(x, t, c), bb.policy_eps(x, t, c), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(split.decode(x), bb.decode(x), rtol=1e-5, atol=1e-6)


def test_cfg_uses_the_empty_prompt(bb: Any) -> None:
    cond = bb.encode_prompts(["cat", "dog"])
    null = bb.null_cond(cond)
    assert null.shape == cond.shape
    assert torch.equal(null[0], bb.encode_prompts([""])[0]) and torch.equal(null[1], null[0])
    assert not torch.equal(cond[0], cond[1])  # different prompts, different conditions
    x, t, _ = _inputs(bb, 2)
    with torch.no_grad():
        eps = guided_eps(bb.policy, x, t, cond, null, 5.0)
        e_u, e_c = bb.policy_eps(x, t, null), bb.policy_eps(x, t, cond)
    torch.testing.assert_close(eps, e_u + 5.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)


def test_decode_range_and_gradient(bb: Any) -> None:
    x0 = (3 * torch.randn(4, *bb.sample_shape, generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    img = bb.decode(x0)
    assert img.shape == (4, 3, bb.resolution, bb.resolution) and img.dtype == torch.float32
    assert float(img.detach().min()) >= 0.0 and float(img.detach().max()) <= 1.0
    img.mean().backward()
    assert x0.grad is not None and float(x0.grad.abs().sum()) > 0


def test_gradient_reaches_lora_and_nothing_else(task: Any, bb: Any) -> None:
    """One differentiable DDIM step + decode + the tiny aesthetic reward: LoRA B gets a nonzero
    gradient (A's is exactly 0 while B = 0), every frozen parameter gets none."""
    reward = task.build_reward("aesthetic")
    x, t, c = _inputs(bb, 2)
    grid = bb.schedule.grid(10)
    eps = guided_eps(bb.policy, x, t[:1].expand(2), c, bb.null_cond(c), 5.0)
    out = ddim_step(eps, x, grid.alpha_bars[0], grid.prev_alpha_bars[0], 1.0, noise=torch.zeros_like(x))
    reward(bb.decode(out.prev_sample), ["cat", "dog"]).sum().backward()
    named = dict(bb.named_parameters())
    lora = {n for n, p in named.items() if "lora_" in n}
    try:
        assert lora and {n for n, p in named.items() if p.grad is not None} == lora
        assert all(float(named[n].grad.abs().sum()) > 0 for n in lora if "lora_B" in n)
    finally:
        for p in bb.parameters():
            p.grad = None


# ---- SQDF's consistency model -------------------------------------------------------------------


def test_lcm_timestep_mapping_and_scalings() -> None:
    from diffusers import LCMScheduler

    from bench.tasks.sd_utils import lcm_boundary_scalings, lcm_timestep, lcm_timesteps, sd15_schedule

    assert lcm_timestep(torch.tensor([961, 21, 1])).tolist() == [959, 19, 19]  # docs/tasks/sd.md §4
    ddim = sd15_schedule().grid(50).timesteps  # 981, 961, ..., 1
    mapped = lcm_timestep(ddim)
    assert mapped[:-1].tolist() == (ddim[:-1] - 2).tolist() and int(mapped[-1]) == 19
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_scaling=10.0,
                         original_inference_steps=50, set_alpha_to_one=False)
    sched.set_timesteps(50)
    assert sorted(sched.timesteps.tolist()) == lcm_timesteps().tolist()
    c_skip, c_out = lcm_boundary_scalings(torch.tensor([19, 959]))
    for i, tau in enumerate((19, 959)):
        ref = sched.get_scalings_for_boundary_condition_discrete(tau)
        assert math.isclose(float(c_skip[i]), ref[0], rel_tol=1e-12) and math.isclose(float(c_out[i]), ref[1], rel_tol=1e-12)


def test_consistency_x0_formula_and_gradient(bb: Any) -> None:
    from bench.tasks.sd_utils import lcm_boundary_scalings

    assert bb.has_consistency_model
    x, _, c = _inputs(bb, 2)
    t = torch.tensor([961, 1])
    x = x.requires_grad_(True)
    n0 = bb.counter.state_dict().get("consistency", 0)
    out = bb.consistency_x0(x, t, c)
    assert bb.counter.state_dict()["consistency"] == n0 + 2
    tau = torch.tensor([959, 19])
    with torch.no_grad():
        eps = bb.lcm_unet(x, tau, encoder_hidden_states=c).sample
        a = bb.schedule.alpha_bar(tau).float().view(-1, 1, 1, 1)
        cs, co = (v.float().view(-1, 1, 1, 1) for v in lcm_boundary_scalings(tau))
        ref = co * (x - (1 - a).sqrt() * eps) / a.sqrt() + cs * x
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert float(x.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in bb.lcm_unet.parameters())


# ---- weights: the real loading path on a local folder, and the missing-weights error -------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny components saved as a diffusers SD folder (+ a stand-in LCM-LoRA file)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from bench.tasks.sd_utils import random_components, tiny_unet_config, write_random_lora

    d = tmp_path_factory.mktemp("sd-folder")
    c = random_components("tiny", seed=0)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(d / "model")
    write_random_lora(tiny_unet_config(), d / "lcm", 4, 7, ("to_q", "to_k", "to_v", "to_out.0"))
    return d


def test_sd15_loads_a_local_diffusers_folder(sd_folder: Path, bb: Any) -> None:
    from bench.tasks.sd import SD15Config, SD15Task

    task = SD15Task(SD15Config(model=str(sd_folder / "model"), lcm_lora=str(sd_folder / "lcm"), device="cpu"))
    b = task.build_backbone()
    assert b.sample_shape == bb.sample_shape and b.base_model == str(sd_folder / "model")
    x, t, c = _inputs(b)
    with torch.no_grad():
        assert torch.equal(b.policy_eps(x, t, c), b.reference_eps(x, t, c))
        torch.testing.assert_close(b.reference_eps(x, t, c), bb.reference_eps(x, t, c), rtol=0, atol=1e-6)  # same weights
    assert b.has_consistency_model
    assert b.consistency_x0(x, t, c).shape == x.shape


def test_sd15_refuses_a_foreign_schedule(sd_folder: Path, tmp_path: Path) -> None:
    import shutil

    from bench.core.weights import resolve_sd_weights
    from bench.tasks.sd_utils import check_scheduler_config

    model = tmp_path / "model"
    shutil.copytree(sd_folder / "model", model)
    cfg = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**cfg, "beta_end": 0.02}))
    assert resolve_sd_weights(str(model), "t", "BENCH_SD15_PATH", "x/y") == model
    with pytest.raises(BenchError, match="beta_end"):
        check_scheduler_config(model)


def test_missing_weights_are_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sd_folder: Path) -> None:
    from bench.core.weights import resolve_lora_file, resolve_sd_weights
    from bench.tasks.sd_utils import SD15_REPO
    from bench.tasks.sd import SD15Config, SD15Task

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("BENCH_SD15_PATH", raising=False)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingWeightsError, match=f"{SD15_REPO}/unet/config.json.*hf download"):
        resolve_sd_weights(SD15_REPO, "task sd15", "BENCH_SD15_PATH", SD15_REPO)
    with pytest.raises(MissingWeightsError, match="nothing was downloaded"):
        resolve_lora_file("latent-consistency/lcm-lora-sdv1-5", "sqdf", "BENCH_LCM_LORA_PATH", "latent-consistency/lcm-lora-sdv1-5")
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    with pytest.raises(MissingWeightsError, match="unet/config.json"):
        resolve_sd_weights(str(partial), "task sd15", "BENCH_SD15_PATH", SD15_REPO)
    monkeypatch.setenv("BENCH_SD15_PATH", str(sd_folder / "model"))  # the env var stands in for the default id
    assert resolve_sd_weights(SD15_REPO, "task sd15", "BENCH_SD15_PATH", SD15_REPO) == sd_folder / "model"
    # a missing LCM-LoRA fails when SQDF asks for the consistency model, naming the file
    b = SD15Task(SD15Config(model=str(sd_folder / "model"), lcm_lora=str(tmp_path / "nowhere"), device="cpu")).build_backbone()
    with pytest.raises(MissingWeightsError, match="pytorch_lora_weights.safetensors"):
        b.has_consistency_model


def test_cli_missing_weights_exit_code_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BENCH_SD15_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "bench.app.cli", "run", "--task", "sd15", "--methods", "draft", "--seeds", "0", "--quiet",
                           "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: task sd15"), proc.stderr[-2000:]
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5/unet/config.json" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]


# ---- prompts, rewards, oracle, proxy features ------------------------------------------------------


def test_prompt_sets(task: Any, tmp_path: Path) -> None:
    from bench.tasks.sd_utils import load_hpsv2_prompts
    from bench.tasks.sd import SD15TinyConfig, SD15TinyTask

    train, held = task.train_prompts, task.eval_prompt_sets["heldout"]
    assert len(train) == 45 and len(set(train)) == 45 and "cat" in train
    full = SD15TinyTask(SD15TinyConfig(eval_prompts=0))
    assert full.eval_prompt_sets["heldout"] == ["snail", "hippopotamus", "cheetah", "crocodile", "lobster", "octopus"]
    assert not set(train) & set(full.eval_prompt_sets["heldout"])
    assert set(task.eval_prompt_sets["train"]) <= set(train) and len(task.eval_prompt_sets["train"]) == task.cfg.eval_prompts
    assert set(held) <= set(full.eval_prompt_sets["heldout"])
    assert SD15TinyTask(task.cfg).eval_prompt_sets == task.eval_prompt_sets  # a fixed subsample
    # HPSv2 benchmark files from a user folder (made-up prompts here), split by style
    for style in ("anime", "concept-art", "paintings"):
        (tmp_path / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(5)]))
    (tmp_path / "photo.txt").write_text("\n".join(f"photo prompt {i}" for i in range(5)) + "\n")
    hp = SD15TinyTask(SD15TinyConfig(prompts="hpsv2", hpsv2_dir=str(tmp_path), eval_prompts=3))
    assert len(hp.train_prompts) == 15 and all(not p.startswith("photo") for p in hp.train_prompts)
    assert len(hp.eval_prompt_sets["heldout"]) == 3 and all(p.startswith("photo") for p in hp.eval_prompt_sets["heldout"])
    with pytest.raises(BenchError, match="unknown HPSv2 style"):
        load_hpsv2_prompts(str(tmp_path), ("cartoon",))
    with pytest.raises(BenchError, match="hpsv2_dir"):
        SD15TinyTask(SD15TinyConfig(prompts="hpsv2"))


def test_rewards_oracle_and_proxy_features(task: Any) -> None:
    from bench.tasks.sd import NoisyAestheticOracle

    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["cat"] * 6
    aes = task.build_reward("aesthetic")
    assert task.reward_model("aesthetic") is task.reward_model("aesthetic")  # loaded once
    xg = x.clone().requires_grad_(True)
    r = aes(xg, prompts)
    assert r.shape == (6,) and r.dtype == torch.float32 and aes.differentiable
    r.sum().backward()
    assert float(xg.grad.abs().sum()) > 0
    # the oracle: aesthetic + 0.1·ε, ε a deterministic function of each image
    oracle = task.build_reward("aesthetic-oracle")
    assert isinstance(oracle, NoisyAestheticOracle) and not oracle.differentiable
    y1, y2 = oracle(x, prompts), oracle(x.flip(0), prompts[::-1])
    torch.testing.assert_close(y2, y1.flip(0))  # the noise follows the image, not the batch position
    torch.testing.assert_close((y1 - r.detach()) / 0.1, oracle.label_noise(x).float(), rtol=1e-4, atol=1e-4)
    eps = oracle.label_noise(torch.rand(2000, 3, 2, 2, generator=torch.Generator().manual_seed(1)))
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.08
    with pytest.raises(BenchError, match="differentiable"):
        resolve("sd15-tiny", "sqdf", 0, reward="aesthetic-oracle")
    # proxy features: the aesthetic CLIP embedding, differentiable
    xg = x.clone().requires_grad_(True)
    f = task.proxy_features(xg)
    assert f.shape == (6, 768)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(6), rtol=1e-4, atol=1e-4)
    f.sum().backward()
    assert xg.grad is not None


def test_double_normalize_only_for_the_training_reward() -> None:
    from bench.tasks.sd import SD15TinyConfig, SD15TinyTask

    t = SD15TinyTask(SD15TinyConfig(double_normalize=True))
    assert t.build_reward("aesthetic").inner.double_normalize
    assert not t.reward_model("aesthetic").double_normalize


def test_reward_selects_sd15() -> None:
    from bench.app.cli import task_for_reward

    assert task_for_reward("hps") == "sd15" and task_for_reward("aesthetic") == "sd15"
    cfgs = [resolve(task_for_reward("hps"), m, 0, reward="hps") for m in ("sqdf", "draft")]
    assert all(c.task == "sd15" and c.reward == "hps-v2.0" for c in cfgs)


# ---- every registered method, one step ------------------------------------------------------------

SHRINK = {"batch_size": 4, "rollouts_per_step": 4, "buffer_size": 16, "samples_per_iteration": 8, "minibatch_size": 4,
          "value_batch_size": 8, "queries_total": 16, "query_batch": 8, "proxy_epochs": 5, "updates_per_round": 1}


def _tiny_run_config(method: str, shrink: Any) -> Any:
    """A 6-step sd15-tiny run config for `method`: its Config.smoke() (the method's own CPU test
    settings for 6-step chains) when it has one, else the sd15-tiny preset; then obviously-named
    size fields shrunk."""
    cls = METHODS.get(method)
    reward = "aesthetic" if cls.needs_reward_grad else "aesthetic-oracle"
    cfg = resolve("sd15-tiny", method, 0, reward=reward, layers=[{"sampler": {"steps": 6}}])
    base = cls.Config.smoke() if hasattr(cls.Config, "smoke") else cfg.method_cfg
    try:
        mcfg = shrink(base, SHRINK)
    except BenchError:  # the shrunk sizes break one of the method's constraints: keep its own
        mcfg = base
    return dataclasses.replace(cfg, method_cfg=mcfg)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_one_step(method: str, task: Any, contexts: Any, shrink: Any) -> None:
    from bench.core.reward import BudgetExhausted

    cfg = _tiny_run_config(method, shrink)
    ctx = contexts(task, cfg.reward, sampler=cfg.sampler, alpha=cfg.alpha, budget=cfg.train.query_budget or None)
    backbone = ctx.backbone
    m = METHODS.get(method)(cfg.method_cfg, ctx)
    lora0 = [p.detach().clone() for p in backbone.trainable_parameters()]
    frozen0 = {n: p.detach().clone() for n, p in backbone.named_parameters() if "lora_" not in n}
    stats: dict[str, float] = {}
    for _ in range(3):  # online methods may spend a step on queries before their first update
        try:
            stats = m.train_step()
        except BudgetExhausted:
            break
        if any(not torch.equal(a, p) for a, p in zip(lora0, backbone.trainable_parameters())):
            break
    assert stats and all(k.startswith("train/") and math.isfinite(float(v)) for k, v in stats.items()), stats
    assert any(not torch.equal(a, p) for a, p in zip(lora0, backbone.trainable_parameters())), f"{method} did not move the LoRA"
    assert all(torch.equal(frozen0[n], p) for n, p in backbone.named_parameters() if "lora_" not in n)


# ---- end to end through the CLI; the saved LoRA in a diffusers pipeline ----------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, cli: Any) -> Path:
    d = tmp_path_factory.mktemp("cli")
    res = cli("run", "--task", "sd15-tiny", "--methods", "sqdf,draft", "--seeds", "0", "--quiet",
              "--set", "task.eval_prompts=2", "--set", "train.final_eval_samples=2",  # a smaller evaluation
              "--runs-dir", str(d / "runs"), "--results-dir", str(d / "results"))
    assert res.exit_code == 0, (res.output, res.exception)
    return d


def test_cli_end_to_end(cli_run: Path) -> None:
    finals = sorted(cli_run.glob("runs/sd15-tiny/*/*/final.json"))
    assert [p.parts[-3] for p in finals] == ["draft", "sqdf"]
    for f in finals:
        r = json.loads(f.read_text())
        assert r["iterations"] == 3 and r["backbone"]["type"] == "SDBackbone"
        assert r["alpha_sqdf"] == pytest.approx(2.0)  # the task's default α is SQDF's α = 2
        for k in ("reward", "path_kl", "reward@heldout", "aesthetic_score@heldout", "lpips_diversity"):
            assert math.isfinite(r["metrics"][k]), k
        assert (f.parent / "lora" / "pytorch_lora_weights.safetensors").exists() and (f.parent / "samples.png").exists()
    table = (cli_run / "results" / "sd15-tiny" / "table.md").read_text()
    assert "| sqdf | 1 |" in table and "| draft | 1 |" in table and "*base (pretrained)*" in table


def test_saved_lora_loads_into_a_diffusers_pipeline(cli_run: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from bench.app.config import config_from_dict
    from bench.tasks.sd_utils import random_components

    run = next(cli_run.glob("runs/sd15-tiny/sqdf/*/"))
    c = random_components("tiny", seed=0)  # the same tiny components the run started from
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def sample() -> torch.Tensor:
        return pipe(["cat"], num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = sample()
    pipe.load_lora_weights(run / "lora")
    after = sample()
    assert float((after - before).abs().max()) > 1e-6
    # the pipeline's UNet now is the run's policy: compare with the checkpointed LoRA
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    from bench.app.runner import build_task

    bb = build_task(cfg.task, cfg.task_cfg).build_backbone()
    bb.load_trainable_state_dict(state["method"]["params"])
    x, t, cond = _inputs(bb)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=cond).sample, bb.policy_eps(x, t, cond), rtol=1e-5, atol=1e-5)


# ---- the throughput script ----------------------------------------------------------------------


def test_throughput_script_tiny(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench_sd_throughput as bst
    finally:
        sys.path.pop(0)
    out = bst.main(["--tiny", "--batch-sizes", "1", "--steps", "2", "--repeats", "1", "--methods", "draft,no-such-method", "--out", str(tmp_path)])
    res = json.loads(out.read_text())
    assert res["settings"]["tiny"] and res["sampling"][0]["images_per_s"] > 0
    assert res["flops"]["unet_gflops_per_row"] > 0
    assert res["methods"]["draft"][0]["seconds_per_update"] > 0 and "phases" in res["methods"]["draft"][0]
    assert res["methods"]["no-such-method"].startswith("skipped")
    assert "CPU smoke run" in out.with_suffix(".md").read_text()


def test_half_precision_frozen_parts_with_fp32_lora() -> None:
    """The mixed-precision path of GPU runs, exercised on the CPU in bf16: frozen weights in bf16,
    LoRA in fp32, ε_θ ≡ ε_ref at init, fp32 outputs, finite LoRA gradients, the LCM path."""
    from bench.tasks.sd import SD15TinyConfig, SD15TinyTask

    task = SD15TinyTask(SD15TinyConfig(dtype="bf16", device="cpu"))
    b = task.build_backbone()
    assert b.unet.conv_in.weight.dtype == torch.bfloat16 and b.vae.decoder.conv_out.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in b.trainable_parameters())
    x, t, c = _inputs(b, 2)
    with torch.no_grad():
        pol, ref = b.policy_eps(x, t, c), b.reference_eps(x, t, c)
    assert pol.dtype == torch.float32 and torch.equal(pol, ref)
    img = b.decode(b.consistency_x0(x, t, c))
    assert img.dtype == torch.float32 and img.shape[-1] == b.resolution
    task.build_reward("aesthetic")(b.decode(b.policy_eps(x, t, c)), ["cat", "dog"]).sum().backward()
    grads = [p.grad for n, p in b.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
