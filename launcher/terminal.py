"""What a person sees while a run trains: a rich progress bar on a terminal, plain lines otherwise.

Only the main process creates one of these; the other ranks stay quiet.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from launcher.rundir import RunSummary, StepRecord


def _bar(console: Console, label: str, clock: ProgressColumn) -> Progress:
    """label | bar | done/total | the task's ``info`` field | a clock."""
    return Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), clock, console=console
    )


class _LiveLines:
    """A rich progress bar on a terminal, plain lines otherwise: what both progress views share."""

    _progress: Progress | None = None

    def note(self, line: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self._progress is not None:
            self._progress.console.print(line, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class StepProgress(_LiveLines):
    def __init__(self, total_steps: int, log_every_steps: int, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stdout)
        self.total_steps = total_steps
        self.log_every_steps = log_every_steps
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = _bar(self.console, "[bold]train", TimeRemainingColumn())
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.start()

    def update(self, record: StepRecord) -> None:
        rate = record.samples / record.step_time_s if record.step_time_s else 0.0
        info = f"loss {record.loss:.4f}  lr {record.lr:.2e}  {rate:,.1f} samples/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=record.step, info=info)
        elif record.step % self.log_every_steps == 0 or record.step == self.total_steps:
            print(f"step {record.step}/{self.total_steps}  {info}", flush=True)


class RowProgress(_LiveLines):
    """Rows tokenized so far: a bar on a terminal, a line per chunk otherwise."""

    def __init__(self, what: str, total_rows: int, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stdout)
        self.what, self.total_rows = what, total_rows
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = _bar(self.console, f"[bold]tokenize {what}", TimeRemainingColumn())
            self._task = self._progress.add_task("tokenize", total=total_rows, info="rows")
            self._progress.start()

    def update(self, done_rows: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done_rows)
        else:
            print(f"tokenizing {self.what}: {done_rows:,} of {self.total_rows:,} rows", flush=True)


def describe_eval(result: dict[str, Any]) -> str:
    """One line for an eval result dict (launcher.evaluate): loss and the task's metrics."""
    line = f"step {result['step']}: loss {result['loss']:.4f}"
    if "accuracy" in result:
        return f"{line} accuracy {result['accuracy']:.4f} macro_f1 {result['macro_f1']:.4f} (n={result['num_samples']})"
    return f"{line} perplexity {result['perplexity']:.3f} (n={result['num_samples']}, {result['tokens']} tokens)"


def breakdown_text(breakdown: dict[str, float]) -> str:
    """``fwd 3.2, bwd 5.0, comm 1.1, optim 0.9, other 0.2 ms``: the phases of 0.05 ms or more."""
    short = {"forward": "fwd", "backward": "bwd", "comm_exposed": "comm", "optimizer": "optim"}
    parts = [f"{short.get(k[:-2], k[:-2])} {v * 1000:.1f}" for k, v in breakdown.items() if v >= 5e-5]
    return ", ".join(parts) + " ms"


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout)
    table = Table(title="run summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    totals, s = summary.totals, summary
    rows = [
        ("launch", f"{s.world_size} process(es), {s.backend}, {s.dtype}"),
        ("batch", f"{s.micro_batch_size} x {s.accum_steps} x {s.world_size} = {s.global_batch_size} samples/step"),
        ("steps", str(s.steps)),
        ("loss", f"{s.first_loss:.4f} -> {s.final_loss:.4f}"),
        ("median step time", f"{s.median_step_time_s * 1000:.1f} ms"),
        *([("where it goes (median)", breakdown_text(s.median_time_breakdown))] if s.median_time_breakdown else []),
        ("samples/s", f"{s.samples_per_s:,.1f}"),
        ("sync rounds", f"{totals.sync_rounds} ({totals.sync_rounds / max(s.steps, 1):g}/step)"),
        ("all-reduce", f"{totals.allreduce_bytes / 2**20:,.2f} MiB in {totals.allreduce_calls} calls"),
        ("peak memory / process", f"{max(s.peak_mem_bytes_per_rank) / 2**20:,.1f} MiB"),
        ("wall time", f"{s.wall_time_s:.1f} s" + (" (the last attempt)" if s.restarts else "")),
        *([("restarts", f"{len(s.restarts)} ({s.retrained_steps} step(s) trained again)")] if s.restarts else []),
        *([("eval", describe_eval(s.eval))] if s.eval else []),
        ("output", s.output_dir),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)


class ModesProgress(_LiveLines):
    """The live view of a comparison: one row per mode (waiting, running with its step count, done or
    failed) on a terminal; on a pipe or file, one plain line when a mode starts and when it ends."""

    def __init__(self, modes: list[tuple[str, int | None]], console: Console | None = None) -> None:
        """``modes``: (name, optimizer steps), None where the run resolves them itself (run.max_epochs)."""
        self.console = console or Console(file=sys.stdout)
        self._tasks: dict[str, Any] = {}
        self._progress: Progress | None = None
        if self.console.is_terminal:
            self._progress = _bar(self.console, "[bold]{task.fields[mode]:<16}", TimeElapsedColumn())
            for name, total in modes:
                self._tasks[name] = self._progress.add_task(name, total=total, mode=name, info="[dim]waiting")
            self._progress.start()

    def start(self, name: str, detail: str) -> None:
        if self._progress is not None:
            self._progress.reset(self._tasks[name], start=True)
            self._progress.update(self._tasks[name], info=f"running: {detail}")
        else:
            self._say(f"mode {name}: start ({detail})")

    def update(self, name: str, steps_done: int, loss: float | None, total_steps: int | None = None) -> None:
        if self._progress is not None:
            info = f"running: loss {loss:.4f}" if loss is not None else "running: starting processes"
            self._progress.update(self._tasks[name], completed=steps_done, info=info, total=total_steps)

    def finish(self, name: str, ok: bool, detail: str, log_tail: list[str] = ()) -> None:
        mark = "[green]done" if ok else "[red]FAILED"
        if self._progress is not None:
            task = self._tasks[name]
            # The last step may land between two looks at metrics.jsonl: a finished run shows all of them.
            state = self._progress.tasks[task]
            done = state.total if ok and state.total is not None else state.completed
            self._progress.update(
                task, completed=done, total=done if state.total is None else None, info=f"{mark}[/]: {detail}"
            )
            self._progress.stop_task(self._tasks[name])
        else:
            self._say(f"mode {name}: {'done' if ok else 'FAILED'} ({detail})")
        if not ok and log_tail:
            self._say(f"--- last lines of mode {name}'s log ---")
            for line in log_tail:
                self._say(line)

    def _say(self, line: str) -> None:
        # markup off: a log line may hold [brackets] that rich would read as styles.
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
