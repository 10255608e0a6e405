"""One optimizer step: the micro-steps of one window, then one agreed update.

The launcher owns this loop rather than ``accelerator.accumulate()`` so that the two things that decide
equivalence stay visible in one place:
  * the sync point: every micro-step but the last runs forward AND backward without communicating (the
    strategy's ``sync``); ``batch.sync=every_step`` is the baseline that communicates on every one;
  * the loss scale: each micro-step's summed loss times a factor fixed for the window before its first
    backward (``loss.micro_step_scales``).
Accelerate's own accumulation stays at 1 step, so it never divides the loss itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from launcher.distributed import start_all_reduce_sum
from launcher.loss import micro_step_scales, summed_loss
from launcher.lr import lr_at
from launcher.measure import COUNTER, Traffic, now_s, peak_memory_bytes, replicated, synchronize
from launcher.records import to_json
from launcher.run import Run
from launcher.rundir import StepRecord


@dataclass(frozen=True)
class Agreement:
    """What every rank agrees on after a step, from one all-reduce of three numbers."""

    loss_sum: float  # the window's summed loss over every rank
    nonfinite_ranks: int  # ranks whose loss or gradients are NaN/inf
    stop_ranks: int  # ranks asked to stop (a signal): all stop after this step


def start_agreement(run: Run, local_loss: float, nonfinite: bool, stop: bool) -> Callable[[], Agreement]:
    """One collective carries the logged loss and both agreements, so every rank stops after the same step and
    neither costs a collective of its own. It is launched before the optimizer step and read after it: on gloo a
    blocking one cost 10 % of the tiny model's step (README, Benchmarks)."""
    with COUNTER.scalar():
        sums = start_all_reduce_sum(run.accelerator, [local_loss, float(nonfinite), float(stop)])

    def result() -> Agreement:
        loss_sum, bad, stopping = sums()
        return Agreement(loss_sum, int(bad), int(stopping))

    return result


def accumulate(run: Run, batches: list[dict[str, torch.Tensor]], scales: list[float], syncs: list[bool]) -> float:
    """Forward and backward of every micro-batch; gradients add up in ``.grad``. Returns this rank's summed
    loss of the window."""
    model, device, task, clock = run.state.model, run.accelerator.device, run.task, run.clock
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for m, (batch, scale, sync) in enumerate(zip(batches, scales, syncs, strict=True)):
        with clock.phase("data"):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with run.strategy.sync(model, sync), COUNTER.round(), run.meter.micro_step(m):
            with clock.phase("forward"):
                loss = summed_loss(model(**batch).logits, labels, task)
            with clock.backward():
                run.accelerator.backward(loss * scale)
        loss_sum += loss.detach().double()  # stays on the device: no sync per micro-step
    return float(loss_sum)


def train_step(run: Run, step: int) -> tuple[StepRecord, bool]:
    """Train optimizer step ``step`` (0-based); returns its record (global values) and whether any rank asked
    to stop. A step whose loss or gradients are non-finite on any rank is skipped on all."""
    acc, batch_plan, cfg = run.accelerator, run.plan.batch, run.cfg
    started, traffic = now_s(), COUNTER.snapshot()
    lr = lr_at(step, run.plan.optim, run.plan.max_steps)
    for group in run.state.optimizer.param_groups:
        group["lr"] = lr

    # The divisor must be known before the first backward: the whole window's item count, over every rank,
    # which each rank counts itself from the window's samples.
    with run.clock.phase("data"):
        window = run.feeder.window(step, run.plan.max_steps)
    global_items = window.global_items
    scales = micro_step_scales(window.local_items, global_items, batch_plan.world_size, cfg.batch.loss_normalization)
    syncs = [cfg.batch.sync == "every_step" or m == batch_plan.accum_steps - 1 for m in range(len(window.batches))]
    local_loss = accumulate(run, window.batches, scales, syncs)

    # Clip once per optimizer step, on the synced gradients; with clipping off the norm is still logged.
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    with run.clock.phase("optimizer"):
        grad_norm = float(replicated(acc.clip_grad_norm_(run.state.model.parameters(), max_norm)))
    # The norm is of the all-reduced gradients, the same on every rank, so every rank skips the same steps without
    # waiting for the agreement; a non-finite loss anywhere makes the gradients non-finite everywhere. Under fp16
    # an inf gradient is the GradScaler's business: it skips that step and lowers the scale itself.
    skipped = not math.isfinite(grad_norm) and acc.scaler is None
    with run.clock.phase("scalars"):
        agreement = start_agreement(run, local_loss, not math.isfinite(local_loss) or skipped, run.stop_requested())
    with run.clock.phase("optimizer"):
        if not skipped:
            run.state.optimizer.step()
        run.state.optimizer.zero_grad(set_to_none=True)  # a skipped step's gradients are dropped, not carried
    with run.clock.phase("scalars"):
        verdict = agreement()
    synchronize(acc.device)
    step_time_s = now_s() - started
    sent = COUNTER.since(traffic)
    record = StepRecord(
        step=step + 1,
        loss=verdict.loss_sum / max(global_items, 1),
        lr=lr,
        grad_norm=grad_norm,
        items=global_items,
        samples=window.samples,
        step_time_s=step_time_s,
        sync_rounds=sent.rounds,
        allreduce_calls=sent.by_collective.get("all_reduce", Traffic()).calls,
        allreduce_bytes=sent.by_collective.get("all_reduce", Traffic()).bytes,
        collectives={kind: to_json(t) for kind, t in sent.by_collective.items()},
        activation_bytes=run.meter.activation_bytes,
        held_grad_bytes=run.meter.held_grad_bytes,
        peak_mem_bytes=peak_memory_bytes(acc.device),
        skipped=skipped,
        nonfinite_ranks=verdict.nonfinite_ranks,
        time_breakdown=run.clock.read(step_time_s),
    )
    return record, verdict.stop_ranks > 0
