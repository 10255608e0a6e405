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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from launcher.batching import BatchPlan, SampleOrder, micro_batch_ids
from launcher.config import Config, OptimConfig, dump_config
from launcher.data import IGNORE, TokenDataset
from launcher.distributed import all_reduce_sum, backend_name, gather_object
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
    write_json_atomic,
    write_text_atomic,
)
from launcher.models import LM
from launcher.terminal import StepProgress, print_summary


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): a pure function of the step, so every
    launch (any world size, any accumulation) applies the same rate at the same step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Labels aligned with the logits: a causal LM predicts token t+1 from position t."""
    return labels[:, 1:] if task == LM else labels


def count_items(labels: torch.Tensor, task: str) -> int:
    """Items that carry loss: next-token targets for an LM, samples for a classifier."""
    return int((_targets(labels, task) != IGNORE).sum())


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum (not mean) of per-item cross-entropy; ignored items add exactly zero."""
    if task == LM:
        logits = logits[:, :-1]
    targets = _targets(labels, task)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
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
    counter: CommCounter = field(default_factory=CommCounter)


def train_step(ctx: StepContext, step: int) -> dict[str, Any]:
    """Run optimizer step ``step`` (0-based) and return its metrics record (global values)."""
    acc, plan, task = ctx.accelerator, ctx.plan, ctx.task
    started = now_s()
    comm_before = ctx.counter.totals()
    lr = lr_at(step, ctx.cfg.optim, ctx.cfg.run.max_steps)
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

    loss_sum_local = torch.zeros((), dtype=torch.float64, device=acc.device)
    for m, batch in enumerate(batches):
        last = m == plan.accum_steps - 1
        syncing = last or ctx.cfg.batch.sync == "every_step"
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        with contextlib.nullcontext() if syncing else acc.no_sync(ctx.model):
            logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum = summed_loss(logits, batch["labels"], task)
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
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    synchronize(acc.device)
    step_time_s = now_s() - started

    (loss_total,) = all_reduce_sum(acc, [float(loss_sum_local)])
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
    }


def summarize(records: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Totals and rates over the run's per-step records."""
    times = [r["step_time_s"] for r in records]
    train_time_s = sum(times)
    samples = sum(r["samples"] for r in records)
    items = sum(r["items"] for r in records)
    rate_key = "tokens_per_s" if task == LM else "items_per_s"
    return {
        "steps": len(records),
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


def run_loop(ctx: StepContext) -> dict[str, Any]:
    """Train ``cfg.run.max_steps`` optimizer steps; the main process writes every result file."""
    acc, cfg = ctx.accelerator, ctx.cfg
    started = now_s()
    out = Path(cfg.run.output_dir)
    main = acc.is_main_process
    ctx.counter.attach(ctx.model)
    ctx.model.train()
    records: list[dict[str, Any]] = []
    if main:
        write_text_atomic(out / "config.yaml", dump_config(cfg))
        for stale in RESULT_FILES:  # reached only with run.overwrite=true: never mix two runs' files
            (out / stale).unlink(missing_ok=True)
        metrics = JsonlWriter(out / "metrics.jsonl")
        progress = StepProgress(cfg.run.max_steps, cfg.run.log_every_steps)
    try:
        for step in range(cfg.run.max_steps):
            record = train_step(ctx, step)
            records.append(record)
            if main:
                metrics.write(record)
                progress.update(record)
    finally:
        if main:
            progress.close()
            metrics.close()

    peaks = gather_object(acc, peak_memory_bytes(acc.device))
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
        **summarize(records, ctx.task),
        "peak_mem_bytes_per_rank": peaks,
        "peak_mem_source": memory_source(acc.device),
        "wall_time_s": now_s() - started,
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
