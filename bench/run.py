"""Benchmarks, one command (``make bench``): the launcher against a hand-written DDP loop and the Transformers
Trainer at two sizes, the cost of its own time breakdown, what no_sync saves, accumulation against devices,
memory against micro batch, and data at scale.

    python bench/run.py            # 7 minutes at most on 2 CPU cores; writes docs/benchmarks.{json,md}
    python bench/run.py --quick    # a smoke run of every section (about 4 minutes)

The method (docs/benchmarks.md says why): every figure is a ratio of two candidates measured side by side, each
rank pinned to a core of its own, every candidate on the same initial weights and samples, warm-up left out.
A loop against the plain loop alternates with it step by step in one process (bench/baselines.py), and the
ratio is the Hodges-Lehmann estimate over the adjacent step pairs (bench/stats.py); layouts that differ in world
size get a launch each and a median step, no ratio. An interval wider than 4% is reported as unresolved.

The run keeps within its minutes: the sections of fixed size go first, then the alternating launches, each in
legs that run one after the other in its one process (the launcher then the Trainer; K=1 then K=8). Each
leg runs to its step cap or its share of the time left, whichever comes first, so a slower machine gives
fewer pairs and wider intervals, not a longer run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baselines import SYNC_POLICIES
from bench.launching import baseline_command, launch_once, train_command
from bench.stats import MIN_PAIRS, RESOLUTION, Ratio, hodges_lehmann, run_statistic
from launcher.launch import REPO
from launcher.rundir import RunDir
from launcher.timing import median_breakdown

WARMUP_STEPS = 3
# The alternating launches, each in legs that run one after the other in its one process (bench/baselines.py):
# a leg's share of the time left (the realistic launcher's ratio is the one that must resolve) and its step
# cap, the pairs that resolved 2% at a normal pace (a 40-60 ms tiny step, 2.4 s realistic).
LAUNCHES = {
    "tiny": {"launcher": (1.5, 240), "trainer": (1.0, 160)},
    "no_sync": {"k1": (0.6, 400), "k8": (1.0, 150)},
    "realistic": {"launcher": (5.0, 32), "trainer": (1.5, 8)},
}
STEPS = {launch: {leg: steps for leg, (_, steps) in legs.items()} for launch, legs in LAUNCHES.items()}
QUICK_STEPS = {launch: {leg: max(n // 8, 4) for leg, n in caps.items()} for launch, caps in STEPS.items()}
# What a launch spends beyond its legs' budgets (start-up, building the models, each leg's first step pair
# and the one that crosses its budget), as measured on 2 cores at a slow hour (tiny 17-20 s, no_sync 12-15 s,
# realistic 65-75 s). Each launch's budgets come from the time left when it starts: what one overran, those
# after it give up.
STARTUP_S = {"tiny": 20.0, "no_sync": 15.0, "realistic": 70.0}
HOSTS = ("launcher", "trainer")
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


def launcher_run(tmp: Path, name: str, shape: Shape, split: Split, steps: int) -> RunDir:
    """One launch of the launcher into ``tmp/name``; its run folder."""
    out = tmp / name
    launch_once(train_command(split.processes, *launcher_overrides(out, shape, split, steps)), tmp, name)
    return RunDir(out)


@dataclass(frozen=True)
class Length:
    """A leg's length (bench/baselines.py Budget): ``max_steps``, the pairs its ratio needs on a machine of
    normal pace, or fewer once ``seconds`` have passed, but never fewer than ``min_steps``."""

    seconds: float
    min_steps: int
    max_steps: int


def baseline_args(out: Path, shape: Shape, micro_batch_size: int, legs: list[tuple[int, Length]]) -> list[str]:
    """bench/baselines.py's options for a launch of ``shape`` writing its step times to ``out``, a leg per
    (K, length), in order."""

    def joined(values: list) -> str:
        return ",".join(str(v) for v in values)

    ks, lengths = zip(*legs, strict=True)
    return [
        f"--out={out}",
        f"--micro-batch-size={micro_batch_size}",
        f"--accum-steps={joined(ks)}",
        f"--steps={joined([n.max_steps for n in lengths])}",
        f"--budget-s={joined([f'{n.seconds:.1f}' for n in lengths])}",
        f"--min-steps={joined([n.min_steps for n in lengths])}",
        *[f"--{k.replace('_', '-')}={v}" for k, v in asdict(shape).items()],
    ]


class Allotment:
    """The bench's minutes, shared among the legs of the alternating launches still to run, by LAUNCHES' shares,
    at the moment each launch starts: on a slow day the run still ends about on time, with fewer pairs; on a
    fast one the legs end at their step caps (``steps``), sooner."""

    def __init__(self, total_s: float, min_pairs: int, steps: dict[str, dict[str, int]]) -> None:
        self.deadline, self.min_pairs, self.steps = time.perf_counter() + total_s, min_pairs, steps
        self.left = {launch: {leg: share for leg, (share, _) in got.items()} for launch, got in LAUNCHES.items()}
        self.overrun_s: dict[str, float] = {}  # each launch's time beyond its legs' budgets, as measured

    def lengths(self, launch: str, warmup: int, toggled: tuple[str, ...] = ()) -> dict[str, Length]:
        """``toggled``: legs with the breakdown on every other step, so twice the steps give the least pairs."""
        shares = self.left.pop(launch)
        left_s = self.deadline - time.perf_counter() - sum(STARTUP_S[name] for name in [launch, *self.left])
        all_shares = sum(shares.values()) + sum(sum(legs.values()) for legs in self.left.values())
        lengths = {}
        for leg, share in shares.items():
            least = warmup + (2 * self.min_pairs + 1 if leg in toggled else self.min_pairs)
            lengths[leg] = Length(max(left_s, 0.0) * share / all_shares, least, max(self.steps[launch][leg], least))
        return lengths

    def run(
        self, launch: str, warmup: int, start: Callable[[dict[str, Length]], dict], toggled: tuple[str, ...] = ()
    ) -> dict:
        """``start`` the launch at its legs' lengths; records what it spent beyond their budgets."""
        lengths = self.lengths(launch, warmup, toggled)
        got = start(lengths)
        self.overrun_s[launch] = got["wall_s"] - sum(length.seconds for length in lengths.values())
        return got


def entry(of: str, to: str, ratio: Ratio) -> dict:
    return {"of": of, "to": to, **asdict(ratio), "resolved": ratio.resolved, "text": ratio.text()}


def alternating(tmp: Path, shape: Shape, split: Split, lengths: dict[str, Length], toggle: bool = False) -> dict:
    """One launch: the launcher, then the Trainer, each alternating with the plain loop a step of each in turn
    (bench/baselines.py hosts+plain); their step times, and the launcher's summary. ``toggle``: the launcher's
    breakdown on every other step."""
    out = tmp / f"hosts_plain_{shape.hidden_size}"
    # The launcher's run, without its final checkpoint, whose writing would fall in its last step's time.
    extra = [*launcher_overrides(out, shape, split, lengths["launcher"].max_steps), "run.final_checkpoint=false"]
    legs = [(split.accum_steps, lengths[host]) for host in HOSTS]
    args = baseline_args(out.with_suffix(".json"), shape, split.micro_batch_size, legs)
    cmd = baseline_command(split.processes, "hosts+plain", *args, *(["--toggle-breakdown"] if toggle else []), *extra)
    wall_s = launch_once(cmd, tmp, out.name)
    got = json.loads(out.with_suffix(".json").read_text())
    got["launcher"]["summary"] = RunDir(out).read_summary()
    return {**got, "wall_s": wall_s}


def picked(times: dict, steps: range | list[int]) -> tuple[list[float], list[float]]:
    """The host's and the plain loop's times (s) of ``steps`` (0-based), from an alternating launch."""
    return [times["host_step_s"][i] for i in steps], [times["plain_step_s"][i] for i in steps]


def step_ratio(of: str, to: str, numerators: list[float], denominators: list[float]) -> dict:
    """``of`` over ``to`` from their steps, adjacent in one process."""
    return entry(of, to, hodges_lehmann(numerators, denominators))


def overhead(tmp: Path, size: str, shape: Shape, split: Split, allot: Allotment, warmup: int, toggle: bool) -> dict:
    """The launcher and the Trainer each against the plain loop, step by step in one launch (each leg as long
    as ``allot`` gives it); with ``toggle`` also what the launcher's time breakdown costs (its steps with it
    against those without, adjacent)."""
    toggled = ("launcher",) if toggle else ()
    got = allot.run(size, warmup, lambda lengths: alternating(tmp, shape, split, lengths, toggle), toggled)
    launcher, trainer = got["launcher"], got["trainer"]
    steps = (len(launcher["host_step_s"]), len(trainer["host_step_s"]))
    timed = [i for i in range(warmup, steps[0]) if launcher["host_timed"][i]]
    launcher_s, beside_launcher_s = picked(launcher, timed)
    trainer_s, beside_trainer_s = picked(trainer, range(warmup, steps[1]))
    ratios = [
        step_ratio("launcher", "plain", launcher_s, beside_launcher_s),
        step_ratio(TRAINER, "plain", trainer_s, beside_trainer_s),
    ]
    medians = {
        "launcher": statistics.median(launcher_s),
        "plain (beside the launcher)": statistics.median(beside_launcher_s),
        TRAINER: statistics.median(trainer_s),
        "plain (beside the Trainer)": statistics.median(beside_trainer_s),
    }
    if toggle:  # each timed step against the untimed one after it
        after = [i for i in timed if i + 1 < steps[0]]
        host = launcher["host_step_s"]
        ratios.append(step_ratio("launcher", UNTIMED, [host[i] for i in after], [host[i + 1] for i in after]))
    return {
        "shape": asdict(shape),
        "parameters": shape.parameters,
        # A host step and a plain one: what each step a leg stopped short of its cap would have cost.
        "pair_s": {
            "launcher": medians["launcher"] + medians["plain (beside the launcher)"],
            TRAINER: medians[TRAINER] + medians["plain (beside the Trainer)"],
        },
        "split": asdict(split),
        "steps": steps,
        "warmup_steps": warmup,
        "median_step_s": medians,
        "ratios": ratios,
        "launcher_breakdown": launcher["summary"].median_time_breakdown,
    }


def no_sync(tmp: Path, allot: Allotment, warmup: int = WARMUP_STEPS) -> list[dict]:
    """One launch of a leg per K (1 and 8), each two launcher runs, no_sync and every_step, a step of each in
    turn (the order swapped every step), as long as ``allot`` gives it."""
    ks, out = (1, 8), tmp / "sync_policies"

    def policies(lengths: dict[str, Length]) -> dict:
        legs = [(k, lengths[f"k{k}"]) for k in ks]
        args = baseline_args(out.with_suffix(".json"), TINY, 2, legs)
        # Each leg sets its own K and output_dir after these.
        overrides = launcher_overrides(out, TINY, Split(2, 2, 1), max(n.max_steps for n in lengths.values()))
        wall_s = launch_once(baseline_command(2, "no_sync+every_step", *args, *overrides), tmp, out.name)
        return {**json.loads(out.with_suffix(".json").read_text()), "wall_s": wall_s}

    got, rows = allot.run("no_sync", warmup, policies), []
    for k in ks:
        leg = got[f"k{k}"]
        kept = {sync: leg[f"{sync}_step_s"][warmup:] for sync in SYNC_POLICIES}
        rows.append(
            {
                "accum_steps": k,
                "steps": len(leg["no_sync_step_s"]),
                "ratio": step_ratio("no_sync", "every_step", kept["no_sync"], kept["every_step"]),
                "pair_s": sum(statistics.median(times) for times in kept.values()),
                "median_step_s": {f"k{k}_{sync}": times for sync, times in kept.items()},
                "allreduce_bytes_per_step": {
                    sync: statistics.fmean(leg[f"{sync}_allreduce_bytes"]) for sync in SYNC_POLICIES
                },
                "breakdown": {
                    f"k{k}_{sync}": median_breakdown(leg[f"{sync}_time_breakdown"]) for sync in SYNC_POLICIES
                },
            }
        )
    return rows


def minutes_to_caps(results: dict, steps: dict[str, dict[str, int]]) -> float:
    """What this run would have taken with every leg at its step cap, at the pace it measured: its wall time,
    and each leg's steps short of its cap at that leg's median step pair."""
    short = [
        (steps[size][leg] - ran, results[section]["pair_s"][leg])
        for size, section in (("tiny", "overhead"), ("realistic", "realistic"))
        for leg, ran in zip(HOSTS, results[section]["steps"], strict=True)
    ]
    short += [(steps["no_sync"][f"k{row['accum_steps']}"] - row["steps"], row["pair_s"]) for row in results["no_sync"]]
    return (results["wall_time_s"] + sum(max(n, 0) * pair_s for n, pair_s in short)) / 60


def accumulation_vs_devices(tmp: Path, steps: int) -> dict:
    """One launch per layout, its median step and phases. No ratio: the layouts differ in world size, so they
    cannot share a launch, and separate launches differ by several percent here (three rounds of them, 82-99 s
    of the run, left every ratio's interval 11-175% wide)."""
    layouts = {"1x_K8": Split(1, 4, 8), "2x_K4": Split(2, 4, 4), "2x_K1": Split(2, 16, 1)}
    runs = {name: launcher_run(tmp, name, TINY, split, steps) for name, split in layouts.items()}
    return {
        "layouts": {name: asdict(split) for name, split in layouts.items()},
        "median_step_s": {
            name: run_statistic([m.step_time_s for m in run.read_metrics()], WARMUP_STEPS) for name, run in runs.items()
        },
        "breakdown": {name: run.read_summary().median_time_breakdown for name, run in runs.items()},
    }


def memory_vs_micro_batch(tmp: Path, micros: list[int]) -> list[dict]:
    """One process, the realistic model at a fixed global batch: what each micro-step holds, from the tensors
    (exact, so one run each), and the process's peak resident set."""
    rows = []
    for b in micros:
        s = launcher_run(tmp, f"mem{b}", REALISTIC, Split(1, b, max(micros) // b), 1).read_summary()
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


def read_previous(path: Path) -> dict | None:
    """The results a run is about to replace, to set its ratios beside; None where there are none."""
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return previous if isinstance(previous, dict) else None


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
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller data: a smoke run")
    parser.add_argument("--minutes", type=float, help="the most wall time the run takes (default 7; --quick: 4)")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where benchmarks.json and benchmarks.md go")
    args = parser.parse_args()
    from bench.data_scale import data_at_scale
    from bench.report import against_previous, labelled_ratios, overlaps, write_report

    quick = args.quick
    minutes = args.minutes or (4.0 if quick else 7.0)
    started = time.perf_counter()
    allot = Allotment(minutes * 60, 2 if quick else MIN_PAIRS, QUICK_STEPS if quick else STEPS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # The sections of fixed size first (a launch per layout, one-step memory runs, data: 2-3 minutes on 2 cores,
        # as the machine goes), then the alternations in what is left, the realistic one first: its least steps
        # (2 warm-up and 6 pairs a leg, of 2.4-4.7 s steps) take a minute or two; the tiny launches after it
        # can shrink to fit what it leaves.
        sections = [
            ("accumulation_vs_devices", lambda: accumulation_vs_devices(tmp, 8 if quick else 10)),
            ("memory", lambda: memory_vs_micro_batch(tmp, [1, 4] if quick else [1, 2, 4])),
            ("data", lambda: data_at_scale(tmp, quick)),
            ("realistic", lambda: overhead(tmp, "realistic", REALISTIC, Split(2, 1, 4), allot, 2, False)),
            ("overhead", lambda: overhead(tmp, "tiny", TINY, Split(2, 4, 4), allot, 5, True)),
            ("no_sync", lambda: no_sync(tmp, allot)),
        ]
        results: dict = {"machine": machine(), "command": "python bench/run.py" + (" --quick" if quick else "")}
        results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        results["minutes"] = minutes
        results["warmup_steps_excluded"] = WARMUP_STEPS  # the realistic section's own is in its entry
        for name, section in sections:
            print(f"{name} ...", flush=True)
            begun = time.perf_counter()
            results[name] = section()
            print(f"{name}: {time.perf_counter() - begun:.0f} s", flush=True)
    results["launch_overrun_s"] = allot.overrun_s  # each alternating launch's time beyond its legs' budgets
    results["wall_time_s"] = time.perf_counter() - started
    results["minutes_to_step_caps"] = minutes_to_caps(results, QUICK_STEPS if quick else STEPS)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    previous = read_previous(args.out_dir / "benchmarks.json")
    results["previous_run"] = against_previous(previous, results) if previous else None
    (args.out_dir / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, args.out_dir)
    print(f"wrote {args.out_dir / 'benchmarks.md'} in {results['wall_time_s']:.0f} s")
    beside, apart = overlaps(results["previous_run"])
    if beside:
        print(
            f"{len(beside) - len(apart)} of {len(beside)} intervals overlap the previous run's"
            + (f"; apart: {', '.join(apart)}" if apart else "")
        )
    ratios = labelled_ratios(results).values()
    unresolved = sum(not ratio["resolved"] for ratio in ratios)
    if unresolved:
        print(
            f"{unresolved} of {len(ratios)} ratios unresolved (intervals wider than {RESOLUTION:.0%}); at this pace "
            f"every leg at its step cap would take about {results['minutes_to_step_caps']:.1f} minutes: "
            f"{results['command']} --minutes {math.ceil(results['minutes_to_step_caps'])}"
        )


if __name__ == "__main__":
    main()
