"""The comparison's tables and sentences, shared by the terminal and report.md: rows of strings from a
``Comparison``, and nothing else."""

from __future__ import annotations

import math

from launcher.compare.config import DIFFER, EQUAL, SWEEP
from launcher.compare.results import BY_TOLERANCE, DISAGREES, Comparison, ModeResult

MIB = 2**20


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


AGREEMENT_HEADER = [
    "mode",
    "launch",
    "expect",
    "loss max |Δ|",
    "x floor",
    "rel L2",
    "of update",
    "x floor",
    "cosine",
    "verdict",
]


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def expectation(m: ModeResult) -> str:
    if m.is_control:
        return "control"
    return m.expect + (", baseline" if m.baseline else "")


def agreement_rows(result: Comparison) -> list[list[str]]:
    """Per mode: the largest per-step loss gap and the weights' distance (relative to the weights and to what
    training changed), each with its ratio to the control's, and the verdict."""
    rows = []
    for m in result.modes:
        a = m.agreement
        rows.append(
            [
                m.name,
                m.launch,
                expectation(m),
                sci(a.loss_max_abs_diff if a else None),
                ratio(a.loss_floor_ratio if a else None),
                sci(a.weights_rel_l2 if a else None),
                sci(a.update_rel_l2 if a else None),
                ratio(a.floor_ratio if a else None),
                "-" if not a else f"{a.weights_cosine:.12f}",
                m.verdict + (f" ({'; '.join(m.changed)})" if m.changed and m.verdict != DISAGREES else ""),
            ]
        )
    return rows


def floor_lines(result: Comparison) -> list[str]:
    """How the verdict was reached: the rule for each dtype, the measured floor, and what it can detect."""
    tol, floor = result.tolerance, result.floor
    lines = [
        f"float64 modes agree when the relative L2 distance of their final weights is at most {tol['float64']:.0e}: "
        "exact arithmetic leaves nothing but rounding far below that."
    ]
    if floor is None:
        # Said only where it happened: an all-float64 comparison needs no floor and judged nothing by tolerance.
        if any(m.agreement is not None and m.agreement.judged_by == BY_TOLERANCE for m in result.modes):
            lines.append(
                "No rounding floor was measured (floor.control=false, or the control failed): float32 and "
                f"mixed-precision modes were judged by the fixed tolerance {tol['float32']:.0e} of the weights' norm "
                "instead."
            )
        return lines
    lines.append(
        f"The floor of this comparison is measured by `{floor.control}`, {floor.how}. It ends "
        f"{sci(floor.update_rel_l2)} of the update away from the reference (||w - w_ref|| / ||w_ref - w_init||; "
        f"{sci(floor.weights_rel_l2)} of the weights' norm), with a largest per-step loss gap of "
        f"{sci(floor.loss_max_abs_diff)}. float32 and mixed-precision modes expected `equal` agree when both their "
        f"distance and their loss gap are within {floor.multiple:g}x the control's (the shaded band in the loss plot)."
    )
    share = floor.detectable_update_share
    if share is not None:
        lines.append(
            f"So this comparison can tell a mode from rounding when its weights differ by more than {share:.2%} of "
            "what training changed"
            + (
                "; that is most of the update: too few steps or too coarse a precision to judge agreement, which is "
                "reported as measured rather than claimed."
                if share >= 0.5
                else "."
            )
        )
    return lines


def cost_header(result: Comparison) -> list[str]:
    """tokens/s only for a language model: a classifier's items are its samples."""
    rates = ["samples/s", "tokens/s"] if result.task != "cls" else ["samples/s"]
    return [
        "mode",
        "median step",
        "x ref",
        *rates,
        "sync rounds/step",
        "all-reduce/step",
        "peak mem/proc",
        "train time",
        "launch wall",
    ]


def cost_rows(result: Comparison) -> list[list[str]]:
    with_tokens = result.task != "cls"
    rows = []
    for m in result.modes:
        c = m.cost
        if not c:
            rows.append([m.name, *["-"] * (8 if with_tokens else 7), f"{m.launch_wall_s:.1f} s"])
            continue
        rates = [rate(c.samples_per_s), *([rate(c.tokens_per_s)] if with_tokens else [])]
        rows.append(
            [
                m.name,
                ms(c.median_step_time_s),
                "-" if c.step_time_ratio is None else f"{c.step_time_ratio:.2f}",
                *rates,
                f"{c.sync_rounds_per_step:g}",
                mib(c.allreduce_bytes_per_step),
                mib(max(c.peak_mem_bytes_per_process)),
                f"{c.train_time_s:.1f} s",
                f"{m.launch_wall_s:.1f} s",
            ]
        )
    return rows


COLLECTIVES = [("all_reduce", "all-reduce"), ("reduce_scatter", "reduce-scatter"), ("all_gather", "all-gather")]
COMM_HEADER = ["mode", "launch", *[name for _, name in COLLECTIVES], "scalar"]


def _traffic(c: dict[str, float] | None) -> str:
    return "-" if not c else f"{c['calls']:g} x, {mib(c['bytes'])}"


def comm_rows(result: Comparison) -> list[list[str]]:
    """Per optimizer step, every collective the strategy called (calls, bytes requested) and the launcher's own
    scalar all-reduces: DDP's buckets are all-reduces, FSDP's shards reduce-scatters and all-gathers."""
    rows = []
    for m in result.modes:
        per_step = m.cost.collectives_per_step if m.cost else {}
        rows.append(
            [
                m.name,
                m.launch,
                *[_traffic(per_step.get(kind)) for kind, _ in COLLECTIVES],
                _traffic(per_step.get("scalar")),
            ]
        )
    return rows


PHASE_NAMES = {
    "data_s": "data",
    "forward_s": "forward",
    "backward_s": "backward",
    "comm_exposed_s": "comm exposed",
    "scalars_s": "scalars",
    "optimizer_s": "optimizer",
    "other_s": "other",
}
TIME_HEADER = ["mode", "median step", *PHASE_NAMES.values()]


def time_rows(result: Comparison) -> list[list[str]]:
    """Each phase's median per optimizer step (launcher.timing), on each mode's main process."""
    rows = []
    for m in result.modes:
        breakdown = m.cost.time_breakdown if m.cost else None
        step = m.cost.median_step_time_s if m.cost else None
        rows.append([m.name, ms(step), *[ms(breakdown[k]) if breakdown else "-" for k in PHASE_NAMES]])
    return rows


MEMORY_HEADER = [
    "mode",
    "launch",
    "parameters",
    "optimizer state",
    "gradients held",
    "activations/micro-step",
    "model state",
]


def memory_rows(result: Comparison) -> list[list[str]]:
    """Per rank (the largest over the ranks), from the tensors each holds."""
    rows = []
    for m in result.modes:
        c = m.cost
        if not c:
            rows.append([m.name, m.launch, *["-"] * 5])
            continue
        state = c.params_bytes + c.optimizer_bytes + c.held_grad_bytes
        rows.append(
            [
                m.name,
                m.launch,
                *[mib(v) for v in (c.params_bytes, c.optimizer_bytes, c.held_grad_bytes, c.activation_bytes, state)],
            ]
        )
    return rows


def lr_of(mode: ModeResult) -> str:
    """``6e-05 (linear x3)``: the resolved peak learning rate and how it was reached."""
    text = f"{mode.lr_resolved:.3g}"
    if not mode.lr or mode.lr_resolved == mode.lr:
        return text
    how = mode.lr_scaling if mode.lr_scaling != "none" else "by hand"
    return f"{text} ({how} x{mode.lr_resolved / mode.lr:.3g})"


# The headline metric of the evaluation table per task: (eval key, column, higher is better). Macro-F1 for
# classification: it is what the batch/lr studies report, and it does not flatter a majority-class model.
HEADLINE_METRIC = {"cls": ("macro_f1", "macro-F1", True), "lm": ("perplexity", "perplexity", False)}
EVAL_COLUMNS = {"cls": [("accuracy", "accuracy"), ("macro_f1", "macro-F1")], "lm": [("perplexity", "perplexity")]}
BEST = " (best)"


def eval_task(result: Comparison) -> str | None:
    """cls / lm from the modes' eval dicts, None when no mode evaluated."""
    evals = [m.eval for m in result.modes if m.eval]
    if not evals:
        return None
    return "cls" if any("accuracy" in e for e in evals) else "lm"


def eval_header(result: Comparison) -> list[str]:
    task = eval_task(result)
    head = ["mode", "launch", "global batch", "lr", "steps", "epochs", "final train loss"]
    if task is None:
        return head
    return [*head, "eval loss", *[name for _, name in EVAL_COLUMNS[task]]]


def eval_rows(result: Comparison) -> list[list[str]]:
    """One row per mode: batch, resolved lr, steps, epochs, final train loss, and the eval figures; the best
    value of the headline metric (eval's, or the final train loss without an eval set) is marked."""
    task = eval_task(result)
    key, _, higher = HEADLINE_METRIC[task] if task else ("final_train_loss", "", False)

    def value(m: ModeResult, name: str) -> float | None:
        if name == "final_train_loss":
            return m.losses[-1] if m.losses else None
        return (m.eval or {}).get(name)

    scored = [v for m in result.modes if (v := value(m, key)) is not None]
    best = (max if higher else min)(scored) if scored else None

    def cell(m: ModeResult, name: str) -> str:
        v = value(m, name)
        if v is None:
            return "-"
        text = f"{v:.4f}"
        # Ties at the shown precision are all marked: a difference the table cannot show is no ranking.
        return text + (BEST if name == key and text == f"{best:.4f}" else "")

    rows = []
    for m in result.modes:
        row = [
            m.name,
            m.launch,
            str(m.plan.global_batch_size),
            lr_of(m),
            "-" if not m.losses else str(len(m.losses)),
            "-" if m.epochs is None else f"{m.epochs:.2f}",
            cell(m, "final_train_loss"),
        ]
        if task is not None:
            row += [cell(m, "loss"), *[cell(m, name) for name, _ in EVAL_COLUMNS[task]]]
        rows.append(row)
    return rows


def eval_note(result: Comparison) -> str:
    task = eval_task(result)
    if task is None and any(m.eval_configured for m in result.modes):
        return "The modes have an eval set, but no mode that has one finished: nothing was evaluated."
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


def headline(result: Comparison) -> str:
    equal = [m for m in result.modes if m.expect == EQUAL and not m.is_reference and not m.is_control]
    swept = [m for m in result.modes if m.expect == SWEEP]
    agreeing = [m for m in equal if m.ok]
    reference = result.reference_mode
    if reference is not None and reference.failed:
        return f"the reference {result.reference!r} failed: nothing could be judged ({reference.error})"
    if not result.ok:
        return (
            f"{len(agreeing)} of {len(equal)} modes expected to equal {result.reference!r} agree; failed: "
            + ", ".join(result.failed)
        )
    judged = f"all {len(equal)} modes expected to equal {result.reference!r} agree with it" if equal else ""
    sweep = f"{len(swept)} modes swept against {result.reference!r} (reported, not judged)" if swept else ""
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


def _batch_norm_modes(result: Comparison) -> tuple[int | None, list[ModeResult]]:
    """The reference's samples per statistic and the modes whose runs had BatchNorm ([] when none had)."""
    ref = result.reference_mode
    ref_bn = ref.batch_norm if ref else None
    return (ref_bn["samples_per_statistic"] if ref_bn else None), [m for m in result.modes if m.batch_norm]


def batch_norm_rows(result: Comparison) -> list[list[str]]:
    ref_samples, modes = _batch_norm_modes(result)
    rows = []
    for m in modes:
        bn, a = m.batch_norm, m.agreement
        rows.append(
            [
                m.name,
                m.launch,
                f"{bn['layers']} layers" + (", synced over ranks" if bn["sync"] else ""),
                str(bn["samples_per_statistic"]),
                "-" if ref_samples is None else str(ref_samples),
                sci(a.weights_rel_l2 if a else None),
                sci(a.parameters_rel_l2 if a else None),
                sci(a.loss_max_abs_diff if a else None),
                m.verdict,
            ]
        )
    return rows


def batch_norm_finding(result: Comparison) -> str | None:
    """One line: samples per statistic and drift of every BatchNorm mode against the reference."""
    ref_samples, modes = _batch_norm_modes(result)
    judged = [m for m in modes if m.agreement and not m.is_reference]
    if ref_samples is None or not judged:
        return None
    per_mode = ", ".join(
        f"{m.name} {m.batch_norm['samples_per_statistic']} -> {sci(m.agreement.weights_rel_l2)} "
        f"({sci(m.agreement.parameters_rel_l2)})"
        for m in judged
    )
    return (
        f"BatchNorm, samples per statistic -> relative L2 to {result.reference} (parameters alone in parentheses; "
        f"the reference takes {ref_samples}): {per_mode}"
    )


def findings(result: Comparison) -> list[str]:
    """The comparison in sentences: what syncing every micro-step costs against the same split with
    no_sync, how far each baseline expected to differ ended from the reference, and what BatchNorm did."""
    lines = []
    measured = [m for m in result.modes if m.cost]
    for m in measured:
        if m.sync != "every_step":
            continue
        twin = next(
            (
                n
                for n in measured
                if n.sync == "no_sync" and n.plan == m.plan and n.loss_normalization == m.loss_normalization
            ),
            None,
        )
        if twin and twin.cost.allreduce_bytes_per_step:
            byte_ratio = m.cost.allreduce_bytes_per_step / twin.cost.allreduce_bytes_per_step
            time_ratio = m.cost.median_step_time_s / twin.cost.median_step_time_s
            lines.append(
                f"{m.name} (sync every micro-step) sends {byte_ratio:.1f}x the all-reduce bytes of {twin.name} "
                f"(no_sync) per optimizer step and takes {time_ratio:.2f}x its median step time"
            )
    for m in result.modes:
        if m.expect == DIFFER and m.agreement:
            a = m.agreement
            loss = "" if a.loss_max_abs_diff is None else f"; its loss is off by up to {a.loss_max_abs_diff:.2e}"
            lines.append(
                f"{m.name} (expected to differ) ends {a.weights_rel_l2:.2e} away from {result.reference} "
                f"(relative L2 of the weights){loss}"
            )
    bn_line = batch_norm_finding(result)
    return [*lines, bn_line] if bn_line else lines
