"""Judging: every mode's run read back from its files and held against the reference's.

Agreement and cost are read from each run's own files (model.safetensors, metrics.jsonl, summary.json),
never recomputed from a model of what should happen.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

from launcher.compare.config import DIFFER, EQUAL, SWEEP, CompareConfig, ToleranceConfig
from launcher.compare.modes import PlannedMode
from launcher.compare.results import (
    AGREES,
    AGREES_DESPITE,
    AGREES_UNEXPECTEDLY,
    BY_FLOAT64,
    BY_FLOOR,
    BY_TOLERANCE,
    CONTROL_VERDICT,
    DIFFERS,
    DISAGREES,
    FAILED,
    NOT_COMPARABLE,
    NOT_JUDGED,
    REFERENCE,
    SKIPPED,
    SWEPT,
    Agreement,
    Comparison,
    Cost,
    Floor,
    ModeResult,
    PlanInfo,
)
from launcher.launch import LaunchOutcome
from launcher.records import to_json
from launcher.rundir import INITIAL_WEIGHTS, FinishedRun, RunDir, RunSummary, read_run


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


def rel_l2(weights: dict[str, Any], reference: dict[str, Any]) -> float:
    """Relative L2 distance of two state dicts' floating-point tensors."""
    return weights_agreement(weights, reference)["weights_rel_l2"]


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


def cost_of(summary: RunSummary, reference: RunSummary | None) -> Cost:
    """Cost figures of one run, as its trainer measured them."""
    steps = max(summary.steps, 1)
    totals = summary.totals
    median = summary.median_step_time_s
    ref_median = reference.median_step_time_s if reference else None
    return Cost(
        median_step_time_s=median,
        step_time_ratio=median / ref_median if median and ref_median else None,
        samples_per_s=summary.samples_per_s,
        tokens_per_s=summary.tokens_per_s,
        sync_rounds_per_step=totals.sync_rounds / steps,
        allreduce_calls_per_step=totals.allreduce_calls / steps,
        allreduce_bytes_per_step=totals.allreduce_bytes / steps,
        peak_mem_bytes_per_process=summary.peak_mem_bytes_per_rank,
        peak_mem_source=summary.peak_mem_source,
        train_time_s=summary.train_time_s,
        wall_time_s=summary.wall_time_s,
        collectives_per_step=summary.collectives_per_step,
        params_bytes=max(m.params_bytes for m in summary.memory_per_rank),
        optimizer_bytes=max(m.optimizer_bytes for m in summary.memory_per_rank),
        held_grad_bytes=max(m.held_grad_bytes for m in summary.memory_per_rank),
        activation_bytes=max(m.activation_bytes for m in summary.memory_per_rank),
        time_breakdown=summary.median_time_breakdown,
    )


def tolerance_for(dtypes: set[str], tolerance: ToleranceConfig) -> float:
    """The loosest dtype involved decides: a float64 mode is judged as float32 against a float32 reference."""
    return tolerance.float32 if "float32" in dtypes else tolerance.float64


def l2_distance(weights: dict[str, Any], reference: dict[str, Any]) -> float:
    """||w - w_ref|| over the floating-point tensors, in float64."""
    total = 0.0
    for key, ref in reference.items():
        if ref.is_floating_point():
            delta = weights[key].double() - ref.double()
            total += float((delta * delta).sum())
    return math.sqrt(total)


def within(agreement: Agreement, floor: Floor | None, dtypes: set[str], tolerance: ToleranceConfig) -> bool:
    """Whether a mode's run is the reference's training, up to rounding; sets ``agreement.judged_by``.

    float64: exact is exact, relative L2 <= tolerance.float64. Otherwise, with a measured floor: the distance
    relative to the update and the largest loss gap within floor.multiple of the control's. Without one: the
    fixed float32 tolerance.
    """
    if dtypes == {"float64"}:
        agreement.judged_by = BY_FLOAT64
        return agreement.weights_rel_l2 <= tolerance.float64
    if floor is not None and floor.update_rel_l2 and agreement.floor_ratio is not None:
        agreement.judged_by = BY_FLOOR
        loss_ok = agreement.loss_floor_ratio is None or agreement.loss_floor_ratio <= floor.multiple
        return agreement.floor_ratio <= floor.multiple and loss_ok
    agreement.judged_by = BY_TOLERANCE
    return agreement.weights_rel_l2 <= tolerance.float32


def verdict(pm: PlannedMode, agrees: bool) -> tuple[str, bool]:
    """(words for the report, whether the comparison passes on this mode)."""
    if pm.is_reference:
        return REFERENCE, True
    if pm.is_control:
        return CONTROL_VERDICT, True
    if pm.mode.expect == SWEEP:  # another setting on purpose: its distance is shown, not judged
        return SWEPT, True
    if pm.mode.expect == EQUAL:
        # A mode that changes more than the split never agrees silently: the change is named.
        return (AGREES_DESPITE if pm.changed else AGREES) if agrees else DISAGREES, agrees
    # A baseline never fails the comparison: it is there to show its deviation.
    return (DIFFERS if not agrees else AGREES_UNEXPECTEDLY), True


def _mode_result(pm: PlannedMode, outcome: LaunchOutcome, run: FinishedRun | None) -> ModeResult:
    """A mode's result before it is judged: what it was, and what its run recorded."""
    summary = run.summary if run else None
    return ModeResult(
        name=pm.name,
        description=pm.mode.description,
        expect=pm.mode.expect,
        baseline=pm.mode.baseline or pm.mode.expect == DIFFER,
        is_reference=pm.is_reference,
        is_control=pm.is_control,
        changed=list(pm.changed),
        num_processes=pm.mode.num_processes,
        num_machines=pm.mode.num_machines,
        launch=pm.label,
        overrides=pm.overrides,
        plan=PlanInfo(**dataclasses.asdict(pm.plan.batch), global_batch_size=pm.plan.batch.global_batch_size),
        dtype=pm.train.run.dtype,
        precision=pm.train.precision,
        sync=pm.train.batch.sync,
        loss_normalization=pm.train.batch.loss_normalization,
        strategy=pm.train.parallel.strategy,
        lr=pm.train.optim.lr,
        lr_scaling=pm.train.optim.lr_scaling,
        lr_resolved=summary.optim.lr_resolved if summary else pm.plan.optim.lr,
        max_steps=summary.max_steps if summary else pm.plan.max_steps,
        epochs=summary.epochs if summary else None,
        eval=summary.eval if summary else None,
        run_dir=str(pm.run_dir),
        log=str(outcome.log),
        machine_logs=[str(path) for path in outcome.logs],
        returncode=outcome.returncode,
        launch_wall_s=outcome.wall_s,
        status="ok" if run else "failed",
        batch_norm=to_json(summary.batch_norm) if summary and summary.batch_norm else None,
        losses=run.losses if run else [],
        samples_seen=list(itertools.accumulate(m.samples for m in run.metrics)) if run else [],
        eval_configured=bool(pm.train.eval.fraction or pm.train.eval.file or pm.train.eval.split),
    )


@dataclass
class _Reference:
    """The reference run, with what judging needs of it: its initial weights' distance from its final ones."""

    run: FinishedRun
    update_norm: float | None  # ||w_ref - w_init||; None without the initial weights


def _agreement(run: FinishedRun, ref: _Reference, tolerance: float) -> Agreement:
    """Raises ValueError when the two models' tensors differ."""
    weights = weights_agreement(run.weights, ref.run.weights)
    agreement = Agreement(**loss_agreement(run.losses, ref.run.losses), **weights, tolerance_rel_l2=tolerance)
    if ref.update_norm:
        agreement.update_rel_l2 = l2_distance(run.weights, ref.run.weights) / ref.update_norm
    return agreement


def measure_floor(control: FinishedRun, ref: _Reference, multiple: float, name: str) -> Floor:
    """The control's distance from the reference: what rounding alone does to this model, precision, data and
    number of steps."""
    agreement = _agreement(control, ref, 0.0)
    band = None
    if agreement.loss_deviation:
        band = [multiple * m for m in itertools.accumulate((abs(d) for d in agreement.loss_deviation), max)]
    update = agreement.update_rel_l2
    return Floor(
        control=name,
        how="the reference with the samples of every optimizer step in reverse order (batch.window_order=reversed): "
        "the same training in exact arithmetic, summed in another order",
        update_rel_l2=update,
        weights_rel_l2=agreement.weights_rel_l2,
        loss_max_abs_diff=agreement.loss_max_abs_diff,
        multiple=multiple,
        detectable_update_share=multiple * update if update is not None else None,
        loss_band=band,
    )


def judge(
    cfg: CompareConfig, planned: list[PlannedMode], outcomes: dict[str, LaunchOutcome], warnings: list[str]
) -> Comparison:
    """Every figure of the comparison, per mode, read from the runs' files (what compare.json holds)."""
    runs: dict[str, FinishedRun] = {}
    read_errors: dict[str, str] = {}
    for pm in planned:
        if outcomes[pm.name].ok:
            try:
                runs[pm.name] = read_run(pm.run_dir)
            except (OSError, ValueError, TypeError, KeyError) as err:
                read_errors[pm.name] = f"could not read its results: {err}"
    reference = next(pm for pm in planned if pm.is_reference)
    ref = None
    if reference.name in runs:
        init = reference.run_dir / INITIAL_WEIGHTS
        ref_run = runs[reference.name]
        ref = _Reference(
            ref_run,
            l2_distance(ref_run.weights, RunDir(reference.run_dir).read_weights(INITIAL_WEIGHTS))
            if init.is_file()
            else None,
        )
    control = next((pm for pm in planned if pm.is_control), None)
    floor = None
    if ref is not None and control is not None and control.name in runs:
        floor = measure_floor(runs[control.name], ref, cfg.floor.multiple, control.name)
    modes = []
    for pm in planned:
        outcome = outcomes[pm.name]
        run = runs.get(pm.name)
        entry = _mode_result(pm, outcome, run)
        if run is None:
            entry.error = read_errors.get(pm.name) or outcome.reason()
            entry.log_tail = outcome.log_tail()
            # A sweep never fails the comparison: a setting that diverges is a result too (shown, with its log). A
            # failed control only leaves the floor unmeasured: the fixed tolerances apply, and the report says so.
            entry.verdict, entry.ok = FAILED, pm.mode.expect == SWEEP or pm.is_control
            if outcome.note.startswith(SKIPPED) and not pm.is_reference:  # this host cannot make the link
                entry.verdict, entry.ok = outcome.note, True
        else:
            entry.cost = cost_of(run.summary, ref.run.summary if ref else None)
            if ref is None:
                entry.verdict, entry.ok = NOT_JUDGED, pm.mode.expect != EQUAL
            else:
                _judge_against(entry, pm, run, ref, floor, cfg.tolerance)
        modes.append(entry)
    first = next(iter(runs.values()), None)
    return Comparison(
        base=cfg.base,
        output_dir=cfg.output_dir,
        reference=reference.name,
        tolerance=to_json(cfg.tolerance),
        task=first.summary.task if first else None,
        steps=first.summary.steps if first else None,
        global_batch_size=reference.plan.batch.global_batch_size,
        warnings=warnings,
        modes=modes,
        failed=[m.name for m in modes if not m.ok],
        ok=all(m.ok for m in modes),
        versions=first.summary.versions if first else None,
        config=to_json(cfg),
        floor=floor,
        model=reference.train.model.name,
        data=reference.train.data.name,
    )


def _judge_against(
    entry: ModeResult,
    pm: PlannedMode,
    run: FinishedRun,
    ref: _Reference,
    floor: Floor | None,
    tolerance: ToleranceConfig,
) -> None:
    """Fill ``entry``'s agreement with the reference run and its verdict."""
    dtypes = {pm.train.run.dtype, ref.run.summary.dtype}
    try:
        agreement = _agreement(run, ref, tolerance_for(dtypes, tolerance))
    except ValueError as err:
        entry.error = f"cannot be compared with the reference: {err}"
        entry.verdict, entry.ok = NOT_COMPARABLE, pm.mode.expect != EQUAL
        return
    entry.agreement = agreement
    if entry.batch_norm:
        # The running statistics move with every forward's statistics; what training did to the parameters
        # alone is the other half of the story.
        agreement.parameters_rel_l2 = rel_l2(without_running_stats(run.weights), without_running_stats(ref.run.weights))
    if floor is not None and floor.update_rel_l2 and agreement.update_rel_l2 is not None:
        agreement.floor_ratio = agreement.update_rel_l2 / floor.update_rel_l2
    if floor is not None and floor.loss_max_abs_diff and agreement.loss_max_abs_diff is not None:
        agreement.loss_floor_ratio = agreement.loss_max_abs_diff / floor.loss_max_abs_diff
    if pm.mode.expect == EQUAL and len(entry.losses) != len(ref.run.losses):
        # Another number of optimizer steps is another training, whatever its weights say.
        entry.error = (
            f"cannot be compared with the reference: {len(entry.losses)} optimizer steps vs {len(ref.run.losses)}"
        )
        entry.verdict, entry.ok = NOT_COMPARABLE, False
        return
    entry.verdict, entry.ok = verdict(pm, within(agreement, floor, dtypes, tolerance))


def failure_lines(result: Comparison) -> list[str]:
    """One line per mode that makes the comparison fail, naming it and the numbers that decided."""
    lines = []
    for m in result.modes:
        if m.ok:
            continue
        a = m.agreement
        if m.verdict == DISAGREES and a.judged_by == BY_FLOOR:
            loss = "" if a.loss_floor_ratio is None else f", its largest loss gap {a.loss_floor_ratio:.3g}x"
            lines.append(
                f"mode {m.name!r} is expected to equal {result.reference!r} but its final weights are "
                f"{a.update_rel_l2:.3e} of the update away, {a.floor_ratio:.3g}x the floor{loss} "
                f"(floor.multiple={result.floor.multiple:g}, floor measured by {result.floor.control!r})"
            )
        elif m.verdict == DISAGREES:
            lines.append(
                f"mode {m.name!r} is expected to equal {result.reference!r} but its final weights are "
                f"{a.weights_rel_l2:.3e} away (relative L2; tolerance {a.tolerance_rel_l2:.0e})"
            )
        else:
            lines.append(f"mode {m.name!r} {m.verdict}: {m.error or ''}".rstrip(": "))
    return lines
