"""The run loop: steps from the resumed position to the end, evaluation, checkpoints, and the summary."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from launcher import batchnorm, checkpoint, faults
from launcher.builtin import LM
from launcher.config import Config, dump_config
from launcher.distributed import backend_name, gather_object, tracker_values
from launcher.measure import library_versions, memory_source, model_state_bytes, now_s, peak_memory_bytes
from launcher.run import Run
from launcher.rundir import INITIAL_WEIGHTS, WEIGHTS, MemoryInfo, OptimInfo, RunSummary, StepRecord, Totals
from launcher.step import train_step
from launcher.terminal import StepProgress, describe_eval, print_summary
from launcher.timing import median_breakdown


class NonFiniteError(RuntimeError):
    """Non-finite loss or gradients: run.on_nonfinite=stop, or too many skipped steps in a row."""


@dataclass(frozen=True)
class Outcome:
    stopped: bool  # stopped early (a signal or run.stop_at_step) after writing a checkpoint
    step: int  # optimizer steps done


def check_nonfinite(cfg: Config, records: list[StepRecord]) -> None:
    """Stop (on every rank: the verdict was all-reduced) per run.on_nonfinite and run.max_consecutive_nonfinite."""
    if not records[-1].skipped:
        return
    streak = 0
    for record in reversed(records):
        if not record.skipped:
            break
        streak += 1
    step = records[-1].step
    if cfg.run.on_nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss or gradients at step {step} (run.on_nonfinite=stop)")
    if streak >= cfg.run.max_consecutive_nonfinite:
        raise NonFiniteError(
            f"non-finite loss or gradients in {streak} steps in a row, up to step {step} "
            f"(run.max_consecutive_nonfinite={cfg.run.max_consecutive_nonfinite})"
        )


def _every(n: int, done: int) -> bool:
    return n > 0 and done % n == 0


# Runs on every rank after each step; True ends the run there, summarized as finished (every rank must agree).
AfterStep = Callable[[Run, StepRecord], bool]


def run_loop(run: Run, after_step: AfterStep | None = None) -> Outcome:
    """Train from ``run.state.step`` to the planned steps (or a stop); checkpoints at step boundaries.

    The main process writes every result file; summary.json and the final weights only once the run finished.
    ``after_step(run, record)``, if given, runs on every rank once each step is done and written (the benchmark
    runs another loop's step there, so that the two alternate step by step in one process); when it returns
    True the run ends after that step as if it were the last (the benchmark's time budget).
    """
    acc, cfg, state, max_steps = run.accelerator, run.cfg, run.state, run.plan.max_steps
    started = now_s()
    main = acc.is_main_process
    state.model.train()
    records: list[StepRecord] = []
    meta = checkpoint.run_meta(cfg, run.plan, run.num_labels)
    if main:
        metrics, records = run.folder.start(
            # config.yaml records the steps as resolved: run.max_epochs decides them from the data.
            dump_config(cfg, {"run.max_steps": max_steps}),
            state.step,
            keep_checkpoints=cfg.run.resume != "none",
            restart=run.restart,
        )
        progress = StepProgress(max_steps, cfg.run.log_every_steps)
    if cfg.run.save_initial_weights and state.step == 0:
        write_weights(run, INITIAL_WEIGHTS)
    prior = len(records)  # only this session's records are the same on every rank (rank 0 read the rest back)
    stopped = False
    try:
        for step in range(state.step, max_steps):
            with faults.nan_logits(state.module, cfg.run, step, acc.process_index):
                record, stop = train_step(run, step)
            state.step = done = step + 1
            if run.evaluator is not None and (done == max_steps or _every(cfg.eval.every_steps, done)):
                # Between steps, outside step_time_s; its result rides on this step's metrics line.
                record.eval = run.evaluator(state.model, done)
            records.append(record)
            if main:
                metrics.write(record)
                progress.update(record)
                if record.eval is not None:
                    progress.note(f"eval {describe_eval(record.eval)}")
            faults.kill_if_asked(cfg.run, done, acc.process_index, run.restart.attempt if run.restart else 0)
            if acc.trackers:  # run.log_with: the same record, numeric fields only (main process only)
                acc.log(tracker_values(record.to_json()), step=done)
            check_nonfinite(cfg, records[prior:])
            # A stop asked for during the last step changes nothing: the run finishes normally.
            stopped = (stop or done == cfg.run.stop_at_step) and done < max_steps
            final = done == max_steps and cfg.run.final_checkpoint
            if stopped or final or done == cfg.run.stop_at_step or _every(cfg.run.checkpoint_every, done):
                checkpoint.save_checkpoint(acc, state, run.strategy, run.folder, meta, cfg.run.keep_checkpoints)
            if stopped:
                break
            if after_step is not None and after_step(run, record):
                break
    finally:
        run.feeder.close()
        if main:
            progress.close()
            metrics.close()
    if stopped:
        return Outcome(True, state.step)

    summary = summarize(run, records, prior, gather_object(acc, memory_of(run, records[prior:])), started)
    write_weights(run, WEIGHTS)
    if main:
        summary.wall_time_s = now_s() - started
        summary.restarts = run.folder.restarts()
        summary.retrained_steps = sum(r.retrained_steps for r in summary.restarts)
        run.folder.write_summary(summary)
        print_summary(summary)
    # Nobody tears down the process group while rank 0 is still writing (gloo aborts on that).
    acc.wait_for_everyone()
    return Outcome(False, state.step)


def write_weights(run: Run, name: str) -> None:
    """The model's full weights as ``name`` in the run folder: every rank takes part in gathering sharded ones,
    the main process writes."""
    state = run.state
    weights = run.strategy.full_weights(state.model) if run.strategy.sharded else state.module
    if run.accelerator.is_main_process:
        run.folder.write_weights(weights, name)


def memory_of(run: Run, records: list[StepRecord]) -> MemoryInfo:
    """This rank's memory over this session's steps (held gradients and activations: the largest seen)."""
    state = model_state_bytes(run.state.model, run.state.optimizer)
    return MemoryInfo(
        params_bytes=state.params,
        optimizer_bytes=state.optimizer,
        held_grad_bytes=max((r.held_grad_bytes for r in records), default=0),
        activation_bytes=max((r.activation_bytes for r in records), default=0),
        peak_bytes=peak_memory_bytes(run.accelerator.device),
    )


def per_step(records: list[StepRecord]) -> dict[str, dict[str, float]]:
    """Mean calls and bytes per optimizer step of each collective."""
    kinds = sorted({kind for r in records for kind in r.collectives})
    steps = max(len(records), 1)
    return {
        kind: {f: sum(r.collectives.get(kind, {}).get(f, 0) for r in records) / steps for f in ("calls", "bytes")}
        for kind in kinds
    }


def summarize(run: Run, records: list[StepRecord], prior: int, memory: list[MemoryInfo], started: float) -> RunSummary:
    """The run's summary from its per-step records (every session's, after a resume)."""
    acc, cfg, batch = run.accelerator, run.cfg, run.plan.batch
    times = [r.step_time_s for r in records]
    train_time_s = sum(times)
    totals = Totals(
        samples=sum(r.samples for r in records),
        items=sum(r.items for r in records),
        sync_rounds=sum(r.sync_rounds for r in records),
        allreduce_calls=sum(r.allreduce_calls for r in records),
        allreduce_bytes=sum(r.allreduce_bytes for r in records),
    )
    return RunSummary(
        world_size=batch.world_size,
        accum_steps=batch.accum_steps,
        micro_batch_size=batch.micro_batch_size,
        global_batch_size=batch.global_batch_size,
        task=run.task,
        backend=backend_name(),
        device=str(acc.device),
        distributed_type=str(acc.distributed_type),
        dtype=cfg.run.dtype,
        precision=cfg.precision,
        sync=cfg.batch.sync,
        loss_normalization=cfg.batch.loss_normalization,
        batch_norm=batchnorm.summary(run.state.module, batch.micro_batch_size, batch.world_size),
        optim=OptimInfo(**run.plan.optim.summary()),
        max_steps=run.plan.max_steps,
        # Passes over the training set actually trained (an epoch's short last window counts what it held).
        epochs=totals.samples / len(run.dataset),
        steps=len(records),
        skipped_steps=[r.step for r in records if r.skipped],
        first_loss=records[0].loss if records else None,
        final_loss=records[-1].loss if records else None,
        median_step_time_s=statistics.median(times) if times else None,
        median_time_breakdown=median_breakdown([r.time_breakdown for r in records]),
        train_time_s=train_time_s,
        samples_per_s=totals.samples / train_time_s if train_time_s else None,
        tokens_per_s=totals.items / train_time_s if train_time_s and run.task == LM else None,
        totals=totals,
        strategy=run.strategy.name,
        collectives_per_step=per_step(records),
        memory_per_rank=memory,
        peak_mem_bytes_per_rank=[m.peak_bytes for m in memory],
        peak_mem_source=memory_source(acc.device),
        wall_time_s=now_s() - started,
        resumed_from_step=run.resumed_from_step,
        data=run.data_info,
        eval=next((r.eval for r in reversed(records[prior:]) if r.eval is not None), None),
        output_dir=str(run.folder.path),
        versions=library_versions(),
    )
