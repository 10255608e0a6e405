"""One optimizer step = the micro-steps of one window; the run loop around it.

The loop is owned here rather than by ``accelerator.accumulate()`` so that the
two things that decide equivalence stay visible in one place:
  * the sync point: every micro-step but the last runs forward AND backward under
    ``no_sync`` (wrapping backward alone saves nothing: DDP arms its reducer in forward);
  * the loss scale: sum of per-item losses / the window's global item count, counted
    before the first backward and all-reduced, times world size to undo DDP's averaging.
Accelerate's own accumulation stays at 1 step, so it never divides the loss itself.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from launcher import batchnorm, checkpoint
from launcher.batching import BatchPlan, SampleOrder, micro_batch_ids
from launcher.config import Config, dump_config
from launcher.data import IGNORE, TokenDataset, model_inputs
from launcher.distributed import all_reduce_sum, backend_name, gather_object
from launcher.lr import ResolvedOptim, lr_at
from launcher.metrics import (
    RESULT_FILES,
    CommCounter,
    JsonlWriter,
    library_versions,
    memory_source,
    now_s,
    peak_memory_bytes,
    save_weights_atomic,
    synchronize,
    tracker_values,
    truncate_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from launcher.models import LM
from launcher.terminal import StepProgress, describe_eval, print_summary


def build_optimizer(optim: ResolvedOptim, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer with the batch-scaled values; the lr set here is replaced by ``lr_at`` before every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = optim.cfg
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=cfg.weight_decay
    )


def _targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Labels aligned with the logits: a causal LM predicts token t+1 from position t."""
    return labels[:, 1:] if task == LM else labels


def count_items(labels: torch.Tensor, task: str) -> int:
    """Items that carry loss: next-token targets for an LM, samples for a classifier."""
    return int((_targets(labels, task) != IGNORE).sum())


def _aligned(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and their targets, flattened to (items, classes) and (items,)."""
    if task == LM:
        logits = logits[:, :-1]
    return logits.reshape(-1, logits.size(-1)), _targets(labels, task).reshape(-1)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum (not mean) of per-item cross-entropy; ignored items add exactly zero."""
    return F.cross_entropy(*_aligned(logits, labels, task), ignore_index=IGNORE, reduction="sum")


def item_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy per item, ignored items exactly zero: shape (batch,) for a classifier, (batch, length - 1)
    for an LM."""
    return F.cross_entropy(*_aligned(logits, labels, task), ignore_index=IGNORE, reduction="none").view(
        _targets(labels, task).shape
    )


@dataclass
class StepContext:
    """What every step needs, built once per run."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    dataset: TokenDataset
    plan: BatchPlan
    order: SampleOrder
    task: str
    optim: ResolvedOptim
    counter: CommCounter = field(default_factory=CommCounter)
    start_step: int = 0  # steps already done (a resumed run)
    stop_requested: Callable[[], bool] = lambda: False  # set by a signal on this rank
    # evaluator(model, step) -> the eval result dict, the same on every rank; None without an eval set.
    evaluator: Callable[[torch.nn.Module, int], dict[str, Any]] | None = None
    data_info: dict[str, Any] = field(default_factory=dict)  # summary.json's "data"


class NonFiniteError(RuntimeError):
    """Non-finite loss or gradients: run.on_nonfinite=stop, or too many skipped steps in a row."""


def train_step(ctx: StepContext, step: int) -> tuple[dict[str, Any], bool]:
    """Run optimizer step ``step`` (0-based); returns its metrics record (global values) and whether any
    rank asked to stop. A step whose loss or gradients are non-finite on any rank is skipped on all."""
    acc, plan, task = ctx.accelerator, ctx.plan, ctx.task
    started = now_s()
    comm_before = ctx.counter.totals()
    lr = lr_at(step, ctx.optim, ctx.cfg.run.max_steps)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr

    window = ctx.order.window(step)
    batches = [
        ctx.dataset.collate(micro_batch_ids(window, plan, acc.process_index, m), plan.micro_batch_size, window[0])
        for m in range(plan.accum_steps)
    ]
    local_counts = [count_items(b["labels"], task) for b in batches]
    # The divisor must be known before the first backward: it is the whole window's count, over all ranks.
    (global_items,) = all_reduce_sum(acc, [float(sum(local_counts))])
    token_norm = ctx.cfg.batch.loss_normalization == "tokens"
    poison = ctx.cfg.run.inject_nan_at_step == step + 1 and ctx.cfg.run.inject_nan_rank == acc.process_index

    loss_sum_local = torch.zeros((), dtype=torch.float64, device=acc.device)
    for m, batch in enumerate(batches):
        last = m == plan.accum_steps - 1
        syncing = last or ctx.cfg.batch.sync == "every_step"
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with contextlib.nullcontext() if syncing else acc.no_sync(ctx.model):
            logits = ctx.model(**model_inputs(batch)).logits
            loss_sum = summed_loss(logits, batch["labels"], task)
            if poison and m == 0:
                loss_sum = loss_sum * float("nan")  # test hook: a NaN on this rank only
            if token_norm:
                # DDP averages gradients over ranks; x world_size turns that average back into a sum.
                loss = loss_sum * (plan.world_size / max(global_items, 1.0))
            else:
                # Naive baseline: mean over this micro-batch, / K. Wrong when item counts differ.
                loss = loss_sum / max(local_counts[m], 1) / plan.accum_steps
            acc.backward(loss)
        loss_sum_local += loss_sum.detach().double()  # stays on device: no sync per micro-step

    # Clip once per optimizer step, on the synced gradients; with clipping off the norm is still logged.
    max_norm = ctx.cfg.optim.grad_clip if ctx.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = float(acc.clip_grad_norm_(ctx.model.parameters(), max_norm))
    local_loss = float(loss_sum_local)
    # Under fp16 an inf gradient is the GradScaler's business: it skips that step and lowers the scale itself.
    grads_bad = not math.isfinite(grad_norm) and acc.scaler is None
    nonfinite = not math.isfinite(local_loss) or grads_bad
    # One all-reduce carries the logged loss and both agreements (non-finite here, stop requested here), so
    # every rank skips, or stops after, the same step, and neither costs an extra collective.
    loss_total, nonfinite_ranks, stop_ranks = all_reduce_sum(
        acc, [local_loss, float(nonfinite), float(ctx.stop_requested())]
    )
    skipped = nonfinite_ranks > 0
    if not skipped:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped, not carried over
    synchronize(acc.device)
    step_time_s = now_s() - started

    comm = {k: v - comm_before[k] for k, v in ctx.counter.totals().items()}
    return {
        "step": step + 1,
        "loss": loss_total / max(global_items, 1.0),
        "lr": lr,
        "grad_norm": grad_norm,
        "items": int(global_items),
        "samples": len(window),
        "step_time_s": step_time_s,
        "sync_rounds": comm["sync_rounds"],
        "allreduce_calls": comm["allreduce_calls"],
        "allreduce_bytes": comm["allreduce_bytes"],
        "peak_mem_bytes": peak_memory_bytes(acc.device),
        "skipped": skipped,
        "nonfinite_ranks": int(nonfinite_ranks),
    }, stop_ranks > 0


def summarize(records: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Totals and rates over the run's per-step records."""
    times = [r["step_time_s"] for r in records]
    train_time_s = sum(times)
    samples = sum(r["samples"] for r in records)
    items = sum(r["items"] for r in records)
    rate_key = "tokens_per_s" if task == LM else "items_per_s"
    return {
        "steps": len(records),
        "skipped_steps": [r["step"] for r in records if r.get("skipped")],
        "first_loss": records[0]["loss"] if records else None,
        "final_loss": records[-1]["loss"] if records else None,
        "median_step_time_s": statistics.median(times) if times else None,
        "train_time_s": train_time_s,
        "samples_per_s": samples / train_time_s if train_time_s else None,
        rate_key: items / train_time_s if train_time_s else None,
        "totals": {
            "samples": samples,
            "items": items,
            "sync_rounds": sum(r["sync_rounds"] for r in records),
            "allreduce_calls": sum(r["allreduce_calls"] for r in records),
            "allreduce_bytes": sum(r["allreduce_bytes"] for r in records),
        },
    }


def _check_nonfinite(cfg: Config, records: list[dict[str, Any]]) -> None:
    """Stop (on every rank: the verdict was all-reduced) per run.on_nonfinite and run.max_consecutive_nonfinite."""
    if not records[-1]["skipped"]:
        return
    streak = 0
    for record in reversed(records):
        if not record.get("skipped"):
            break
        streak += 1
    step = records[-1]["step"]
    if cfg.run.on_nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradients at step {step} (run.on_nonfinite=stop)")
    if streak >= cfg.run.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"non-finite loss or gradients in {streak} steps in a row, up to step {step} "
            f"(run.max_consecutive_nonfinite={cfg.run.max_consecutive_nonfinite})"
        )


def _wants_checkpoint(cfg: Config, done: int, stop: bool) -> bool:
    every = cfg.run.checkpoint_every
    return stop or done == cfg.run.max_steps or done == cfg.run.stop_at_step or (every > 0 and done % every == 0)


def _wants_eval(cfg: Config, done: int) -> bool:
    every = cfg.eval.every_steps
    return done == cfg.run.max_steps or (every > 0 and done % every == 0)


def _open_outputs(ctx: StepContext, out: Path) -> tuple[JsonlWriter, list[dict[str, Any]]]:
    """Main process: config.yaml, and metrics.jsonl fresh or continued after the checkpoint's step."""
    write_text_atomic(out / "config.yaml", dump_config(ctx.cfg))
    checkpoint.remove_partial(out)
    if ctx.start_step == 0:
        for stale in RESULT_FILES:  # reached only with run.overwrite=true: never mix two runs' files
            (out / stale).unlink(missing_ok=True)
        if ctx.cfg.run.resume == "none":
            checkpoint.remove_all(out)  # so that a later resume=auto cannot pick up the old run's
        return JsonlWriter(out / "metrics.jsonl"), []
    # Steps after the checkpoint are trained again: drop their lines so no step is missing or repeated.
    kept = truncate_jsonl(out / "metrics.jsonl", ctx.start_step)
    for stale in ("summary.json", "model.safetensors"):
        (out / stale).unlink(missing_ok=True)
    return JsonlWriter(out / "metrics.jsonl", append=True), kept


def run_loop(ctx: StepContext) -> dict[str, Any]:
    """Train from ``ctx.start_step`` to ``cfg.run.max_steps`` (or a stop); checkpoints at step boundaries.

    The main process writes every result file. ``summary["stopped"]`` says whether the run stopped early
    (a signal or run.stop_at_step) after writing a checkpoint; summary.json and the final weights are
    only written by a run that finished.
    """
    acc, cfg = ctx.accelerator, ctx.cfg
    started = now_s()
    out = Path(cfg.run.output_dir)
    main = acc.is_main_process
    ctx.counter.attach(ctx.model)
    ctx.model.train()
    records: list[dict[str, Any]] = []
    if main:
        metrics, records = _open_outputs(ctx, out)
        progress = StepProgress(cfg.run.max_steps, cfg.run.log_every_steps)
    # Only this session's records are the same on every rank (rank 0 alone reads the earlier ones back).
    prior = len(records)
    stopped = False
    try:
        for step in range(ctx.start_step, cfg.run.max_steps):
            record, stop = train_step(ctx, step)
            if ctx.evaluator is not None and _wants_eval(cfg, step + 1):
                # Between steps, outside step_time_s; its result rides on this step's metrics line.
                record["eval"] = ctx.evaluator(ctx.model, step + 1)
            records.append(record)
            if main:
                metrics.write(record)
                progress.update(record)
                if "eval" in record:
                    progress.note(f"eval {describe_eval(record['eval'])}")
            if acc.trackers:  # run.log_with: the same record, numeric fields only (main process only)
                acc.log(tracker_values(record), step=record["step"])
            _check_nonfinite(cfg, records[prior:])
            done = step + 1
            # A stop asked for during the last step changes nothing: the run finishes normally.
            stopped = (stop or done == cfg.run.stop_at_step) and done < cfg.run.max_steps
            if _wants_checkpoint(cfg, done, stopped):
                checkpoint.save_checkpoint(acc, ctx.model, ctx.optimizer, cfg, ctx.plan, done)
            if stopped:
                break
    finally:
        if main:
            progress.close()
            metrics.close()
    if stopped:
        return {"stopped": True, "step": records[-1]["step"]}

    peaks = gather_object(acc, peak_memory_bytes(acc.device))
    stats = summarize(records, ctx.task)
    summary = {
        "world_size": ctx.plan.world_size,
        "accum_steps": ctx.plan.accum_steps,
        "micro_batch_size": ctx.plan.micro_batch_size,
        "global_batch_size": ctx.plan.global_batch_size,
        "task": ctx.task,
        "backend": backend_name(),
        "device": str(acc.device),
        "distributed_type": str(acc.distributed_type),
        "dtype": cfg.run.dtype,
        "precision": cfg.precision,
        "sync": cfg.batch.sync,
        "loss_normalization": cfg.batch.loss_normalization,
        "batch_norm": batchnorm.summary(acc.unwrap_model(ctx.model), ctx.plan.micro_batch_size, ctx.plan.world_size),
        "optim": ctx.optim.summary(),
        "max_steps": cfg.run.max_steps,
        # Passes over the training set actually trained (an epoch's short last window counts what it held).
        "epochs": stats["totals"]["samples"] / len(ctx.dataset),
        **stats,
        "peak_mem_bytes_per_rank": peaks,
        "peak_mem_source": memory_source(acc.device),
        "wall_time_s": now_s() - started,
        "resumed_from_step": ctx.start_step,
        "data": ctx.data_info,
        "eval": next((r["eval"] for r in reversed(records[prior:]) if "eval" in r), None),
        "stopped": False,
        "output_dir": str(out),
        "versions": library_versions(),
    }
    if main:
        save_weights_atomic(acc.unwrap_model(ctx.model), out / "model.safetensors")
        summary["wall_time_s"] = now_s() - started
        write_json_atomic(out / "summary.json", summary)
        print_summary(summary)
    # Nobody tears down the process group while rank 0 is still writing (gloo aborts on that).
    acc.wait_for_everyone()
    return summary
