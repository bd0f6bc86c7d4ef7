"""Tables (bench/app/table.py, `bench table`): golden Markdown, LaTeX and CSV from small synthetic
final.json files, best-per-column marks and arrows, the published-number column, and the refusal
to mix runs whose versions or evaluation prompt sets differ."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from bench.app.cli import app
from bench.app.results import FinalResult
from bench.app.table import (TABLE_FORMATS, collect_runs, groups, load_paper, load_results, long_rows, make_table, read_metric_log,
                             read_run_config, render_tables, row_labels)
from bench.core.errors import BenchError

COLUMNS = ("reward", "path_kl", "gap", "mode_recall")
# draft: 3 seeds, sqdf: 2 seeds; hand-computed means and sample stds in the golden strings below
VALUES = {
    "draft": [(-2.0, 0.5, 3.0, 1.0), (-1.5, 0.7, 2.0, 1.0), (-1.0, 0.9, 1.0, 1.0)],
    "sqdf": [(-1.2, 1.1, 0.5, 0.5), (-1.0, 1.3, 0.7, 1.0)],
}
BUDGET = {"draft": (640, 32640), "sqdf": (320, 16320)}
REFERENCE = {"p* (closed form)": {"reward": -1.34, "path_kl": 1.0, "gap": 0.0, "mode_recall": 1.0},
             "base (pretrained)": {"reward": -8.4, "path_kl": 0.0, "gap": 5.5, "mode_recall": 0.5}}


def final(method: str, seed: int, vals: tuple[float, ...], method_version: int = 1, reward_version: int = 1, prompts: str = "abcd1234",
          config: dict[str, Any] | None = None) -> dict[str, Any]:
    q, calls = BUDGET[method]
    return FinalResult(
        run=f"quadratic_a1_s{seed}_{method}",
        task={"name": "gmm-ring8", "version": 1, "config": {"base": "analytic"}},
        method={"name": method, "version": method_version, "paper": "", "config": config or {"lr": 1e-3}},
        reward={"name": "quadratic", "version": reward_version},
        alpha=1.0, alpha_sqdf=1.0, seed=seed, sampler={"steps": 50}, train={"iterations": 10},
        config_hash=f"{method}-{json.dumps(config or {}, sort_keys=True)}", iterations=10, stopped_by_budget=False,
        metrics=dict(zip(COLUMNS, vals)), metric_meta={},
        eval={"samples_per_prompt": 64, "prompt_sets": {"train": [""]}, "prompt_set_hash": prompts},
        budget={"reward_queries": q, "denoiser_calls": calls}, time={"total": 12.5 + seed}, backbone={}, provenance={},
    ).to_dict()


def runs() -> list[dict[str, Any]]:
    return [final(m, s, v) for m, vs in VALUES.items() for s, v in enumerate(vs)]


GOLDEN_MD = """### gmm-ring8 · reward quadratic · α = 1

| method | n | E[r] ↑ | KL ≈ | gap ↓ | recall ↑ | queries | denoiser calls |
|---|---|---|---|---|---|---|---|
| *p\\* (closed form)* |  | -1.340 | 1.000 | 0.000 | 1.000 |  |  |
| *base (pretrained)* |  | -8.400 | 0.000 | 5.500 | 0.500 |  |  |
| draft | 3 | -1.500 ± 0.500 | 0.700 ± 0.200 | 2.000 ± 1.000 | **1.000 ± 0.000** | 640 | 32,640 |
| sqdf | 2 | **-1.100 ± 0.141** | **1.200 ± 0.141** | **0.600 ± 0.141** | 0.750 ± 0.354 | 320 | 16,320 |
"""

GOLDEN_TEX = r"""% gmm-ring8 · reward quadratic · α = 1
\begin{tabular}{lrrrrrrrr}
\toprule
method & n & E[r] $\uparrow$ & KL $\approx$ & gap $\downarrow$ & recall $\uparrow$ & queries & denoiser calls & time (s) \\
\midrule
\textit{p$^*$ (closed form)} &  & -1.340 & 1.000 & 0.000 & 1.000 &  &  &  \\
\textit{base (pretrained)} &  & -8.400 & 0.000 & 5.500 & 0.500 &  &  &  \\
draft & 3 & -1.500 $\pm$ 0.500 & 0.700 $\pm$ 0.200 & 2.000 $\pm$ 1.000 & \textbf{1.000 $\pm$ 0.000} & 640 & 32,640 & 13.50 $\pm$ 1.000 \\
sqdf & 2 & \textbf{-1.100 $\pm$ 0.141} & \textbf{1.200 $\pm$ 0.141} & \textbf{0.600 $\pm$ 0.141} & 0.750 $\pm$ 0.354 & 320 & 16,320 & 13.00 $\pm$ 0.707 \\
\bottomrule
\end{tabular}
"""


def test_markdown_golden() -> None:
    assert make_table(runs(), REFERENCE, fmt="markdown", columns=COLUMNS, time=False) == GOLDEN_MD


def test_latex_golden() -> None:
    assert make_table(runs(), REFERENCE, fmt="latex", columns=COLUMNS) == GOLDEN_TEX


def test_best_per_column_follows_the_direction() -> None:
    # flip the KL values: draft is now closest to the exact KL* = 1 (≈ column), sqdf still has the higher E[r] (↑)
    rs = runs()
    for r in rs:
        r["metrics"]["path_kl"] = 2.0 - r["metrics"]["path_kl"] if r["method"]["name"] == "sqdf" else 1.0 + 0.01 * r["seed"]
    row = {ln.split(" | ")[0].strip("| "): ln for ln in make_table(rs, REFERENCE, columns=COLUMNS).splitlines() if ln.startswith("| d") or ln.startswith("| s")}
    assert "**1.010 ± 0.010**" in row["draft"] and "**-1.100 ± 0.141**" in row["sqdf"]
    # without the closed form there is no "best" for a ≈ column
    assert "**1.010" not in make_table(rs, None, columns=COLUMNS)


def test_csv_golden_via_cli(tmp_path: Path) -> None:
    for r in runs():
        d = tmp_path / "runs" / "gmm-ring8" / r["method"]["name"] / r["run"]
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps(r))
    res = CliRunner().invoke(app, ["table", str(tmp_path / "runs"), "--format", "csv", "--no-reference", "--no-time"])
    assert res.exit_code == 0, res.output
    rows = [r for r in csv.DictReader(io.StringIO(res.output)) if r["metric"] in ("reward", "gap", "budget.reward_queries")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    assert buf.getvalue() == (
        "task,reward,alpha,row,metric,mean,std,n\n"
        "gmm-ring8,quadratic,1.0,draft,reward,-1.5,0.5,3\n"
        "gmm-ring8,quadratic,1.0,draft,gap,2.0,1.0,3\n"
        "gmm-ring8,quadratic,1.0,draft,budget.reward_queries,640.0,0.0,3\n"
        "gmm-ring8,quadratic,1.0,sqdf,reward,-1.1,0.14142135623730948,2\n"
        "gmm-ring8,quadratic,1.0,sqdf,gap,0.6,0.14142135623730948,2\n"
        "gmm-ring8,quadratic,1.0,sqdf,budget.reward_queries,320.0,0.0,2\n"
    )
    assert "time.total" not in res.output  # --no-time
    # Markdown through the CLI: the task's own columns, one table per group
    res = CliRunner().invoke(app, ["table", str(tmp_path / "runs"), "--no-reference"])
    assert res.exit_code == 0 and res.output.count("### gmm-ring8") == 1 and "| sqdf | 2 |" in res.output


PAPER = {"tables": [{
    "id": "toy-table", "source": "a made-up table for the test", "tasks": ["gmm-ring8"], "reward": "quadratic",
    "rows": [
        {"method": "draft", "metrics": {"reward": -1.4, "gap": 1.9}},
        {"method": "sqdf", "match": {"lr": 1e-3}, "metrics": {"reward": -1.05}},
        {"method": "sqdf", "match": {"lr": 5.0}, "label": "SQDF-other", "metrics": {"reward": -0.9}},
        {"method": "ppo-kl", "label": "PPO+KL", "metrics": {"reward": -3.0, "mode_recall": 0.25}},
    ]}, {
    "id": "other-task", "source": "not for this task", "tasks": ["sd15"], "reward": "quadratic",
    "rows": [{"method": "draft", "metrics": {"reward": 99.0}}]}]}


def test_published_column(tmp_path: Path) -> None:
    p = tmp_path / "paper.yaml"
    p.write_text(yaml.safe_dump(PAPER))
    md = make_table(runs(), None, columns=COLUMNS, budget=False, paper=load_paper(p))
    assert md == (
        "### gmm-ring8 · reward quadratic · α = 1\n\n"
        "| method | n | E[r] ↑ | (paper) | KL ≈ | gap ↓ | (paper) | recall ↑ | (paper) |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| draft | 3 | -1.500 ± 0.500 | -1.400 | 0.700 ± 0.200 | 2.000 ± 1.000 | 1.900 | **1.000 ± 0.000** |  |\n"
        "| sqdf | 2 | **-1.100 ± 0.141** | -1.050 | 1.200 ± 0.141 | **0.600 ± 0.141** |  | 0.750 ± 0.354 |  |\n"
        "| *SQDF-other (paper)* |  |  | -0.900 |  |  |  |  |  |\n"
        "| *PPO+KL (paper)* |  |  | -3.000 |  |  |  |  | 0.250 |\n"
        "\n(paper) toy-table: a made-up table for the test\n"
    )
    rows = long_rows(runs(), None, paper=load_paper(p))
    assert {(r["row"], r["metric"], r["mean"]) for r in rows if r["row"].endswith("(paper)")} == {
        ("draft (paper)", "reward", -1.4), ("draft (paper)", "gap", 1.9), ("sqdf (paper)", "reward", -1.05),
        ("SQDF-other (paper)", "reward", -0.9), ("PPO+KL (paper)", "reward", -3.0), ("PPO+KL (paper)", "mode_recall", 0.25)}


def test_shipped_published_numbers_parse() -> None:
    tables = load_paper()
    assert {t["id"] for t in tables} >= {"sqdf-table1", "sqdf-table2"}
    t1 = next(t for t in tables if t["id"] == "sqdf-table1")
    sq = next(r for r in t1["rows"] if r["label"] == "SQDF-Bootstrap")
    assert sq["metrics"] == {"aesthetic_score": 7.87, "imagereward_score": 1.14}  # SQDF Table 1 (arXiv:2512.04559): the SQDF row has only these two cells
    assert all("arXiv:2512.04559" in t["source"] for t in tables)


@pytest.mark.parametrize("change, what", [
    (lambda r: r["method"].update(version=2), "method version"),
    (lambda r: r["reward"].update(version=2), "reward version"),
    (lambda r: r["eval"].update(prompt_set_hash="ffff0000"), "evaluation prompt set"),
])
def test_refuses_to_mix_versions_and_prompt_sets(change: Any, what: str, tmp_path: Path) -> None:
    rs = runs()
    odd = copy.deepcopy(rs[-1])
    change(odd)
    rs[-1] = odd
    with pytest.raises(BenchError, match=f"refusing to mix runs with different {what}s"):
        make_table(rs, None, columns=COLUMNS)
    # and through the CLI: one line, exit code 2
    for r in rs:
        d = tmp_path / "runs" / r["method"]["name"] / r["run"]
        d.mkdir(parents=True, exist_ok=True)
        (d / "final.json").write_text(json.dumps(r))
    from bench.app.cli import main
    import sys

    argv = sys.argv
    sys.argv = ["bench", "table", str(tmp_path / "runs"), "--no-reference"]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = argv
    assert e.value.code == 2


def test_groups_split_by_task_reward_alpha() -> None:
    rs = runs()
    other = copy.deepcopy(rs[0])
    other["alpha"] = 0.3
    g = groups(rs + [other])
    assert list(g) == [("gmm-ring8", "quadratic", 0.3), ("gmm-ring8", "quadratic", 1.0)]
    assert len(g[("gmm-ring8", "quadratic", 1.0)]) == 5


def test_ablation_rows_name_only_what_differs_from_the_common_config() -> None:
    base = {"gamma": 1.0, "x0_predictor": "tweedie", "ddim_steps": 2, "use_buffer": True}
    variants = [base, {**base, "gamma": 0.9}, {**base, "x0_predictor": "ddim"}, {**base, "x0_predictor": "ddim", "ddim_steps": 4},
                {**base, "gamma": 0.9, "x0_predictor": "consistency"}, {**base, "use_buffer": False}]
    rs = [final("sqdf", s, VALUES["sqdf"][s], config=cfg) for cfg in variants for s in range(2)]
    labels = [line.split(" | ")[0].lstrip("| ") for line in make_table(rs, None, columns=COLUMNS).splitlines() if line.startswith("| sqdf")]
    assert sorted(labels) == sorted(row_labels(rs))  # the one home of row labels (tables, figures, reports)
    assert labels == [
        "sqdf (ddim_steps=2, gamma=1.0, use_buffer=True, x0_predictor=tweedie)",  # the reference row lists every varying field
        "sqdf (gamma=0.9)",
        "sqdf (x0_predictor=ddim)",
        "sqdf (ddim_steps=4, x0_predictor=ddim)",
        "sqdf (gamma=0.9, x0_predictor=consistency)",
        "sqdf (use_buffer=False)",
    ]


# ---- bad input and corrupt run folders: one line naming the file, exit code 2 ---------------------------------


def bench_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `bench <argv>` through the entry point; assert exit code 2 and one line on stderr, and return it."""
    import sys

    from bench.app.cli import main

    old = sys.argv
    sys.argv = ["bench", *argv]
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        sys.argv = old
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


def write_runs(root: Path, rs: list[dict[str, Any]]) -> list[Path]:
    dirs = []
    for r in rs:
        d = root / "gmm-ring8" / r["method"]["name"] / r["run"]
        d.mkdir(parents=True, exist_ok=True)
        (d / "final.json").write_text(json.dumps(r))
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("text, why", [
    ("", "corrupt result file"),
    ('{"schema": 1, "run": "x", "task": {"na', "corrupt result file"),
    ("[1, 2]", "not a run result"),
    ('{"schema": 1, "run": "x"}', "not a complete run result"),
    ('{"schema": 99}', "unknown result schema"),
])
def test_corrupt_final_json_is_one_line_naming_the_file(text: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dirs = write_runs(tmp_path / "runs", runs())
    (dirs[1] / "final.json").write_text(text)
    with pytest.raises(BenchError, match=why):
        load_results(dirs)
    err = bench_error(["table", str(tmp_path / "runs"), "--no-reference"], capsys)
    assert str(dirs[1] / "final.json") in err and why in err


def test_table_format_and_missing_runs_are_refused_before_reading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert TABLE_FORMATS == ("markdown", "latex", "csv")
    with pytest.raises(BenchError, match="unknown table format 'nope'; known: markdown, latex, csv"):
        render_tables([], "nope")  # the format is checked before the runs
    with pytest.raises(BenchError, match="unknown table format"):
        make_table(runs(), None, fmt="nope", columns=COLUMNS)
    write_runs(tmp_path / "runs", runs())
    assert "markdown, latex, csv" in bench_error(["table", str(tmp_path / "runs"), "--format", "nope"], capsys)
    (tmp_path / "empty").mkdir()
    assert "no finished runs" in bench_error(["table", str(tmp_path / "empty")], capsys)
    assert "does not exist" in bench_error(["table", str(tmp_path / "nosuch")], capsys)
    with pytest.raises(BenchError, match="no finished runs .* finish a run first"):
        collect_runs([tmp_path / "empty"])
    with pytest.raises(BenchError, match="does not exist"):
        collect_runs([tmp_path / "nosuch"])


@pytest.mark.parametrize("text, why", [("", "corrupt run config"), ("{", "corrupt run config"), ('{"task": "gmm-ring8"}', "not a run config"),
                                       ('{"task": "nosuch", "method": "draft"}', "nosuch")])
def test_corrupt_config_json_is_one_line_naming_the_file(text: str, why: str, tmp_path: Path) -> None:
    dirs = write_runs(tmp_path / "runs", runs())
    rs = load_results(dirs)
    with pytest.raises(BenchError, match="config.json: no such file; the run folder is incomplete"):
        read_run_config(rs[0])
    (dirs[0] / "config.json").write_text(text)
    with pytest.raises(BenchError, match=why) as e:
        render_tables(rs)  # the reference rows come from the first run's config
    assert str(e.value).startswith(str(dirs[0] / "config.json")) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, why", [(None, "missing or empty"), ("", "missing or empty"), ('{"iteration": 0}\n{"eval/re', "corrupt metric log"),
                                       ("[1]\n", "not a metric log")])
def test_corrupt_metric_log_is_one_line_naming_the_file(text: str | None, why: str, tmp_path: Path) -> None:
    r = load_results(write_runs(tmp_path / "runs", runs()[:1]))[0]
    if text is not None:
        (Path(r["_dir"]) / "metrics.jsonl").write_text(text)
    with pytest.raises(BenchError, match=why) as e:
        read_metric_log(r)
    assert str(e.value).startswith(str(Path(r["_dir"]) / "metrics.jsonl"))
