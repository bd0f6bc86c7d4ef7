"""Run configuration: frozen dataclasses, layered overrides, validation before anything is written.

Layers, later wins: dataclass defaults (the single source of each field's meaning) <- the task's
preset YAML (`bench/configs/tasks/<task>.yaml`: settings for all methods, then per method) <- a
suite entry or `--config FILE` <- `--set key=value`.

Keys: `alpha`, `reward`, `method.<field>`, `task.<field>`, `sampler.<field>`, `train.<field>`.
Values are coerced to the field's type; unknown keys and bad values fail with one line that lists
what is accepted.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

import yaml

from bench.core.cache import config_hash
from bench.core.errors import BenchError
from bench.core.registry import METHODS, REWARDS, TASKS
from bench.core.task import SamplerConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class TrainConfig:
    """The runner's loop."""

    iterations: int = 400
    "number of method.train_step() calls"
    eval_every: int = 100
    "evaluate every this many iterations (0: only at the start and the end)"
    eval_samples: int = 1024
    "samples per prompt at periodic evaluations"
    final_eval_samples: int = 4096
    "samples per prompt at the final evaluation"
    checkpoint_every: int = 100
    "write a resumable checkpoint every this many iterations"
    query_budget: int = 0
    "maximum training-reward (oracle) queries; 0 = unlimited"
    plot: bool = True
    "write a PNG of final samples against the target"
    processes: int = 1
    "processes (ranks) training this run: each draws its own batch, gradients are averaged (bench/core/distributed.py)"

    def __post_init__(self) -> None:
        if self.processes > 1 and self.query_budget:
            raise BenchError("train.query_budget needs train.processes=1 (a budget is not split across ranks)")
        for f in ("iterations", "eval_samples", "final_eval_samples", "checkpoint_every", "processes"):
            if getattr(self, f) < 1:
                raise BenchError(f"train.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("eval_every", "query_budget"):
            if getattr(self, f) < 0:
                raise BenchError(f"train.{f} must be >= 0, got {getattr(self, f)}")


@dataclass(frozen=True)
class RunConfig:
    """One run = (task, method, reward, α, seed) plus every setting, resolved."""

    task: str
    method: str
    reward: str
    alpha: float
    seed: int
    task_cfg: Any
    method_cfg: Any
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "method": self.method,
            "reward": self.reward,
            "alpha": self.alpha,
            "seed": self.seed,
            "task_cfg": asdict(self.task_cfg),
            "method_cfg": asdict(self.method_cfg),
            "sampler": asdict(self.sampler),
            # a 1-process run omits train.processes, so its config and hash are what they were before the field existed
            "train": {k: v for k, v in asdict(self.train).items() if not (k == "processes" and v == 1)},
        }

    def hash(self) -> str:
        """Hash of everything but the seed (runs that differ only in seed share it)."""
        d = self.to_dict()
        d.pop("seed")
        return config_hash(d)[:8]

    def run_name(self) -> str:
        return f"{self.reward}_a{self.alpha:g}_s{self.seed}_{self.hash()}"


# ---- coercion and overrides ---------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin in (tuple, list):
        inner = (typing.get_args(typ) or (str,))[0]
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").replace("[", "").replace("]", "").split(",") if v.strip()]
        try:
            return tuple(_coerce(v, inner, key) for v in value)
        except TypeError:
            raise BenchError(f"{key} expects a list, got {value!r}") from None
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("true", "1", "yes", "on"):
                return True
            if s in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ in (int, float):
            return _number(value, typ, key)
        if typ is str:
            if isinstance(value, (dict, list, tuple)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(typ, "__name__", str(typ))
        raise BenchError(f"{key} expects {name}, got {value!r}") from None
    return value


def _number(value: Any, typ: type, key: str) -> int | float:
    """An int or float field's value: finite (no nan, inf, 1e999), an int without a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError
    x = float(value)  # ValueError on text that is no number
    if not math.isfinite(x):
        raise BenchError(f"{key} must be a finite number, got {value!r}")
    if typ is float:
        return x
    if isinstance(value, int):
        return value
    if not x.is_integer():
        raise ValueError
    return int(x) if isinstance(value, float) or "e" in value.lower() or "." in value else int(value)


def coerce(value: Any, typ: Any, key: str) -> Any:
    """`value` as type `typ` (int, float, bool, str, tuples, optionals), or a one-line BenchError naming `key`."""
    return _coerce(value, typ, key)


def apply_dict(obj: Any, overrides: dict[str, Any], prefix: str) -> Any:
    """A copy of dataclass `obj` with `overrides` (field -> value) applied and validated."""
    if not overrides:
        return obj
    types_ = _field_types(type(obj))
    names = [f.name for f in fields(obj)]
    kwargs = {}
    for k, v in overrides.items():
        if k not in names:
            raise BenchError(f"unknown key {prefix}{k}; {prefix.rstrip('.') or 'top-level'} keys: {', '.join(prefix + n for n in names)}")
        kwargs[k] = _coerce(v, types_[k], prefix + k)
    try:
        return replace(obj, **kwargs)
    except BenchError:
        raise
    except (TypeError, ValueError) as e:
        raise BenchError(f"invalid {prefix.rstrip('.')} settings: {e}") from None


def parse_sets(items: Iterable[str], sweeps: bool = True) -> dict[str, Any]:
    """The one `--set key=value` parser: ["method.lr=1e-3", "alpha=[1, 0.3]"] ->
    {"method": {"lr": "1e-3"}, "alpha": [1, 0.3]}.

    Values stay text (each field coerces its own); a value written as a YAML list is a sweep (a
    list of values, one cell each) when `sweeps`, else text like any other (a list-valued field).
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise BenchError(f"malformed --set {item!r}: expected key=value, e.g. method.lr=1e-3 or alpha=0.3")
        parts = key.split(".")
        if len(parts) > 2 or not all(parts):
            raise BenchError(f"malformed --set key {key!r}: use alpha, reward, or <section>.<field> with section in method, task, sampler, train")
        val: Any = _sweep(item, value) if sweeps and value.startswith("[") and value.endswith("]") else value
        if len(parts) == 2:
            if not isinstance(out.get(parts[0], {}), dict):
                raise BenchError(f"malformed --set {item!r}: {parts[0]} is set both as a value and as a section")
            out.setdefault(parts[0], {})[parts[1]] = val
        else:
            out[key] = val
    return out


def _sweep(item: str, value: str) -> list[Any]:
    try:
        values = yaml.safe_load(value)
    except yaml.YAMLError:
        raise BenchError(f"malformed sweep in --set {item!r}: expected a YAML list, e.g. [1, 0.3]") from None
    if not isinstance(values, list) or not values:
        raise BenchError(f"malformed sweep in --set {item!r}: a sweep lists at least one value, e.g. [1, 0.3]")
    return values


SECTIONS = ("method", "task", "sampler", "train")
TOP_LEVEL = ("alpha", "reward")


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge nested override dicts (later wins)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in (layer or {}).items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = dict(v) if isinstance(v, dict) else v
    return out


def load_yaml(path: Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; anything else is one line of BenchError."""
    path = Path(path)
    if path.is_dir():
        raise BenchError(f"{what} {str(path)!r} is a folder; give a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise BenchError(f"{what} {str(path)!r} not found") from None
    except UnicodeDecodeError:
        raise BenchError(f"{what} {str(path)!r} is not a text (UTF-8 YAML) file") from None
    except OSError as e:
        raise BenchError(f"cannot read {what} {str(path)!r}: {e.strerror or type(e).__name__}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BenchError(f"malformed YAML in {path}: {first}") from None
    if not isinstance(data, dict):
        raise BenchError(f"malformed {what} {path}: expected a mapping (key: value lines) at the top level, got {type(data).__name__}")
    return data


def task_preset(task: str, method: str) -> dict[str, Any]:
    """The shipped preset for (task, method): the file's shared part merged with its method part."""
    path = CONFIG_DIR / "tasks" / f"{task}.yaml"
    if not path.exists():
        return {}
    data = load_yaml(path)
    per_method = data.pop("methods", {}) or {}
    return merge(data, per_method.get(method, {}))


def check_layer(layer: dict[str, Any], where: str) -> None:
    for k, v in layer.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise BenchError(f"{where}: '{k}' must be a mapping of {k} fields")
        elif k not in TOP_LEVEL:
            raise BenchError(f"{where}: unknown key {k!r}; accepted: {', '.join(TOP_LEVEL + SECTIONS)}")


def resolve(task: str, method: str, seed: int, alpha: float | None = None, reward: str | None = None, layers: Iterable[dict[str, Any]] = ()) -> RunConfig:
    """Build and validate one RunConfig. Raises BenchError (one line) on any bad input."""
    task = TASKS.canonical(task)
    method = METHODS.canonical(method)
    task_cls = TASKS.get(task)
    method_cls = METHODS.get(method)
    layers = [task_preset(task, method), *layers]
    for i, layer in enumerate(layers):
        check_layer(layer, "preset" if i == 0 else "override")
    merged = merge(*layers)
    if alpha is not None:
        merged["alpha"] = alpha
    if reward is not None:
        merged["reward"] = reward
    task_cfg = apply_dict(task_cls.Config(), merged.get("task", {}), "task.")
    method_cfg = apply_dict(method_cls.Config(), merged.get("method", {}), "method.")
    sampler = apply_dict(task_cls.sampler_defaults, merged.get("sampler", {}), "sampler.")
    train = apply_dict(TrainConfig(), merged.get("train", {}), "train.")
    a = _coerce(merged.get("alpha", task_cls.default_alpha), float, "alpha")
    if not a > 0:
        raise BenchError(f"alpha must be > 0 (the KL weight in nats), got {a}")
    r = str(merged.get("reward", task_cls.default_reward))
    r = REWARDS.canonical(r) if r in REWARDS else r
    accepted = task_cls.rewards
    if r not in accepted:
        raise BenchError(f"task {task} has no reward {r!r}; its rewards: {', '.join(accepted)}")
    if method_cls.needs_reward_grad:
        entry = REWARDS.entry(r) if r in REWARDS else None
        cls_ = entry.obj if entry else None
        if cls_ is not None and getattr(cls_, "differentiable", True) is False:
            raise BenchError(f"method {method} needs a differentiable reward, but {r!r} is not; use a method that only queries rewards (e.g. ddpo)")
    return RunConfig(task, method, r, a, check_seed(seed), task_cfg, method_cfg, sampler, train)


MAX_SEED = 2**63
"seeds are integers in [0, 2**63) (torch generators take 64-bit seeds; JSON and hashes keep them exact)"


def check_seed(seed: Any, what: str = "seed") -> int:
    """A seed as an int in [0, 2**63); anything else (negative, fractional, text, nan) is a BenchError."""
    s = _coerce(seed, int, what)
    if not 0 <= s < MAX_SEED:
        raise BenchError(f"{what} must be an integer in [0, 2**63), got {seed!r}")
    return s


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` (e.g. a run folder's config.json)."""
    task_cls, method_cls = TASKS.get(d["task"]), METHODS.get(d["method"])
    return RunConfig(
        d["task"], d["method"], d["reward"], float(d["alpha"]), int(d["seed"]),
        apply_dict(task_cls.Config(), d["task_cfg"], "task."),
        apply_dict(method_cls.Config(), d["method_cfg"], "method."),
        apply_dict(SamplerConfig(), d["sampler"], "sampler."),
        apply_dict(TrainConfig(), d["train"], "train."),
    )
