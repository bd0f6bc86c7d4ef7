"""The `digits` task: base quality, rewards, held-out metrics, the SIR reference, the cache, a run.

The default tier uses a small config (a 2 × 128 ε-MLP trained for 800 iterations, 1024 SIR
samples per prompt) built once per module in a temporary BENCH_CACHE_DIR: a few seconds of CPU.
The default-size base is checked under `-m slow`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.core.errors import BenchError
from bench.core.evaluation import EvalContext, PromptSamples, compute_metrics, sample_model
from bench.core.registry import METRICS, TASKS
from bench.tasks import digits as dg
from bench.tasks.digits import DigitsConfig, DigitsData, DigitsTask, SIRTarget
from metrics.digits import frechet_distance, vendi_score
from rewards.digits import gray, prompt_class

SMALL = DigitsConfig(hidden=128, layers=2, base_iterations=800, base_batch=128, reward_iterations=300, sir_samples=1024, sir_min_ess=100)
SMALL_SETS = {k: getattr(SMALL, k) for k in ("hidden", "layers", "base_iterations", "base_batch", "reward_iterations", "sir_samples", "sir_min_ess")}


@pytest.fixture(scope="module")
def task(bench_cache: Path) -> DigitsTask:
    t = DigitsTask(SMALL)
    t.prepare(progress=False)
    return t


def _real(task: DigitsTask, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = task.data
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_heldout, d.y_heldout)
    return d.to_images(x), y


# ---- data, prompts, backbone -------------------------------------------------------------------------


def test_split_is_fixed_disjoint_and_complete() -> None:
    a, b = DigitsData.load(0, 1200), DigitsData.load(0, 1200)
    assert torch.equal(a.x_train, b.x_train) and a.digest == b.digest
    assert a.x_train.shape == (1200, 64) and a.x_heldout.shape == (597, 64)
    assert float(a.x_train.min()) == -1.0 and float(a.x_train.max()) == 1.0
    both = torch.cat([torch.cat([a.x_train, a.x_heldout]), torch.cat([a.y_train, a.y_heldout])[:, None].float()], 1)
    assert torch.unique(both, dim=0).shape[0] >= 1790  # all digits, each once (sklearn's digits hold a few exact duplicates)
    assert set(a.y_heldout.tolist()) == set(range(10))
    assert not torch.equal(DigitsData.load(1, 1200).x_train, a.x_train)


def test_prompts_and_prompt_sets(task: DigitsTask) -> None:
    assert task.train_prompts == [f"digit {k}" for k in range(8)]
    assert task.eval_prompt_sets["heldout"] == ["digit 8", "digit 9"]
    assert prompt_class("digit 9") == 9
    with pytest.raises(BenchError, match="unknown prompt"):
        prompt_class("digit 10")


def test_policy_is_an_exact_copy_of_the_reference(task: DigitsTask) -> None:
    bb = task.build_backbone()
    prompts = ["digit 1", "digit 8"]
    s = sample_model(bb, prompts, 16, task.sampler_defaults)
    for p in prompts:
        assert torch.all(s[p].path_kl == 0)  # bit-identical denoisers at initialization
        assert s[p].x.shape == (16, 1, 8, 8) and 0 <= float(s[p].x.min()) and float(s[p].x.max()) <= 1
    ref = dict(bb.reference_net.named_parameters())
    for k, v in bb.policy_net.named_parameters():
        assert v.requires_grad and not ref[k].requires_grad and torch.equal(v, ref[k])
    assert {id(p) for p in bb.trainable_parameters()} == {id(p) for p in bb.policy_net.parameters()}
    # the null prompt exists (classifier-free guidance changes the samples)
    guided = sample_model(bb, ["digit 1"], 16, replace(task.sampler_defaults, guidance=3.0), with_kl=False)
    assert not torch.equal(guided["digit 1"].x, s["digit 1"].x)


def test_base_generates_class_correct_digits(task: DigitsTask) -> None:
    """Even the small test base is far above chance (0.1) for the held-out judge, on training and
    held-out prompts."""
    s = sample_model(task.build_backbone(), [f"digit {k}" for k in range(10)], 64, task.sampler_defaults, with_kl=False)
    ctx = EvalContext(task, "classifier", 1.0)
    m = compute_metrics(s, ctx, ["judge_acc", "judge_acc_knn"])
    assert m["judge_acc"] > 0.6 and m["judge_acc@heldout"] > 0.5, m
    assert m["judge_acc_knn"] > 0.6, m


def test_consistency_model_is_the_reference_ode_and_differentiable(task: DigitsTask) -> None:
    bb = task.build_backbone()
    x = torch.randn(4, 64, requires_grad=True)
    t = torch.tensor([901, 501, 101, 1])
    cond = bb.encode_prompts(["digit 3"] * 4)
    x0 = bb.consistency_x0(x, t, cond)
    x0.sum().backward()
    assert x0.shape == (4, 64) and x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ---- rewards -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["classifier", "aesthetic"])
def test_rewards_are_differentiable(task: DigitsTask, name: str) -> None:
    r = task.build_reward(name)
    assert r.differentiable
    bb = task.build_backbone()
    g = torch.Generator().manual_seed(0)
    x = (0.8 * torch.rand(6, 64, generator=g, dtype=torch.float64) - 0.4).requires_grad_(True)  # inside the clamp range
    prompts = [f"digit {k}" for k in range(6)]
    out = r(bb.decode(x).float(), prompts)
    assert out.shape == (6,)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # directional derivative against a central finite difference
    v = torch.randn(6, 64, generator=g, dtype=torch.float64)
    h = 1e-3
    with torch.no_grad():
        fd = (r(bb.decode(x + h * v).float(), prompts) - r(bb.decode(x - h * v).float(), prompts)).double() / (2 * h)
    torch.testing.assert_close(fd, (grad * v).sum(1), rtol=2e-2, atol=2e-3)


def test_classifier_reward_is_a_log_probability(task: DigitsTask) -> None:
    r = task.build_reward("classifier")
    x, y = _real(task, "heldout")
    with torch.no_grad():
        total = sum(torch.exp(r(x[:50], [f"digit {k}"] * 50)) for k in range(10))
        assert torch.allclose(total, torch.ones(50), atol=1e-5)
        assert float((r.logits(x).argmax(1) == y).double().mean()) > 0.9  # it generalizes to held-out digits


def test_aesthetic_gold_is_the_standardized_stroke_mass(task: DigitsTask) -> None:
    r = task.build_reward("aesthetic")
    x, _ = _real(task, "train")
    gold = r.gold(x)
    assert abs(float(gold.mean())) < 1e-4 and abs(float(gold.std()) - 1) < 1e-3  # train-split standard units
    with torch.no_grad():
        pred = r(x, ["digit 0"] * x.shape[0])
    assert float(torch.corrcoef(torch.stack([pred, gold]))[0, 1]) > 0.95  # ψ fits its attribute on real digits
    with pytest.raises(BenchError, match="shape"):
        r(torch.zeros(2, 64), ["digit 0"] * 2)


# ---- held-out metrics ------------------------------------------------------------------------------------


def _samples(x: torch.Tensor, prompt: str) -> PromptSamples:
    return PromptSamples(prompt, x, None, "real")


def test_metrics_on_real_digits(task: DigitsTask) -> None:
    ctx = EvalContext(task, "classifier", 1.0)
    j = task.judges
    x_tr, y_tr = _real(task, "train")
    x_ho, y_ho = _real(task, "heldout")
    # the NN-distance ratio is 1 on the real train digits by definition (ρ_real is their mean)
    assert abs(METRICS.get("nn_ratio")(_samples(x_tr, "digit 0"), ctx) - 1.0) < 1e-9
    # samples copied from the training subset are at distance 0 from it: full memorization
    assert METRICS.get("mem_ratio")(_samples(j.train_ref.reshape(-1, 1, 8, 8), "digit 0"), ctx) == 0.0
    for k in (3, 8):
        xk = x_ho[y_ho == k]
        s = _samples(xk, f"digit {k}")
        assert METRICS.get("judge_acc_knn")(s, ctx) > 0.85  # (its own training set, up to 5-NN votes)
        assert METRICS.get("style_recall")(s, ctx) == 1.0  # every style cluster at its own frequency
        assert METRICS.get("fd_real")(s, ctx) < 1e-6
        assert METRICS.get("log_density")(s, ctx) > METRICS.get("log_density")(_samples(torch.rand_like(xk), f"digit {k}"), ctx)
    assert METRICS.get("ess")(_samples(x_ho[:4], "digit 0"), ctx) != METRICS.get("ess")(_samples(x_ho[:4], "digit 0"), ctx)  # NaN for samples


def test_diversity_and_frechet_properties() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 5, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert abs(frechet_distance(a, a + 2.0) - 4.0 * 5) < 1e-6  # a mean shift of 2 in 5 dims
    x = torch.rand(1, 64, generator=g)
    assert abs(vendi_score(x.expand(50, 64), 0.5) - 1.0) < 1e-6  # 50 copies: one effective sample
    far = torch.eye(64)[:20] * 100
    assert abs(vendi_score(far, 0.5) - 20.0) < 1e-6  # 20 points far apart: twenty


def test_metrics_recompute_for_new_samples_of_the_same_prompt(task: DigitsTask) -> None:
    """Memoized per-sample metrics must not serve an earlier evaluation's numbers, even when a freed
    sample tensor's id() is reused by the next one (as between the runner's evaluations)."""
    ctx = EvalContext(task, "classifier", 1.0)
    r, j = task.build_reward("classifier"), task.judges
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        s = _samples(torch.rand(32, 1, 8, 8, generator=g), "digit 3")
        with torch.no_grad():
            want_r = float(r(s.x, [s.prompt] * 32).double().mean())
        want_nn = float((j.nn_heldout(gray(s.x)) / j.nn_real).mean())
        assert METRICS.get("reward")(s, ctx) == pytest.approx(want_r, abs=1e-12)
        assert METRICS.get("nn_ratio")(s, ctx) == pytest.approx(want_nn, abs=1e-12)


# ---- the SIR reference -----------------------------------------------------------------------------------


def test_sir_reference_reports_ess_and_consistent_scalars(task: DigitsTask) -> None:
    for reward, alpha in (("classifier", 1.0), ("aesthetic", 3.0)):
        t = task.target(reward, alpha, "digit 5")
        w = t.weights
        assert abs(float(w.sum()) - 1) < 1e-12
        assert 1.0 <= t.ess <= task.cfg.sir_samples
        assert abs(t.ess - 1 / float((w**2).sum())) < 1e-6
        r = t.rewards
        assert abs(t.log_z - math.log(float(torch.exp(r / alpha).mean()))) < 1e-9  # log Ẑ = log mean e^{r/α}
        assert t.kl >= -1e-12 and abs(t.kl - (t.expected_reward / alpha - t.log_z)) < 1e-12
        assert t.expected_reward >= float(r.mean()) - 1e-12  # tilting towards reward raises it
        draw = t.sample(256, torch.Generator().manual_seed(0))
        assert draw.shape == (256, 1, 8, 8)
    # weaker regularization concentrates the weights
    assert task.target("classifier", 0.1, "digit 5").ess < task.target("classifier", 1.0, "digit 5").ess < task.target("classifier", 100.0, "digit 5").ess


def test_sir_constant_reward_is_the_base_and_low_ess_is_flagged() -> None:
    pool = torch.rand(100, 1, 8, 8)
    t = SIRTarget(pool, torch.full((100,), 0.7, dtype=torch.float64), 0.5, 10.0)
    assert abs(t.ess - 100) < 1e-9 and abs(t.log_z - 1.4) < 1e-12 and abs(t.kl) < 1e-12 and t.reliable
    spiky = SIRTarget(pool, torch.cat([torch.tensor([50.0]), torch.zeros(99)]).double(), 1.0, 10.0)
    assert spiky.ess < 1.01 and not spiky.reliable


def test_reference_note_flags_low_ess(task: DigitsTask) -> None:
    note = task.reference_note("classifier", 1.0)
    assert "ESS per prompt" in note and "Unreliable" not in note
    strict = DigitsTask(replace(SMALL, sir_min_ess=10**9))  # no cache key depends on the threshold: everything loads
    assert "Unreliable reference" in strict.reference_note("classifier", 1.0)


# ---- the cache -------------------------------------------------------------------------------------------


@pytest.fixture
def counting_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path))
    calls = {"n": 0}
    real = dg.train_base

    def counted(*a: Any, **k: Any) -> dict[str, Any]:
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(dg, "train_base", counted)
    return calls


TINY = DigitsConfig(hidden=16, layers=1, base_iterations=20, base_batch=32)


def test_cache_is_reused_and_rebuilt_when_its_config_changes(counting_base: dict[str, int]) -> None:
    a = DigitsTask(TINY).base_net
    assert counting_base["n"] == 1
    b = DigitsTask(TINY).base_net  # a new task object (a new process would do the same): loaded, not trained
    assert counting_base["n"] == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # a field the base depends on -> a new entry; a field it does not depend on -> the same entry
    DigitsTask(replace(TINY, base_iterations=21)).base_net
    assert counting_base["n"] == 2
    DigitsTask(replace(TINY, reward_iterations=7, sir_samples=3)).base_net
    assert counting_base["n"] == 2
    assert len(list((Path(os.environ["BENCH_CACHE_DIR"]) / "digits-base").glob("*.pt"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_cache_file_is_rebuilt(counting_base: dict[str, int], damage: str) -> None:
    t = DigitsTask(TINY)
    good = t.base_net.state_dict()
    path = dg.cache_path("digits-base", t.base_key())
    if damage == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:  # loads, carries the right key, but holds a state dict of another network
        obj = torch.load(path, weights_only=True)  # the harness's own files hold tensors and plain values only
        obj["state_dict"] = {"w": torch.zeros(3)}
        torch.save(obj, path)
    again = DigitsTask(TINY).base_net
    assert counting_base["n"] == 2
    assert all(torch.equal(x, y) for x, y in zip(good.values(), again.state_dict().values()))  # deterministic rebuild
    assert DigitsTask(TINY).base_net is not None and counting_base["n"] == 2  # and the rebuilt file is good


def test_config_validation() -> None:
    with pytest.raises(BenchError, match="task.n_train"):
        DigitsConfig(n_train=1700)
    with pytest.raises(BenchError, match="task.null_prob"):
        DigitsConfig(null_prob=1.0)
    with pytest.raises(BenchError, match="task.hidden"):
        DigitsConfig(hidden=0)


# ---- runs through the shared interface ------------------------------------------------------------------


def test_runs_table_and_figures(task: DigitsTask, tmp_path: Path, bench_cache: Path) -> None:
    """sqdf and draft run on digits through the runner; the report writes the table (with the
    held-out prompt column and the ESS), the SIR note, sample grids per checkpoint and the
    held-out-vs-reward figure."""
    from bench.app.config import resolve
    from bench.app.report import write_report
    from bench.app.runner import run_dir, run_one

    layers = [{"task": SMALL_SETS, "train": {"iterations": 4, "eval_every": 2, "eval_samples": 16, "final_eval_samples": 32, "checkpoint_every": 2},
               "sampler": {"steps": 10}}]
    method_sets = {"sqdf": {"rollouts_per_step": 8, "batch_size": 8}, "draft": {"batch_size": 8}}
    results = []
    for m in ("sqdf", "draft"):
        for seed in (0,):
            cfg = resolve("digits", m, seed, alpha=1.0, reward="classifier", layers=layers + [{"method": method_sets[m]}])
            assert cfg.task_cfg == SMALL
            res = run_one(cfg, tmp_path / "runs", progress=False)
            res["_dir"] = str(run_dir(tmp_path / "runs", cfg))
            results.append(res)
            d = Path(res["_dir"])
            assert (d / "samples.png").stat().st_size > 0
            grids = torch.load(d / "eval_grids.pt", weights_only=True)
            assert sorted(grids) == [0, 2, 4]  # every evaluation, for the per-checkpoint rows
    evals = [json.loads(line) for line in (Path(results[-1]["_dir"]) / "metrics.jsonl").read_text().splitlines() if "eval/reward" in line]
    assert evals[0]["eval/path_kl"] == 0.0 and evals[-1]["eval/path_kl"] > 0.0  # the policy moved, the reference did not
    for k in ("judge_acc@heldout", "vendi", "fd_pstar", "gold_mass", "style_recall"):
        assert math.isfinite(results[0]["metrics"][k])
    out = write_report("digits-test", results, tmp_path / "runs", tmp_path / "results")
    text = (out / "table.md").read_text()
    assert "digits · reward classifier · α = 1" in text and "judge acc@heldout" in text and "ESS(p*)" in text
    assert "sampling-importance-resampling" in text
    ref_row = next(line for line in text.splitlines() if line.startswith("| *p") and "(closed form)" in line)
    assert "—" not in ref_row.split("|")[-5]  # the ESS cell of the reference row is filled
    figs = {p.name for p in (out / "figures").iterdir()}
    assert any(n.endswith("_heldout_vs_reward.png") for n in figs) and any(n.endswith("sqdf_samples.png") for n in figs)


def test_prepare_command(task: DigitsTask, bench_cache: Path, cli: Any) -> None:
    args = ["prepare", "digits", "--quiet"] + [f"--set=task.{k}={v}" for k, v in SMALL_SETS.items()]
    res = cli(*args)
    assert res.exit_code == 0, res.output
    assert "digits-base" in res.output and str(bench_cache) in res.output
    bad = cli("prepare", "digits", "--set", "method.lr=1")
    assert isinstance(bad.exception, BenchError)


def test_task_is_registered_with_its_metrics() -> None:
    cls = TASKS.get("digits")
    for m in cls.metrics:
        assert m in METRICS
    for m in cls.table_metrics:
        assert m.split("@")[0] in cls.metrics


# ---- the default-size base (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_default_base_is_class_correct() -> None:
    """The default base (3 × 512, 6000 iterations; ~3 CPU-minutes unless cached) at the default
    sampler: held-out judges agree with the prompt ≥ 90 % of the time on every prompt set."""
    t = DigitsTask(DigitsConfig())
    s = sample_model(t.build_backbone(), [f"digit {k}" for k in range(10)], 200, t.sampler_defaults, with_kl=False)
    m = compute_metrics(s, EvalContext(t, "classifier", 1.0), ["judge_acc", "judge_acc_knn", "nn_ratio"])
    assert m["judge_acc"] > 0.9 and m["judge_acc@heldout"] > 0.9, m
    assert m["nn_ratio"] < 1.5, m


def test_held_out_density_matches_scikit_learn(task: DigitsTask) -> None:
    """The torch log-density of the held-out judges equals the fitted mixture's score_samples."""
    from sklearn.mixture import GaussianMixture

    j = task.judges
    feats = j.features(j.heldout).numpy()
    c = task.cfg
    gmm = GaussianMixture(c.judge_gmm_components, covariance_type="full", reg_covar=1e-3, n_init=2, random_state=0).fit(feats)
    x = torch.rand(20, 64, generator=torch.Generator().manual_seed(1))
    probe = torch.cat([j.heldout[:20], x])
    torch.testing.assert_close(j.log_density(probe), torch.from_numpy(gmm.score_samples(j.features(probe).numpy())), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", sorted(__import__("bench.core.registry", fromlist=["METHODS"]).METHODS.names()))
def test_every_registered_method_trains_on_digits(task: DigitsTask, method: str, contexts: Any, tiny_config: Any) -> None:
    """Every method runs on digits through the same interface: two updates move the policy, never
    the reference, with finite stats (online methods query the digits reward as their oracle)."""
    from bench.core.registry import METHODS

    ctx = contexts(task, "classifier", sampler=6)
    bb = ctx.backbone
    m = METHODS.get(method)(tiny_config(method), ctx)
    before = [p.detach().clone() for p in m.trainable_parameters()]
    for _ in range(2):
        stats = m.train_step()
        assert all(math.isfinite(v) for v in stats.values()), stats
    assert any(not torch.equal(a, p) for a, p in zip(before, m.trainable_parameters()))
    x = torch.randn(4, *bb.sample_shape)
    t = torch.full((4,), 500, dtype=torch.long)
    cond = bb.encode_prompts(["digit 1"] * 4)
    with torch.no_grad():
        ref_eps = bb.reference(x, t, cond)
    fresh = task.build_backbone()
    with torch.no_grad():
        assert torch.equal(ref_eps, fresh.reference(x, t, cond)), "the reference moved"
