"""What a person sees while a run trains: a rich progress bar on a terminal, plain lines otherwise.

Only the main process creates one of these; the other ranks stay quiet.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class StepProgress:
    def __init__(self, total_steps: int, log_every_steps: int, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stdout)
        self.total_steps = total_steps
        self.log_every_steps = log_every_steps
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.start()

    def update(self, record: dict[str, Any]) -> None:
        rate = record["samples"] / record["step_time_s"] if record["step_time_s"] else 0.0
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {rate:,.1f} samples/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
        elif record["step"] % self.log_every_steps == 0 or record["step"] == self.total_steps:
            print(f"step {record['step']}/{self.total_steps}  {info}", flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout)
    table = Table(title="run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    totals = summary["totals"]
    rows = [
        ("launch", f"{summary['world_size']} process(es), {summary['backend']}, {summary['dtype']}"),
        (
            "batch",
            f"{summary['micro_batch_size']} x {summary['accum_steps']} x {summary['world_size']} "
            f"= {summary['global_batch_size']} samples/step",
        ),
        ("steps", str(summary["steps"])),
        ("loss", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"),
        ("median step time", f"{summary['median_step_time_s'] * 1000:.1f} ms"),
        ("samples/s", f"{summary['samples_per_s']:,.1f}"),
        ("sync rounds", f"{totals['sync_rounds']} ({totals['sync_rounds'] / max(summary['steps'], 1):g}/step)"),
        ("all-reduce", f"{totals['allreduce_bytes'] / 2**20:,.2f} MiB in {totals['allreduce_calls']} calls"),
        ("peak memory / process", f"{max(summary['peak_mem_bytes_per_rank']) / 2**20:,.1f} MiB"),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("output", summary["output_dir"]),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
