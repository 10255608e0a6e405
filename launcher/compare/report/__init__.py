"""What a comparison shows: rich tables in the terminal, report.md, loss_curves.png and cost.png.

Everything here renders a ``results.Comparison`` (what compare.json holds) and nothing else: the report can
be rebuilt from compare.json alone (``write_all(read_comparison(path), folder)``).
"""

from __future__ import annotations

from pathlib import Path

from launcher.compare.report.markdown import markdown
from launcher.compare.report.plots import plot_cost, plot_loss_curves
from launcher.compare.report.terminal import make_console, print_plan, print_result
from launcher.compare.results import Comparison
from launcher.files import write_text_atomic

__all__ = ["make_console", "markdown", "print_plan", "print_result", "write_all"]


def write_all(result: Comparison, out: Path) -> None:
    """report.md and both plots beside compare.json."""
    plot_loss_curves(result, out / "loss_curves.png")
    plot_cost(result, out / "cost.png")
    write_text_atomic(out / "report.md", markdown(result))
