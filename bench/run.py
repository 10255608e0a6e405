"""Benchmarks: the launcher against a hand-written DDP loop and the Transformers Trainer, what no_sync
saves, accumulation vs devices, and memory vs micro batch. One command, candidates interleaved:

    python bench/run.py                 # about 6 minutes on 2 CPU cores
    python bench/run.py --quick         # a smoke run

Writes docs/benchmarks.json, docs/benchmarks.md and docs/bench_*.png. Every figure is read from what
the runs wrote (the launcher's summary.json / metrics.jsonl, the baselines' step times), never computed
from a model of the cost. Step times are medians over the steps after the first WARMUP_STEPS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.launch import REPO, Job, accelerate_command, launch_env
from launcher.rundir import RunDir

WARMUP_STEPS = 2
DOCS = REPO / "docs"
MODEL = {"hidden_size": 64, "num_layers": 2, "seq_len": 64, "num_samples": 1024}
BIG_MODEL = {"hidden_size": 128, "num_layers": 2, "seq_len": 256, "num_samples": 256}


def _run(cmd: list[str], tmp: Path) -> None:
    outcome = Job([cmd], [tmp / "bench.log"], launch_env(tmp / "tmp")).start().wait(600)
    if not outcome.ok:
        raise SystemExit(f"benchmark run failed ({outcome.reason()}): {' '.join(cmd)}\n{outcome.log_text()[-3000:]}")


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[WARMUP_STEPS:] or times)


def launcher_run(
    tmp: Path, name: str, nproc: int, micro: int, accum: int, steps: int, model: dict, sync: str = "no_sync"
) -> dict:
    out = tmp / name
    overrides = [
        f"run.output_dir={out}",
        "run.overwrite=true",
        f"run.max_steps={steps}",
        "model.name=tiny-gpt2",
        f"model.hidden_size={model['hidden_size']}",
        f"model.num_layers={model['num_layers']}",
        "data.name=synthetic-lm",
        f"data.seq_len={model['seq_len']}",
        f"data.num_samples={model['num_samples']}",
        "batch.global_batch_size=null",
        f"batch.micro_batch_size={micro}",
        f"batch.accum_steps={accum}",
        f"batch.sync={sync}",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "optim.grad_clip=1.0",
        "run.log_every_steps=1000",
    ]
    _run([*accelerate_command(nproc), *overrides], tmp)
    run = RunDir(out)
    summary, metrics = run.read_summary(), run.read_metrics()
    return {
        "step_time_s": median_after_warmup([m.step_time_s for m in metrics]),
        "samples_per_s": summary.samples_per_s,
        "tokens_per_s": summary.tokens_per_s,
        "allreduce_bytes_per_step": summary.totals.allreduce_bytes / summary.steps,
        "sync_rounds_per_step": summary.totals.sync_rounds / summary.steps,
        "peak_mem_bytes": max(summary.peak_mem_bytes_per_rank),
        "world_size": summary.world_size,
        "micro_batch_size": micro,
        "accum_steps": accum,
    }


def baseline_run(tmp: Path, loop: str, nproc: int, micro: int, accum: int, steps: int, model: dict) -> dict:
    out = tmp / f"{loop}.json"
    _run(
        [
            *accelerate_command(nproc, REPO / "bench" / "baselines.py"),
            loop,
            "--out",
            str(out),
            "--micro-batch-size",
            str(micro),
            "--accum-steps",
            str(accum),
            "--steps",
            str(steps),
            *[f"--{k.replace('_', '-')}={v}" for k, v in model.items()],
        ],
        tmp,
    )
    return {"step_time_s": median_after_warmup(json.loads(out.read_text())["step_time_s"])}


def overhead(tmp: Path, repeats: int, steps: int) -> dict:
    """Launcher vs plain DDP loop vs Trainer at 2 x B=4 x K=4; the order rotates each repeat."""
    candidates = ["plain", "launcher", "trainer"]
    times: dict[str, list[float]] = {c: [] for c in candidates}
    for r in range(repeats):
        for c in candidates[r % 3 :] + candidates[: r % 3]:
            if c == "launcher":
                result = launcher_run(tmp, "overhead", 2, 4, 4, steps, MODEL)
            else:
                result = baseline_run(tmp, c, 2, 4, 4, steps, MODEL)
            times[c].append(result["step_time_s"])
    plain = statistics.median(times["plain"])
    return {
        c: {
            "median_step_time_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "repeats": t,
            "ratio_to_plain": statistics.median(t) / plain,
        }
        for c, t in times.items()
    }


def no_sync_savings(tmp: Path, accums: list[int], steps: int) -> list[dict]:
    rows = []
    for k in accums:
        pair = {
            sync: launcher_run(tmp, f"k{k}_{sync}", 2, 2, k, steps, MODEL, sync) for sync in ("no_sync", "every_step")
        }
        rows.append(
            {
                "accum_steps": k,
                "no_sync": pair["no_sync"],
                "every_step": pair["every_step"],
                "time_saving": 1 - pair["no_sync"]["step_time_s"] / pair["every_step"]["step_time_s"],
                "bytes_ratio": pair["every_step"]["allreduce_bytes_per_step"]
                / max(pair["no_sync"]["allreduce_bytes_per_step"], 1),
            }
        )
    return rows


def accumulation_vs_devices(tmp: Path, steps: int) -> list[dict]:
    layouts = [("1 x K=8", 1, 4, 8), ("2 x K=4", 2, 4, 4), ("2 x K=1", 2, 16, 1)]
    return [{"layout": name, **launcher_run(tmp, f"layout{n}", n, b, k, steps, MODEL)} for name, n, b, k in layouts]


def memory_vs_micro_batch(tmp: Path, micros: list[int], steps: int) -> list[dict]:
    global_batch = max(micros)
    return [
        {"micro_batch_size": b, **launcher_run(tmp, f"mem{b}", 1, b, global_batch // b, steps, BIG_MODEL)}
        for b in micros
    ]


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
    parser.add_argument("--quick", action="store_true", help="fewer repeats, steps and points: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=DOCS, help="where the JSON, markdown and plots go")
    args = parser.parse_args()
    repeats, steps = (1, 4) if args.quick else (3, 12)
    accums = [1, 4] if args.quick else [1, 2, 4, 8, 16]
    micros = [4, 16] if args.quick else [1, 2, 4, 8, 16]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results = {
            "machine": machine(),
            "command": "python bench/run.py" + (" --quick" if args.quick else ""),
            "model": MODEL,
            "memory_model": BIG_MODEL,
            "warmup_steps_excluded": WARMUP_STEPS,
            "overhead": overhead(tmp, repeats, steps),
            "no_sync": no_sync_savings(tmp, accums, max(6, steps // 2)),
            "accumulation_vs_devices": accumulation_vs_devices(tmp, max(6, steps // 2)),
            "memory": memory_vs_micro_batch(tmp, micros, 3),
        }
    from bench.report import write_report

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(results, args.out_dir)
    print(f"wrote {args.out_dir / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
