"""The comparison in the terminal: the plan before anything runs, and the tables and findings after."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from launcher.compare.config import CompareConfig
from launcher.compare.modes import PlannedMode
from launcher.compare.report.tables import (
    AGREEMENT_HEADER,
    COMM_HEADER,
    MEMORY_HEADER,
    agreement_rows,
    comm_rows,
    cost_header,
    cost_rows,
    eval_header,
    eval_rows,
    findings,
    floor_lines,
    headline,
    memory_rows,
)
from launcher.compare.results import Comparison


def make_console() -> Console:
    console = Console()
    # Not a terminal (CI log, pipe): rich would wrap the tables at 80 columns.
    return console if console.is_terminal else Console(width=180)


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def print_plan(console: Console, cfg: CompareConfig, planned: list[PlannedMode], warnings: list[str]) -> None:
    """The modes about to run and the preflight warnings, before anything starts."""
    rows = [
        [
            pm.name,
            pm.launch.split(" x mb")[0],
            f"{pm.plan.batch.micro_batch_size}",
            f"{pm.plan.batch.accum_steps}",
            f"{pm.plan.batch.global_batch_size}",
            pm.train.batch.sync,
            pm.train.batch.loss_normalization,
            pm.train.run.dtype,
            f"{pm.plan.optim.lr:.3g}",
            str(pm.plan.max_steps) if pm.plan.max_steps else f"{pm.plan.max_epochs:g} epochs",
            pm.mode.expect + (" (reference)" if pm.name == cfg.reference_name else ""),
        ]
        for pm in planned
    ]
    header = ["mode", "processes", "micro", "K", "global", "sync", "loss norm", "dtype", "lr", "steps", "expect"]
    train = planned[0].train
    title = f"compare: {cfg.base} (model {train.model.name}, data {train.data.name}) -> {cfg.output_dir}"
    console.print(rich_table(title, header, rows))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {line}", highlight=False)


def print_result(console: Console, result: Comparison) -> None:
    console.print(rich_table("evaluation (task quality per mode)", eval_header(result), eval_rows(result)))
    console.print(
        rich_table(
            "agreement with the reference (final weights, per-step loss)", AGREEMENT_HEADER, agreement_rows(result)
        )
    )
    console.print(rich_table("cost (as measured by each run)", cost_header(result), cost_rows(result)))
    console.print(rich_table("communication per optimizer step, by collective", COMM_HEADER, comm_rows(result)))
    console.print(rich_table("memory per rank, from the tensors", MEMORY_HEADER, memory_rows(result)))
    for line in [*findings(result), *floor_lines(result)[1:]]:
        console.print(f"- {line}", highlight=False)
    style = "green" if result.ok else "red"
    console.print(f"[{style}]{headline(result)}[/]  ->  {result.output_dir}/report.md", highlight=False)
