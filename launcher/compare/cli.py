"""The compare command: parse and plan (no torch), then run the comparison.

Exit status: 0 when every ``equal`` mode agrees, 1 when one does not or a mode failed, 2 for a config error,
130 when interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.compare.config import CompareConfig, load_compare_config
from launcher.compare.modes import PlannedMode, plan_modes
from launcher.config import UserError
from launcher.launch import threads_per_device
from launcher.rundir import claim_output_folder

OUTPUT_FILES = ("compare.json", "report.md", "loss_curves.png", "cost.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="accum-compare",
        description="Run accumulation, DDP and both side by side; judge agreement and show cost.",
    )
    parser.add_argument("--config", required=True, help="compare config (YAML), e.g. configs/compare/default.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. modes.ddp_2x1.num_processes=4"
    )
    return parser.parse_args(argv)


def threads_for(cfg: CompareConfig, planned: list[PlannedMode]) -> int:
    """Every mode gets the same threads per process: a process stands for one device, and one device must not
    get more cores when it runs alone (the single-process mode would look faster than it is)."""
    env_threads = os.environ.get("OMP_NUM_THREADS", "")
    if cfg.threads_per_process:
        return cfg.threads_per_process
    if env_threads.isdigit():
        return int(env_threads)
    return threads_per_device(max(pm.plan.batch.world_size for pm in planned))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_compare_config(args.config, args.overrides)
        planned = plan_modes(cfg)
        # The seam: checking the inputs and running pull in torch, once the config is known to be good.
        from launcher.compare.session import check_inputs, run_comparison

        check_inputs(planned)
        out = claim_output_folder(Path(cfg.output_dir), OUTPUT_FILES, cfg.overwrite, "a comparison")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return run_comparison(cfg, planned, out, threads_for(cfg, planned))


if __name__ == "__main__":
    sys.exit(main())
