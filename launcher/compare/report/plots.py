"""The comparison's plots: loss curves with each mode's deviation from the reference, and cost by mode."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.ticker import MaxNLocator  # noqa: E402

from launcher.compare.report.tables import MIB, PHASE_NAMES  # noqa: E402
from launcher.compare.results import Comparison  # noqa: E402

ZERO_FLOOR = 1e-17  # a log axis cannot show 0: exact agreement is drawn here, and the legend says so


def plot_loss_curves(result: Comparison, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 2))
    for i, m in enumerate(result.modes):
        if not m.losses:
            continue
        # x = samples seen, not the step index: modes with other global batches (a sweep) take other numbers
        # of steps for the same data, and line up only by what they have trained on. At one global batch this
        # is the step index times the batch, the same curve.
        seen = m.samples_seen
        # One color per mode in both panels; baselines dashed.
        style = {"color": f"C{i}", "linestyle": "--" if m.baseline else "-"}
        top.plot(seen, m.losses, label=f"{m.name} ({m.expect})", alpha=0.85, **style)
        deviation = m.agreement.loss_deviation if m.agreement else None
        if deviation and not m.is_reference:
            bottom.plot(seen, [max(abs(d), ZERO_FLOOR) for d in deviation], marker=".", label=m.name, **style)
    ref, floor = result.reference_mode, result.floor
    if ref is not None and ref.losses and floor is not None and floor.loss_band:
        # The floor band: how far from the reference rounding alone takes the loss, times floor.multiple.
        low = [loss - band for loss, band in zip(ref.losses, floor.loss_band, strict=True)]
        high = [loss + band for loss, band in zip(ref.losses, floor.loss_band, strict=True)]
        top.fill_between(ref.samples_seen, low, high, color="0.8", alpha=0.6, label=f"floor band (x{floor.multiple:g})")
        bottom.plot(ref.samples_seen, [max(b, ZERO_FLOOR) for b in floor.loss_band], "k:", label="floor band")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("loss")
    top.set_title(f"loss per optimizer step, by samples seen (reference: {result.reference})")
    bottom.set_yscale("log")
    bottom.set_xlabel("samples seen (each point: one optimizer step)")
    bottom.set_ylabel("|loss - reference loss|")
    bottom.set_title(
        f"deviation from the reference, same step count only (exact zeros drawn at {ZERO_FLOOR:.0e})",
        fontsize="medium",
    )
    for panel in (top, bottom):
        if panel.lines:  # a comparison whose modes all failed has nothing to label
            panel.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stack_phases(ax, measured: list) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Each mode's phase medians (launcher.timing) as one stacked bar, in milliseconds."""
    left = [0.0] * len(measured)
    for phase, label in PHASE_NAMES.items():
        widths = [(m.cost.time_breakdown or {}).get(phase, 0.0) * 1000 for m in measured]
        ax.barh([m.name for m in measured], widths, left=left, label=label)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=4, frameon=False)


def plot_cost(result: Comparison, path: Path) -> None:
    measured = [m for m in result.modes if m.cost]
    names = [m.name for m in measured]
    colors = ["tab:gray" if m.baseline else "tab:blue" for m in measured]

    def sent(m) -> float:  # every gradient and parameter collective of a step, whatever the strategy
        return sum(c["bytes"] for kind, c in m.cost.collectives_per_step.items() if kind != "scalar")

    def state(m) -> float:
        return m.cost.params_bytes + m.cost.optimizer_bytes + m.cost.held_grad_bytes

    panels = [
        ("median optimizer-step time (ms)", [(m.cost.median_step_time_s or 0) * 1000 for m in measured], "{:.1f}"),
        ("collectives per optimizer step (MiB)", [sent(m) / MIB for m in measured], "{:.2f}"),
        ("model state per rank (MiB)", [state(m) / MIB for m in measured], "{:.2f}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 * len(names) + 2))
    for i, (ax, (title, values, fmt)) in enumerate(zip(axes, panels, strict=True)):
        if i == 0 and any(m.cost.time_breakdown for m in measured):
            _stack_phases(ax, measured)  # the step's phases side by side, the median step at the end
            bars = ax.barh(names, values, color="none", edgecolor="black", linewidth=0.6)
        else:
            bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.invert_yaxis()  # run order, top to bottom
        ax.margins(x=0.25)
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("cost by mode (gray: baselines expected to differ or cost more)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
