"""Figures: samples against their target, and (bench plot) curves and fronts."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.app.table import eval_records, group_key, groups, read_metric_log, read_run_config, reference_for, row_labels  # noqa: E402
from bench.core.errors import BenchError  # noqa: E402
from bench.core.io import save_figure  # noqa: E402
from bench.core.registry import METRICS, TASKS  # noqa: E402

FIGURE_KINDS = ("training", "pareto", "curves", "samples", "queries")
FIGURE_FORMATS = ("png", "pdf", "svg")
"file formats `bench plot` writes (the file suffix picks matplotlib's backend)"


def plot_curves(curves: dict[str, list[tuple[list[float], list[float]]]], metric_labels: dict[str, str], path: Path, title: str,
                targets: dict[str, float] | None = None, xlabel: str = "iteration") -> None:
    """Held-out metrics over training: one panel per metric, mean over seeds with a min–max band.

    Args:
        curves: "metric|method" -> list over seeds of (x, y).
    """
    import numpy as np

    metrics = list(dict.fromkeys(k.split("|")[0] for k in curves))
    methods = list(dict.fromkeys(k.split("|")[1] for k in curves))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], metrics):
        for j, meth in enumerate(methods):
            runs = curves.get(f"{m}|{meth}", [])
            if not runs:
                continue
            n = min(len(x) for x, _ in runs)
            x = np.asarray(runs[0][0][:n])
            ys = np.asarray([y[:n] for _, y in runs], dtype=float)
            c = colors[j % len(colors)]
            ax.plot(x, ys.mean(0), color=c, label=f"{meth} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=c, alpha=0.2, linewidth=0)
        if targets and m in targets and targets[m] == targets[m]:
            ax.axhline(targets[m], color="k", ls="--", lw=1, label="p* (exact)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric_labels.get(m, m))
        ax.grid(alpha=0.3)
    if len(methods) > 3:  # many rows (an ablation): the legend beside the last panel, not over the first
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_metric_vs_reward(curves: dict[str, list[tuple[list[float], dict[str, list[float]]]]], metric_labels: dict[str, str], reward_label: str,
                          path: Path, title: str, references: dict[str, tuple[float, dict[str, float]]] | None = None) -> None:
    """Held-out metrics against the training reward as training goes (the shape of the SQDF
    paper's Fig. 3): one panel per metric, one line per method through its evaluations in order
    (mean over seeds at each evaluation; the circle is the first evaluation, the base model), and
    reference points (e.g. p*) as black stars.

    Args:
        curves: method -> list over seeds of (training reward at each evaluation, metric -> values
            at the same evaluations).
        references: label -> (reward, metric -> value).
    """
    import numpy as np

    metrics = list(metric_labels)
    cols = min(4, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.3 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["*", "P", "X", "D"]
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    for ax, m in zip(axes.flat, metrics):
        for j, (meth, runs) in enumerate(curves.items()):
            runs = [(x, ys[m]) for x, ys in runs if m in ys]
            if not runs:
                continue
            n = min(len(x) for x, _ in runs)
            xs = np.asarray([x[:n] for x, _ in runs], dtype=float).mean(0)
            ys = np.asarray([y[:n] for _, y in runs], dtype=float).mean(0)
            c = colors[j % len(colors)]
            ax.plot(xs, ys, "-", color=c, marker=".", ms=4, lw=1.2, label=f"{meth} (n={len(runs)})")
            ax.plot(xs[:1], ys[:1], "o", color=c, mfc="none", ms=7)
        for k, (lab, (rx, vals)) in enumerate((references or {}).items()):
            if m in vals and vals[m] == vals[m] and rx == rx:
                ax.plot([rx], [vals[m]], markers[k % len(markers)], color="k", ms=9, label=lab)
        ax.set_xlabel(reward_label)
        ax.set_ylabel(metric_labels[m])
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(metrics):]
    if spare:  # the legend in the first unused panel
        handles, labels = axes.flat[0].get_legend_handles_labels()
        spare[0].legend(handles, labels, loc="center", fontsize=8, title="○ = first evaluation (base)", title_fontsize=8)
    else:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


# ---- `bench plot`: paper figures from run folders (PNG and PDF) -----------------------------------------------


def save_formats(fig: Any, stem: Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save `fig` as stem.<fmt> for each format (atomic writes) and close it."""
    stem = Path(stem)
    return save_figure(fig, *(stem.with_name(f"{stem.name}.{fmt}") for fmt in formats))


def pareto_figure(points: dict[str, list[tuple[float, float, float, float, float]]], front: list[tuple[float, float]] | None,
                  xlabel: str, ylabel: str, title: str) -> Any:
    """α-sweep trade-off (the SQDF paper's Fig. 4): one line per method through its α values.

    Args:
        points: method -> [(α, x mean, y mean, x std, y std)] (std NaN with one seed).
        front: the exact front [(x*(α), y*(α))] over a dense α grid (the KL-regularized optimum p*_α), or None.
    Returns:
        The matplotlib Figure (not saved).
    """
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    if front:
        fx, fy = zip(*sorted(front))
        ax.plot(fx, fy, "k--", lw=1.2, label="exact front p*_α (closed form)")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (meth, pts) in enumerate(points.items()):
        pts = sorted(pts)
        a, x, y, sx, sy = (np.asarray(v, dtype=float) for v in zip(*pts))
        c = colors[j % len(colors)]
        ax.errorbar(x, y, xerr=np.nan_to_num(sx), yerr=np.nan_to_num(sy), fmt="-o", color=c, ms=4, lw=1.2, capsize=2, label=meth)
        for ai, xi, yi in zip(a, x, y):
            ax.annotate(f"α={ai:g}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=6, color=c)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def read_sample_image(path: Path) -> Any:
    """A run's samples.png as an image array.

    Raises:
        BenchError: one line naming a corrupt or unreadable file.
    """
    import matplotlib.image as mpimg

    try:
        return mpimg.imread(str(path))
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError is an OSError; truncated PNGs raise any of these
        raise BenchError(f"{path}: corrupt sample figure ({type(e).__name__}); re-run the run or delete the file (the grid leaves it out)") from None


def sample_grid_figure(images: dict[str, list[tuple[str, Path]]], title: str) -> Any:
    """A grid of the runs' sample figures: one row per method, one column per run (e.g. seed).

    Args:
        images: row label -> [(column title, PNG path)].
    Returns:
        The matplotlib Figure (not saved).
    """
    rows = list(images)
    cols = max(len(v) for v in images.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.6 * cols, 3.4 * len(rows)), squeeze=False)
    for i, lab in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(images[lab]):
                ax.axis("off")
                continue
            name, path = images[lab][j]
            ax.imshow(read_sample_image(path))
            ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(lab, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def exact_front(task: Any, reward: str, x_metric: str, y_metric: str, alphas: Sequence[float]) -> list[tuple[float, float]] | None:
    """(x*(α), y*(α)) of the exact target p*_α over `alphas`, from the metrics' closed forms (None
    when the task has no exact target or a metric has no closed form)."""
    from bench.core.evaluation import EvalContext, all_eval_prompts, closed_form_row

    if task.target(reward, float(alphas[0]), all_eval_prompts(task)[0]) is None:
        return None
    out = []
    for a in alphas:
        row = closed_form_row(EvalContext(task, reward, float(a)), [x_metric, y_metric])
        x, y = row.get(x_metric, math.nan), row.get(y_metric, math.nan)
        if math.isnan(x) or math.isnan(y):
            return None
        out.append((x, y))
    return out


def slug(*parts: Any) -> str:
    """Parts of a figure's file name joined by "_", spaces and slashes made "-"."""
    return "_".join(str(p).replace(" ", "-").replace("/", "-") for p in parts)


def group_tag(task: str, reward: str, alpha: float) -> str:
    """The file-name stem of a (task, reward, α) group's figures: "gmm-ring8_quadratic_a1"."""
    return slug(task, reward, "a" + format(alpha, "g"))


def metric_label(m: str) -> str:
    """A metric's axis label as registered ("metric@set": the set appended); unregistered names as given."""
    base, _, sset = m.partition("@")
    return METRICS.entry(base).meta.get("label", base) + (f" @{sset}" if sset else "") if base in METRICS else m


def learning_curves(runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, list[tuple[list[float], list[float]]]]:
    """"metric|row label" -> per run (iterations, values) of each evaluation logged in metrics.jsonl,
    one entry per table row (`bench.app.table.row_labels`), as `plot_curves` takes them."""
    out: dict[str, list[tuple[list[float], list[float]]]] = {}
    for label, rs in row_labels(runs).items():
        for r in rs:
            ev = eval_records(r)
            for m in metrics:
                pts = [(e["iteration"], e[f"eval/{m}"]) for e in ev if f"eval/{m}" in e]
                out.setdefault(f"{m}|{label}", []).append(([x for x, _ in pts], [y for _, y in pts]))
    return out


def reward_curves(runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, list[tuple[list[float], dict[str, list[float]]]]]:
    """Row label -> per run (training reward E[r] at each evaluation, metric -> its values at the
    same evaluations; NaN where an evaluation lacks it), as `plot_metric_vs_reward` takes them."""
    curves: dict[str, list[tuple[list[float], dict[str, list[float]]]]] = {}
    for label, rs in row_labels(runs).items():
        for r in rs:
            ev = [e for e in eval_records(r) if "eval/reward" in e]
            curves.setdefault(label, []).append(([float(e["eval/reward"]) for e in ev],
                                                 {m: [float(e.get(f"eval/{m}", math.nan)) for e in ev] for m in metrics}))
    return curves


def query_curves(runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, list[tuple[list[float], list[float]]]]:
    """"metric|row label" -> per run (oracle reward queries spent before each evaluation, values),
    as `plot_curves` takes them (online runs log "budget/reward_queries" with each training step)."""
    qc: dict[str, list[tuple[list[float], list[float]]]] = {}
    for label, rs in row_labels(runs).items():
        for r in rs:
            spent, pts = 0.0, {m: ([], []) for m in metrics}
            for rec in read_metric_log(r):
                spent = float(rec.get("budget/reward_queries", spent))
                for m in metrics:
                    if f"eval/{m}" in rec:
                        pts[m][0].append(spent)
                        pts[m][1].append(float(rec[f"eval/{m}"]))
            for m in metrics:
                qc.setdefault(f"{m}|{label}", []).append(pts[m])
    return qc


def check_figure_args(out_dir: Path, kinds: Sequence[str], formats: Sequence[str]) -> None:
    """BenchError (one line, what is accepted) for unknown figure kinds or formats, none given, or
    an output folder that is an existing file; `make_figures` calls it before anything is read or written."""
    unknown = sorted(set(kinds) - set(FIGURE_KINDS))
    if unknown or not kinds:
        raise BenchError(f"unknown figure kinds {unknown}; known: {', '.join(FIGURE_KINDS)}" if unknown
                         else f"no figure kind given; known: {', '.join(FIGURE_KINDS)}")
    bad = sorted(set(formats) - set(FIGURE_FORMATS))
    if bad or not formats:
        raise BenchError(f"unknown figure formats {bad}; accepted: {', '.join(FIGURE_FORMATS)}" if bad
                         else f"no figure format given; accepted: {', '.join(FIGURE_FORMATS)}")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BenchError(f"figure folder {out_dir} is an existing file; give a folder (it is created if missing)")


def _check_run_files(results: list[dict[str, Any]], kinds: Sequence[str], reference: bool) -> None:
    """Read every run file the figures will read (config.json, metrics.jsonl, samples.png), so a
    corrupt one stops `make_figures` with one line before any figure is written."""
    for r in results:
        if {"training", "curves", "queries"} & set(kinds):
            read_metric_log(r)
        if "pareto" in kinds or (reference and {"training", "curves"} & set(kinds)):
            read_run_config(r)
        if "samples" in kinds and (Path(r["_dir"]) / "samples.png").exists():
            read_sample_image(Path(r["_dir"]) / "samples.png")


def make_figures(results: list[dict[str, Any]], out_dir: Path, kinds: Sequence[str] = ("training", "pareto", "curves", "samples"),
                 formats: Sequence[str] = ("png", "pdf"), runs_root: Path | None = None, x_metric: str = "path_kl",
                 y_metric: str = "reward", reference: bool = True) -> dict[str, list[Path]]:
    """The paper-style figures of finished runs (final.json dicts with "_dir", as bench.app.table.load_results gives).

    `reference` adds the sampled reference rows (p* draw, base model; cached under runs/_reference)
    as points and target lines. Bad arguments and corrupt run files raise a one-line BenchError
    before any figure is written.

    Kinds:
        training  held-out metrics against the training reward as training goes, one line per method
                  (the SQDF paper's Fig. 3), per (task, reward, α)
        pareto    y_metric against x_metric over α, one line per method, with the exact front where
                  the task has a closed-form target (Fig. 4; drawn with or without `reference`), per (task, reward)
        curves    metrics over training iterations, mean over seeds with a min–max band, per (task, reward, α)
        samples   the runs' final-sample figures side by side (method × seed), per (task, reward, α)
        queries   held-out metrics against the oracle reward queries spent (online runs), per (task, reward, α)
    Returns:
        kind -> the files written.
    """
    check_figure_args(out_dir, kinds, formats)
    if not results:
        raise BenchError("no finished runs to plot")
    _check_run_files(results, kinds, reference)
    out_dir = Path(out_dir)
    written: dict[str, list[Path]] = {k: [] for k in kinds}
    by_group = groups(results)
    per_group = (("training", _training_figures), ("curves", _curve_figures), ("queries", _query_figures), ("samples", _sample_figures))
    for runs in by_group.values():
        ref = reference_for(runs, runs_root) if reference and ("training" in kinds or "curves" in kinds) else {}
        for kind, draw in per_group:
            if kind in kinds:
                written[kind] += draw(runs, ref, out_dir, formats)
    if "pareto" in kinds:
        written["pareto"] += _pareto_figures(by_group, out_dir, formats, x_metric, y_metric)
    return written


def _training_figures(runs: list[dict[str, Any]], ref: dict[str, dict[str, float]], out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Fig. 3 of one (task, reward, α) group: held-out metrics against the training reward, with the
    p* draw and the base model as reference points."""
    task, reward, alpha = group_key(runs[0])
    task_cls = TASKS.get(task)
    ms = tuple(getattr(task_cls, "reward_curve_metrics", ()) or [m for m in task_cls.table_metrics if m not in ("reward", "path_kl")][:4])
    curves = reward_curves(runs, ms)
    points = {name: (row.get("reward", math.nan), row) for name, row in ref.items() if name.startswith(("p* sample", "base"))}
    out = []
    for fmt in formats:
        path = out_dir / f"{group_tag(task, reward, alpha)}_training.{fmt}"
        plot_metric_vs_reward(curves, {m: metric_label(m) for m in ms}, f"{metric_label('reward')} (training reward, held-out evaluation)",
                              path, f"{task} · {reward} · α={alpha:g}: held-out metrics vs training reward", points)
        out.append(path)
    return out


def _curve_figures(runs: list[dict[str, Any]], ref: dict[str, dict[str, float]], out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Learning curves of one group: metrics over iterations, mean over seeds with a min–max band."""
    task, reward, alpha = group_key(runs[0])
    task_cls = TASKS.get(task)
    ms = [m for m in ("reward", "path_kl", "gap", "mode_tv") if m in task_cls.metrics] or list(task_cls.table_metrics[:4])
    lc = learning_curves(runs, ms)
    out = []
    for fmt in formats:
        path = out_dir / f"{group_tag(task, reward, alpha)}_curves.{fmt}"
        plot_curves(lc, {m: metric_label(m) for m in ms}, path, f"{task} · {reward} · α={alpha:g} (mean over seeds, band: min–max)",
                    targets=ref.get("p* (closed form)"))
        out.append(path)
    return out


def _query_figures(runs: list[dict[str, Any]], ref: dict[str, dict[str, float]], out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Online runs of one group: held-out metrics against the oracle queries spent so far (none
    when the task has none of the metrics)."""
    task, reward, alpha = group_key(runs[0])
    ms = [m for m in ("gold_reward", "reward", "path_kl") if m in TASKS.get(task).metrics]
    qc = query_curves(runs, ms)
    out = []
    if qc:
        for fmt in formats:
            path = out_dir / f"{group_tag(task, reward, alpha)}_queries.{fmt}"
            plot_curves(qc, {m: metric_label(m) for m in ms}, path,
                        f"{task} · {reward} · α={alpha:g}: against oracle queries (mean over seeds, band: min–max)", xlabel="oracle queries")
            out.append(path)
    return out


def _sample_figures(runs: list[dict[str, Any]], ref: dict[str, dict[str, float]], out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """The group's final-sample figures side by side: one row per table row, one column per seed
    (runs without samples.png are left out; no figure when none has one)."""
    task, reward, alpha = group_key(runs[0])
    images: dict[str, list[tuple[str, Path]]] = {}
    for lab, rs in row_labels(runs).items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            p = Path(r["_dir"]) / "samples.png"
            if p.exists():
                images.setdefault(lab, []).append((f"seed {r['seed']}", p))
    if not images:
        return []
    fig = sample_grid_figure(images, f"{task} · {reward} · α={alpha:g}: final samples")
    return save_formats(fig, out_dir / f"{group_tag(task, reward, alpha)}_samples", formats)


def _final_metric(r: dict[str, Any], m: str) -> float:
    v = r["metrics"].get(m)
    return math.nan if v is None else float(v)


def _pareto_figures(by_group: dict[tuple[str, str, float], list[dict[str, Any]]], out_dir: Path, formats: Sequence[str],
                    x_metric: str, y_metric: str) -> list[Path]:
    """Fig. 4 per (task, reward): y_metric against x_metric over α, mean ± std over seeds per table
    row, with the exact front over a dense α grid where the task has a closed-form target."""
    from bench.app.runner import build_task

    by_tr: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (task, reward, _), runs in by_group.items():
        by_tr.setdefault((task, reward), []).extend(runs)
    written = []
    for (task, reward), runs in by_tr.items():
        pts: dict[str, list[tuple[float, float, float, float, float]]] = {}
        for (_, _, alpha), rs in groups(runs).items():
            for lab, rr in row_labels(rs).items():
                xs = [_final_metric(r, x_metric) for r in rr]
                ys = [_final_metric(r, y_metric) for r in rr]
                sd = (lambda v: statistics.stdev(v) if len(v) > 1 else math.nan)  # noqa: E731
                pts.setdefault(lab, []).append((alpha, statistics.fmean(xs), statistics.fmean(ys), sd(xs), sd(ys)))
        alphas = sorted({a for p in pts.values() for a, *_ in p})
        cfg0 = read_run_config(runs[0])
        lo, hi = min(alphas) / 4, max(alphas) * 4
        grid_a = [lo * (hi / lo) ** (i / 39) for i in range(40)]
        front = exact_front(build_task(task, cfg0.task_cfg), reward, x_metric, y_metric, grid_a)  # closed form: cheap
        fig = pareto_figure(pts, front, metric_label(x_metric), metric_label(y_metric), f"{task} · {reward}: α sweep")
        written += save_formats(fig, out_dir / f"{slug(task, reward)}_pareto", formats)
    return written
