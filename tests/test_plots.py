"""Figures (`bench plot`, bench/app/plots.py:make_figures): held-out metrics vs training reward (Fig. 3),
α-sweep fronts with the exact front (Fig. 4), learning curves with seed bands, sample grids. The
files are opened and checked (PNG/PDF signatures, size, image shape) and every figure's axes are
read back before it is saved."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import pytest
from typer.testing import CliRunner

import bench.app.plots as plots
from bench.app.cli import app
from bench.app.config import resolve
from bench.app.results import FinalResult
from bench.core.evaluation import EvalContext, closed_form_row
from bench.core.registry import METRICS
from bench.app.runner import build_task, run_dir

PNG = b"\x89PNG\r\n\x1a\n"


def check_file(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 3000, f"{path} is nearly empty"
    if path.suffix == ".png":
        assert data[:8] == PNG
        img = mpimg.imread(str(path))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01, "a blank image"
    else:
        assert data[:5] == b"%PDF-" and data.rstrip().endswith(b"%%EOF")


def fake_runs(root: Path, configs: tuple[tuple[str, dict[str, Any]], ...] = (("draft", {}), ("sqdf", {}))) -> None:
    """2 methods (or the given method configs) × 2 α × 2 seeds of gmm-ring8 with synthetic metrics,
    evaluation logs and sample images."""
    for m_i, (method, overrides) in enumerate(configs):
        for alpha in (1.0, 0.3):
            for seed in (0, 1):
                cfg = resolve("gmm-ring8", method, seed, alpha=alpha,
                              layers=[{"train": {"final_eval_samples": 32, "eval_samples": 32}, "method": overrides}])
                d = run_dir(root, cfg)
                d.mkdir(parents=True)
                (d / "config.json").write_text(json.dumps(cfg.to_dict()))
                shift = 0.3 * m_i + 0.05 * seed + (0.5 if alpha < 1 else 0.0)
                evals = []
                for k, it in enumerate((0, 50, 100)):
                    evals.append({"iteration": it, "eval/reward": -8.0 + 3 * k + shift, "eval/path_kl": 0.6 * k + shift, "eval/gap": 5.0 - 2 * k,
                                  "eval/mode_tv": 0.7 - 0.2 * k, "eval/mode_recall": 0.5, "eval/log_p_pre": -3.5 - 0.1 * k,
                                  "eval/off_manifold": 0.01 * k, "eval/mmd": 1.0 - 0.3 * k})
                (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
                last = {k.split("/", 1)[1]: v for k, v in evals[-1].items() if k.startswith("eval/")}
                FinalResult(
                    run=d.name, task={"name": "gmm-ring8", "version": 1, "config": asdict(cfg.task_cfg)},
                    method={"name": method, "version": 1, "paper": "", "config": asdict(cfg.method_cfg)},
                    reward={"name": "quadratic", "version": 1}, alpha=alpha, alpha_sqdf=alpha, seed=seed, sampler=asdict(cfg.sampler),
                    train=asdict(cfg.train), config_hash=cfg.hash(), iterations=100, stopped_by_budget=False, metrics=last, metric_meta={},
                    eval={"samples_per_prompt": 32, "prompt_sets": {"train": [""]}, "prompt_set_hash": "0000"},
                    budget={"reward_queries": 100, "denoiser_calls": 1000}, time={"total": 1.0}, backbone={}, provenance={},
                ).write(d / "final.json")
                fig, ax = plt.subplots(figsize=(3, 3))
                ax.scatter([0, 1, 2], [seed, 2, m_i], c="tab:red")
                ax.set_title(f"{method} {seed}")
                fig.savefig(d / "samples.png")
                plt.close(fig)


def test_exact_front_is_the_closed_form_and_monotone() -> None:
    cfg = resolve("gmm-ring8", "draft", 0)
    task = build_task("gmm-ring8", cfg.task_cfg)
    alphas = [3.0, 1.0, 0.3, 0.1]
    front = plots.exact_front(task, "quadratic", "path_kl", "reward", alphas)
    assert front is not None and len(front) == 4
    kl, r = zip(*front)
    # a smaller KL weight buys more reward for more KL: both increase as α decreases
    assert all(a < b for a, b in zip(kl, kl[1:])) and all(a < b for a, b in zip(r, r[1:]))
    row = closed_form_row(EvalContext(task, "quadratic", 1.0), ["path_kl", "reward"])
    assert front[1] == (row["path_kl"], row["reward"])  # the table's p* (closed form) row at α = 1


def test_pareto_figure_axes_and_files(tmp_path: Path) -> None:
    pts = {"draft": [(1.0, 0.2, -5.0, 0.01, 0.1), (0.3, 0.5, -3.0, float("nan"), float("nan"))], "sqdf": [(1.0, 1.5, -1.4, 0.1, 0.05)]}
    fig = plots.pareto_figure(pts, [(0.5, -3.0), (1.6, -1.3), (3.0, -0.8)], "KL", "E[r]", "toy")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("KL", "E[r]")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["exact front p*_α (closed form)", "draft", "sqdf"]
    assert {t.get_text() for t in ax.texts} == {"α=1", "α=0.3"}
    files = plots.save_formats(fig, tmp_path / "front", ("png", "pdf"))
    assert [f.name for f in files] == ["front.png", "front.pdf"]
    for f in files:
        check_file(f)


def test_bench_plot_writes_every_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    fake_runs(root)
    seen: dict[str, list[tuple[str, str, str]]] = {}
    legends: dict[str, list[str]] = {}
    real_save = plots.save_figure

    def axes_of(fig: Any) -> list[tuple[str, str, str]]:
        return [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in fig.axes if ax.get_visible() and ax.axison]

    def spy_save(fig: Any, *paths: Path) -> list[Path]:
        for path in paths:
            seen[Path(path).name] = axes_of(fig)
            legends[Path(path).name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        return real_save(fig, *paths)

    monkeypatch.setattr(plots, "save_figure", spy_save)
    out = tmp_path / "figs"
    res = CliRunner().invoke(app, ["plot", str(root), "--out", str(out), "--no-reference"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    expected = sorted(f"gmm-ring8_quadratic_a{a}_{k}.{fmt}" for a in ("0.3", "1") for k in ("training", "curves", "samples") for fmt in ("png", "pdf"))
    assert names == sorted(expected + ["gmm-ring8_quadratic_pareto.png", "gmm-ring8_quadratic_pareto.pdf"])
    for p in out.iterdir():
        check_file(p)
    # Fig. 3: held-out metrics (one panel each) against the training reward
    tr = seen["gmm-ring8_quadratic_a1_training.png"]
    assert all("E[r]" in x for x, _, _ in tr)
    assert [y for _, y, _ in tr] == [METRICS.entry(m).meta["label"] for m in ("gap", "mode_tv", "mode_recall", "log_p_pre")]
    # Fig. 4: reward against KL over α, with the exact front of the closed-form target
    (px, py, _), = seen["gmm-ring8_quadratic_pareto.png"]
    assert (px, py) == ("KL", "E[r]")
    assert legends["gmm-ring8_quadratic_pareto.png"] == ["exact front p*_α (closed form)", "draft", "sqdf"]
    # learning curves: one panel per metric over iterations
    cur = seen["gmm-ring8_quadratic_a1_curves.png"]
    assert [x for x, _, _ in cur] == ["iteration"] * len(cur) and [y for _, y, _ in cur] == ["E[r]", "KL", "gap", "mode TV"]
    # sample grid: method × seed
    grid = seen["gmm-ring8_quadratic_a1_samples.png"]
    assert sorted(t for _, _, t in grid) == ["seed 0", "seed 0", "seed 1", "seed 1"]
    assert sorted(y for _, y, _ in grid if y) == ["draft", "sqdf"]
    # one kind, one format, one α group, with the reference points (p* draw, base model; computed and cached)
    a1 = sorted(str(p.parent) for p in root.glob("gmm-ring8/*/quadratic_a1_*/final.json"))
    res = CliRunner().invoke(app, ["plot", *a1, "--out", str(tmp_path / "one"), "--kind", "training", "--format", "pdf"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["gmm-ring8_quadratic_a1_training.pdf"]
    check_file(tmp_path / "one" / "gmm-ring8_quadratic_a1_training.pdf")
    assert list((root / "_reference").glob("gmm-ring8_quadratic_a1_*.json")), "reference rows are cached beside the runs"
    res = CliRunner().invoke(app, ["plot", str(root), "--out", str(tmp_path / "x"), "--kind", "nosuch"])
    assert res.exit_code != 0


def test_queries_figure_puts_oracle_queries_on_the_x_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online runs: each evaluation is placed at the oracle queries spent before it."""
    root = tmp_path / "runs"
    fake_runs(root)
    for mfile in root.glob("gmm-ring8/*/*/metrics.jsonl"):  # interleave budget records as the runner logs them
        evals = [json.loads(line) for line in mfile.read_text().splitlines()]
        recs = []
        for k, e in enumerate(evals):
            recs.append({"iteration": e["iteration"], "train/loss": 0.0, "budget/reward_queries": 128 * k})
            recs.append(e)
        mfile.write_text("".join(json.dumps(r) + "\n" for r in recs))
    seen: dict[str, Any] = {}
    real_save = plots.save_figure

    def spy_save(fig: Any, *paths: Path) -> list[Path]:
        for path in paths:
            seen[Path(path).name] = [(ax.get_xlabel(), ax.get_ylabel(), [list(line.get_xdata()) for line in ax.get_lines()]) for ax in fig.axes]
        return real_save(fig, *paths)

    monkeypatch.setattr(plots, "save_figure", spy_save)
    out = tmp_path / "figs"
    res = CliRunner().invoke(app, ["plot", str(root), "--out", str(out), "--kind", "queries", "--format", "png", "--no-reference"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["gmm-ring8_quadratic_a0.3_queries.png", "gmm-ring8_quadratic_a1_queries.png"]
    check_file(out / "gmm-ring8_quadratic_a1_queries.png")
    panels = seen["gmm-ring8_quadratic_a1_queries.png"]
    assert [x for x, _, _ in panels] == ["oracle queries"] * len(panels)
    assert [y for _, y, _ in panels][:2] == [METRICS.entry("reward").meta["label"], METRICS.entry("path_kl").meta["label"]]
    assert panels[0][2][0] == [0.0, 128.0, 256.0]


def test_results_report_draws_one_line_and_one_sample_figure_per_table_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A suite that runs one method under two configs (an ablation) gets a curve and a sample figure
    per config, labelled like the table's rows, not one curve pooling both."""
    import bench.app.report as report
    from bench.app.table import load_results

    root = tmp_path / "runs"
    fake_runs(root, configs=(("sqdf", {}), ("sqdf", {"gamma": 0.9})))
    legends: dict[str, list[str]] = {}
    real_save = plots.save_figure

    def spy_save(fig: Any, *paths: Path) -> list[Path]:
        for path in paths:
            legends[Path(path).name] = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        return real_save(fig, *paths)

    monkeypatch.setattr(plots, "save_figure", spy_save)
    out = report.write_report("abl", load_results(sorted(q.parent for q in root.rglob("final.json"))), root, tmp_path / "results")
    rows = ["sqdf (gamma=1.0)", "sqdf (gamma=0.9)"]
    assert legends["gmm-ring8_quadratic_a1_curves.png"] == [f"{r} (n=2)" for r in rows] + ["p* (exact)"]
    figs = sorted(p.name for p in (out / "figures").glob("*_a1_*samples.png"))
    assert figs == ["gmm-ring8_quadratic_a1_sqdf_gamma-0.9_samples.png", "gmm-ring8_quadratic_a1_sqdf_gamma-1.0_samples.png"]
    md = (out / "table.md").read_text()
    assert "[sqdf (gamma=0.9)](figures/gmm-ring8_quadratic_a1_sqdf_gamma-0.9_samples.png)" in md
    assert all(f"| {r} | 2 |" in md for r in rows)


def test_bad_options_and_corrupt_run_files_are_one_line_before_anything_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`bench plot`: an --out that is a file, unknown kinds or formats, no runs, or a corrupt
    final.json, config.json, metrics.jsonl or samples.png stop it with one line (exit 2) naming
    what is wrong and what is accepted, and leave the output folder unmade."""
    from test_table import bench_error

    root = tmp_path / "runs"
    fake_runs(root, configs=(("draft", {}),))
    out = tmp_path / "figs"
    (tmp_path / "a-file").write_text("x")
    assert "is an existing file" in bench_error(["plot", str(root), "--out", str(tmp_path / "a-file")], capsys)
    assert (tmp_path / "a-file").read_text() == "x"
    for fmt in ("eps", "nope", "png,jpg"):
        assert "accepted: png, pdf, svg" in bench_error(["plot", str(root), "--out", str(out), "--format", fmt], capsys)
    assert "known: training, pareto, curves, samples, queries" in bench_error(["plot", str(root), "--out", str(out), "--kind", "nosuch"], capsys)
    (tmp_path / "empty").mkdir()
    assert "no finished runs" in bench_error(["plot", str(tmp_path / "empty"), "--out", str(out)], capsys)
    run = sorted(root.glob("gmm-ring8/*/*/final.json"))[-1].parent
    cases = [("final.json", "", "--kind", "samples"), ("metrics.jsonl", '{"iteration": 0, "eval/rew', "--kind", "curves"),
             ("metrics.jsonl", "", "--kind", "training"), ("config.json", "{", "--kind", "pareto"), ("samples.png", "not a png", "--kind", "samples")]
    for name, text, *opts in cases:
        saved = (run / name).read_bytes()
        (run / name).write_text(text)
        err = bench_error(["plot", str(root), "--out", str(out), "--no-reference", *opts], capsys)
        assert str(run / name) in err, err
        (run / name).write_bytes(saved)
    assert not out.exists()
    assert plots.FIGURE_FORMATS == ("png", "pdf", "svg")


def test_report_refuses_a_corrupt_metric_log_before_writing(tmp_path: Path) -> None:
    import bench.app.report as report
    from bench.app.table import load_results
    from bench.core.errors import BenchError

    root = tmp_path / "runs"
    fake_runs(root, configs=(("draft", {}),))
    results = load_results(sorted(q.parent for q in root.rglob("final.json")))
    (Path(results[-1]["_dir"]) / "metrics.jsonl").write_text("{\n")
    with pytest.raises(BenchError, match="metrics.jsonl: corrupt metric log"):
        report.write_report("bad", results, root, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_files_for_the_user_are_written_atomically() -> None:
    """Tables, reports and figures go through bench.core.io (write_text, dump_json, save_figure,
    atomic_write): no plain open(..., "w"), Path.write_text, savefig or copyfile in these modules."""
    import re

    import bench.app.report as report
    import bench.app.table as table

    for mod in (table, report, plots):
        for i, line in enumerate(Path(mod.__file__).read_text().splitlines(), 1):
            if re.search(r"\.write_text\(|\.write_bytes\(|\bopen\(|savefig\(|copyfile\(", line) and "atomic_write(" not in line:
                pytest.fail(f"{mod.__name__}:{i} writes a file without bench.core.io: {line.strip()}")
