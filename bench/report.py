"""Render benchmark results (the dict bench/run.py saves) as markdown tables and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIB = 2**20


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _plots(results: dict[str, Any], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["no_sync"]
    ks = [r["accum_steps"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sync in ("no_sync", "every_step"):
        ax1.plot(ks, [r[sync]["step_time_s"] * 1000 for r in rows], marker="o", label=sync)
        ax2.plot(ks, [r[sync]["allreduce_bytes_per_step"] / MIB for r in rows], marker="o", label=sync)
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
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.plot([r["micro_batch_size"] for r in mem], [r["peak_mem_bytes"] / MIB for r in mem], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro batch size (global batch fixed)")
    ax.set_ylabel("peak memory per process (MiB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "bench_memory.png", dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out_dir: Path) -> None:
    _plots(results, out_dir)
    m = results["machine"]
    ov = results["overhead"]
    parts = [
        "# Benchmarks",
        "",
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['gpu'] or 'no GPU'}, backend {m['backend']}, "
        f"Python {m['python']}, torch {m['torch']}, accelerate {m['accelerate']}, transformers {m['transformers']}.",
        f"Reproduce: `{results['command']}` (the numbers below are from that one run; candidates are interleaved so "
        "machine noise hits all of them alike). Step times are medians over the steps after the first "
        f"{results['warmup_steps_excluded']}. Model: tiny GPT-2 {results['model']}.",
        "",
        "## 1. Overhead: launcher vs a hand-written DDP loop vs the Transformers Trainer",
        "",
        "2 processes, micro batch 4, K=4 (global batch 32), AdamW, clip 1.0. Ratio to the plain loop; the spread is "
        "the min-max of the per-repeat medians.",
        "",
        _table(
            ["loop", "median step (ms)", "spread (ms)", "ratio to plain"],
            [
                [
                    name,
                    f"{r['median_step_time_s'] * 1000:.1f}",
                    f"{r['min_s'] * 1000:.1f}-{r['max_s'] * 1000:.1f}",
                    f"{r['ratio_to_plain']:.3f}",
                ]
                for name, r in ov.items()
            ],
        ),
        "",
        "## 2. What no_sync saves",
        "",
        "2 processes, micro batch 2; `every_step` all-reduces on every micro-step.",
        "",
        _table(
            [
                "K",
                "no_sync step (ms)",
                "every_step step (ms)",
                "time saved",
                "no_sync MiB/step",
                "every_step MiB/step",
                "bytes ratio",
            ],
            [
                [
                    str(r["accum_steps"]),
                    f"{r['no_sync']['step_time_s'] * 1000:.1f}",
                    f"{r['every_step']['step_time_s'] * 1000:.1f}",
                    f"{r['time_saving']:.0%}",
                    f"{r['no_sync']['allreduce_bytes_per_step'] / MIB:.2f}",
                    f"{r['every_step']['allreduce_bytes_per_step'] / MIB:.2f}",
                    f"{r['bytes_ratio']:.1f}x",
                ]
                for r in results["no_sync"]
            ],
        ),
        "",
        "![no_sync](bench_no_sync.png)",
        "",
        "## 3. Accumulation vs devices at global batch 32",
        "",
        _table(
            ["layout", "step (ms)", "samples/s", "tokens/s", "MiB all-reduced/step", "peak MiB/process"],
            [
                [
                    r["layout"],
                    f"{r['step_time_s'] * 1000:.1f}",
                    f"{r['samples_per_s']:.0f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['allreduce_bytes_per_step'] / MIB:.2f}",
                    f"{r['peak_mem_bytes'] / MIB:.0f}",
                ]
                for r in results["accumulation_vs_devices"]
            ],
        ),
        "",
        "## 4. Memory vs micro batch at a fixed global batch",
        "",
        f"1 process, tiny GPT-2 {results['memory_model']}, global batch {results['memory'][-1]['micro_batch_size']}. "
        "Peak memory is the CUDA allocator's peak on GPU and the process's peak resident set on CPU (which includes "
        "the ~350 MiB of the Python and torch runtime).",
        "",
        _table(
            ["micro batch", "K", "peak MiB/process", "step (ms)"],
            [
                [
                    str(r["micro_batch_size"]),
                    str(r["accum_steps"]),
                    f"{r['peak_mem_bytes'] / MIB:.0f}",
                    f"{r['step_time_s'] * 1000:.0f}",
                ]
                for r in results["memory"]
            ],
        ),
        "",
        "![memory](bench_memory.png)",
        "",
    ]
    (out_dir / "benchmarks.md").write_text("\n".join(parts))
