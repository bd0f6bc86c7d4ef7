"""Paper-style tables from run folders: methods × metrics, mean ± std over seeds with n.

Runs are grouped by (task, reward, α); within a group, rows are methods (a method run with several
configs gets one row per config: the config sharing the most fields with the others lists every
field that varies, the others only where they differ from it, e.g. "sqdf (gamma=0.9)"). Reference rows (exact
target, floors, base model) come first. The best method cell per column is bold: highest for ↑,
lowest for ↓, closest to the exact value for ≈. Tables refuse to mix runs whose method, reward or task
versions, or evaluation prompt sets, differ.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from bench.app.config import RunConfig, config_from_dict
from bench.app.results import read_final
from bench.core.errors import BenchError
from bench.core.io import read_json
from bench.core.registry import METRICS, TASKS

ARROWS = {"max": "↑", "min": "↓", "target": "≈"}
TABLE_FORMATS = ("markdown", "latex", "csv")
BUDGET_COLUMNS = (("budget.reward_queries", "queries"), ("budget.denoiser_calls", "denoiser calls"), ("time.total", "time (s)"))


# ---- reading run folders: the one home for final.json, config.json and metrics.jsonl ---------------------------


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """final.json of every run folder given, validated (`bench.app.results.read_final`), as plain
    dicts (`FinalResult.to_dict()`) with the run folder under "_dir"; folders without one are skipped.

    Raises:
        BenchError: one line naming a corrupt, empty, truncated or foreign final.json.
    """
    out = []
    for p in paths:
        p = Path(p)
        f = p / "final.json" if p.is_dir() else p
        if f.exists():
            r = read_final(f).to_dict()
            r["_dir"] = str(f.parent)
            out.append(r)
    return out


def collect_runs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The finished runs under `paths` (run folders, or folders holding them; runs/_reference is
    not a run), as `load_results` gives them, for `bench table` and `bench plot`.

    Raises:
        BenchError: a path that does not exist, no finished run at all, or a corrupt final.json.
    """
    paths = [Path(p) for p in paths]
    dirs: list[Path] = []
    for p in paths:
        if not p.exists():
            raise BenchError(f"{p} does not exist; give run folders or folders holding them (e.g. runs/gmm-ring8)")
        if (p / "final.json").exists():
            dirs.append(p)
        else:
            dirs += sorted(q.parent for q in p.rglob("final.json") if "_reference" not in q.parts)
    results = load_results(dirs)
    if not results:
        raise BenchError(f"no finished runs (final.json) under {', '.join(map(str, paths))}; finish a run first (bench run) or give its folder")
    return results


def read_run_config(run: dict[str, Any]) -> RunConfig:
    """The resolved RunConfig of a run (its folder's config.json).

    Raises:
        BenchError: one line naming a missing, corrupt or foreign config.json.
    """
    f = Path(run["_dir"]) / "config.json"
    d = read_json(f, "run config", "the run folder is incomplete or damaged (re-run the run, deleting its folder first, or leave it out)")
    try:
        return config_from_dict(d)
    except BenchError as e:
        raise BenchError(f"{f}: {e}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise BenchError(f"{f}: not a run config ({type(e).__name__}: {e}); re-run the run or leave it out") from None


def read_metric_log(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every record of a finished run's metrics.jsonl (training steps, budgets, evaluations), in order.

    Raises:
        BenchError: one line naming a missing, empty or corrupt metrics.jsonl (a finished run has
            logged at least its final evaluation).
    """
    from bench.app.runner import MetricLog

    f = Path(run["_dir"]) / "metrics.jsonl"
    try:
        recs = MetricLog(f).read()
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{f}: corrupt metric log ({type(e).__name__}); re-run the run (delete its folder first) or leave it out") from None
    if not recs:
        raise BenchError(f"{f}: missing or empty metric log of a finished run; re-run the run (delete its folder first) or leave it out")
    if not all(isinstance(rec, dict) for rec in recs):
        raise BenchError(f"{f}: not a metric log (every line should be a JSON object); re-run the run or leave it out")
    return recs


def eval_records(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation records of a run's metrics.jsonl (those with "eval/..." keys), in order."""
    return [rec for rec in read_metric_log(run) if any(k.startswith("eval/") for k in rec)]


def reference_for(runs: list[dict[str, Any]], runs_root: Path | None = None) -> dict[str, dict[str, float]]:
    """The reference rows (exact target, floors, base model) of one (task, reward, α) group, from its
    first run's config; computed once and cached under <runs_root>/_reference (default: the runs'
    root, three levels above a run folder)."""
    from bench.app.runner import reference_rows

    task, reward, alpha = group_key(runs[0])
    cfg0 = read_run_config(runs[0])
    root = runs_root or Path(runs[0]["_dir"]).parents[2]
    return reference_rows(task, cfg0.task_cfg, reward, alpha, cfg0.sampler, cfg0.train.final_eval_samples, root)


# ---- tables ----------------------------------------------------------------------------------------------------


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


def row_labels(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of a table, figure legend or report: row label -> its runs (seeds), methods sorted by name.

    A method run with one config is one row labelled by its name; a method run with several configs
    (an ablation) gets one row per config (runs sharing `config_hash`), labelled by the fields that
    vary between its configs (method config, train.*, sampler.*, task.*): the config sharing the
    most fields with the others lists every varying field, the others only where they differ from
    it, e.g. "sqdf (gamma=0.9)". Tables, `bench plot` and the results report all label rows
    through this function, so a row reads the same everywhere.
    """
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
        ref = _reference_config(dicts, keys)
        for h, rs in cfgs.items():
            shown = keys if h == ref else [k for k in keys if json.dumps(dicts[h].get(k)) != json.dumps(dicts[ref].get(k))]
            rows[m + " (" + ", ".join(f"{k}={dicts[h].get(k)}" for k in shown) + ")"] = rs
    return rows


def _reference_config(dicts: dict[str, dict[str, Any]], keys: list[str]) -> str:
    """The config that shares the most fields with the others (ties: the first listed).

    Its row lists every varying field; every other row lists only the fields where it differs from
    it (an ablation table reads "sqdf (gamma=0.9)", not the whole config on each row). Labels stay
    unique: two configs that differ from the reference in the same fields with the same values are
    the same config.
    """
    common = {k: Counter(json.dumps(d.get(k)) for d in dicts.values()) for k in keys}
    return max(dicts, key=lambda h: sum(common[k][json.dumps(dicts[h].get(k))] for k in keys))


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
    for label, rs in row_labels(runs).items():
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
               columns: Sequence[str] | None = None, budget: bool = True, paper: list[dict[str, Any]] | None = None,
               time: bool = True) -> str:
    """One table for runs of a single (task, reward, α) group.

    Args:
        paper: published tables (`load_paper()`); a "(paper)" column follows each metric that has
            published numbers for this task and reward, and published methods without runs get rows.
        time: include the wall-time column (off for tables that must be identical across machines).
    """
    if not runs:
        raise BenchError("no finished runs to tabulate")
    if fmt not in ("markdown", "latex"):
        check_table_format(fmt)
        raise BenchError("make_table draws markdown or latex; a csv table is long-format rows (long_rows, render_csv)")
    keys = {group_key(r) for r in runs}
    if len(keys) > 1:
        raise BenchError(f"make_table takes one (task, reward, alpha) group, got {sorted(keys)}")
    _check_comparable(runs)
    task_name, reward, alpha = next(iter(keys))
    task_cls = TASKS.get(task_name)
    metric_cols = list(columns or task_cls.table_metrics)
    budget_cols = [(c, h) for c, h in BUDGET_COLUMNS if time or c != "time.total"] if budget else []
    cols = metric_cols + [c for c, _ in budget_cols]
    budget_keys = {c for c, _ in budget_cols if c.startswith("budget.")}
    agg = aggregate(runs, cols)
    # a column "metric@set" is the metric on an eval prompt set other than "train" (e.g. judge_acc@heldout)
    dirs = {m: METRICS.entry(m.split("@")[0]).meta.get("direction", "max") for m in metric_cols}
    heads = [f"{METRICS.entry(m.split('@')[0]).meta.get('label', m)}{'@' + m.split('@')[1] if '@' in m else ''} {ARROWS[dirs[m]]}" for m in metric_cols]
    heads += [h for _, h in budget_cols]
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
        label = name.replace("*", "\\*")  # "p*" stays literal inside the Markdown italics
        lines.append([f"*{label}*", ""] + [_fmt(row.get(c, float("nan"))) for c in metric_cols] + [""] * len(budget_cols))
    for lab, cells in agg.items():
        n = max(c[2] for c in cells.values())
        row = [lab, str(n)]
        for c in cols:
            mean, sd, k = cells[c]
            if k == 0:
                s = "—"
            elif c in budget_keys and float(mean).is_integer() and (math.isnan(sd) or sd == 0):
                s = f"{int(mean):,}"  # identical counts across seeds: one integer, no "± 0"
            else:
                s = _fmt(mean) + ("" if math.isnan(sd) else f" ± {_fmt(sd)}")
            if c in best and best[c] == lab:
                s = f"**{s}**" if fmt == "markdown" else f"\\textbf{{{s}}}"
            row.append(s)
        lines.append(row)
    header = ["method", "n"] + heads
    title = f"{task_name} · reward {reward} · α = {alpha:g}"
    sources: list[str] = []
    if paper:
        keys: list[str | None] = [None] * len(reference or {}) + list(agg)
        sources = _add_paper_columns(header, lines, keys, metric_cols, published(paper, task_name, reward, row_labels(runs)))
    if fmt == "markdown":
        out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in lines]
        out += ([""] + [f"(paper) {src}" for src in sources]) if sources else []
        return "\n".join(out) + "\n"
    body = [" & ".join(_latex(c) for c in header) + " \\\\", "\\midrule"]  # latex
    body += [" & ".join(_latex(c) for c in r) + " \\\\" for r in lines]
    notes = "".join(f"% (paper) {src}\n" for src in sources)
    return (f"% {title}\n{notes}\\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}\n\\toprule\n" + "\n".join(body) + "\n\\bottomrule\n\\end{tabular}\n")


def check_table_format(fmt: str) -> None:
    """BenchError (one line, the accepted formats) unless `fmt` is one of TABLE_FORMATS."""
    if fmt not in TABLE_FORMATS:
        raise BenchError(f"unknown table format {fmt!r}; known: {', '.join(TABLE_FORMATS)}")


def render_tables(results: list[dict[str, Any]], fmt: str = "markdown", reference: bool = True,
                  paper: list[dict[str, Any]] | None = None, time: bool = True, runs_root: Path | None = None) -> str:
    """`bench table`: every (task, reward, α) group of `results` as one text in `fmt` (TABLE_FORMATS):
    Markdown or LaTeX tables one after the other, or one long-format CSV.

    Args:
        reference: add the reference rows (`reference_for`; cached under <runs_root>/_reference).
        paper: published tables (`load_paper()`), or None.
        time: include the wall-time column.
    """
    check_table_format(fmt)
    if not results:
        raise BenchError("no finished runs to tabulate")
    chunks, csv_rows = [], []
    for runs in groups(results).values():
        ref = reference_for(runs, runs_root) if reference else None
        if fmt == "csv":
            csv_rows += long_rows(runs, ref, paper=paper, time=time)
        else:
            chunks.append(make_table(runs, ref, fmt=fmt, paper=paper, time=time))
    return render_csv(csv_rows) if fmt == "csv" else "\n".join(chunks)


def render_csv(rows: list[dict[str, Any]]) -> str:
    """Long-format rows (`long_rows`) as CSV text, header from the first row's keys (csv's default
    "\\r\\n" line ends)."""
    import csv
    import io

    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _latex(cell: str) -> str:
    """A Markdown table cell as LaTeX: *italic* reference rows, \\textbf{} best cells, symbols in math mode."""
    if cell.startswith("\\textbf{"):
        return "\\textbf{" + _latex(cell[len("\\textbf{"):-1]) + "}"
    if len(cell) > 2 and cell.startswith("*") and cell.endswith("*"):
        return "\\textit{" + _latex(cell[1:-1].replace("\\*", "*")) + "}"
    out = cell.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("%", "\\%").replace("&", "\\&").replace("#", "\\#")
    for sym, tex in (("±", "$\\pm$"), ("↑", "$\\uparrow$"), ("↓", "$\\downarrow$"), ("≈", "$\\approx$"), ("ε", "$\\epsilon$"),
                     ("α", "$\\alpha$"), ("γ", "$\\gamma$"), ("*", "$^*$"), ("—", "--")):
        out = out.replace(sym, tex)
    return out


def long_rows(runs: list[dict[str, Any]], reference: dict[str, dict[str, float]] | None = None,
              paper: list[dict[str, Any]] | None = None, time: bool = True) -> list[dict[str, Any]]:
    """Long-format rows (one per group × row × metric) for CSV export (published numbers: row "<label> (paper)")."""
    if not runs:
        raise BenchError("no finished runs to tabulate")
    out = []
    task_name, reward, alpha = group_key(runs[0])
    cols = list(TASKS.get(task_name).metrics) + [c for c, _ in BUDGET_COLUMNS if time or c != "time.total"]
    for name, row in (reference or {}).items():
        for c in cols:
            if c in row:
                out.append({"task": task_name, "reward": reward, "alpha": alpha, "row": name, "metric": c, "mean": row[c], "std": "", "n": ""})
    for lab, cells in aggregate(runs, cols).items():
        for c, (mean, sd, n) in cells.items():
            out.append({"task": task_name, "reward": reward, "alpha": alpha, "row": lab, "metric": c, "mean": mean, "std": sd, "n": n})
    if paper:
        by_label, extra, _ = published(paper, task_name, reward, row_labels(runs))
        for lab, vals in {**by_label, **extra}.items():
            for c, v in vals.items():
                out.append({"task": task_name, "reward": reward, "alpha": alpha, "row": f"{lab} (paper)", "metric": c, "mean": v, "std": "", "n": ""})
    return out


# ---- published numbers (bench table --paper) ----------------------------------------------------------------

PAPER_FILE = Path(__file__).resolve().parents[2] / "results" / "paper.yaml"


def load_paper(path: Path | None = None) -> list[dict[str, Any]]:
    """The published tables of results/paper.yaml (or `path`): [{id, source, tasks, reward, rows: [...]}]."""
    from bench.app.config import load_yaml

    p = Path(path) if path else PAPER_FILE
    data = load_yaml(p, "published-numbers file")
    tables = data.get("tables")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise BenchError(f"malformed {p}: expected a 'tables' list of mappings (id, source, tasks, reward, rows)")
    for t in tables:
        for k in ("id", "source", "tasks", "reward", "rows"):
            if k not in t:
                raise BenchError(f"malformed {p}: table {t.get('id', '?')} lacks {k!r}")
        if not isinstance(t["rows"], list) or not all(isinstance(row, dict) for row in t["rows"]):
            raise BenchError(f"malformed {p}: 'rows' of {t['id']} must be a list of mappings with 'method' and 'metrics'")
        for row in t["rows"]:
            if "method" not in row or not isinstance(row.get("metrics"), dict):
                raise BenchError(f"malformed {p}: every row of {t['id']} needs 'method' and a 'metrics' mapping")
    return tables


def published(paper: list[dict[str, Any]], task: str, reward: str, rows: dict[str, list[dict[str, Any]]]
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[str]]:
    """Published numbers for one table.

    Returns:
        (our row label -> metric -> value, published rows that no run matches (by the paper's label)
        -> metric -> value, the sources used). A published row matches our row when the method names
        agree and every `match:` field equals the runs' method config value.
    """
    by_label: dict[str, dict[str, float]] = {}
    extra: dict[str, dict[str, float]] = {}
    sources: list[str] = []
    for t in paper:
        if task not in t["tasks"] or reward != t["reward"]:
            continue
        for row in t["rows"]:
            vals = {m: float(v) for m, v in row["metrics"].items() if v is not None}
            hits = [lab for lab, rs in rows.items() if rs[0]["method"]["name"] == row["method"]
                    and all(rs[0]["method"]["config"].get(k) == v for k, v in (row.get("match") or {}).items())]
            for lab in hits:
                by_label.setdefault(lab, {}).update(vals)
            if not hits:
                extra[str(row.get("label", row["method"]))] = vals
        sources.append(f"{t['id']}: {t['source']}")
    return by_label, extra, sources


def _add_paper_columns(header: list[str], lines: list[list[str]], keys: list[str | None], metric_cols: list[str],
                       pub: tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], list[str]]) -> list[str]:
    """Insert a "(paper)" column after each metric with published numbers, and rows for published-only methods."""
    by_label, extra, sources = pub
    have = [m for m in metric_cols if any(m in v for v in list(by_label.values()) + list(extra.values()))]
    width = len(header)
    for name in extra:
        lines.append([f"*{name} (paper)*", ""] + [""] * (width - 2))
        keys.append(name)
    table_of = {**by_label, **extra}
    for m in reversed(have):
        i = 2 + metric_cols.index(m) + 1
        header.insert(i, "(paper)")
        for line, key in zip(lines, keys):
            v = table_of.get(key, {}).get(m) if key is not None else None
            line.insert(i, "" if v is None else _fmt(v))
    return sources


def groups(runs: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    """(task, reward, α) -> its runs, sorted by group, then method, then seed (one table or figure per group)."""
    g: dict[tuple[str, str, float], list[dict[str, Any]]] = OrderedDict()
    for r in sorted(runs, key=lambda r: (group_key(r), r["method"]["name"], r["seed"])):
        g.setdefault(group_key(r), []).append(r)
    return g
