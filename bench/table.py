"""Paper-style tables from run folders: methods × metrics, mean ± std over seeds with n.

Runs are grouped by (task, reward, α); within a group, rows are methods (a method run with several
configs gets one row per config, labelled by the fields that differ). Reference rows (exact
target, floors, base model) come first. The best method cell per column is bold: highest for ↑,
lowest for ↓, closest to the exact value for ≈. Tables refuse to mix runs whose method or reward
versions, or evaluation prompt sets, differ.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench.errors import BenchError
from bench.registry import METRICS, TASKS

ARROWS = {"max": "↑", "min": "↓", "target": "≈"}
BUDGET_COLUMNS = (("budget.reward_queries", "queries"), ("budget.denoiser_calls", "denoiser calls"), ("time.total", "time (s)"))


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """final.json of every run folder given (folders without one are skipped)."""
    out = []
    for p in paths:
        p = Path(p)
        f = p / "final.json" if p.is_dir() else p
        if f.exists():
            r = json.loads(f.read_text())
            r["_dir"] = str(f.parent)
            out.append(r)
    return out


def find_runs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob("*/*/*/final.json"))


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a >= 1e5:
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _get(r: dict[str, Any], key: str) -> float:
    if key.startswith("budget.") or key.startswith("time."):
        sect, k = key.split(".", 1)
        v = r.get(sect, {}).get(k)
    else:
        v = r["metrics"].get(key)
    return float("nan") if v is None else float(v)


def group_key(r: dict[str, Any]) -> tuple[str, str, float]:
    return (r["task"]["name"], r["reward"]["name"], float(r["alpha"]))


def _row_labels(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """method label -> its runs; methods with several configs are told apart by the differing fields."""
    by_method: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by_method[r["method"]["name"]][r["config_hash"]].append(r)
    rows: dict[str, list[dict[str, Any]]] = OrderedDict()
    for m in sorted(by_method):
        cfgs = by_method[m]
        if len(cfgs) == 1:
            rows[m] = next(iter(cfgs.values()))
            continue
        dicts = {h: _flat_cfg(rs[0]) for h, rs in cfgs.items()}
        keys = sorted({k for d in dicts.values() for k in d if len({json.dumps(dd.get(k)) for dd in dicts.values()}) > 1})
        for h, rs in cfgs.items():
            label = m + " (" + ", ".join(f"{k}={dicts[h].get(k)}" for k in keys) + ")"
            rows[label] = rs
    return rows


def _flat_cfg(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r["method"]["config"].items()}
    for sect in ("train", "sampler"):
        for k, v in r.get(sect, {}).items():
            out[f"{sect}.{k}"] = v
    for k, v in r["task"].get("config", {}).items():
        out[f"task.{k}"] = v
    return out


def _check_comparable(runs: list[dict[str, Any]]) -> None:
    seen: dict[str, Any] = {}
    for r in runs:
        for what, key, val in (
            ("method version", r["method"]["name"], r["method"]["version"]),
            ("reward version", r["reward"]["name"], r["reward"]["version"]),
            ("task version", r["task"]["name"], r["task"]["version"]),
            ("evaluation prompt set", "prompts", r["eval"]["prompt_set_hash"]),
        ):
            k = f"{what}:{key}"
            if k in seen and seen[k] != val:
                raise BenchError(f"refusing to mix runs with different {what}s for {key} ({seen[k]} vs {val}); table them separately")
            seen[k] = val


def aggregate(runs: list[dict[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """label -> column -> (mean, std, n) over seeds."""
    out: dict[str, dict[str, tuple[float, float, int]]] = OrderedDict()
    for label, rs in _row_labels(runs).items():
        cells = {}
        for c in columns:
            vals = [v for v in (_get(r, c) for r in rs) if not math.isnan(v)]
            if not vals:
                cells[c] = (float("nan"), float("nan"), 0)
            else:
                sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
                cells[c] = (statistics.fmean(vals), sd, len(vals))
        out[label] = cells
    return out


def make_table(runs: list[dict[str, Any]], reference: dict[str, dict[str, float]] | None = None, fmt: str = "markdown",
               columns: Sequence[str] | None = None, budget: bool = True) -> str:
    """One table for runs of a single (task, reward, α) group."""
    if not runs:
        raise BenchError("no finished runs to tabulate")
    keys = {group_key(r) for r in runs}
    if len(keys) > 1:
        raise BenchError(f"make_table takes one (task, reward, alpha) group, got {sorted(keys)}")
    _check_comparable(runs)
    task_name, reward, alpha = next(iter(keys))
    task_cls = TASKS.get(task_name)
    metric_cols = list(columns or task_cls.table_metrics)
    cols = metric_cols + ([c for c, _ in BUDGET_COLUMNS] if budget else [])
    agg = aggregate(runs, cols)
    dirs = {m: METRICS.entry(m).meta.get("direction", "max") for m in metric_cols}
    heads = [f"{METRICS.entry(m).meta.get('label', m)} {ARROWS[dirs[m]]}" for m in metric_cols]
    heads += [h for _, h in BUDGET_COLUMNS] if budget else []
    cf = (reference or {}).get("p* (closed form)", {})
    best: dict[str, str] = {}
    for m in metric_cols:
        cand = {lab: cells[m][0] for lab, cells in agg.items() if not math.isnan(cells[m][0])}
        if not cand:
            continue
        if dirs[m] == "max":
            best[m] = max(cand, key=cand.get)
        elif dirs[m] == "min":
            best[m] = min(cand, key=cand.get)
        elif m in cf and not math.isnan(cf[m]):
            best[m] = min(cand, key=lambda lab: abs(cand[lab] - cf[m]))
    lines: list[list[str]] = []
    for name, row in (reference or {}).items():
        lines.append([f"*{name}*", ""] + [_fmt(row.get(c, float("nan"))) for c in metric_cols] + ([""] * len(BUDGET_COLUMNS) if budget else []))
    for lab, cells in agg.items():
        n = max(c[2] for c in cells.values())
        row = [lab, str(n)]
        for c in cols:
            mean, sd, k = cells[c]
            s = "—" if k == 0 else (_fmt(mean) + ("" if math.isnan(sd) else f" ± {_fmt(sd)}"))
            if c in best and best[c] == lab:
                s = f"**{s}**" if fmt == "markdown" else f"\\textbf{{{s}}}"
            row.append(s)
        lines.append(row)
    header = ["method", "n"] + heads
    title = f"{task_name} · reward {reward} · α = {alpha:g}"
    if fmt == "markdown":
        out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in lines]
        return "\n".join(out) + "\n"
    if fmt == "latex":
        esc = lambda s: s.replace("_", "\\_").replace("±", "$\\pm$").replace("↑", "$\\uparrow$").replace("↓", "$\\downarrow$").replace("≈", "$\\approx$").replace("*", "").replace("ε", "$\\epsilon$")  # noqa: E731
        body = [" & ".join(esc(c) for c in header) + " \\\\", "\\midrule"]
        body += [" & ".join(esc(c) if not c.startswith("\\textbf") else c.replace("±", "$\\pm$") for c in r) + " \\\\" for r in lines]
        return (f"% {title}\n\\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}\n\\toprule\n" + "\n".join(body) + "\n\\bottomrule\n\\end{tabular}\n")
    raise BenchError(f"unknown table format {fmt!r}; known: markdown, latex, csv")


def long_rows(runs: list[dict[str, Any]], reference: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Long-format rows (one per group × row × metric) for CSV export."""
    out = []
    task_name, reward, alpha = group_key(runs[0])
    cols = list(TASKS.get(task_name).metrics) + [c for c, _ in BUDGET_COLUMNS]
    for name, row in (reference or {}).items():
        for c in cols:
            if c in row:
                out.append({"task": task_name, "reward": reward, "alpha": alpha, "row": name, "metric": c, "mean": row[c], "std": "", "n": ""})
    for lab, cells in aggregate(runs, cols).items():
        for c, (mean, sd, n) in cells.items():
            out.append({"task": task_name, "reward": reward, "alpha": alpha, "row": lab, "metric": c, "mean": mean, "std": sd, "n": n})
    return out


def groups(runs: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    g: dict[tuple[str, str, float], list[dict[str, Any]]] = OrderedDict()
    for r in sorted(runs, key=lambda r: (group_key(r), r["method"]["name"], r["seed"])):
        g.setdefault(group_key(r), []).append(r)
    return g
