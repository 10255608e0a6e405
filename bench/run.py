"""Benchmarks, one command (``make bench``): the launcher against a hand-written DDP loop and the Transformers
Trainer at two sizes, the cost of its own time breakdown, what no_sync saves, accumulation against devices,
memory against micro batch, and data at scale.

    python bench/run.py            # about 10 minutes on 2 CPU cores; writes docs/benchmarks.{json,md}
    python bench/run.py --quick    # a smoke run of every section (about 2 minutes)

The method (docs/benchmarks.md says why): every figure is a ratio of two candidates whose runs alternate in
rounds (the order rotated each round), each run short and its first WARMUP_STEPS steps left out, each rank
pinned to a core of its own, every candidate on the same initial weights and samples. A run's figure is the
median of its step times as its main process measured them; a ratio is the geometric mean of the per-round
ratios, with a 95% Student-t interval over them, and an interval wider than 4% is reported as unresolved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.launching import baseline_command, launch_once, train_command
from bench.stats import Ratio, paired_ratio, run_statistic
from launcher.launch import REPO
from launcher.rundir import RunDir, RunSummary

WARMUP_STEPS = 3
TRAINER, UNTIMED = "trainer", "launcher_untimed"
DOCS = REPO / "docs"


@dataclass(frozen=True)
class Shape:
    """A built-in GPT-2 and its synthetic data."""

    hidden_size: int
    num_layers: int
    num_heads: int
    seq_len: int
    num_samples: int

    @property
    def parameters(self) -> int:
        """About 12 h^2 per block (attention and MLP); the byte vocabulary's embeddings are small."""
        return 12 * self.num_layers * self.hidden_size**2


TINY = Shape(64, 2, 2, 64, 1024)  # overhead: the launcher's fixed costs dominate
REALISTIC = Shape(512, 8, 8, 256, 256)  # GPT-2-small-shaped, about 25 M parameters


@dataclass(frozen=True)
class Split:
    processes: int
    micro_batch_size: int
    accum_steps: int


def launcher_overrides(out: Path, shape: Shape, split: Split, steps: int) -> list[str]:
    return [
        f"run.output_dir={out}",
        "run.overwrite=true",
        f"run.max_steps={steps}",
        f"model.hidden_size={shape.hidden_size}",
        f"model.num_layers={shape.num_layers}",
        f"model.num_heads={shape.num_heads}",
        f"data.seq_len={shape.seq_len}",
        f"data.num_samples={shape.num_samples}",
        "data.packing=true",  # every sample seq_len tokens: every step the same work
        "batch.global_batch_size=null",
        f"batch.micro_batch_size={split.micro_batch_size}",
        f"batch.accum_steps={split.accum_steps}",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.grad_clip=1.0",
        "run.log_every_steps=100000",
    ]


@dataclass
class Candidate:
    """One program under test: ``run(tmp, index)`` launches it once and returns its step times."""

    name: str
    run: Callable[[Path, int], list[float]]
    summaries: list[RunSummary]


def launcher_candidate(name: str, shape: Shape, split: Split, steps: int, *extra: str) -> Candidate:
    summaries: list[RunSummary] = []

    def run(tmp: Path, index: int) -> list[float]:
        out = tmp / f"{name}_{index}"
        launch_once(
            train_command(split.processes, *launcher_overrides(out, shape, split, steps), *extra), tmp, out.name
        )
        folder = RunDir(out)
        summaries.append(folder.read_summary())
        return [m.step_time_s for m in folder.read_metrics()]

    return Candidate(name, run, summaries)


def baseline_candidate(loop: str, shape: Shape, split: Split, steps: int) -> Candidate:
    def run(tmp: Path, index: int) -> list[float]:
        out = tmp / f"{loop}_{index}.json"
        cmd = baseline_command(
            split.processes,
            loop,
            f"--out={out}",
            f"--micro-batch-size={split.micro_batch_size}",
            f"--accum-steps={split.accum_steps}",
            f"--steps={steps}",
            *[f"--{k.replace('_', '-')}={v}" for k, v in asdict(shape).items()],
        )
        launch_once(cmd, tmp, out.stem)
        return json.loads(out.read_text())["step_time_s"]

    return Candidate(loop, run, [])


def rounds(candidates: list[Candidate], count: int, tmp: Path, warmup: int = WARMUP_STEPS) -> dict[str, list[float]]:
    """Each candidate once per round, the order rotated every round; each run's median step time (seconds)."""
    figures: dict[str, list[float]] = {c.name: [] for c in candidates}
    for r in range(count):
        for c in candidates[r % len(candidates) :] + candidates[: r % len(candidates)]:
            figures[c.name].append(run_statistic(c.run(tmp, r), warmup))
            print(f"  round {r + 1}/{count} {c.name}: {figures[c.name][-1] * 1000:.1f} ms", flush=True)
    return figures


def ratio_entry(figures: dict[str, list[float]], name: str, base: str) -> dict:
    ratio: Ratio = paired_ratio(figures[name], figures[base])
    return {"of": name, "to": base, **asdict(ratio), "resolved": ratio.resolved, "text": ratio.text()}


def breakdown(summaries: list[RunSummary]) -> dict[str, float] | None:
    """The median over runs of each phase's median (launcher.timing)."""
    found = [s.median_time_breakdown for s in summaries if s.median_time_breakdown]
    if not found:
        return None
    return {k: sorted(b[k] for b in found)[len(found) // 2] for k in found[0]}


def overhead(tmp: Path, shape: Shape, split: Split, steps: int, count: int, third: str, warmup: int) -> dict:
    """The launcher against the plain loop and a third candidate: ``trainer`` (the Transformers Trainer) or
    ``launcher_untimed`` (the launcher without its time breakdown: what the breakdown costs)."""
    launcher = launcher_candidate("launcher", shape, split, steps)
    other = (
        baseline_candidate("trainer", shape, split, steps)
        if third == "trainer"
        else launcher_candidate(third, shape, split, steps, "run.time_breakdown=none")
    )
    candidates = [baseline_candidate("plain", shape, split, steps), launcher, other]
    figures = rounds(candidates, count, tmp, warmup)
    ratios = [ratio_entry(figures, "launcher", "plain"), ratio_entry(figures, third, "plain")]
    if third == "launcher_untimed":
        ratios.append(ratio_entry(figures, "launcher", third))
    return {
        "shape": asdict(shape),
        "parameters": shape.parameters,
        "split": asdict(split),
        "steps": steps,
        "rounds": count,
        "warmup_steps": warmup,
        "median_step_s": figures,
        "ratios": ratios,
        "launcher_breakdown": breakdown(launcher.summaries),
    }


def no_sync(tmp: Path, accums: list[int], steps: int, count: int) -> list[dict]:
    rows = []
    for k in accums:
        split = Split(2, 2, k)
        pair = [
            launcher_candidate(f"k{k}_{sync}", TINY, split, steps, f"batch.sync={sync}")
            for sync in ("no_sync", "every_step")
        ]
        figures = rounds(pair, count, tmp)
        sent = [c.summaries[0].totals.allreduce_bytes / c.summaries[0].steps for c in pair]
        rows.append(
            {
                "accum_steps": k,
                "ratio": ratio_entry(figures, pair[0].name, pair[1].name),
                "median_step_s": figures,
                "allreduce_bytes_per_step": {"no_sync": sent[0], "every_step": sent[1]},
                "breakdown": {c.name: breakdown(c.summaries) for c in pair},
            }
        )
    return rows


def accumulation_vs_devices(tmp: Path, steps: int, count: int) -> dict:
    layouts = {"1x_K8": Split(1, 4, 8), "2x_K4": Split(2, 4, 4), "2x_K1": Split(2, 16, 1)}
    candidates = [launcher_candidate(name, TINY, split, steps) for name, split in layouts.items()]
    figures = rounds(candidates, count, tmp)
    return {
        "layouts": {name: asdict(split) for name, split in layouts.items()},
        "median_step_s": figures,
        "ratios": [ratio_entry(figures, name, "2x_K4") for name in ("1x_K8", "2x_K1")],
        "breakdown": {c.name: breakdown(c.summaries) for c in candidates},
    }


def memory_vs_micro_batch(tmp: Path, micros: list[int]) -> list[dict]:
    """One process, the realistic model at a fixed global batch: what each micro-step holds, from the tensors
    (exact, so one run each), and the process's peak resident set."""
    rows = []
    for b in micros:
        c = launcher_candidate(f"mem{b}", REALISTIC, Split(1, b, max(micros) // b), 1)
        c.run(tmp, 0)
        s = c.summaries[0]
        m = s.memory_per_rank[0]
        rows.append(
            {
                "micro_batch_size": b,
                "accum_steps": max(micros) // b,
                "activation_bytes": m.activation_bytes,
                "held_grad_bytes": m.held_grad_bytes,
                "model_state_bytes": m.params_bytes + m.optimizer_bytes + m.held_grad_bytes,
                "peak_rss_bytes": s.peak_mem_bytes_per_rank[0],
            }
        )
    return rows


def machine() -> dict:
    import accelerate
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "transformers": transformers.__version__,
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one or two rounds and fewer steps: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where benchmarks.json and benchmarks.md go")
    args = parser.parse_args()
    from bench.data_scale import data_at_scale
    from bench.report import write_report

    quick = args.quick
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # Sized for 9 minutes on 2 cores (10 from a fresh clone): a launch costs about 4 s before its first
        # step, so rounds are many and runs short; the realistic model's steps take seconds, so two warm-up
        # steps are enough there.
        sections = [
            (
                "overhead",
                lambda: overhead(tmp, TINY, Split(2, 4, 4), 8 if quick else 30, 2 if quick else 4, UNTIMED, 3),
            ),
            (
                "realistic",
                lambda: overhead(tmp, REALISTIC, Split(2, 1, 4), 3 if quick else 5, 1 if quick else 5, TRAINER, 2),
            ),
            ("no_sync", lambda: no_sync(tmp, [1, 8], 8 if quick else 30, 2 if quick else 3)),
            ("accumulation_vs_devices", lambda: accumulation_vs_devices(tmp, 8 if quick else 20, 1 if quick else 2)),
            ("memory", lambda: memory_vs_micro_batch(tmp, [1, 4] if quick else [1, 2, 4])),
            ("data", lambda: data_at_scale(tmp, quick)),
        ]
        results: dict = {"machine": machine(), "command": "python bench/run.py" + (" --quick" if quick else "")}
        results["warmup_steps_excluded"] = WARMUP_STEPS  # the realistic section's own is in its entry
        for name, section in sections:
            print(f"{name} ...", flush=True)
            begun = time.perf_counter()
            results[name] = section()
            print(f"{name}: {time.perf_counter() - begun:.0f} s", flush=True)
    results["wall_time_s"] = time.perf_counter() - started
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, args.out_dir)
    print(f"wrote {args.out_dir / 'benchmarks.md'} in {results['wall_time_s']:.0f} s")


if __name__ == "__main__":
    main()
