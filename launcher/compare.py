"""Run the ways of reaching one global batch side by side, judge whether they agree, and show what each costs.

    python -m launcher.compare --config configs/compare/default.yaml [key=value ...]
    accum-compare --config configs/compare/default.yaml modes.ddp_2x1.num_processes=4

A compare config names a base training config and a set of modes. Each mode is one launch (processes,
overrides of the training config) and an expectation: ``equal`` (must give the reference's model within
the dtype's tolerance) or ``differ`` (a baseline, whose measured deviation is shown). Each mode runs as
its own ``accelerate launch`` (Accelerate's state is process-global; a mode on N machines is N launches on
this host, one per machine rank, meeting over loopback), from the same seed, so every mode starts from the
same weights and walks the same sample order.

Agreement and cost are read back from each run's own files (model.safetensors, metrics.jsonl,
summary.json), never recomputed from a model of what should happen. Exit status: 0 when every
``equal`` mode agrees, 1 when one does not or a mode failed, 2 for a config error.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.batching import BatchPlan, plan_batch
from launcher.config import (
    Config,
    ConfigError,
    UserError,
    _build,
    _check,
    _field,
    apply_overrides,
    build_config,
    dump_config,
    flatten,
    read_yaml,
    set_dotted,
)
from launcher.launch import Machine, accelerate_command, free_port, launch_env, threads_per_device
from launcher.lr import ResolvedOptim, resolve_optim

EQUAL, DIFFER, SWEEP = "equal", "differ", "sweep"
# Keys a mode may change and still be expected to train the same model: how the global batch is split,
# how often it syncs (SyncBatchNorm changes how BatchNorm's statistics are computed over the split, not the
# model), and where it writes. Anything else that differs from the reference is flagged.
SPLIT_KEYS = frozenset(
    {
        "batch.micro_batch_size",
        "batch.accum_steps",
        "batch.sync",
        "model.sync_batchnorm",
        "run.output_dir",
        "run.overwrite",
        "run.log_every_steps",
        "run.expected_world_size",
    }
)
OUTPUT_FILES = ("compare.json", "report.md", "loss_curves.png", "cost.png")
LOG_TAIL_LINES = 25
MODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name


@dataclass
class ModeConfig:
    num_processes: int = _field(
        1, "processes over all machines, as accelerate launch --num_processes counts them: the world size"
    )
    num_machines: int = _field(
        1,
        "machines: one accelerate launch each, num_processes / num_machines processes per machine, all on this "
        "host over loopback (a rehearsal of the multi-node launch: separate agents, one rendezvous, gloo over TCP)",
    )
    expect: str = _field(
        EQUAL,
        "equal: must agree with the reference within tolerance; differ: a baseline; sweep: another setting "
        "(batch, lr), reported and never judged",
        (EQUAL, DIFFER, SWEEP),
    )
    baseline: bool = _field(False, "shown for contrast (costs more, or trains differently); expect=differ implies it")
    description: str = _field("", "one line for the report")
    overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "training-config keys for this mode, dotted (batch.sync: every_step) or nested"},
    )


@dataclass
class ToleranceConfig:
    float64: float = _field(1e-10, "largest relative L2 distance of final weights that counts as equal, float64")
    # 10 x the largest distance measured between float32 splits of the tiny LM: 4.7e-6 over 3 seeds x 4
    # splits, AdamW, 30 steps (docs/float32_floor.md). A real error is orders above: mean normalization ~1e-1.
    float32: float = _field(5e-5, "the same for float32 runs: 10 x the measured floor (docs/float32_floor.md)")


@dataclass
class CompareConfig:
    base: str = _field("configs/runs/tiny_lm.yaml", "training config every mode starts from")
    output_dir: str = _field("runs/compare", "folder for compare.json, report.md, the plots and modes/<name>/")
    overwrite: bool = _field(False, "allow replacing a finished comparison in output_dir")
    reference: str | None = _field(None, "mode the others are judged against (null = the first mode)")
    timeout_s: float = _field(900.0, "wall-clock limit per mode; a mode past it is stopped and reported failed")
    threads_per_process: int = _field(
        0, "OMP_NUM_THREADS of every process (0: $OMP_NUM_THREADS if set, else cores / the largest mode's processes)"
    )
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "training-config keys applied to every mode, before its own"}
    )
    modes: dict[str, ModeConfig] = field(default_factory=dict, metadata={"help": "name -> mode, in run order"})
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)

    @property
    def reference_name(self) -> str:
        return self.reference or next(iter(self.modes))


def validate_compare(cfg: CompareConfig) -> CompareConfig:
    _check(bool(cfg.modes), "modes", cfg.modes, "name at least one mode")
    for name, mode in cfg.modes.items():
        _check(bool(MODE_NAME.match(name)), f"modes.{name}", name, "a mode name is a folder name: letters, digits, _.-")
        _check(mode.num_processes >= 1, f"modes.{name}.num_processes", mode.num_processes, "must be >= 1")
        _check(mode.num_machines >= 1, f"modes.{name}.num_machines", mode.num_machines, "must be >= 1")
        _check(
            mode.num_processes % mode.num_machines == 0,
            f"modes.{name}.num_processes",
            mode.num_processes,
            f"counts the processes of all {mode.num_machines} machines (as accelerate does), so it must be a "
            f"multiple of num_machines={mode.num_machines}",
        )
    _check(
        cfg.reference is None or cfg.reference in cfg.modes,
        "reference",
        cfg.reference,
        f"must name a mode: {', '.join(cfg.modes)}",
    )
    reference = cfg.modes[cfg.reference_name]
    _check(reference.expect == EQUAL, f"modes.{cfg.reference_name}.expect", reference.expect, "the reference is equal")
    _check(cfg.timeout_s > 0, "timeout_s", cfg.timeout_s, "must be > 0")
    _check(cfg.threads_per_process >= 0, "threads_per_process", cfg.threads_per_process, "must be >= 0 (0 = auto)")
    for dtype in ("float64", "float32"):
        value = getattr(cfg.tolerance, dtype)
        _check(value > 0, f"tolerance.{dtype}", value, "must be > 0")
    return cfg


def load_compare_config(path: str | Path, overrides: list[str] = ()) -> CompareConfig:
    data = read_yaml(path)
    apply_overrides(data, list(overrides))
    return validate_compare(_build(CompareConfig, data, ""))


@dataclass
class PlannedMode:
    """One mode, resolved before anything runs: its full training config and batch plan."""

    name: str
    mode: ModeConfig
    train: Config
    plan: BatchPlan
    optim: ResolvedOptim  # the batch-scaled lr (and betas) the trainer will use
    overrides: dict[str, Any]  # the mode's own, flat

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run.output_dir)

    @property
    def known_max_steps(self) -> int | None:
        """Optimizer steps of this mode, or None until the run has resolved run.max_epochs (it needs the data)."""
        return None if self.train.run.max_epochs > 0 else self.train.run.max_steps

    def describe(self) -> str:
        from launcher.report import processes_of

        p = self.plan
        processes = processes_of(self.mode.num_machines, p.world_size)
        return f"{processes} x micro {p.micro_batch_size} x K={p.accum_steps}, {self.train.batch.sync}"


def plan_modes(cfg: CompareConfig) -> list[PlannedMode]:
    """Every mode's training config, validated with the trainer's own rules, so a bad mode stops the
    comparison before the first launch rather than after the others have run."""
    from launcher.batchnorm import check_micro_batch  # torch: only once the compare config has parsed

    base = read_yaml(cfg.base, key="base")
    modes_dir = Path(cfg.output_dir) / "modes"
    planned = []
    for name, mode in cfg.modes.items():
        data = copy.deepcopy(base)
        own = flatten(mode.overrides)
        try:
            for key, value in [*flatten(cfg.overrides).items(), *own.items()]:
                set_dotted(data, key.split("."), value)
            # compare owns the mode folders (it clears them before each launch).
            set_dotted(data, ["run", "output_dir"], str(modes_dir / name))
            set_dotted(data, ["run", "overwrite"], True)
            # A launch that gives another world size (a wrong accelerate default) fails, not trains another mode.
            # num_processes is the total over the mode's machines, as accelerate counts it.
            set_dotted(data, ["run", "expected_world_size"], mode.num_processes)
            train = build_config(data)
            plan = plan_batch(
                train.batch.global_batch_size, train.batch.micro_batch_size, train.batch.accum_steps, mode.num_processes
            )
            check_micro_batch(train.model, plan.micro_batch_size)
            optim = resolve_optim(train.optim, plan.global_batch_size)
        except ConfigError as err:
            raise ConfigError(f"mode {name!r}: {err}") from None
        planned.append(PlannedMode(name, mode, train, plan, optim, own))
    return planned


# ---------------------------------------------------------------------------------------------- preflight


def _task(train: Config) -> str | None:
    """lm / cls when the config says so without loading anything; None when only the model knows."""
    from launcher.models import BUILTIN_TASKS

    if train.model.task != "auto":
        return train.model.task
    if train.model.name in BUILTIN_TASKS:
        return BUILTIN_TASKS[train.model.name]
    return {"synthetic-lm": "lm", "synthetic-cls": "cls"}.get(train.data.name)


def batch_norm_layers(model: Any) -> list[str]:
    """Types of the BatchNorm layers (SyncBatchNorm included) among ``model``'s modules."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)})


def model_batch_norm(train: Config) -> list[str]:
    """BatchNorm layers of the model a mode's config names, without loading weights, as its launch will train
    them: synced when model.sync_batchnorm is set and the mode has more than one process (plan_modes sets
    run.expected_world_size to the mode's process count)."""
    from launcher.models import BATCH_NORM_MODELS, BUILTIN_TASKS, build_model

    if train.model.name in BUILTIN_TASKS and train.model.name not in BATCH_NORM_MODELS:
        # The built-in tiny GPT-2 and BERT (models.py) normalize with LayerNorm only; building one just
        # to look would cost the comparison seconds of transformers import before the first launch.
        return []
    import torch

    from launcher.batchnorm import convert_sync_batchnorm

    with torch.device("meta"):  # the module tree without memory or a weights download
        if train.model.name in BUILTIN_TASKS:
            model = build_model(train.model, train.data.seq_len, torch.float32).model
        else:
            from transformers import AutoConfig, AutoModel

            model = AutoModel.from_config(AutoConfig.from_pretrained(train.model.name.removeprefix("hf:")))
    if train.model.sync_batchnorm and train.run.expected_world_size > 1:
        model = convert_sync_batchnorm(model, cuda=torch.cuda.is_available())
    return batch_norm_layers(model)


def _mode_warnings(pm: PlannedMode, reference: PlannedMode, bn_layers: list[str]) -> list[str]:
    train, why = pm.train, []
    if train.model.dropout > 0:
        why.append(f"model.dropout={train.model.dropout} > 0: each split draws different dropout masks")
    if train.precision != "no":
        why.append(f"precision={train.precision}: low-precision rounding differs with the micro-batch split")
    if train.batch.loss_normalization == "mean":
        # A classifier's items are samples, equal per micro-batch but in an epoch's short last window; an LM's
        # are tokens, which vary with every sequence length (and an hf: model of unknown task may be an LM).
        # num_samples=0 takes every row of a file: the window sizes are unknown until it is read.
        short_window = train.data.num_samples == 0 or train.data.num_samples % pm.plan.global_batch_size != 0
        if _task(train) != "cls":
            why.append(
                "batch.loss_normalization=mean with variable lengths: a mean per micro-batch weighs tokens "
                "unequally when micro-batches hold different token counts"
            )
        elif short_window:
            why.append("batch.loss_normalization=mean: the short last window of an epoch is averaged per micro-batch")
    if bn_layers and pm is not reference:
        from launcher.batchnorm import samples_per_statistic

        ours, theirs = (
            samples_per_statistic(p.plan.micro_batch_size, p.plan.world_size, p.train.model.sync_batchnorm)
            for p in (pm, reference)
        )
        if ours != theirs:
            why.append(
                f"BatchNorm ({', '.join(bn_layers)}): statistics over {ours} samples per micro-step, the "
                f"reference's over {theirs}: normalization changes with the split"
            )
    if pm.mode.expect == EQUAL and pm is not reference:
        theirs, ours = flatten(reference.train.to_dict()), flatten(train.to_dict())
        changed = [f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in ours if k not in SPLIT_KEYS and ours[k] != theirs[k]]
        if changed:
            why.append(f"changes more than the split vs reference {reference.name!r} ({'; '.join(changed)})")
    if pm.plan.world_size > (os.cpu_count() or 1):
        why.append(f"{pm.plan.world_size} processes on {os.cpu_count()} cores: timings are oversubscribed")
    return why


def preflight(planned: list[PlannedMode], reference: PlannedMode) -> list[str]:
    """Warnings (never refusals) about what will break equivalence, one line per cause, naming the modes."""
    bn_cache: dict[str, list[str]] = {}
    by_cause: dict[str, list[str]] = {}
    for pm in planned:
        key = json.dumps([dataclasses.asdict(pm.train.model), pm.train.data.seq_len, pm.plan.world_size])
        if key not in bn_cache:
            try:
                bn_cache[key] = model_batch_norm(pm.train)
            except Exception as err:  # inspection is best effort: a model that cannot load fails its run, reported
                by_cause.setdefault(f"could not inspect the model for BatchNorm ({type(err).__name__})", []).append(
                    pm.name
                )
                bn_cache[key] = []
        for cause in _mode_warnings(pm, reference, bn_cache[key]):
            by_cause.setdefault(cause, []).append(pm.name)
    everyone = len(planned)
    return [
        f"{'all modes' if len(names) == everyone and everyone > 1 else ', '.join(names)}: {cause}"
        for cause, names in by_cause.items()
    ]


# ------------------------------------------------------------------------------------------------ running


@dataclass
class ModeOutcome:
    returncode: int | None  # 0 when every machine's launch exited 0, else the first failing one's; None: timeout
    launch_wall_s: float  # the whole mode: every machine's launch, from the first start to the last exit
    logs: list[Path]  # one per machine, machine 0's (the mode's train.log) first
    failed_machine: int | None = None  # the first machine whose launch failed: its log explains the failure

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def log(self) -> Path:
        """The log that tells the mode's story: the failing machine's, else machine 0's."""
        return self.logs[self.failed_machine or 0]

    def log_lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        return self.log_lines()[-lines:]

    def reason(self) -> str:
        """Why the mode failed, in one line: the failing launch's own ``error:`` line when the trainer printed
        one (the launcher's traceback that follows it says only that a child failed)."""
        if self.returncode is None:
            return "stopped at the timeout"
        errors = [line.removeprefix("error: ") for line in self.log_lines() if line.startswith("error: ")]
        machine = f"machine {self.failed_machine} " if len(self.logs) > 1 else ""
        return f"{machine}exited {self.returncode}" + (f": {errors[-1]}" if errors else "")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics.jsonl (a running trainer may be half-way through the next one)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def resolved_max_steps(run_dir: Path) -> int | None:
    """run.max_steps as the trainer resolved it, from the config.yaml it writes before its first step."""
    try:
        return int(read_yaml(run_dir / "config.yaml")["run"]["max_steps"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None  # not written yet


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop launches and their workers: each launcher is a session leader, so its group holds them all.
    SIGTERM first, to every launch at once (the trainer stops at a step boundary); SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        running = [proc for proc in procs if proc.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def machine_log(run_dir: Path, machine_rank: int) -> Path:
    return run_dir / ("train.log" if machine_rank == 0 else f"train.machine{machine_rank}.log")


def launch_commands(pm: PlannedMode, config_path: Path) -> list[list[str]]:
    """One `accelerate launch` per machine of the mode. Several machines meet at one rendezvous on this
    host's loopback, on a port picked here: ``--main_process_port 0`` would give each machine its own."""
    tail = ["--config", str(config_path)]
    num_machines = pm.mode.num_machines
    if num_machines == 1:
        return [[*accelerate_command(pm.plan.world_size), *tail]]
    port = free_port()
    return [
        [*accelerate_command(pm.plan.world_size, machine=Machine(num_machines, rank, port)), *tail]
        for rank in range(num_machines)
    ]


def run_mode(pm: PlannedMode, cfg: CompareConfig, threads: int, progress: Any) -> ModeOutcome:
    """Launch one mode into a clean folder, one launch per machine, and follow its metrics.jsonl for the live
    view. Every machine reads the same config, so all point at the same run folder; only the job's main
    process (machine 0, rank 0) writes results there. The mode fails as soon as one machine's launch does:
    the others are stopped rather than left to wait out the collective timeout."""
    from launcher.metrics import write_text_atomic  # torch: only once something runs

    if pm.run_dir.exists():
        shutil.rmtree(pm.run_dir)  # never judge a mode on files a previous comparison left
    pm.run_dir.mkdir(parents=True)
    config_path = pm.run_dir / "launch_config.yaml"
    write_text_atomic(config_path, dump_config(pm.train))
    tmp_dir = Path(cfg.output_dir) / "tmp" / pm.name
    env = launch_env(tmp_dir, threads, offline=False)  # a hub model or dataset loads where the network allows
    commands = launch_commands(pm, config_path)
    logs = [machine_log(pm.run_dir, rank) for rank in range(len(commands))]
    started = time.perf_counter()
    progress.start(pm.name, pm.describe())
    procs: list[subprocess.Popen] = []
    exited: dict[int, int] = {}  # machine rank -> exit code, in the order the launches ended
    note = ""
    total_steps = pm.known_max_steps
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("w") as log_file:  # the launch keeps its own descriptor
                procs.append(
                    subprocess.Popen(
                        command,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        env=env,
                        start_new_session=True,
                    )
                )
        while True:
            try:
                next(proc for proc in procs if proc.poll() is None).wait(0.5)
            except (StopIteration, subprocess.TimeoutExpired):
                pass
            exited.update({rank: proc.returncode for rank, proc in enumerate(procs) if proc.poll() is not None})
            if len(exited) == len(procs) or any(exited.values()):
                break
            records = read_metrics(pm.run_dir / "metrics.jsonl")
            total_steps = total_steps or resolved_max_steps(pm.run_dir)
            progress.update(pm.name, len(records), records[-1]["loss"] if records else None, total_steps)
            if time.perf_counter() - started > cfg.timeout_s:
                note = f"compare: stopped after timeout_s={cfg.timeout_s:g}"
                break
    finally:  # a failed machine, the timeout, Ctrl-C: leave no orphaned workers holding the port
        stopped = [rank for rank, proc in enumerate(procs) if proc.poll() is None]
        _stop(procs)
    failed = next((rank for rank, code in exited.items() if code != 0), None)
    for rank in stopped:
        with logs[rank].open("a") as log_file:
            log_file.write(f"\n{note or f'compare: stopped because machine {failed} failed'}\n")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    returncode = None if note else exited[failed] if failed is not None else 0
    return ModeOutcome(returncode, time.perf_counter() - started, logs, failed)


# ------------------------------------------------------------------------------------------------ judging


def read_run(run_dir: Path) -> dict[str, Any]:
    """What a finished run wrote: summary.json, metrics.jsonl and the final weights."""
    from safetensors.torch import load_file

    return {
        "summary": json.loads((run_dir / "summary.json").read_text()),
        "metrics": read_metrics(run_dir / "metrics.jsonl"),
        "weights": load_file(str(run_dir / "model.safetensors")),
    }


def weights_agreement(weights: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Max abs difference, relative L2 distance and cosine similarity of two state dicts, over all
    floating-point tensors together, in float64 (a float32 sum of squares would round the very differences
    it measures). Integer tensors are counters, not weights: BatchNorm's ``num_batches_tracked`` counts
    forwards, which differ by design between K micro-steps and one big batch. BatchNorm's running mean and
    variance are floating-point and compared: they are part of the model eval uses."""
    if weights.keys() != reference.keys():
        raise ValueError(f"different parameters: {sorted(set(weights) ^ set(reference))[:3]}")
    diff_sq = ref_sq = own_sq = dot = max_abs = 0.0
    for key, ref in reference.items():
        if not ref.is_floating_point():
            continue
        a, b = weights[key].double(), ref.double()
        if a.shape != b.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        delta = a - b
        diff_sq += float((delta * delta).sum())
        ref_sq += float((b * b).sum())
        own_sq += float((a * a).sum())
        dot += float((a * b).sum())
        max_abs = max(max_abs, float(delta.abs().max())) if delta.numel() else max_abs
    return {
        "weights_max_abs_diff": max_abs,
        "weights_rel_l2": math.sqrt(diff_sq / ref_sq) if ref_sq else math.sqrt(diff_sq),
        "weights_cosine": dot / math.sqrt(own_sq * ref_sq) if own_sq and ref_sq else float("nan"),
    }


def without_running_stats(weights: dict[str, Any]) -> dict[str, Any]:
    """A state dict without BatchNorm's running mean and variance (buffers, not trained parameters)."""
    return {k: v for k, v in weights.items() if not k.endswith(("running_mean", "running_var"))}


def loss_agreement(losses: list[float], reference: list[float]) -> dict[str, Any]:
    """Per-step loss deviation from the reference (signed), and its largest absolute value; all None when the
    step counts differ (another global batch or number of epochs: step s is not the same data)."""
    if len(losses) != len(reference):
        return {"loss_max_abs_diff": None, "final_loss_diff": None, "loss_deviation": None}
    deviation = [a - b for a, b in zip(losses, reference, strict=True)]
    return {
        "loss_max_abs_diff": max((abs(d) for d in deviation), default=0.0),
        "final_loss_diff": deviation[-1] if deviation else 0.0,
        "loss_deviation": deviation,
    }


def cost_of(summary: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """Cost figures of one run, as its trainer measured them (summary.json)."""
    steps = max(summary["steps"], 1)
    totals = summary["totals"]
    median = summary["median_step_time_s"]
    ref_median = reference["median_step_time_s"] if reference else None
    return {
        "median_step_time_s": median,
        "step_time_ratio": median / ref_median if median and ref_median else None,
        "samples_per_s": summary["samples_per_s"],
        "tokens_per_s": summary.get("tokens_per_s"),
        "items_per_s": summary.get("items_per_s"),
        "sync_rounds_per_step": totals["sync_rounds"] / steps,
        "allreduce_calls_per_step": totals["allreduce_calls"] / steps,
        "allreduce_bytes_per_step": totals["allreduce_bytes"] / steps,
        "peak_mem_bytes_per_process": summary["peak_mem_bytes_per_rank"],
        "peak_mem_source": summary["peak_mem_source"],
        "train_time_s": summary["train_time_s"],
        "wall_time_s": summary["wall_time_s"],
    }


def tolerance_for(dtypes: set[str], tolerance: ToleranceConfig) -> float:
    """The loosest dtype involved decides: a float64 mode is judged as float32 against a float32 reference."""
    return tolerance.float32 if "float32" in dtypes else tolerance.float64


def verdict(expect: str, rel_l2: float, tol: float, is_reference: bool) -> tuple[str, bool]:
    """(words for the report, whether the comparison passes on this mode)."""
    if is_reference:
        return "reference", True
    if expect == SWEEP:  # another setting on purpose: its distance is shown, not judged
        return "swept", True
    within = rel_l2 <= tol
    if expect == EQUAL:
        return ("agrees" if within else "DISAGREES"), within
    # A baseline never fails the comparison: it is there to show its deviation.
    return ("differs, as expected" if not within else "expected to differ, but agrees"), True


def judge(
    cfg: CompareConfig, planned: list[PlannedMode], outcomes: dict[str, ModeOutcome], warnings: list[str]
) -> dict[str, Any]:
    """Every figure of the comparison, per mode, read from the runs' files (what compare.json holds)."""
    ref_name = cfg.reference_name
    runs: dict[str, dict[str, Any]] = {}
    read_errors: dict[str, str] = {}
    for pm in planned:
        if outcomes[pm.name].ok:
            try:
                runs[pm.name] = read_run(pm.run_dir)
            except (OSError, ValueError) as err:
                read_errors[pm.name] = f"could not read its results: {err}"
    ref_run = runs.get(ref_name)
    modes = []
    for pm in planned:
        outcome = outcomes[pm.name]
        run = runs.get(pm.name)
        summary = run["summary"] if run else {}
        entry: dict[str, Any] = {
            "name": pm.name,
            "description": pm.mode.description,
            "expect": pm.mode.expect,
            "baseline": pm.mode.baseline or pm.mode.expect == DIFFER,
            "is_reference": pm.name == ref_name,
            "num_processes": pm.mode.num_processes,
            "num_machines": pm.mode.num_machines,
            "overrides": pm.overrides,
            "plan": {
                "world_size": pm.plan.world_size,
                "micro_batch_size": pm.plan.micro_batch_size,
                "accum_steps": pm.plan.accum_steps,
                "global_batch_size": pm.plan.global_batch_size,
            },
            "dtype": pm.train.run.dtype,
            "precision": pm.train.precision,
            "sync": pm.train.batch.sync,
            "loss_normalization": pm.train.batch.loss_normalization,
            # What the run used (its summary.json); the planned resolution when it did not finish.
            "lr": pm.train.optim.lr,
            "lr_scaling": pm.train.optim.lr_scaling,
            "lr_resolved": summary["optim"]["lr_resolved"] if run else pm.optim.lr,
            "max_steps": summary.get("max_steps", pm.known_max_steps),
            "epochs": summary.get("epochs"),
            "eval": summary.get("eval"),
            "run_dir": str(pm.run_dir),
            "log": str(outcome.log),
            "machine_logs": [str(path) for path in outcome.logs],
            "returncode": outcome.returncode,
            "launch_wall_s": outcome.launch_wall_s,
            "status": "ok" if run else "failed",
            "batch_norm": run["summary"].get("batch_norm") if run else None,
            "losses": [m["loss"] for m in run["metrics"]] if run else [],
            # The loss curves' x axis: modes with different global batches line up by the data they have seen.
            "samples_seen": list(itertools.accumulate(m["samples"] for m in run["metrics"])) if run else [],
            "agreement": None,
            "cost": None,
        }
        if not run:
            entry["error"] = read_errors.get(pm.name) or outcome.reason()
            entry["log_tail"] = outcome.log_tail()
            # A sweep never fails the comparison: a setting that diverges is a result too (shown, with its log).
            entry["verdict"], entry["ok"] = "failed", pm.mode.expect == SWEEP
        else:
            entry["cost"] = cost_of(run["summary"], ref_run["summary"] if ref_run else None)
            if ref_run is None:
                entry["verdict"], entry["ok"] = "not judged: the reference failed", pm.mode.expect != EQUAL
            else:
                _judge_against(entry, pm, run, ref_run, cfg.tolerance)
        modes.append(entry)
    first = next(iter(runs.values()), None)
    return {
        "base": cfg.base,
        "output_dir": cfg.output_dir,
        "reference": ref_name,
        "tolerance": dataclasses.asdict(cfg.tolerance),
        "task": first["summary"]["task"] if first else None,
        "steps": first["summary"]["steps"] if first else None,
        "global_batch_size": planned[0].plan.global_batch_size,
        "warnings": warnings,
        "modes": modes,
        "failed": [m["name"] for m in modes if not m["ok"]],
        "ok": all(m["ok"] for m in modes),
        "versions": first["summary"]["versions"] if first else None,
        "config": dataclasses.asdict(cfg),
    }


def _judge_against(
    entry: dict[str, Any], pm: PlannedMode, run: dict[str, Any], ref_run: dict[str, Any], tolerance: ToleranceConfig
) -> None:
    """Fill ``entry``'s agreement with the reference run and its verdict."""
    tol = tolerance_for({pm.train.run.dtype, ref_run["summary"]["dtype"]}, tolerance)
    ref_losses = [m["loss"] for m in ref_run["metrics"]]
    try:
        weights = weights_agreement(run["weights"], ref_run["weights"])
    except ValueError as err:
        entry["error"] = f"cannot be compared with the reference: {err}"
        entry["verdict"], entry["ok"] = "not comparable", pm.mode.expect != EQUAL
        return
    entry["agreement"] = {**loss_agreement(entry["losses"], ref_losses), **weights, "tolerance_rel_l2": tol}
    if entry["batch_norm"]:
        # The running statistics move with every forward's statistics; what training did to the parameters
        # alone is the other half of the story.
        entry["agreement"]["parameters_rel_l2"] = weights_agreement(
            without_running_stats(run["weights"]), without_running_stats(ref_run["weights"])
        )["weights_rel_l2"]
    if pm.mode.expect == EQUAL and len(entry["losses"]) != len(ref_losses):
        # Another number of optimizer steps is another training, whatever its weights say.
        entry["error"] = (
            f"cannot be compared with the reference: {len(entry['losses'])} optimizer steps vs {len(ref_losses)}"
        )
        entry["verdict"], entry["ok"] = "not comparable", False
        return
    entry["verdict"], entry["ok"] = verdict(pm.mode.expect, weights["weights_rel_l2"], tol, entry["is_reference"])


def failure_lines(result: dict[str, Any]) -> list[str]:
    """One line per mode that makes the comparison fail, naming it and the number that decided."""
    lines = []
    for m in result["modes"]:
        if m["ok"]:
            continue
        if m["verdict"] == "DISAGREES":
            a = m["agreement"]
            lines.append(
                f"mode {m['name']!r} is expected to equal {result['reference']!r} but its final weights are "
                f"{a['weights_rel_l2']:.3e} away (relative L2; tolerance {a['tolerance_rel_l2']:.0e})"
            )
        else:
            lines.append(f"mode {m['name']!r} {m['verdict']}: {m.get('error', '')}".rstrip(": "))
    return lines


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="accum-compare",
        description="Run accumulation, DDP and both side by side; judge agreement and show cost.",
    )
    parser.add_argument("--config", required=True, help="compare config (YAML), e.g. configs/compare/default.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. modes.ddp_2x1.num_processes=4"
    )
    return parser.parse_args(argv)


def _check_output_dir(cfg: CompareConfig) -> Path:
    out = Path(cfg.output_dir)
    found = [name for name in OUTPUT_FILES if (out / name).exists()]
    if found and not cfg.overwrite:
        raise ConfigError(
            f"output_dir={cfg.output_dir!r} already holds a comparison ({', '.join(found)}); "
            "choose another folder or set overwrite=true"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir={cfg.output_dir!r} is not writable: {err.strerror}") from None
    for name in OUTPUT_FILES:  # never leave an older report beside a newer comparison
        (out / name).unlink(missing_ok=True)
    return out


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Rendering pulls in rich, matplotlib and torch: imported after the config is known to be good.
    try:
        cfg = load_compare_config(args.config, args.overrides)
        planned = plan_modes(cfg)
        out = _check_output_dir(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2

    from launcher import report
    from launcher.metrics import write_json_atomic
    from launcher.terminal import ModesProgress

    console = report.make_console()
    reference = next(pm for pm in planned if pm.name == cfg.reference_name)
    warnings = preflight(planned, reference)
    report.print_plan(console, cfg, planned, warnings)

    # Every mode gets the same threads per process: a process stands for one device, and one device
    # must not get more cores when it runs alone (the single-process mode would look faster than it is).
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = cfg.threads_per_process or (
        int(env_threads) if env_threads.isdigit() else threads_per_device(max(pm.plan.world_size for pm in planned))
    )
    outcomes: dict[str, ModeOutcome] = {}
    progress = ModesProgress([(pm.name, pm.known_max_steps) for pm in planned], console)
    # A scheduler's SIGTERM takes the same way out as Ctrl-C: every running launch is stopped (run_mode).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for pm in planned:
            outcome = run_mode(pm, cfg, threads, progress)
            outcomes[pm.name] = outcome
            detail = f"{outcome.launch_wall_s:.1f} s" if outcome.ok else outcome.reason()
            progress.finish(pm.name, outcome.ok, detail, [] if outcome.ok else outcome.log_tail())
    except KeyboardInterrupt:
        print("error: compare interrupted; its running launches were stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        progress.close()
        shutil.rmtree(out / "tmp", ignore_errors=True)

    result = judge(cfg, planned, outcomes, warnings)
    result["threads_per_process"] = threads
    write_json_atomic(out / "compare.json", result)
    report.write_all(result, out)
    report.print_result(console, result)
    for line in failure_lines(result):
        print(f"error: {line}", file=sys.stderr, flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
