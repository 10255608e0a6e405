"""Typed run configuration: YAML file + dotted ``key=value`` overrides.

The dotted key names (``run.max_steps``, ``batch.global_batch_size`` ...) are a
public contract: scripts and the comparison tool address runs through them.
Every user mistake becomes a ``ConfigError`` whose message is one line naming
the key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class UserError(Exception):
    """A mistake the user can fix; its message is printed as one line, without a traceback."""


class ConfigError(UserError, ValueError):
    """A user error in the configuration."""


def _field(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class RunConfig:
    output_dir: str = _field("runs/default", "folder for config.yaml, metrics.jsonl, summary.json, model.safetensors")
    seed: int = _field(0, "seed for model init, data and sample order")
    max_steps: int = _field(20, "number of optimizer steps to train (run.max_epochs, when > 0, decides instead)")
    max_epochs: float = _field(
        0.0, "train this many passes over the training set; the steps follow from the global batch (0 = off)"
    )
    dtype: str = _field(
        "float32", "parameter dtype; float64 makes exact equivalence checks possible", ("float32", "float64")
    )
    log_every_steps: int = _field(1, "plain-text log line every N optimizer steps when not on a terminal")
    overwrite: bool = _field(False, "allow writing into an output_dir that already holds a finished run")
    dist_timeout_s: float = _field(600.0, "collective timeout in seconds: a hung rank fails the job after this")
    expected_world_size: int = _field(0, "refuse to start unless the launch has this many processes (0 = any)")
    checkpoint_every: int = _field(0, "write a checkpoint every N optimizer steps (0 = only at the end)")
    keep_checkpoints: int = _field(2, "complete checkpoints kept in output_dir/checkpoints; older ones are pruned")
    resume: str = _field("none", "none | auto (newest complete checkpoint in output_dir, if any) | <checkpoint folder>")
    allow_batch_change: bool = _field(
        False, "resume a checkpoint written with another global batch size (the sample order does not continue)"
    )
    stop_at_step: int = _field(0, "checkpoint after this optimizer step and exit 0, a planned stop (0 = off)")
    on_nonfinite: str = _field(
        "skip", "non-finite loss or gradients on any rank: skip the step on every rank, or stop", ("skip", "stop")
    )
    max_consecutive_nonfinite: int = _field(3, "stop the run when this many steps in a row were skipped")
    inject_nan_at_step: int = _field(0, "test hook: make this optimizer step's loss NaN (1-based; 0 = off)")
    inject_nan_rank: int = _field(0, "test hook: the rank whose loss run.inject_nan_at_step poisons")
    log_with: str = _field(
        "none", "Accelerate trackers besides metrics.jsonl: none, or a comma list (tensorboard, wandb, ...)"
    )


@dataclass
class ModelConfig:
    name: str = _field("tiny-gpt2", "tiny-gpt2 | tiny-bert | mlp-bn | hf:<local dir or hub id>")
    dropout: float = _field(0.0, "probability applied to every dropout in the model")
    task: str = _field("auto", "lm | cls | auto (from the model name or architecture)", ("auto", "lm", "cls"))
    hidden_size: int = _field(64, "width of the built-in tiny models")
    num_layers: int = _field(2, "depth of the built-in tiny models")
    num_heads: int = _field(2, "attention heads of the built-in tiny models")
    num_labels: int = _field(2, "classes for sequence classification")
    sync_batchnorm: bool = _field(
        False, "under DDP, compute BatchNorm statistics over all ranks' micro-batches (SyncBatchNorm)"
    )


@dataclass
class DataConfig:
    name: str = _field(
        "synthetic-lm", "synthetic-lm | synthetic-cls | path to .csv/.json/.jsonl/.parquet | hf:<hub dataset id>"
    )
    num_samples: int = _field(256, "samples in the training set (synthetic) or the most taken from a file (0 = all)")
    seq_len: int = _field(32, "maximum sequence length in tokens")
    text_column: str = _field("text", "column holding the text (file and hub datasets)")
    text_pair_column: str = _field("", "column holding the second text of a pair (e.g. sentence2; empty = none)")
    label_column: str = _field("label", "column holding the class label (classification)")
    split: str = _field("train", "split of a hub dataset")
    subset: str = _field("", "configuration of a hub dataset (e.g. mrpc of glue; empty = none)")
    cache_dir: str = _field(
        "auto", "folder for tokenized datasets: auto ($ACCUM_CACHE or ~/.cache/accum-launcher) | none | <folder>"
    )


@dataclass
class EvalConfig:
    fraction: float = _field(0.0, "carve this share of the training rows out as the eval set (seeded by run.seed)")
    file: str = _field("", "or: an eval file with data.name's columns (.csv/.json/.jsonl/.parquet)")
    split: str = _field("", "or: a split of the hub dataset data.name (e.g. validation)")
    num_samples: int = _field(0, "most eval samples taken (0 = all)")
    every_steps: int = _field(0, "evaluate every N optimizer steps; with an eval set it also runs at the end (0 = end)")
    batch_size: int = _field(0, "eval samples per forward, per process (0 = batch.micro_batch_size, or 8)")


@dataclass
class BatchConfig:
    global_batch_size: int | None = _field(None, "samples per optimizer step, over all processes and micro-steps")
    micro_batch_size: int | None = _field(None, "samples per forward/backward, per process")
    accum_steps: int | None = _field(None, "micro-steps per optimizer step, per process")
    sync: str = _field(
        "no_sync",
        "no_sync: all-reduce on the last micro-step only; every_step: on every micro-step",
        ("no_sync", "every_step"),
    )
    loss_normalization: str = _field(
        "tokens", "tokens: sum / global item count (exact); mean: per-micro-batch mean / K (naive)", ("tokens", "mean")
    )


@dataclass
class OptimConfig:
    name: str = _field("adamw", "optimizer", ("sgd", "adamw"))
    lr: float = _field(1e-3, "peak learning rate")
    weight_decay: float = _field(0.0, "decoupled weight decay (adamw) or L2 (sgd)")
    schedule: str = _field("constant", "learning-rate shape after warmup", ("constant", "linear", "cosine"))
    warmup_steps: int = _field(0, "optimizer steps of linear warmup from 0")
    grad_clip: float = _field(0.0, "max global gradient L2 norm per optimizer step (0 = off)")
    beta1: float = _field(0.9, "adamw first-moment decay")
    beta2: float = _field(0.999, "adamw second-moment decay")
    eps: float = _field(1e-8, "adamw epsilon")
    lr_scaling: str = _field(
        "none",
        "scale optim.lr by global/base global batch: none, linear (x k) or sqrt (x sqrt k)",
        ("none", "linear", "sqrt"),
    )
    base_global_batch_size: int | None = _field(None, "the global batch optim.lr was tuned for (lr_scaling)")
    scale_betas_eps: bool = _field(
        False,
        "adamw with lr_scaling=sqrt: also beta -> 1 - k(1 - beta) and eps -> eps / sqrt k (Malladi et al., 2022)",
    )


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    precision: str = _field("no", "mixed precision through Accelerate", ("no", "bf16", "fp16"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type; YAML gives strings for forms like 1e-3."""
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {names}")


def _section(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a section (a mapping of keys)")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(sorted(known))}")
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], _section(key, value), f"{key}.")
            continue
        if typing.get_origin(hints[name]) is dict:
            # A mapping of named entries (compare's modes): each value is a section of its own type, or free-form.
            item_type = typing.get_args(hints[name])[1]
            entries = _section(key, value if value is not None else {})
            if dataclasses.is_dataclass(item_type):
                entries = {
                    str(k): _build(item_type, _section(f"{key}.{k}", v or {}), f"{key}.{k}.")
                    for k, v in entries.items()
                }
            kwargs[name] = dict(entries)
            continue
        choices = known[name].metadata.get("choices")
        if value is False and choices and "no" in choices:
            value = "no"  # YAML 1.1 reads a bare `no` as false: `precision=no` means what it says
        kwargs[name] = _coerce(key, value, hints[name])
        if choices and kwargs[name] not in choices:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. optim.lr=0.01")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path[0]][path[1]]... = value``, creating sections on the way (in place)."""
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is not a section, so {'.'.join(path)} cannot be set in it")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in the nested mapping ``data`` (in place)."""
    for text in overrides:
        set_dotted(data, *_parse_override(text))
    return data


def flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"batch": {"sync": x}}`` and ``{"batch.sync": x}`` both -> ``{"batch.sync": x}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def read_yaml(path: str | Path, key: str = "--config") -> dict[str, Any]:
    """The mapping in the YAML file ``path``; ``key`` names where the path came from in error messages."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key} {str(path)!r}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{key} {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key} {str(path)!r} must hold a mapping of sections (run:, model:, ...)")
    return data


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not valid: {rule}")


def validate(cfg: Config) -> Config:
    """Range checks that the types alone cannot express."""
    _check(cfg.run.max_steps >= 1, "run.max_steps", cfg.run.max_steps, "must be >= 1")
    _check(cfg.run.log_every_steps >= 1, "run.log_every_steps", cfg.run.log_every_steps, "must be >= 1")
    _check(cfg.run.dist_timeout_s > 0, "run.dist_timeout_s", cfg.run.dist_timeout_s, "must be > 0")
    _check(cfg.run.expected_world_size >= 0, "run.expected_world_size", cfg.run.expected_world_size, "must be >= 0")
    _check(bool(cfg.run.output_dir), "run.output_dir", cfg.run.output_dir, "must name a folder")
    for key in ("checkpoint_every", "stop_at_step", "inject_nan_at_step", "inject_nan_rank"):
        _check(getattr(cfg.run, key) >= 0, f"run.{key}", getattr(cfg.run, key), "must be >= 0")
    for key in ("keep_checkpoints", "max_consecutive_nonfinite"):
        _check(getattr(cfg.run, key) >= 1, f"run.{key}", getattr(cfg.run, key), "must be >= 1")
    _check(bool(cfg.run.resume), "run.resume", cfg.run.resume, "must be none, auto or a checkpoint folder")
    _check(0.0 <= cfg.model.dropout < 1.0, "model.dropout", cfg.model.dropout, "must be in [0, 1)")
    for key in ("hidden_size", "num_layers", "num_heads"):
        _check(getattr(cfg.model, key) >= 1, f"model.{key}", getattr(cfg.model, key), "must be >= 1")
    _check(cfg.model.num_labels >= 2, "model.num_labels", cfg.model.num_labels, "must be >= 2")
    _check(cfg.data.num_samples >= 0, "data.num_samples", cfg.data.num_samples, "must be >= 0 (0 = all rows of a file)")
    _check(cfg.data.seq_len >= 4, "data.seq_len", cfg.data.seq_len, "must be >= 4")
    for key in ("global_batch_size", "micro_batch_size", "accum_steps"):
        value = getattr(cfg.batch, key)
        _check(value is None or value >= 1, f"batch.{key}", value, "must be a positive integer or null (derived)")
    _check(cfg.optim.lr >= 0, "optim.lr", cfg.optim.lr, "must be >= 0")
    _check(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "must be >= 0")
    _check(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "must be >= 0")
    _check(cfg.optim.grad_clip >= 0, "optim.grad_clip", cfg.optim.grad_clip, "must be >= 0 (0 = off)")
    _check(cfg.run.max_epochs >= 0, "run.max_epochs", cfg.run.max_epochs, "must be >= 0 (0 = use run.max_steps)")
    _check(bool(cfg.run.log_with.strip()), "run.log_with", cfg.run.log_with, "must be none or a comma list of trackers")
    _check(bool(cfg.data.cache_dir), "data.cache_dir", cfg.data.cache_dir, "must be auto, none or a folder")
    _check(0.0 <= cfg.eval.fraction < 1.0, "eval.fraction", cfg.eval.fraction, "must be in [0, 1)")
    sources = [k for k in ("fraction", "file", "split") if getattr(cfg.eval, k)]
    if len(sources) > 1:
        key = sources[-1]
        _check(False, f"eval.{key}", getattr(cfg.eval, key), f"set only one of eval.{', eval.'.join(sources)}")
    for key in ("num_samples", "every_steps", "batch_size"):
        _check(getattr(cfg.eval, key) >= 0, f"eval.{key}", getattr(cfg.eval, key), "must be >= 0")
    for key in ("beta1", "beta2"):
        _check(0.0 <= getattr(cfg.optim, key) < 1.0, f"optim.{key}", getattr(cfg.optim, key), "must be in [0, 1)")
    _check(cfg.optim.eps > 0, "optim.eps", cfg.optim.eps, "must be > 0")
    base = cfg.optim.base_global_batch_size
    _check(base is None or base >= 1, "optim.base_global_batch_size", base, "must be a positive integer")
    _check(
        cfg.optim.lr_scaling == "none" or base is not None,
        "optim.lr_scaling",
        cfg.optim.lr_scaling,
        "needs optim.base_global_batch_size, the global batch optim.lr was tuned for",
    )
    _check(
        not cfg.optim.scale_betas_eps or (cfg.optim.lr_scaling == "sqrt" and cfg.optim.name == "adamw"),
        "optim.scale_betas_eps",
        cfg.optim.scale_betas_eps,
        "applies to optim.name=adamw with optim.lr_scaling=sqrt only",
    )
    _check(
        cfg.precision == "no" or cfg.run.dtype == "float32",
        "precision",
        cfg.precision,
        "mixed precision needs run.dtype=float32 (float64 runs are for exact checks)",
    )
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (or start from defaults), apply ``overrides``, build and validate."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return build_config(data)


def build_config(data: dict[str, Any]) -> Config:
    """A validated ``Config`` from a nested mapping (a YAML file's content after overrides)."""
    return validate(_build(Config, data, ""))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
