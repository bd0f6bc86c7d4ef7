"""The house's floors: layered imports, short functions, citations that resolve inside the repository.

* Layers (pyproject.toml, [tool.importlinter]): bench.app > bench.tasks > methods | metrics >
  rewards > bench.core. Nothing imports a module above it, lazy imports inside functions included.
* No function in the library packages is longer than 80 lines.
* Every `*.md` a comment or docstring points to exists in this repository: readers following a
  citation find it.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "methods", "rewards", "metrics")
MAX_LINES = 80


def _lint(config: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"
    return subprocess.run([sys.executable, "-c", code, str(config)], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_import_layers_hold() -> None:
    out = _lint(REPO / "pyproject.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "KEPT" in out.stdout and "BROKEN" not in out.stdout


def test_the_layer_contract_can_fail(tmp_path: Path) -> None:
    """The same contract with the floors swapped must be reported broken: the check reads real imports."""
    cfg = tmp_path / "upside-down.ini"
    cfg.write_text(
        "[importlinter]\nroot_packages =\n    bench\n    methods\n    rewards\n    metrics\n\n"
        "[importlinter:contract:upside-down]\nname = core above app\ntype = layers\nlayers =\n    bench.core\n    bench.app\n"
    )
    out = _lint(cfg)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and "bench.app" in out.stdout


def _library_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES
    ]


def test_no_function_is_longer_than_80_lines() -> None:
    long = [f for p in _library_files() for f in _long_functions(p)]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_the_length_check_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n" + "    x = 1\n" * 85)
    assert _long_functions_of(f) == ["f"]


def _long_functions_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > MAX_LINES]


OUTSIDE_NOTES = re.compile(r"(?<![-\w])reference/|\b(sqdf|baselines|deps|toy|anchors|methods2026|aesthetics)\.md\b")
MD_PATH = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.md)\b")  # a path (with a folder): output names like table.md are not citations


def _unresolved_citations(path: Path, paths_too: bool = True) -> list[str]:
    """Citations of the research notes, and (paths_too) `dir/*.md` references naming no file of this repository."""
    bad = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if OUTSIDE_NOTES.search(line):
            bad.append(f"{path}:{i}: {line.strip()}")
            continue
        for ref in MD_PATH.findall(line) if paths_too else ():
            if not any((base / ref).exists() for base in (REPO, REPO / "docs", path.parent)):
                bad.append(f"{path}:{i}: {ref}")
    return bad


def test_every_cited_document_is_in_the_repository() -> None:
    files = _library_files() + sorted((REPO / "scripts").rglob("*.py")) + sorted((REPO / "bench" / "configs").rglob("*.yaml"))
    bad = [b for p in files for b in _unresolved_citations(p)]
    data = [p for p in sorted((REPO / "tests").glob("*.py")) if p.name != "test_architecture.py"] + [REPO / "results" / "paper.yaml"]
    bad += [b for p in data for b in _unresolved_citations(p, paths_too=False)]  # tests write files like afile/t.md
    assert not bad, "citations of documents outside the repository:\n" + "\n".join(bad)


@pytest.mark.parametrize("line,ok", [
    ("# see docs/architecture.md", True),
    ("# derivation in reference/sqdf.md §3", False),
    ("# baselines.md §2.1", False),
    ("# docs/methods/nowhere-to-be-found.md", False),
])
def test_the_citation_check_can_fail(tmp_path: Path, line: str, ok: bool) -> None:
    f = tmp_path / "probe.py"
    f.write_text(line + "\n")
    assert (_unresolved_citations(f) == []) is ok


def test_the_import_drawing_in_docs_is_current() -> None:
    """docs/imports.md is regenerated from the code (scripts/draw_imports.py) and says no arrow runs up."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "draw_imports.py"), "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Arrows running up: none." in (REPO / "docs" / "imports.md").read_text()
