"""docs/benchmarks.md and its plots, from the results dict bench/run.py saves (docs/benchmarks.json)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from bench.stats import RESOLUTION
from launcher.timing import PHASES

MIB = 2**20


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _median_ms(runs: list[float]) -> str:
    return _ms(statistics.median(runs))


def _phases(breakdown: dict[str, float] | None) -> str:
    """``fwd 3.2 / bwd 5.0 / comm 1.1 / ...`` (ms), or ``-``."""
    if not breakdown:
        return "-"
    short = {"forward": "fwd", "backward": "bwd", "comm_exposed": "comm", "optimizer": "optim"}
    return " / ".join(f"{short.get(p, p)} {breakdown[p + '_s'] * 1000:.1f}" for p in (*PHASES, "other"))


def _overhead_table(section: dict) -> str:
    ratios = {r["of"]: r["text"] for r in section["ratios"] if r["to"] == "plain"}
    rows = [[name, _ms(median), ratios.get(name, "1 (the base)")] for name, median in section["median_step_s"].items()]
    return _table(["loop", "median step (ms)", "ratio to plain [95% interval]"], rows)


def _overhead_text(section: dict, title: str) -> list[str]:
    shape, split = section["shape"], section["split"]
    parts = [
        title,
        "",
        f"GPT-2's architecture from config, hidden {shape['hidden_size']}, {shape['num_layers']} layers, "
        f"seq_len {shape['seq_len']} "
        f"(about {section['parameters'] / 1e6:.1f} M parameters in the blocks); {split['processes']} processes, "
        f"micro batch {split['micro_batch_size']}, K={split['accum_steps']}, AdamW, clip 1.0. One launch, the "
        f"first {section['warmup_steps']} steps of each leg left out: {section['steps'][0]} steps of the launcher "
        f"alternating with the plain loop, then {section['steps'][1]} of the Trainer alternating with a new one.",
        "",
        _overhead_table(section),
        "",
        f"The launcher's step, by phase (ms, median): {_phases(section['launcher_breakdown'])}.",
    ]
    untimed = [r for r in section["ratios"] if r["to"] == "launcher_untimed"]
    if untimed:
        parts += [
            "",
            "The time breakdown's own cost (the launcher's steps with it against the next step without it, "
            f"`run.time_breakdown=none`): {untimed[0]['text']}.",
        ]
    return parts


def _plots(results: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["no_sync"]
    ks = [r["accum_steps"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sync in ("no_sync", "every_step"):
        ax1.plot(
            ks,
            [statistics.median(r["median_step_s"][f"k{r['accum_steps']}_{sync}"]) * 1000 for r in rows],
            marker="o",
            label=sync,
        )
        ax2.plot(ks, [r["allreduce_bytes_per_step"][sync] / MIB for r in rows], marker="o", label=sync)
    for ax, label in ((ax1, "median step time (ms)"), (ax2, "all-reduce MiB / optimizer step")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("accumulation steps K (2 processes, micro batch 2)")
        ax.set_ylabel(label)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_no_sync.png", dpi=110)
    plt.close(fig)

    mem = results["memory"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    micro = [r["micro_batch_size"] for r in mem]
    ax.plot(micro, [r["activation_bytes"] / MIB for r in mem], marker="o", label="activations saved for backward")
    ax.plot(micro, [r["model_state_bytes"] / MIB for r in mem], marker="o", label="parameters + gradients + AdamW")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro batch size (global batch fixed)")
    ax.set_ylabel("MiB per process")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_memory.png", dpi=110)
    plt.close(fig)


def _no_sync_part(results: dict[str, Any]) -> list[str]:
    rows = []
    for r in results["no_sync"]:
        k, figures = r["accum_steps"], r["median_step_s"]
        sent = r["allreduce_bytes_per_step"]
        comm = {
            sync: (r["breakdown"][f"k{k}_{sync}"] or {}).get("comm_exposed_s") for sync in ("no_sync", "every_step")
        }
        rows.append(
            [
                str(k),
                _median_ms(figures[f"k{k}_no_sync"]),
                _median_ms(figures[f"k{k}_every_step"]),
                r["ratio"]["text"],
                f"{sent['no_sync'] / MIB:.2f} / {sent['every_step'] / MIB:.2f}",
                f"{_ms(comm['no_sync'])} / {_ms(comm['every_step'])}",
            ]
        )
    return [
        "## What no_sync saves",
        "",
        "The tiny model, 2 processes, micro batch 2: one launch, a leg per K, each of two launcher runs (their "
        "own copies of the model), `batch.sync=no_sync` and `every_step`, a step of each in turn through the "
        "launcher's own step "
        f"({', '.join(str(r['steps']) + ' steps at K=' + str(r['accum_steps']) for r in results['no_sync'])}). At "
        "K=1 both policies do exactly the same work, so their ratio must be 1 within its interval: the check that "
        "the method does not invent differences.",
        "",
        _table(
            [
                "K",
                "no_sync (ms)",
                "every_step (ms)",
                "no_sync / every_step",
                "all-reduced MiB/step (no_sync / every_step)",
                "exposed comm (ms)",
            ],
            rows,
        ),
        "",
        "![no_sync](bench_no_sync.png)",
    ]


def _accumulation_part(section: dict) -> list[str]:
    figures, layouts = section["median_step_s"], section["layouts"]
    rows = [
        [
            name,
            f"{s['processes']} x {s['micro_batch_size']} x K={s['accum_steps']}",
            _ms(figures[name]),
            _phases(section["breakdown"][name]),
        ]
        for name, s in layouts.items()
    ]
    return [
        "## Accumulation against devices, at global batch 32",
        "",
        "The tiny model, one launch per layout, its median step after the warm-up. One process here is one core: "
        "`1x_K8` is the same work on half the hardware. No ratio is given: the layouts differ in world size, so "
        "they cannot share a launch, and separate launches of one program differ by several percent here. "
        "What a layout costs elsewhere is what `make plan` models.",
        "",
        _table(["layout", "processes x micro x K", "step (ms)", "phases (ms)"], rows),
    ]


def _memory_part(rows: list[dict]) -> list[str]:
    table = [
        [
            str(r["micro_batch_size"]),
            str(r["accum_steps"]),
            f"{r['activation_bytes'] / MIB:.1f}",
            f"{r['model_state_bytes'] / MIB:.1f}",
            f"{r['peak_rss_bytes'] / MIB:.0f}",
        ]
        for r in rows
    ]
    return [
        "## Memory against micro batch, at a fixed global batch",
        "",
        "The realistic model on 1 process. Activations are the bytes saved for backward in one micro-step and the "
        "model state is parameters, gradients and AdamW's moments, both read from the tensors (exact, so one run "
        "each); the peak resident set is the process's, runtime included.",
        "",
        _table(["micro batch", "K", "activations (MiB)", "model state (MiB)", "peak RSS (MiB)"], table),
        "",
        "![memory](bench_memory.png)",
    ]


def _data_part(section: dict) -> list[str]:
    files = [
        [
            f"{r['tokens']:.0e}",
            f"{r['file_bytes'] / MIB:,.0f}",
            f"{r['peak_rss_bytes'] / MIB:.0f}",
            f"{r['first_startup_s']:.1f}",
            f"{r['startup_s']:.1f}" if r["startup_s"] is not None else "-",
            f"{r['data_share']:.1%}",
        ]
        for r in section["token_files"]
    ]
    csv = section["csv"]
    text = [
        [
            f"{r['rows']:,}",
            f"{r['tokens']:,}",
            f"{r['tokenize_s']:.1f}" if r["tokenize_s"] is not None else "-",
            f"{r['rows_per_s']:,.0f}" if r["rows_per_s"] else "-",
            f"{r['miss_startup_s']:.1f} / {r['hit_startup_s']:.1f}"
            if r["miss_startup_s"]
            else f"{r['hit_startup_s']:.1f} (one launch)",
            f"{r['hit_peak_rss_bytes'] / MIB:.0f}",
            f"{r['data_share']:.1%}" if r["data_share"] is not None else "-",
        ]
        for r in csv["sizes"]
    ]
    return [
        "## Data at scale",
        "",
        f"2 processes, {section['steps']} steps each, the tiny models. Start-up is the launch's wall time less its "
        "training time (process start, imports, data, model, rendezvous). A token file's first launch also checks "
        "every id against the vocabulary (one read of the file, remembered beside the cache); the largest file "
        "is launched again to show start-up without that check. Peak RSS is the largest rank's.",
        "",
        _table(
            [
                "tokens",
                "file (MiB)",
                "peak RSS/rank (MiB)",
                "start-up (s)",
                "start-up, ids known (s)",
                "data share of step",
            ],
            files,
        ),
        "",
        f"A CSV of real text (Python's docstrings, `bench/docstring_text.py`), tokenized by {csv['tokenizer']} at "
        "seq_len 128 on the first launch (a store miss) and mapped from the store on the second (a hit); the "
        "smallest, the memory baseline, is launched once.",
        "",
        _table(
            [
                "rows",
                "tokens",
                "tokenize (s)",
                "rows/s",
                "start-up miss / hit (s)",
                "hit peak RSS/rank (MiB)",
                "data share",
            ],
            text,
        ),
    ]


def labelled_ratios(results: dict[str, Any]) -> dict[str, dict]:
    """Every ratio of a run, under a label that names it across runs (``tiny launcher / plain``)."""
    found = {
        f"{size} {r['of']} / {r['to']}": r
        for size, section in (("tiny", "overhead"), ("realistic", "realistic"))
        for r in results[section]["ratios"]
    }
    return found | {f"no_sync / every_step at K={row['accum_steps']}": row["ratio"] for row in results["no_sync"]}


def against_previous(previous: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """This run's ratios beside the previous run's (the results file it replaces): whether each pair of
    intervals overlaps, which is what two runs agreeing within their intervals means; None where either has
    too few pairs for an interval."""

    def interval(r: dict) -> tuple[float, float] | None:
        return (r["low"], r["high"]) if math.isfinite(r["high"]) else None

    try:
        before = labelled_ratios(previous)
    except (KeyError, TypeError):  # an older or partial file: nothing to set beside
        before = {}
    rows = []
    for label, now in labelled_ratios(results).items():
        if label not in before:
            continue
        a, b = interval(now), interval(before[label])
        overlap = None if a is None or b is None else a[0] <= b[1] and b[0] <= a[1]
        both = now["resolved"] and before[label]["resolved"]
        rows.append(
            {
                "ratio": label,
                "now": now["text"],
                "before": before[label]["text"],
                "overlap": overlap,
                "both_resolved": both,
            }
        )
    return {"command": previous.get("command"), "date": previous.get("date"), "ratios": rows}


def overlaps(section: dict[str, Any] | None) -> tuple[list[dict], list[str]]:
    """Of ``against_previous``'s rows, those with an interval in both runs, and the labels of those whose
    intervals lie apart."""
    judged = [r for r in (section["ratios"] if section else []) if r["overlap"] is not None]
    return judged, [r["ratio"] for r in judged if not r["overlap"]]


def _previous_part(section: dict[str, Any] | None) -> list[str]:
    if not section or not section["ratios"]:
        return ["## Against the previous run", "", "No earlier results in this folder to compare with."]
    rows = section["ratios"]
    judged, apart = overlaps(section)
    yes = {True: "yes", False: "**no**", None: "-"}
    about = [f"`{section['command']}`"] if section["command"] else []
    about += [section["date"]] if section["date"] else []
    when = f" ({', '.join(about)})" if about else ""
    return [
        "## Against the previous run",
        "",
        f"The results this run replaced{when}, ratio by ratio: two runs agree where their intervals overlap. "
        f"{len(judged) - len(apart)} of {len(judged)} overlap, {sum(r['both_resolved'] for r in judged)} "
        "of them resolved in both runs (an unresolved interval is wide, and overlaps easily).",
        "",
        _table(
            ["ratio", "this run", "the previous run", "intervals overlap"],
            [[r["ratio"], r["now"], r["before"], yes[r["overlap"]]] for r in rows],
        ),
    ]


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    _plots(results, out_dir)
    m = results["machine"]
    parts = [
        "# Benchmarks",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['gpu'] or 'no GPU'}, backend {m['backend']}, Python "
        f"{m['python']}, torch {m['torch']}, accelerate {m['accelerate']}, transformers {m['transformers']}. "
        f"Reproduce with `{results['command']}` ({results['wall_time_s'] / 60:.1f} minutes for this run).",
        "",
        "## Method",
        "",
        "Every ratio is of two candidates measured side by side, so that the machine's drift (other work, "
        "clocks, the other rank's pace) falls on both alike. Each rank is pinned to a core of its own, every "
        "candidate starts from the same weights and trains the same samples, packed into blocks of seq_len + 1 "
        "tokens so that every step does the same work (padded rows of varying length made one run's steps differ "
        "by up to 40%), and each run's first steps are left out (warm-up).",
        "",
        "The loops against the plain loop, and the two sync policies, are measured step by step in one process. One "
        "launch trains both candidates on their own copies of the model, a step of each in turn (the plain step "
        "runs in the launcher's after-step hook or a Trainer callback; the two policies are two launcher runs "
        "whose steps alternate, the order swapped every step). A launch runs its comparisons one after the other, "
        "in legs, which spares it a start-up each (13-40 s here). Whatever makes one launch faster than another "
        "(the same program's median step differed by several percent between launches here) falls on both; "
        "each pair of adjacent steps gives a ratio, and the figure is the Hodges-Lehmann estimate over their "
        "logs with the Wilcoxon signed-rank 95% interval (bench/stats.py), which the odd slow step does not "
        "widen. Layouts that differ in world size cannot share a launch: each gets one, and its median step "
        f"after the warm-up ({results['warmup_steps_excluded']} steps) is shown without a ratio (three rounds of "
        "whole launches, alternated, left those ratios' intervals 11-175% wide).",
        "",
        f"An interval wider than {RESOLUTION:.0%} is printed as unresolved, not as a figure.",
        "",
        f"The run keeps within {results['minutes']:g} minutes: the sections of fixed size run first, then "
        "each leg of an alternating launch runs to its step cap or its share of the time left, whichever comes "
        "first, so a slower machine gives fewer pairs and wider intervals, not a longer run. At this run's "
        f"pace, every leg at its step cap would have taken {results['minutes_to_step_caps']:.1f} minutes "
        f"(`--minutes {math.ceil(results['minutes_to_step_caps'])}`).",
        "",
        "Phases (`run.time_breakdown`, in metrics.jsonl and summary.json): data (waiting for the prepared window), "
        "fwd, bwd, comm (the gradient communication the backward did not hide), scalars (the one per-step "
        "all-reduce of the logged loss and the agreements), optim (clip, step, zero) and other.",
        "",
        *_overhead_text(
            results["overhead"], "## Overhead: the launcher against a hand-written DDP loop and the Trainer"
        ),
        "",
        *_overhead_text(results["realistic"], "## The same at a realistic size"),
        "",
        *_no_sync_part(results),
        "",
        *_accumulation_part(results["accumulation_vs_devices"]),
        "",
        *_memory_part(results["memory"]),
        "",
        *_data_part(results["data"]),
        "",
        *_previous_part(results.get("previous_run")),
        "",
    ]
    (out_dir / "benchmarks.md").write_text("\n".join(parts))
