"""What a comparison shows: rich tables in the terminal, report.md, loss_curves.png and cost.png.

Everything here renders the dictionary that compare.json holds (``compare.judge``), and nothing else:
the report can be rebuilt from compare.json alone.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

MIB = 2**20
ZERO_FLOOR = 1e-17  # a log axis cannot show 0: exact agreement is drawn here, and the legend says so


# ------------------------------------------------------------------------------------------------ numbers


def sci(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "0" if value == 0 else f"{value:.2e}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def mib(n_bytes: float | None) -> str:
    if n_bytes is None:
        return "-"
    return "0" if n_bytes == 0 else f"{n_bytes / MIB:,.2f} MiB"


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def processes_of(num_machines: int, world_size: int) -> str:
    """``2p`` on one machine; ``2m x 1p`` (machines x processes per machine) on several."""
    if num_machines == 1:
        return f"{world_size}p"
    return f"{num_machines}m x {world_size // num_machines}p"


def launch_of(mode: dict[str, Any]) -> str:
    """``2p x mb1 x K=8`` style (``2m x 1p x ...`` on two machines): processes x micro batch x accumulation,
    with what else differs."""
    p = mode["plan"]
    text = f"{processes_of(mode['num_machines'], p['world_size'])} x mb{p['micro_batch_size']} x K={p['accum_steps']}"
    extras = [
        mode["sync"] if mode["sync"] != "no_sync" else "",
        mode["loss_normalization"] if mode["loss_normalization"] != "tokens" else "",
        mode["precision"] if mode["precision"] != "no" else "",
    ]
    return ", ".join([text, *[e for e in extras if e]])


def agreement_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result["modes"]:
        a = m["agreement"] or {}
        rows.append(
            [
                m["name"],
                launch_of(m),
                m["expect"] + (", baseline" if m["baseline"] else ""),
                sci(a.get("loss_max_abs_diff")),
                sci(a.get("weights_max_abs_diff")),
                sci(a.get("weights_rel_l2")),
                "-" if not a else f"{a['weights_cosine']:.12f}",
                m["verdict"],
            ]
        )
    return rows


AGREEMENT_HEADER = ["mode", "launch", "expect", "loss max |Δ|", "weights max |Δ|", "rel L2", "cosine", "verdict"]
COST_HEADER = [
    "mode",
    "median step",
    "x ref",
    "samples/s",
    "tokens/s",
    "sync rounds/step",
    "all-reduce/step",
    "peak mem/proc",
    "train time",
    "launch wall",
]


def cost_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result["modes"]:
        c = m["cost"]
        if not c:
            rows.append([m["name"], *["-"] * 8, f"{m['launch_wall_s']:.1f} s"])
            continue
        ratio = c["step_time_ratio"]
        rows.append(
            [
                m["name"],
                ms(c["median_step_time_s"]),
                "-" if ratio is None else f"{ratio:.2f}",
                rate(c["samples_per_s"]),
                rate(c["tokens_per_s"] if c["tokens_per_s"] is not None else c["items_per_s"]),
                f"{c['sync_rounds_per_step']:g}",
                mib(c["allreduce_bytes_per_step"]),
                mib(max(c["peak_mem_bytes_per_process"])),
                f"{c['train_time_s']:.1f} s",
                f"{m['launch_wall_s']:.1f} s",
            ]
        )
    return rows


def lr_of(mode: dict[str, Any]) -> str:
    """``6e-05 (linear x3)``: the resolved peak learning rate and how it was reached."""
    text = f"{mode['lr_resolved']:.3g}"
    if mode["lr_scaling"] == "none" or not mode["lr"]:
        return text
    return f"{text} ({mode['lr_scaling']} x{mode['lr_resolved'] / mode['lr']:.3g})"


# The headline metric of the evaluation table per task: (eval key, column, higher is better). Macro-F1 for
# classification: it is what the batch/lr studies report, and it does not flatter a majority-class model.
HEADLINE_METRIC = {"cls": ("macro_f1", "macro-F1", True), "lm": ("perplexity", "perplexity", False)}
EVAL_COLUMNS = {"cls": [("accuracy", "accuracy"), ("macro_f1", "macro-F1")], "lm": [("perplexity", "perplexity")]}
BEST = " (best)"


def eval_task(result: dict[str, Any]) -> str | None:
    """cls / lm from the modes' eval dicts, None when no mode evaluated."""
    evals = [m["eval"] for m in result["modes"] if m.get("eval")]
    if not evals:
        return None
    return "cls" if any("accuracy" in e for e in evals) else "lm"


def eval_header(result: dict[str, Any]) -> list[str]:
    task = eval_task(result)
    head = ["mode", "launch", "global batch", "lr", "steps", "epochs", "final train loss"]
    if task is None:
        return head
    return [*head, "eval loss", *[name for _, name in EVAL_COLUMNS[task]]]


def eval_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per mode: batch, resolved lr, steps, epochs, final train loss, and the eval figures; the best
    value of the headline metric (eval's, or the final train loss without an eval set) is marked."""
    task = eval_task(result)
    if task is None:
        key, higher = "final_train_loss", False
    else:
        key, _, higher = HEADLINE_METRIC[task]

    def value(m: dict[str, Any], name: str) -> float | None:
        if name == "final_train_loss":
            return m["losses"][-1] if m["losses"] else None
        return (m.get("eval") or {}).get(name)

    scored = [v for m in result["modes"] if (v := value(m, key)) is not None]
    best = (max if higher else min)(scored) if scored else None

    def cell(m: dict[str, Any], name: str) -> str:
        v = value(m, name)
        if v is None:
            return "-"
        text = f"{v:.4f}"
        # Ties at the shown precision are all marked: a difference the table cannot show is no ranking.
        return text + (BEST if name == key and text == f"{best:.4f}" else "")

    rows = []
    for m in result["modes"]:
        row = [
            m["name"],
            launch_of(m),
            str(m["plan"]["global_batch_size"]),
            lr_of(m),
            "-" if not m["losses"] else str(len(m["losses"])),
            "-" if m.get("epochs") is None else f"{m['epochs']:.2f}",
            cell(m, "final_train_loss"),
        ]
        if task is not None:
            row += [cell(m, "loss"), *[cell(m, name) for name, _ in EVAL_COLUMNS[task]]]
        rows.append(row)
    return rows


def eval_note(result: dict[str, Any]) -> str:
    task = eval_task(result)
    if task is None:
        return (
            "No mode has an eval set (eval.fraction, eval.file or eval.split): the final train loss is the only "
            "quality figure, marked where lowest; it is measured on training batches, not held-out data."
        )
    key, name, higher = HEADLINE_METRIC[task]
    return (
        f"From each run's `summary.json` `eval` (the last evaluation, on held-out data); {name} is marked where "
        f"{'highest' if higher else 'lowest'}. lr is the resolved peak (optim.lr scaled with the global batch)."
    )


def headline(result: dict[str, Any]) -> str:
    equal = [m for m in result["modes"] if m["expect"] == "equal" and not m["is_reference"]]
    swept = [m for m in result["modes"] if m["expect"] == "sweep"]
    agreeing = [m for m in equal if m["ok"]]
    if not result["ok"]:
        return (
            f"{len(agreeing)} of {len(equal)} modes expected to equal {result['reference']!r} agree; failed: "
            + ", ".join(result["failed"])
        )
    judged = f"all {len(equal)} modes expected to equal {result['reference']!r} agree with it" if equal else ""
    sweep = f"{len(swept)} modes swept against {result['reference']!r} (reported, not judged)" if swept else ""
    return "; ".join(part for part in (judged, sweep) if part) or "only the reference ran"


BATCH_NORM_HEADER = [
    "mode",
    "launch",
    "BatchNorm",
    "samples/statistic",
    "reference's",
    "rel L2",
    "rel L2, parameters",
    "loss max |Δ|",
    "verdict",
]
BATCH_NORM_WHY = (
    "BatchNorm normalizes each forward with the mean and variance of that forward's samples, so a mode whose "
    "statistics cover fewer samples than the reference's trains another function, whatever the loss scaling: "
    "accumulation runs K separate forwards, and nothing done to the loss merges their statistics. SyncBatchNorm "
    "all-reduces the statistics over the ranks of one micro-step (processes x micro batch samples): that recovers "
    "the big batch for DDP without accumulation, but not across the micro-steps of a window, which are separate "
    "forwards in time. The running statistics (compared with the weights; used in eval) follow the same split, "
    "and under DDP with plain BatchNorm they are rank 0's alone (DDP broadcasts rank 0's buffers)."
)


def _batch_norm_modes(result: dict[str, Any]) -> tuple[int | None, list[dict[str, Any]]]:
    """The reference's samples per statistic and the modes whose runs had BatchNorm ([] when none had)."""
    ref = next((m for m in result["modes"] if m["is_reference"]), None)
    ref_bn = ref.get("batch_norm") if ref else None
    return (ref_bn["samples_per_statistic"] if ref_bn else None), [m for m in result["modes"] if m.get("batch_norm")]


def batch_norm_rows(result: dict[str, Any]) -> list[list[str]]:
    ref_samples, modes = _batch_norm_modes(result)
    rows = []
    for m in modes:
        bn, a = m["batch_norm"], m["agreement"] or {}
        rows.append(
            [
                m["name"],
                launch_of(m),
                f"{bn['layers']} layers" + (", synced over ranks" if bn["sync"] else ""),
                str(bn["samples_per_statistic"]),
                "-" if ref_samples is None else str(ref_samples),
                sci(a.get("weights_rel_l2")),
                sci(a.get("parameters_rel_l2")),
                sci(a.get("loss_max_abs_diff")),
                m["verdict"],
            ]
        )
    return rows


def batch_norm_finding(result: dict[str, Any]) -> str | None:
    """One line: samples per statistic and drift of every BatchNorm mode against the reference."""
    ref_samples, modes = _batch_norm_modes(result)
    judged = [m for m in modes if m["agreement"] and not m["is_reference"]]
    if ref_samples is None or not judged:
        return None
    per_mode = ", ".join(
        f"{m['name']} {m['batch_norm']['samples_per_statistic']} -> {sci(m['agreement']['weights_rel_l2'])} "
        f"({sci(m['agreement'].get('parameters_rel_l2'))})"
        for m in judged
    )
    return (
        f"BatchNorm, samples per statistic -> relative L2 to {result['reference']} (parameters alone in parentheses; "
        f"the reference takes {ref_samples}): {per_mode}"
    )


def findings(result: dict[str, Any]) -> list[str]:
    """The comparison in sentences: what syncing every micro-step costs against the same split with
    no_sync, how far each baseline expected to differ ended from the reference, and what BatchNorm did."""
    lines = []
    measured = [m for m in result["modes"] if m["cost"]]
    for m in measured:
        if m["sync"] != "every_step":
            continue
        twin = next(
            (
                n
                for n in measured
                if n["sync"] == "no_sync"
                and n["plan"] == m["plan"]
                and n["loss_normalization"] == m["loss_normalization"]
            ),
            None,
        )
        if twin and twin["cost"]["allreduce_bytes_per_step"]:
            byte_ratio = m["cost"]["allreduce_bytes_per_step"] / twin["cost"]["allreduce_bytes_per_step"]
            time_ratio = m["cost"]["median_step_time_s"] / twin["cost"]["median_step_time_s"]
            lines.append(
                f"{m['name']} (sync every micro-step) sends {byte_ratio:.1f}x the all-reduce bytes of {twin['name']} "
                f"(no_sync) per optimizer step and takes {time_ratio:.2f}x its median step time"
            )
    for m in result["modes"]:
        if m["expect"] == "differ" and m["agreement"]:
            a = m["agreement"]
            loss = "" if a["loss_max_abs_diff"] is None else f"; its loss is off by up to {a['loss_max_abs_diff']:.2e}"
            lines.append(
                f"{m['name']} (expected to differ) ends {a['weights_rel_l2']:.2e} away from {result['reference']} "
                f"(relative L2 of the weights){loss}"
            )
    bn_line = batch_norm_finding(result)
    return [*lines, bn_line] if bn_line else lines


# ----------------------------------------------------------------------------------------------- terminal


def make_console() -> Console:
    console = Console()
    # Not a terminal (CI log, pipe): rich would wrap the tables at 80 columns.
    return console if console.is_terminal else Console(width=180)


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def print_plan(console: Console, cfg: Any, planned: list[Any], warnings: list[str]) -> None:
    """The modes about to run and the preflight warnings, before anything starts."""
    rows = [
        [
            pm.name,
            processes_of(pm.mode.num_machines, pm.plan.world_size),
            f"{pm.plan.micro_batch_size}",
            f"{pm.plan.accum_steps}",
            f"{pm.plan.global_batch_size}",
            pm.train.batch.sync,
            pm.train.batch.loss_normalization,
            pm.train.run.dtype,
            f"{pm.optim.lr:.3g}",
            str(pm.known_max_steps) if pm.known_max_steps else f"{pm.train.run.max_epochs:g} epochs",
            pm.mode.expect + (" (reference)" if pm.name == cfg.reference_name else ""),
        ]
        for pm in planned
    ]
    header = ["mode", "processes", "micro", "K", "global", "sync", "loss norm", "dtype", "lr", "steps", "expect"]
    console.print(_table(f"compare: {cfg.base} -> {cfg.output_dir}", header, rows))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {line}", highlight=False)


def print_result(console: Console, result: dict[str, Any]) -> None:
    console.print(_table("evaluation (task quality per mode)", eval_header(result), eval_rows(result)))
    console.print(
        _table("agreement with the reference (final weights, per-step loss)", AGREEMENT_HEADER, agreement_rows(result))
    )
    console.print(_table("cost (as measured by each run)", COST_HEADER, cost_rows(result)))
    for line in findings(result):
        console.print(f"- {line}", highlight=False)
    style = "green" if result["ok"] else "red"
    console.print(f"[{style}]{headline(result)}[/]  ->  {result['output_dir']}/report.md", highlight=False)


# ----------------------------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"  # "|Δ|" must not split a cell

    return "\n".join([line(header), "|" + "---|" * len(header), *[line(row) for row in rows]])


def batch_norm_section(result: dict[str, Any]) -> list[str]:
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
        _md_table(BATCH_NORM_HEADER, rows),
        "",
    ]
    if any(m["batch_norm"]["sync"] for m in result["modes"] if m.get("batch_norm")):
        parts += [
            "SyncBatchNorm's own all-reduces (per layer and micro-step, one in forward and one in backward) are "
            "not in the cost table's all-reduce columns, which count gradient buckets; they show in the step time.",
            "",
        ]
    return parts


def markdown(result: dict[str, Any]) -> str:
    tol = result["tolerance"]
    batches = {m["plan"]["global_batch_size"] for m in result["modes"]}
    steps = {len(m["losses"]) for m in result["modes"] if m["losses"]}
    batch_text = f"global batch {batches.pop()} samples/step" if len(batches) == 1 else "global batch per mode"
    steps_text = f"{steps.pop()} optimizer steps" if len(steps) == 1 else "optimizer steps per mode"
    parts = [
        "# Comparison: accumulation, DDP and both",
        "",
        f"Base config `{result['base']}`, {batch_text}, {steps_text}, reference mode `{result['reference']}`. "
        f"A mode expected `equal` agrees when the relative L2 distance of its final weights to the reference's "
        f"is within {tol['float64']:.0e} (float64) or {tol['float32']:.0e} (float32, a multiple of the measured "
        "floor).",
        "",
        f"**{headline(result)}.**",
        "",
        *[f"- {line}" for line in findings(result)],
        "",
    ]
    if result["warnings"]:
        parts += ["## Preflight warnings", "", *[f"- {w}" for w in result["warnings"]], ""]
    parts += ["## Evaluation", "", eval_note(result), "", _md_table(eval_header(result), eval_rows(result)), ""]
    parts += [
        "## Agreement",
        "",
        "Read from each run's `model.safetensors` and `metrics.jsonl`: the largest per-step difference of the "
        "logged loss (between runs with the same number of optimizer steps only), and the final weights' largest "
        "absolute difference, relative L2 distance (||w - w_ref|| / ||w_ref||) and cosine similarity. Launch: "
        "processes (p) x micro batch per process (mb) x accumulation steps (K).",
        "",
        _md_table(AGREEMENT_HEADER, agreement_rows(result)),
        "",
        "![loss curves](loss_curves.png)",
        "",
        *batch_norm_section(result),
        "## Cost",
        "",
        "From each run's `summary.json`: median optimizer-step time and its ratio to the reference, throughput, "
        "gradient sync rounds and all-reduce bytes per optimizer step (counted in DDP's comm hook), the largest "
        "peak memory over the processes, time in training steps, and the launch's wall time (process start, "
        "imports and process group included).",
        "",
        _md_table(COST_HEADER, cost_rows(result)),
        "",
        "![cost](cost.png)",
        "",
    ]
    failed = [m for m in result["modes"] if m["status"] == "failed"]
    for m in failed:
        parts += [f"## Mode `{m['name']}` failed: {m.get('error', '')}", "", f"Log: `{m['log']}`", "", "```"]
        parts += [*m.get("log_tail", []), "```", ""]
    versions = result.get("versions") or {}
    if versions:
        parts += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 2))
    for i, m in enumerate(result["modes"]):
        if not m["losses"]:
            continue
        # x = samples seen, not the step index: modes with other global batches (a sweep) take other numbers
        # of steps for the same data, and line up only by what they have trained on. At one global batch this
        # is the step index times the batch, the same curve.
        seen = m["samples_seen"]
        # One color per mode in both panels; baselines dashed.
        style = {"color": f"C{i}", "linestyle": "--" if m["baseline"] else "-"}
        top.plot(seen, m["losses"], label=f"{m['name']} ({m['expect']})", alpha=0.85, **style)
        deviation = (m["agreement"] or {}).get("loss_deviation")
        if deviation and not m["is_reference"]:
            bottom.plot(seen, [max(abs(d), ZERO_FLOOR) for d in deviation], marker=".", label=m["name"], **style)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("loss")
    top.set_title(f"loss per optimizer step, by samples seen (reference: {result['reference']})")
    top.legend(fontsize="small")
    bottom.set_yscale("log")
    bottom.set_xlabel("samples seen (each point: one optimizer step)")
    bottom.set_ylabel("|loss - reference loss|")
    bottom.set_title(
        f"deviation from the reference, same step count only (exact zeros drawn at {ZERO_FLOOR:.0e})",
        fontsize="medium",
    )
    if bottom.lines:
        bottom.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    measured = [m for m in result["modes"] if m["cost"]]
    names = [m["name"] for m in measured]
    colors = ["tab:gray" if m["baseline"] else "tab:blue" for m in measured]
    panels = [
        ("median optimizer-step time (ms)", [m["cost"]["median_step_time_s"] * 1000 for m in measured], "{:.1f}"),
        (
            "all-reduce per optimizer step (MiB)",
            [m["cost"]["allreduce_bytes_per_step"] / MIB for m in measured],
            "{:.2f}",
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(names) + 2))
    for ax, (title, values, fmt) in zip(axes, panels, strict=True):
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=3, fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.invert_yaxis()  # run order, top to bottom
        ax.margins(x=0.25)
    axes[1].set_yticklabels([])
    fig.suptitle("cost by mode (gray: baselines expected to differ or cost more)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict[str, Any], out: Path) -> None:
    """report.md and both plots beside compare.json."""
    from launcher.metrics import write_text_atomic

    plot_loss_curves(result, out / "loss_curves.png")
    plot_cost(result, out / "cost.png")
    write_text_atomic(out / "report.md", markdown(result))
