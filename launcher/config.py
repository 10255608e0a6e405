"""Typed run configuration: YAML file + dotted ``key=value`` overrides.

The dotted key names (``run.max_steps``, ``batch.global_batch_size`` ...) are a public contract: scripts
and the comparison tool address runs through them. Every section is a frozen dataclass whose fields carry
their help text, and whose ``check()`` holds the range rules beside them; nothing changes a config after
it is built. Every user mistake becomes a ``ConfigError`` whose message is one line naming the key, the
value and what would be valid.

The schema helpers (``option``, ``check``, ``Section``, ``build_section``, ``read_yaml``, ``set_dotted``)
are public: the comparison tool builds its own config with them.
"""

from __future__ import annotations

import dataclasses
import re
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


class InvalidValue(ConfigError):
    """A value outside its valid range. It knows its key relative to its section, so that the section
    can be reported under its full dotted name (``run.max_steps``, ``modes.ddp.num_processes``)."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(f"{key}={value!r} is not valid: {rule}")
        self.key, self.value, self.rule = key, value, rule

    def under(self, prefix: str) -> InvalidValue:
        return InvalidValue(prefix + self.key, self.value, self.rule)


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A config field with its help text (and, for strings, the values it may take)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def check(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise ``InvalidValue`` unless ``ok``; ``key`` is relative to the section being checked."""
    if not ok:
        raise InvalidValue(key, value, rule)


class Section:
    """Base of every config section: choices are checked for every field that has them, then ``check()``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise InvalidValue(f.name, value, f"choose one of: {', '.join(choices)}")
        self.check()

    def check(self) -> None:
        """Range rules that the types and choices alone cannot express."""


@dataclass(frozen=True)
class RunConfig(Section):
    output_dir: str = option("runs/default", "folder for config.yaml, metrics.jsonl, summary.json, model.safetensors")
    seed: int = option(0, "seed for model init, data and sample order")
    max_steps: int = option(20, "number of optimizer steps to train (run.max_epochs, when > 0, decides instead)")
    max_epochs: float = option(
        0.0, "train this many passes over the training set; the steps follow from the global batch (0 = off)"
    )
    dtype: str = option(
        "float32", "parameter dtype; float64 makes exact equivalence checks possible", ("float32", "float64")
    )
    log_every_steps: int = option(1, "plain-text log line every N optimizer steps when not on a terminal")
    overwrite: bool = option(False, "allow writing into an output_dir that already holds a finished run")
    dist_timeout_s: float = option(600.0, "collective timeout in seconds: a hung rank fails the job after this")
    expected_world_size: int = option(0, "refuse to start unless the launch has this many processes (0 = any)")
    checkpoint_every: int = option(0, "write a checkpoint every N optimizer steps (0 = only at the end)")
    final_checkpoint: bool = option(
        True, "also checkpoint after the last step (optimizer state included: what a later resume continues from)"
    )
    keep_checkpoints: int = option(2, "complete checkpoints kept in output_dir/checkpoints; older ones are pruned")
    resume: str = option("none", "none | auto (newest complete checkpoint in output_dir, if any) | <checkpoint folder>")
    allow_batch_change: bool = option(
        False, "resume a checkpoint written with another global batch size (the sample order does not continue)"
    )
    stop_at_step: int = option(0, "checkpoint after this optimizer step and exit 0, a planned stop (0 = off)")
    on_nonfinite: str = option(
        "skip", "non-finite loss or gradients on any rank: skip the step on every rank, or stop", ("skip", "stop")
    )
    max_consecutive_nonfinite: int = option(3, "stop the run when this many steps in a row were skipped")
    inject_nan_at_step: int = option(0, "test hook: make this optimizer step's loss NaN (1-based; 0 = off)")
    inject_nan_rank: int = option(0, "test hook: the rank whose loss run.inject_nan_at_step poisons")
    inject_kill: str = option(
        "", "fault hook: rank@step/attempt[,...]: SIGKILL that rank once that optimizer step is done in that attempt"
    )
    log_with: str = option(
        "none", "Accelerate trackers besides metrics.jsonl: none, or a comma list (tensorboard, wandb, ...)"
    )
    time_breakdown: str = option(
        "auto",
        "per-step phase times in metrics.jsonl: auto (host timers on CPU, CUDA events on GPU: no extra sync), "
        "synced (synchronize at every phase on CUDA: exact, slower) or none",
        choices=("auto", "synced", "none"),
    )
    save_initial_weights: bool = option(
        False, "also write the weights before the first step (model_init.safetensors): what training changed"
    )

    def check(self) -> None:
        check(bool(self.output_dir), "output_dir", self.output_dir, "must name a folder")
        check(self.max_steps >= 1, "max_steps", self.max_steps, "must be >= 1")
        check(self.max_epochs >= 0, "max_epochs", self.max_epochs, "must be >= 0 (0 = use run.max_steps)")
        check(self.log_every_steps >= 1, "log_every_steps", self.log_every_steps, "must be >= 1")
        check(self.dist_timeout_s > 0, "dist_timeout_s", self.dist_timeout_s, "must be > 0")
        check(self.expected_world_size >= 0, "expected_world_size", self.expected_world_size, "must be >= 0")
        for key in ("checkpoint_every", "stop_at_step", "inject_nan_at_step", "inject_nan_rank"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")
        for key in ("keep_checkpoints", "max_consecutive_nonfinite"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(bool(self.resume), "resume", self.resume, "must be none, auto or a checkpoint folder")
        check(bool(self.log_with.strip()), "log_with", self.log_with, "must be none or a comma list of trackers")
        check(
            all(re.fullmatch(r"\d+@\d+/\d+", k.strip()) for k in self.inject_kill.split(",") if k.strip()),
            "inject_kill",
            self.inject_kill,
            "a comma list of rank@step/attempt, e.g. 1@5/0 (rank 1 after step 5 of the first attempt)",
        )


@dataclass(frozen=True)
class ModelConfig(Section):
    name: str = option("tiny-gpt2", "tiny-gpt2 | tiny-bert | mlp-bn | hf:<local dir or hub id>")
    dropout: float | None = option(
        None, "probability applied to every dropout in the model (null: the model's own; 0 for the built-in ones)"
    )
    task: str = option("auto", "lm | cls | auto (from the model name or architecture)", ("auto", "lm", "cls"))
    hidden_size: int = option(64, "width of the built-in tiny models")
    num_layers: int = option(2, "depth of the built-in tiny models")
    num_heads: int = option(2, "attention heads of the built-in tiny models")
    num_labels: int = option(0, "classes for sequence classification (0: from the training labels; 2 for synthetic)")
    sync_batchnorm: bool = option(
        False, "under DDP, compute BatchNorm statistics over all ranks' micro-batches (SyncBatchNorm)"
    )

    def check(self) -> None:
        check(self.dropout is None or 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1) or null")
        for key in ("hidden_size", "num_layers", "num_heads"):
            check(getattr(self, key) >= 1, key, getattr(self, key), "must be >= 1")
        check(
            self.num_labels == 0 or self.num_labels >= 2,
            "num_labels",
            self.num_labels,
            "must be >= 2 (0 = from the data)",
        )


@dataclass(frozen=True)
class DataConfig(Section):
    name: str = option(
        "synthetic-lm",
        "synthetic-lm | synthetic-cls | a .csv/.json/.jsonl/.parquet/.txt file | a flat token file (.bin uint16, "
        ".npy) | a token store folder | hf:<hub dataset id>",
    )
    num_samples: int = option(256, "samples generated for synthetic-lm / synthetic-cls (files: data.max_rows)")
    max_rows: int = option(0, "most training rows taken from a file or hub dataset, after eval.fraction (0 = all)")
    seq_len: int = option(32, "maximum sequence length in tokens (blocks of flat token files: seq_len + 1)")
    packing: bool = option(
        False, "language models: documents joined with the tokenizer's EOS into blocks of seq_len + 1, not padded rows"
    )
    txt_documents: str = option(
        "line",
        "a .txt file's documents: one per line, or per paragraph (separated by blank lines)",
        ("line", "paragraph"),
    )
    text_column: str = option("text", "column holding the text (file and hub datasets)")
    text_pair_column: str = option("", "column holding the second text of a pair (e.g. sentence2; empty = none)")
    label_column: str = option("label", "column holding the class label (classification)")
    split: str = option("train", "split of a hub dataset")
    subset: str = option("", "configuration of a hub dataset (e.g. mrpc of glue; empty = none)")
    cache_dir: str = option(
        "auto", "folder for tokenized datasets: auto ($ACCUM_CACHE or ~/.cache/accum-launcher) | none | <folder>"
    )

    def check(self) -> None:
        check(self.num_samples >= 1, "num_samples", self.num_samples, "must be >= 1")
        check(self.max_rows >= 0, "max_rows", self.max_rows, "must be >= 0 (0 = all rows)")
        check(self.seq_len >= 4, "seq_len", self.seq_len, "must be >= 4")
        check(bool(self.cache_dir), "cache_dir", self.cache_dir, "must be auto, none or a folder")


@dataclass(frozen=True)
class EvalConfig(Section):
    fraction: float = option(0.0, "carve this share of the training rows out as the eval set (seeded by run.seed)")
    file: str = option("", "or: an eval file with data.name's columns (.csv/.json/.jsonl/.parquet)")
    split: str = option("", "or: a split of the hub dataset data.name (e.g. validation)")
    num_samples: int = option(0, "most eval samples taken (0 = all)")
    every_steps: int = option(0, "evaluate every N optimizer steps; with an eval set it also runs at the end (0 = end)")
    batch_size: int = option(0, "eval samples per forward, per process (0 = batch.micro_batch_size, or 8)")

    def check(self) -> None:
        check(0.0 <= self.fraction < 1.0, "fraction", self.fraction, "must be in [0, 1)")
        sources = [k for k in ("fraction", "file", "split") if getattr(self, k)]
        if len(sources) > 1:
            key = sources[-1]
            check(False, key, getattr(self, key), f"set only one of eval.{', eval.'.join(sources)}")
        for key in ("num_samples", "every_steps", "batch_size"):
            check(getattr(self, key) >= 0, key, getattr(self, key), "must be >= 0")


@dataclass(frozen=True)
class BatchConfig(Section):
    global_batch_size: int | None = option(
        None, "samples per optimizer step, over all processes and micro-steps (set two of three; else 16, micro 4)"
    )
    micro_batch_size: int | None = option(None, "samples per forward/backward, per process")
    accum_steps: int | None = option(None, "micro-steps per optimizer step, per process (null: derived)")
    sync: str = option(
        "no_sync",
        "no_sync: all-reduce on the last micro-step only; every_step: on every micro-step",
        ("no_sync", "every_step"),
    )
    loss_normalization: str = option(
        "tokens", "tokens: sum / global item count (exact); mean: per-micro-batch mean / K (naive)", ("tokens", "mean")
    )
    window_order: str = option(
        "forward",
        "reversed: each step's samples in reverse order, the same training in exact arithmetic with other "
        "rounding (compare's rounding-floor control)",
        ("forward", "reversed"),
    )

    def check(self) -> None:
        for key in ("global_batch_size", "micro_batch_size", "accum_steps"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, value, "must be a positive integer or null (derived)")


@dataclass(frozen=True)
class ParallelConfig(Section):
    strategy: str = option(
        "ddp",
        "ddp: a full replica per process; fsdp: parameters, gradients and optimizer state sharded (FSDP2)",
        ("ddp", "fsdp"),
    )
    reshard_after_forward: bool = option(
        True,
        "fsdp: free the gathered parameters after each forward (off: keep them through the window's micro-steps, "
        "one all-gather per optimizer step, at the memory of a full replica)",
    )


@dataclass(frozen=True)
class OptimConfig(Section):
    name: str = option("adamw", "optimizer", ("sgd", "adamw"))
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "decoupled weight decay (adamw) or L2 (sgd)")
    schedule: str = option("constant", "learning-rate shape after warmup", ("constant", "linear", "cosine"))
    warmup_steps: int = option(0, "optimizer steps of linear warmup from 0")
    grad_clip: float = option(0.0, "max global gradient L2 norm per optimizer step (0 = off)")
    beta1: float = option(0.9, "adamw first-moment decay")
    beta2: float = option(0.999, "adamw second-moment decay")
    eps: float = option(1e-8, "adamw epsilon")
    lr_scaling: str = option(
        "none",
        "scale optim.lr by global/base global batch: none, linear (x k) or sqrt (x sqrt k)",
        ("none", "linear", "sqrt"),
    )
    base_global_batch_size: int | None = option(None, "the global batch optim.lr was tuned for (lr_scaling)")
    lr_multiplier: float = option(
        1.0, "times optim.lr, after lr_scaling: a learning rate set relative to the base (a study's hand-picked lr)"
    )
    scale_betas_eps: bool = option(
        False,
        "adamw with lr_scaling=sqrt: also beta -> 1 - k(1 - beta) and eps -> eps / sqrt k (Malladi et al., 2022)",
    )

    def check(self) -> None:
        check(self.lr >= 0, "lr", self.lr, "must be >= 0")
        check(self.lr_multiplier > 0, "lr_multiplier", self.lr_multiplier, "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        for key in ("beta1", "beta2"):
            check(0.0 <= getattr(self, key) < 1.0, key, getattr(self, key), "must be in [0, 1)")
        check(self.eps > 0, "eps", self.eps, "must be > 0")
        base = self.base_global_batch_size
        check(base is None or base >= 1, "base_global_batch_size", base, "must be a positive integer")
        check(
            self.lr_scaling == "none" or base is not None,
            "lr_scaling",
            self.lr_scaling,
            "needs optim.base_global_batch_size, the global batch optim.lr was tuned for",
        )
        check(
            not self.scale_betas_eps or (self.lr_scaling == "sqrt" and self.name == "adamw"),
            "scale_betas_eps",
            self.scale_betas_eps,
            "applies to optim.name=adamw with optim.lr_scaling=sqrt only",
        )


@dataclass(frozen=True)
class Config(Section):
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: str = option("no", "mixed precision through Accelerate", ("no", "bf16", "fp16"))

    def check(self) -> None:
        check(
            self.precision == "no" or self.run.dtype == "float32",
            "precision",
            self.precision,
            "mixed precision needs run.dtype=float32 (float64 runs are for exact checks)",
        )

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


def build_section(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the section dataclass ``cls`` from a nested mapping, every key checked; ``prefix`` is the
    section's dotted name in error messages (``"run."``)."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown key {key!r}; valid keys here: {', '.join(sorted(known))}")
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build_section(hints[name], _section(key, value), f"{key}.")
            continue
        if typing.get_origin(hints[name]) is dict:
            # A mapping of named entries (compare's modes): each value is a section of its own type, or free-form.
            item_type = typing.get_args(hints[name])[1]
            entries = _section(key, value if value is not None else {})
            if dataclasses.is_dataclass(item_type):
                entries = {
                    str(k): build_section(item_type, _section(f"{key}.{k}", v or {}), f"{key}.{k}.")
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
    try:
        return cls(**kwargs)
    except InvalidValue as err:
        raise err.under(prefix) from None


def _type_name(annotation: Any) -> str:
    kinds = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return " | ".join("null" if k is type(None) else getattr(k, "__name__", str(k)) for k in kinds)


def keys_help(cls: type, prefix: str = "") -> str:
    """Every key of the section dataclass ``cls``, grouped by section: the key, its type, default and choices,
    and its help text (what ``--help`` shows)."""
    hints = typing.get_type_hints(cls)
    own, sections = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append(keys_help(hints[f.name], f"{key}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        kind = "{" + ",".join(choices) + "}" if choices else _type_name(hints[f.name])
        own.append(f"  {key}: {kind} = {default!r}\n      {f.metadata.get('help', '')}")
    title = f"{prefix.rstrip('.')}:" if prefix else "top level:"
    return "\n\n".join(([title + "\n" + "\n".join(own)] if own else []) + sections)


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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read ``path`` (or start from defaults), apply ``overrides``, build and validate."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return build_config(data)


def build_config(data: dict[str, Any]) -> Config:
    """A validated ``Config`` from a nested mapping (a YAML file's content after overrides)."""
    return build_section(Config, data)


def dump_config(cfg: Config, resolved: dict[str, Any] | None = None) -> str:
    """The config as YAML, with the dotted keys of ``resolved`` set to the values the run resolved for them."""
    data = cfg.to_dict()
    for key, value in (resolved or {}).items():
        set_dotted(data, key.split("."), value)
    return yaml.safe_dump(data, sort_keys=False)
