"""The run folder: the contract between the trainer and everything that reads a run (compare, bench, tests).

    <output_dir>/config.yaml         the resolved config (written first)
    <output_dir>/metrics.jsonl       one StepRecord per optimizer step, flushed line by line
    <output_dir>/summary.json        the RunSummary, written once the run has finished
    <output_dir>/model.safetensors   the final weights
    <output_dir>/restarts.jsonl      one RestartRecord per restart of a self-healing run (--max_restarts)
    <output_dir>/checkpoints/step-NNNNNNNN/   complete checkpoints (format: launcher.checkpoint)
    <output_dir>/logs/               the trackers' files (run.log_with)

This module owns the paths, the write rules (a folder holding a run is not written over unless asked or
resumed; a fresh start clears the old run's files), the metrics writer that continues after a checkpoint's
step, and reading a run back as typed records. Only the main process writes here.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.config import ConfigError
from launcher.files import atomic_output, write_json_atomic, write_text_atomic
from launcher.records import from_json, to_json

CONFIG, METRICS, SUMMARY, WEIGHTS = "config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"
INITIAL_WEIGHTS = "model_init.safetensors"  # run.save_initial_weights
RESTARTS = "restarts.jsonl"
TRACKER_RUN_ID = "logs/run-id"  # the trackers' run, kept across resumes and restarts
RESULT_FILES = (METRICS, SUMMARY, WEIGHTS)  # what a started or finished run leaves
CHECKPOINTS, CHECKPOINT_PREFIX, PARTIAL_PREFIX = "checkpoints", "step-", ".tmp-"
CHECKPOINT_META = "meta.json"  # written last: a checkpoint folder with it is complete


@dataclass
class StepRecord:
    """One line of metrics.jsonl: one optimizer step, global values (the same on every rank)."""

    step: int  # 1-based: optimizer steps done after this one
    loss: float  # the window's summed loss / its global item count
    lr: float
    grad_norm: float  # before clipping
    items: int  # items that carried loss: next-token targets (LM) or samples (classifier)
    samples: int
    step_time_s: float
    sync_rounds: int  # micro-steps whose backward reduced gradients
    allreduce_calls: int  # gradient all-reduces (DDP's buckets; the launcher's scalar all-reduces not included)
    allreduce_bytes: int
    peak_mem_bytes: int
    skipped: bool  # non-finite loss or gradients on some rank: no optimizer step
    nonfinite_ranks: int
    # Every collective of the step by kind (all_reduce, reduce_scatter, all_gather, scalar): {calls, bytes}.
    collectives: dict[str, dict[str, int]] = field(default_factory=dict)
    activation_bytes: int = 0  # saved for backward by the step's first micro-step
    held_grad_bytes: int = 0  # gradients this rank holds after that micro-step
    eval: dict[str, Any] | None = None  # on a step where evaluation ran
    # Seconds per phase on the main process (launcher.timing: data_s, forward_s, ...); None with it off.
    time_breakdown: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        record = to_json(self)
        if record["eval"] is None:
            del record["eval"]
        return record


@dataclass
class RestartRecord:
    """One restart of a run under torchrun's elastic agent: where the attempt before it got, and where this
    one resumed (the steps in between are trained again, identically)."""

    attempt: int  # 1 for the first restart
    previous_reached_step: int  # the last step the attempt before logged
    resumed_from_step: int  # the checkpoint this attempt continues from (0: from the start)

    @property
    def retrained_steps(self) -> int:
        return max(self.previous_reached_step - self.resumed_from_step, 0)


@dataclass
class Totals:
    samples: int
    items: int
    sync_rounds: int
    allreduce_calls: int
    allreduce_bytes: int


@dataclass
class MemoryInfo:
    """One rank's memory, from the tensors it holds (meaningful on CPU too, where the process's peak resident
    set is mostly the runtime): model state from its local shards, and what a window held."""

    params_bytes: int
    optimizer_bytes: int
    held_grad_bytes: int  # the most gradients held between micro-steps
    activation_bytes: int  # the most activations one micro-step saved for its backward
    peak_bytes: int  # the allocator's peak on CUDA, the peak resident set on CPU

    @property
    def model_state_bytes(self) -> int:
        return self.params_bytes + self.optimizer_bytes + self.held_grad_bytes


@dataclass
class BatchNormInfo:
    layers: int
    sync: bool  # converted to SyncBatchNorm (needs more than one process)
    samples_per_statistic: int


@dataclass
class DataInfo:
    train_samples: int
    eval_samples: int
    tokenized_cache: str  # hit | miss | off
    label_names: list[str] | None = None  # when string labels were mapped to ids
    source_rows: int = 0  # rows (or blocks) of the training source
    rows_used: int = 0  # of them, trained on: after eval.fraction's carve and data.max_rows
    truncated_rows: int = 0  # source rows cut at data.seq_len by the tokenizer
    tokens: int = 0  # in the training source
    tokenize_s: float = 0.0  # spent tokenizing the training source in this session (0 on a cache hit)
    layout: str = "rows"  # rows (padded per micro-batch) or blocks (data.seq_len + 1 tokens of a stream)


@dataclass
class OptimInfo:
    """The lr, betas and eps asked for and used."""

    lr: float
    lr_scaling: str
    base_global_batch_size: int | None
    lr_resolved: float
    beta1: float
    beta2: float
    eps: float
    lr_multiplier: float = 1.0


@dataclass
class RunSummary:
    """summary.json: what a finished run was and what it measured."""

    world_size: int
    accum_steps: int
    micro_batch_size: int
    global_batch_size: int
    task: str
    backend: str
    device: str
    distributed_type: str
    dtype: str
    precision: str
    sync: str
    loss_normalization: str
    batch_norm: BatchNormInfo | None
    optim: OptimInfo
    max_steps: int
    epochs: float  # passes over the training set actually trained
    steps: int
    skipped_steps: list[int]
    first_loss: float | None
    final_loss: float | None
    median_step_time_s: float | None
    train_time_s: float
    samples_per_s: float | None
    tokens_per_s: float | None  # language models only: a classifier's items are its samples
    totals: Totals
    strategy: str
    collectives_per_step: dict[str, dict[str, float]]  # by kind: mean calls and bytes per optimizer step
    memory_per_rank: list[MemoryInfo]
    peak_mem_bytes_per_rank: list[int]
    peak_mem_source: str
    wall_time_s: float
    resumed_from_step: int
    data: DataInfo
    eval: dict[str, Any] | None
    output_dir: str
    versions: dict[str, str] = field(default_factory=dict)
    restarts: list[RestartRecord] = field(default_factory=list)  # every restart, in order
    retrained_steps: int = 0  # trained again after the restarts, in all
    median_time_breakdown: dict[str, float] | None = None  # each phase's median (launcher.timing), main process


def check_folder(path: Path, key: str, found: list[str], overwrite: bool, what: str, overwrite_key: str) -> None:
    """The write rule of every output folder: refuse one that holds ``found`` results unless ``overwrite``, and
    fail early (one line) on a folder that cannot be written."""
    if found and not overwrite:
        raise ConfigError(
            f"{key}={str(path)!r} already holds {what} ({', '.join(found)}); "
            f"choose another folder or set {overwrite_key}=true"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={str(path)!r} is not writable: {err.strerror}") from None


def claim_output_folder(path: Path, outputs: tuple[str, ...], overwrite: bool, what: str) -> Path:
    """A tool's ``output_dir`` (compare, the planner): refused when it holds ``outputs`` (unless overwrite=true),
    then emptied of them, so that no older file is left beside newer results."""
    found = [name for name in outputs if (path / name).exists()]
    check_folder(path, "output_dir", found, overwrite, what, "overwrite")
    for name in outputs:
        (path / name).unlink(missing_ok=True)
    return path


class MetricsWriter:
    """metrics.jsonl, one StepRecord per line, flushed per line so a reader (or a crash) sees whole lines only."""

    def __init__(self, path: Path, append: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a" if append else "w")

    def write(self, record: StepRecord) -> None:
        self._file.write(json.dumps(record.to_json()) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    # ---------------------------------------------------------------------------------------- write rules

    def check(self, overwrite: bool, resuming: bool) -> None:
        """Before anything is written: refuse a folder that holds a run unless ``overwrite`` or ``resuming`` it."""
        found = [name for name in RESULT_FILES if (self.path / name).exists()]
        check_folder(self.path, "run.output_dir", found, overwrite or resuming, "a run", "run.overwrite")

    def start(
        self, config_text: str, start_step: int, keep_checkpoints: bool, restart: RestartRecord | None = None
    ) -> tuple[MetricsWriter, list]:
        """Main process, before the first step: config.yaml, metrics.jsonl fresh or continued after
        ``start_step``, and the record of this attempt's ``restart``. Returns the writer and the records kept
        from earlier sessions."""
        write_text_atomic(self.path / CONFIG, config_text)
        self.remove_partial_checkpoints()
        if restart is not None:
            self.record_restart(restart)
        if start_step == 0:
            # Reached only with run.overwrite=true or on a restart before the first checkpoint: never mix two
            # runs' files (a restart keeps its history).
            for stale in (*RESULT_FILES, INITIAL_WEIGHTS, *([RESTARTS] if restart is None else [])):
                (self.path / stale).unlink(missing_ok=True)
            if not keep_checkpoints:
                shutil.rmtree(self.checkpoints_dir, ignore_errors=True)  # a later resume=auto must not find them
            return MetricsWriter(self.path / METRICS, append=False), []
        # Steps after the checkpoint are trained again: drop their lines so no step is missing or repeated.
        kept = self.truncate_metrics(start_step)
        for stale in (SUMMARY, WEIGHTS):
            (self.path / stale).unlink(missing_ok=True)
        return MetricsWriter(self.path / METRICS, append=True), kept

    def record_restart(self, restart: RestartRecord) -> None:
        """Main process: append one restart to restarts.jsonl (line by line, like the metrics)."""
        with (self.path / RESTARTS).open("a") as f:
            f.write(json.dumps(to_json(restart)) + "\n")

    def restarts(self) -> list[RestartRecord]:
        try:
            lines = (self.path / RESTARTS).read_text().splitlines()
        except OSError:
            return []
        return [from_json(RestartRecord, json.loads(line)) for line in lines if line.strip()]

    def truncate_metrics(self, last_step: int) -> list[StepRecord]:
        """Keep the records of steps 1..``last_step`` and drop a torn last line; rewrites metrics.jsonl
        atomically and returns the kept records."""
        kept = [r for r in self.read_metrics(complete_only=False) if r.step <= last_step]
        write_text_atomic(self.path / METRICS, "".join(json.dumps(r.to_json()) + "\n" for r in kept))
        return kept

    def write_summary(self, summary: RunSummary) -> None:
        write_json_atomic(self.path / SUMMARY, to_json(summary))

    def write_weights(self, weights: Any, name: str = WEIGHTS) -> None:
        """Weights as safetensors (the final ones unless ``name`` says otherwise): a module, whose tied tensors
        (GPT-2's embedding/head) are stored once, or a state dict already without duplicates."""
        from safetensors.torch import save_file, save_model  # torch: compare reads run folders before it needs it

        write = save_file if isinstance(weights, dict) else save_model
        atomic_output(self.path / name, lambda tmp: write(weights, tmp))

    def tracker_run_id(self, continued: bool) -> str:
        """Main process: the trackers' run id, new for a fresh run, the earlier one for a continued run."""
        path = self.path / TRACKER_RUN_ID
        if continued and path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        run_id = secrets.token_hex(8)
        write_text_atomic(path, run_id + "\n")
        return run_id

    # ------------------------------------------------------------------------------------------ checkpoints

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:08d}"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first (``.tmp-`` folders are never complete)."""
        found = []
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.iterdir():
                suffix = path.name[len(CHECKPOINT_PREFIX) :]
                if path.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and (path / CHECKPOINT_META).is_file():
                    found.append((int(suffix), path))
        return sorted(found)

    def remove_partial_checkpoints(self) -> None:
        """Delete ``.tmp-`` folders left by a save that was killed before its rename."""
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.glob(f"{PARTIAL_PREFIX}*"):
                shutil.rmtree(path, ignore_errors=True)

    def prune_checkpoints(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints."""
        for _, path in self.checkpoints()[:-keep]:
            shutil.rmtree(path, ignore_errors=True)

    # --------------------------------------------------------------------------------------------- reading

    def read_metrics(self, complete_only: bool = True) -> list[StepRecord]:
        """The records of metrics.jsonl. A running trainer may be half-way through a line: with
        ``complete_only`` only newline-terminated lines count; otherwise reading stops at the first line that
        does not parse (a line cut by a kill: nothing after it was written whole)."""
        try:
            text = (self.path / METRICS).read_text()
        except OSError:
            return []
        records = []
        for line in text.splitlines(keepends=True):
            if complete_only and not line.endswith("\n"):
                break
            try:
                records.append(from_json(StepRecord, json.loads(line)))
            except (ValueError, TypeError):
                break
        return records

    def read_summary(self) -> RunSummary:
        return from_json(RunSummary, json.loads((self.path / SUMMARY).read_text()))

    def read_weights(self, name: str = WEIGHTS) -> dict[str, Any]:
        from safetensors.torch import load_file  # torch: compare reads run folders before it needs torch

        return load_file(str(self.path / name))

    def resolved_max_steps(self) -> int | None:
        """run.max_steps as the trainer resolved it, from the config.yaml it writes before its first step."""
        try:
            return int(yaml.safe_load((self.path / CONFIG).read_text())["run"]["max_steps"])
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            return None  # not written yet


@dataclass
class FinishedRun:
    """What a finished run wrote, read back."""

    summary: RunSummary
    metrics: list[StepRecord]
    weights: dict[str, Any]

    @property
    def losses(self) -> list[float]:
        return [m.loss for m in self.metrics]


def read_run(path: str | Path) -> FinishedRun:
    run = RunDir(path)
    return FinishedRun(run.read_summary(), run.read_metrics(), run.read_weights())
