"""What a plan shows: the ranked table in the terminal (rich), plan.md and the step-time plot. Renders a
``PlanResult`` and nothing else."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from launcher.compare.report.markdown import md_table
from launcher.compare.report.tables import mib, ms
from launcher.compare.report.terminal import make_console, rich_table
from launcher.files import write_text_atomic
from launcher.plan.model import size_text
from launcher.plan.results import Candidate, PlanResult

__all__ = ["make_console", "print_result", "write_all"]

TOP = 20  # rows of the ranked table; plan.json holds every candidate
HEADER = ["rank", "N", "micro", "K", "strategy", "sync", "step", "tokens/s", "memory/device", "sent/step", "fits"]
VALIDATION_HEADER = ["mode", "split", "link", "predicted", "measured", "predicted / measured"]


def _row(c: Candidate) -> list[str]:
    return [
        str(c.rank) if c.rank else "-",
        str(c.world_size),
        str(c.micro_batch_size),
        str(c.accum_steps),
        c.strategy,
        c.sync,
        ms(c.predicted_step_time_s),
        f"{c.predicted_tokens_per_s:,.0f}",
        size_text(c.predicted_memory_bytes),
        mib(sum(c.bytes_per_step.values())),
        "yes" if c.fits else "no",
    ]


def _validation_row(c: Candidate) -> list[str]:
    return [c.mode, c.label(), c.link, ms(c.predicted_step_time_s), ms(c.measured_step_time_s), f"{c.ratio:.2f}"]


def _ranked(result: PlanResult) -> list[Candidate]:
    return [c for c in result.candidates if c.fits][:TOP]


def summary_line(result: PlanResult) -> str:
    fitting = sum(c.fits for c in result.candidates)
    return (
        f"global batch {result.global_batch_size}: {len(result.candidates)} splits over devices "
        f"{','.join(map(str, result.devices))}, {fitting} fit in {size_text(result.device_memory_bytes)}; "
        f"link {result.link.name} ({result.link.bandwidth_bytes_per_s / 1e9:.3g} GB/s, "
        f"{result.link.latency_s * 1e6:.3g} us)"
    )


def print_result(console: Console, result: PlanResult) -> None:
    console.print(summary_line(result))
    console.print(
        rich_table(
            f"the {min(TOP, len(_ranked(result)))} fastest splits that fit", HEADER, [_row(c) for c in _ranked(result)]
        )
    )
    if result.validation:
        console.print(
            rich_table(
                "validation: predicted vs measured step time",
                VALIDATION_HEADER,
                [_validation_row(c) for c in result.validation],
            )
        )
    for note in result.validation_notes:
        console.print(f"- {note}")
    if result.recommended:
        console.print(f"recommended: {result.recommended.label()}")
        for reason in result.why:
            console.print(f"  - {reason}")


def plot_step_times(result: PlanResult, path: Path) -> None:
    """Predicted step time against N per policy (the best micro batch of each), measured points on top."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    policies = sorted({(c.strategy, c.sync) for c in result.candidates if c.fits})
    for i, (strategy, sync) in enumerate(policies):
        best: dict[int, float] = {}
        for c in result.candidates:
            if c.fits and (c.strategy, c.sync) == (strategy, sync):
                best[c.world_size] = min(best.get(c.world_size, float("inf")), c.predicted_step_time_s)
        ns = sorted(best)
        ax.plot(ns, [best[n] * 1e3 for n in ns], marker="o", color=f"C{i}", label=f"{strategy} {sync}, predicted")
        # A validated mode has one micro batch (not the best): its own prediction (o) beside its measurement (x).
        for c in (c for c in result.validation if (c.strategy, c.sync) == (strategy, sync)):
            at = [c.predicted_step_time_s * 1e3, c.measured_step_time_s * 1e3]
            ax.plot([c.world_size] * 2, at, color=f"C{i}", linewidth=0.8)
            ax.scatter([c.world_size], at[:1], marker="o", s=40, facecolors="none", edgecolors=f"C{i}")
            ax.scatter([c.world_size], at[1:], marker="x", s=70, color=f"C{i}")
            ax.annotate(
                f"{c.link}, mb{c.micro_batch_size}",
                (c.world_size, at[1]),
                fontsize=7,
                xytext=(5, 0),
                textcoords="offset points",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices N")
    ax.set_ylabel("step time (ms)")
    ax.set_title(
        f"global batch {result.global_batch_size}, link {result.link.name}: best predicted per N (lines); "
        "validated: predicted (o), measured (x)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: PlanResult) -> str:
    p = result.profile
    lines = [
        f"# Plan: global batch {result.global_batch_size} for {result.config}",
        "",
        summary_line(result) + ".",
        "",
    ]
    if result.recommended:
        lines += [f"**Recommended: {result.recommended.label()}**", ""] + [f"- {r}" for r in result.why] + [""]
    lines += ["## Ranked splits", "", md_table(HEADER, [_row(c) for c in _ranked(result)]), ""]
    lines += [f"{len(result.candidates)} candidates in all, with every prediction, in plan.json.", ""]
    lines += ["## Step time against devices", "", "![predicted step time against N](plan.png)", ""]
    if result.validation or result.validation_notes:
        lines += ["## Validation", "", md_table(VALIDATION_HEADER, [_validation_row(c) for c in result.validation])]
        lines += [""] + [f"- {note}" for note in result.validation_notes] + [""]
    lines += [
        "## Inputs",
        "",
        f"- profile: {p.source}",
        f"- forward+backward per micro-step: {p.micro_step.intercept * 1e3:.3g} ms + "
        f"{p.micro_step.slope * 1e3:.3g} ms x micro batch; optimizer step {ms(p.optimizer_s)}; rest of a step "
        f"{ms(p.fixed_s)}",
        f"- model state: parameters {mib(p.params_bytes)}, gradients {mib(p.grad_bytes)}, optimizer "
        f"{mib(p.optimizer_bytes)}; activations {mib(p.activation.intercept)} + {mib(p.activation.slope)} x micro "
        "batch",
        f"- DDP: {p.buckets_per_sync:.3g} all-reduce calls per synced micro-step, {ms(p.sync_extra_s)} exposed "
        f"beyond the wire time; 2 processes on this host compute {p.colocated_slowdown:.2f}x slower than one "
        "(measured at N=2)",
        f"- FSDP: {p.fsdp_units} units; {ms(p.fsdp_extra_s)} per micro-step beyond compute and wire time, "
        f"optimizer step {ms(p.fsdp_optimizer_s)} (measured at N=2)",
        f"- link: {result.link.name}, {result.link.source}",
        "",
        "The model and its assumptions: docs/planner.md.",
    ]
    return "\n".join(lines) + "\n"


def write_all(result: PlanResult, out: Path) -> None:
    plot_step_times(result, out / "plan.png")
    write_text_atomic(out / "plan.md", markdown(result))
