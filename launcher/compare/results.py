"""What a comparison found, as typed records: compare.json is ``to_json(Comparison)``, and the report renders a
``Comparison`` (read back with ``read_comparison``) and nothing else."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.records import from_json

# Verdicts, as the report shows them.
REFERENCE = "reference"
SWEPT = "swept"
AGREES = "agrees"
DISAGREES = "DISAGREES"
DIFFERS = "differs, as expected"
AGREES_UNEXPECTEDLY = "expected to differ, but agrees"
FAILED = "failed"
NOT_COMPARABLE = "not comparable"
NOT_JUDGED = "not judged: the reference failed"
CONTROL_VERDICT = "control (the floor)"
AGREES_DESPITE = "agrees within noise, despite the change"
SKIPPED = "skipped"  # a link mode where network namespaces cannot be made: the reason follows

# How an equal mode was judged.
BY_FLOAT64 = "float64"  # exact arithmetic's rule: relative L2 <= tolerance.float64
BY_FLOOR = "floor"  # within floor.multiple of the control's distance and loss gap
BY_TOLERANCE = "tolerance"  # no floor measured: relative L2 <= tolerance.float32


@dataclass
class PlanInfo:
    world_size: int
    micro_batch_size: int
    accum_steps: int
    global_batch_size: int


@dataclass
class Agreement:
    """A mode's run against the reference's: per-step loss and final weights."""

    loss_max_abs_diff: float | None  # None when the step counts differ: step s is not the same data
    final_loss_diff: float | None
    loss_deviation: list[float] | None  # signed, per step
    weights_max_abs_diff: float
    weights_rel_l2: float  # ||w - w_ref|| / ||w_ref||
    weights_cosine: float
    tolerance_rel_l2: float
    parameters_rel_l2: float | None = None  # without BatchNorm's running statistics, for models that have them
    # ||w - w_ref|| / ||w_ref - w_init||: the distance as a share of what training changed (None without the
    # reference's initial weights).
    update_rel_l2: float | None = None
    floor_ratio: float | None = None  # update_rel_l2 / the control's
    loss_floor_ratio: float | None = None  # loss_max_abs_diff / the control's
    judged_by: str = ""  # BY_FLOAT64, BY_FLOOR or BY_TOLERANCE


@dataclass
class Floor:
    """The rounding floor of this comparison, measured by its control."""

    control: str  # the control mode's name
    how: str
    update_rel_l2: float | None  # the control's distance from the reference, relative to the update
    weights_rel_l2: float
    loss_max_abs_diff: float | None
    multiple: float
    # The smallest difference this comparison can tell from rounding, as a share of what training changed.
    detectable_update_share: float | None
    loss_band: list[float] | None = None  # per step: multiple x the control's largest loss gap so far


@dataclass
class Cost:
    """A mode's cost as its trainer measured it (summary.json)."""

    median_step_time_s: float | None
    step_time_ratio: float | None  # to the reference's median
    samples_per_s: float | None
    tokens_per_s: float | None  # language models only
    sync_rounds_per_step: float
    allreduce_calls_per_step: float
    allreduce_bytes_per_step: float
    peak_mem_bytes_per_process: list[int]
    peak_mem_source: str
    train_time_s: float
    wall_time_s: float
    # By kind (all_reduce, reduce_scatter, all_gather, scalar): mean calls and bytes per optimizer step.
    collectives_per_step: dict[str, dict[str, float]] = field(default_factory=dict)
    # The largest over the ranks, from the tensors: what a split costs in memory, meaningful on CPU too.
    params_bytes: int = 0
    optimizer_bytes: int = 0
    held_grad_bytes: int = 0
    activation_bytes: int = 0
    # Each phase's median over the steps, in seconds, on the main process (launcher.timing); None: not measured.
    time_breakdown: dict[str, float] | None = None


@dataclass
class ModeResult:
    name: str
    description: str
    expect: str
    baseline: bool
    is_reference: bool
    is_control: bool
    changed: list[str]  # beyond the split, vs the reference
    num_processes: int
    num_machines: int
    launch: str  # 2p x mb1 x K=8
    overrides: dict[str, Any]
    plan: PlanInfo
    dtype: str
    precision: str
    sync: str
    loss_normalization: str
    strategy: str
    lr: float
    lr_scaling: str
    lr_resolved: float  # what the run used (its summary.json); the planned value when it did not finish
    max_steps: int | None
    epochs: float | None
    eval: dict[str, Any] | None
    run_dir: str
    log: str
    machine_logs: list[str]
    returncode: int | None
    launch_wall_s: float
    status: str  # ok | failed
    batch_norm: dict[str, Any] | None
    losses: list[float]
    samples_seen: list[int]  # the loss curves' x axis: modes with other global batches line up by data seen
    verdict: str = ""
    ok: bool = False
    agreement: Agreement | None = None
    cost: Cost | None = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)
    eval_configured: bool = False  # its training config names an eval set

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class Comparison:
    base: str
    output_dir: str
    reference: str
    tolerance: dict[str, float]
    task: str | None
    steps: int | None
    global_batch_size: int
    warnings: list[str]
    modes: list[ModeResult]
    failed: list[str]  # modes that fail the comparison
    ok: bool
    versions: dict[str, str] | None
    config: dict[str, Any]
    threads_per_process: int = 0
    floor: Floor | None = None  # None: no control ran (floor.control=false, every run float64) or it failed
    model: str = ""  # the reference's model.name and data.name: what was trained
    data: str = ""

    def mode(self, name: str) -> ModeResult:
        return next(m for m in self.modes if m.name == name)

    @property
    def reference_mode(self) -> ModeResult | None:
        return next((m for m in self.modes if m.is_reference), None)


def read_comparison(path: str | Path) -> Comparison:
    """A compare.json read back."""
    return from_json(Comparison, json.loads(Path(path).read_text()))
