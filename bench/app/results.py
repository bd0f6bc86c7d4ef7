"""The schema of a run's `final.json`: what the runner writes and what tables, reports and plots read.

One typed record, `FinalResult`, written by `bench.app.runner` and read back only through
`read_final`, which validates it: a corrupt, truncated or foreign file gives one line naming the
file and what is wrong (a `BenchError`), never a traceback deep inside a table.

Field order is the JSON key order (`to_dict`), so files written before this module existed read
back unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from bench.core.errors import BenchError
from bench.core.io import dump_json, read_json

SCHEMA_VERSION = 1
"bump when a field changes meaning; readers refuse versions they do not know"


@dataclass(frozen=True)
class FinalResult:
    """A finished run. Nested records are plain JSON objects with the keys listed per field."""

    run: str
    "the run folder's name: <reward>_a<α>_s<seed>_<config hash>"
    task: dict[str, Any]
    "Task.describe(): name, version, config"
    method: dict[str, Any]
    "AlignmentMethod.describe() (name, version, paper, signal) plus the resolved `config`"
    reward: dict[str, Any]
    "name, version and, where the task has one, the `gold` reward's name"
    alpha: float
    "KL weight α in nats"
    alpha_sqdf: float
    "the same α in the SQDF code's per-dimension convention (α·2/d)"
    seed: int
    sampler: dict[str, Any]
    "SamplerConfig: steps, eta, guidance"
    train: dict[str, Any]
    "TrainConfig: iterations, evaluation sizes, budgets"
    config_hash: str
    "hash of the resolved config without the seed (runs that differ only in seed share it)"
    iterations: int
    "train_step() calls done (fewer than train.iterations when a query budget stopped the run)"
    stopped_by_budget: bool
    metrics: dict[str, float]
    "final evaluation: metric name (\"name@set\" for held-out prompt sets) -> value"
    metric_meta: dict[str, Any]
    "metric name -> direction and label, as registered"
    eval: dict[str, Any]
    "samples_per_prompt, prompt_sets, prompt_set_hash"
    budget: dict[str, Any]
    "reward_queries, denoiser_calls and denoiser calls per kind"
    time: dict[str, Any]
    "seconds per phase, total, and this_call_wall"
    backbone: dict[str, Any]
    provenance: dict[str, Any]
    "git sha, library versions, device, host, date"

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def write(self, path: Path) -> None:
        dump_json(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: Any, where: str = "final.json") -> "FinalResult":
        """Validate a parsed final.json; BenchError (one line naming `where`) when it is not one."""
        if not isinstance(d, dict):
            raise BenchError(f"{where}: not a run result (expected a JSON object, got {type(d).__name__})")
        if d.get("schema") != SCHEMA_VERSION:
            raise BenchError(f"{where}: unknown result schema {d.get('schema')!r}; this version reads schema {SCHEMA_VERSION}")
        missing = [f.name for f in fields(cls) if f.name not in d]
        if missing:
            raise BenchError(f"{where}: not a complete run result (missing {', '.join(missing)}); re-run the run or delete the file")
        kwargs = {f.name: _check(d[f.name], f.type, f"{where}: field {f.name!r}") for f in fields(cls)}
        for name in ("task", "method", "reward"):
            if not isinstance(kwargs[name].get("name"), str):
                raise BenchError(f"{where}: field {name!r} has no name")
        return cls(**kwargs)


_TYPES = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict[str, Any]": dict, "dict[str, float]": dict}


def _check(v: Any, typ: Any, what: str) -> Any:
    want = _TYPES[typ if isinstance(typ, str) else typ.__name__]
    if not isinstance(v, want) or (want is int and isinstance(v, bool)):
        raise BenchError(f"{what} should be {typ if isinstance(typ, str) else typ.__name__}, got {type(v).__name__}")
    if typ == "dict[str, float]":
        bad = [k for k, x in v.items() if not (x is None or isinstance(x, (int, float)))]
        if bad:
            raise BenchError(f"{what}: non-numeric values for {', '.join(map(str, bad[:3]))}")
    if typ == "float" and isinstance(v, float) and math.isnan(v):
        raise BenchError(f"{what} is NaN")
    return v


def read_final(path: Path) -> FinalResult:
    """Read and validate one final.json (or a run folder holding one)."""
    path = Path(path)
    f = path / "final.json" if path.is_dir() else path
    d = read_json(f, "result file", "re-run the run (delete the file first) or leave it out")
    return FinalResult.from_dict(d, str(f))
