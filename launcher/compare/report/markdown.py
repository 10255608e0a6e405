"""report.md: the comparison's tables, findings and plots, readable on its own."""

from __future__ import annotations

from launcher.compare.report.tables import (
    AGREEMENT_HEADER,
    BATCH_NORM_HEADER,
    COMM_HEADER,
    MEMORY_HEADER,
    TIME_HEADER,
    agreement_rows,
    batch_norm_rows,
    comm_rows,
    cost_header,
    cost_rows,
    eval_header,
    eval_note,
    eval_rows,
    findings,
    floor_lines,
    headline,
    memory_rows,
    time_rows,
)
from launcher.compare.results import Comparison

BATCH_NORM_WHY = (
    "BatchNorm normalizes each forward with the mean and variance of that forward's samples, so a mode whose "
    "statistics cover fewer samples than the reference's trains another function, whatever the loss scaling: "
    "accumulation runs K separate forwards, and nothing done to the loss merges their statistics. SyncBatchNorm "
    "all-reduces the statistics over the ranks of one micro-step (processes x micro batch samples): that recovers "
    "the big batch for DDP without accumulation, but not across the micro-steps of a window, which are separate "
    "forwards in time. The running statistics (compared with the weights; used in eval) follow the same split, "
    "and under DDP with plain BatchNorm they are rank 0's alone (DDP broadcasts rank 0's buffers)."
)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"  # "|Δ|" must not split a cell

    return "\n".join([line(header), "|" + "---|" * len(header), *[line(row) for row in rows]])


def batch_norm_section(result: Comparison) -> list[str]:
    """report.md's BatchNorm section, when any mode's model had BatchNorm layers."""
    rows = batch_norm_rows(result)
    if not rows:
        return []
    parts = [
        "## BatchNorm",
        "",
        BATCH_NORM_WHY,
        "",
        "Per mode: the BatchNorm layers, the samples each statistic is taken over (micro batch, times the "
        "processes when synced) against the reference's, and the measured drift from the reference: the relative "
        "L2 distance of all floating-point tensors (the one judged), of the trained parameters alone (without the "
        "running statistics), and the largest per-step loss difference.",
        "",
        md_table(BATCH_NORM_HEADER, rows),
        "",
    ]
    if any(m.batch_norm["sync"] for m in result.modes if m.batch_norm):
        parts += [
            "SyncBatchNorm's own all-reduces (per layer and micro-step, one in forward and one in backward) are "
            "not in the cost table's all-reduce columns, which count gradient buckets; they show in the step time.",
            "",
        ]
    return parts


def markdown(result: Comparison) -> str:
    batches = {m.plan.global_batch_size for m in result.modes}
    steps = {len(m.losses) if m.losses else m.max_steps for m in result.modes if m.losses or m.max_steps}
    batch_text = f"global batch {batches.pop()} samples/step" if len(batches) == 1 else "global batch per mode"
    steps_text = {0: "steps not known (no mode finished)", 1: f"{min(steps, default=0)} optimizer steps"}.get(
        len(steps), "optimizer steps per mode"
    )
    parts = [
        "# Comparison: accumulation, DDP and both",
        "",
        f"Base config `{result.base}`: model `{result.model}` on data `{result.data}`, {batch_text}, {steps_text}, "
        f"reference mode `{result.reference}`.",
        "",
        f"**{headline(result)}.**",
        "",
        *[f"- {line}" for line in findings(result)],
        "",
    ]
    if result.warnings:
        parts += ["## Preflight warnings", "", *[f"- {w}" for w in result.warnings], ""]
    parts += ["## Evaluation", "", eval_note(result), "", md_table(eval_header(result), eval_rows(result)), ""]
    parts += [
        "## Agreement",
        "",
        *[line + "\n" for line in floor_lines(result)],
        "Read from each run's `model.safetensors` and `metrics.jsonl`: the largest per-step difference of the "
        "logged loss (between runs with the same number of optimizer steps only) and its ratio to the control's, "
        "the final weights' relative L2 distance (to the weights' norm, and to what training changed) with its "
        "ratio to the control's, and the cosine similarity. Launch: processes (p) x micro batch per process (mb) x "
        "accumulation steps (K).",
        "",
        md_table(AGREEMENT_HEADER, agreement_rows(result)),
        "",
        "![loss curves](loss_curves.png)",
        "",
        *batch_norm_section(result),
        "## Cost",
        "",
        "From each run's `summary.json`: median optimizer-step time and its ratio to the reference, throughput, "
        "gradient sync rounds and all-reduce bytes per optimizer step (counted where the collectives are called), "
        "the largest peak memory over the processes, time in training steps, and the launch's wall time (process "
        "start, imports and process group included).",
        "",
        md_table(cost_header(result), cost_rows(result)),
        "",
        "Communication per optimizer step, by collective: calls and the bytes requested (an all-reduce's tensor, "
        "a reduce-scatter's full input, an all-gather's full output), counted where the strategies call them.",
        "",
        md_table(COMM_HEADER, comm_rows(result)),
        "",
        "Where the step time goes, each phase's median over the steps on the main process (so the phases need not "
        "add up to the median step): the data wait and copy, the micro-steps' forward and backward, the gradient "
        "communication the backward did not hide (from the launch of its last gradient collective to its end), the "
        "launcher's per-step scalar all-reduce (which also waits for the slowest rank), clipping and the optimizer.",
        "",
        md_table(TIME_HEADER, time_rows(result)),
        "",
        "Memory per rank, from the tensors it holds (the largest over the ranks): parameters and optimizer state "
        "(local shards under FSDP), the gradients held between micro-steps, the activations the first micro-step "
        "saved for its backward, and the model state they make together. Unlike the peak resident set above, "
        "which on CPU is mostly the Python and torch runtime, these say what a split costs.",
        "",
        md_table(MEMORY_HEADER, memory_rows(result)),
        "",
        "![cost](cost.png)",
        "",
    ]
    for m in result.modes:
        if m.failed:
            parts += [f"## Mode `{m.name}` failed: {m.error or ''}", "", f"Log: `{m.log}`", "", "```"]
            parts += [*m.log_tail, "```", ""]
    if result.versions:
        parts += ["Versions: " + ", ".join(f"{k} {v}" for k, v in result.versions.items()), ""]
    return "\n".join(parts)
