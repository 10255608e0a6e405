"""The plan command: parse and enumerate (no torch), profile with the real trainer, predict, rank, validate.

Exit status: 0 when the plan is written, 1 when a profiling or validation launch failed, 2 for bad input
(a config error, a global batch no split reaches, a device memory no split fits), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.config import Config, ConfigError, UserError
from launcher.files import write_json_atomic
from launcher.plan.config import MEASURED, PlanConfig, load_plan_config
from launcher.plan.enumerate import enumerate_splits
from launcher.plan.model import LINK_CLASSES, Link, Profile
from launcher.plan.profile import PROFILE_FILE, measure_profile, read_profile, write_profile
from launcher.plan.rank import predict_all, reasons
from launcher.plan.results import PlanResult
from launcher.records import to_json
from launcher.rundir import claim_output_folder
from launcher.runplan import make_plan

OUTPUT_FILES = ("plan.json", "plan.md", "plan.png", PROFILE_FILE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="accum-plan",
        description="Predict every way to reach a global batch on hardware you do not have; check it on this one.",
    )
    parser.add_argument("--config", required=True, help="training config (YAML), e.g. configs/runs/tiny_lm.yaml")
    parser.add_argument("--validate", action="store_true", help="run the splits this machine can run; compare")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="planner keys (devices=8,32 device_memory=40GiB link=ib-200g) or training keys (batch.sync=...)",
    )
    return parser.parse_intermixed_args(argv)  # --validate may come after the key=value overrides


def target_batch(train: Config, cfg: PlanConfig) -> int:
    """The global batch to reach: the planner's key, else what the training config resolves to on one device."""
    return cfg.global_batch_size or make_plan(train, 1).batch.global_batch_size


def plan(train: Config, cfg: PlanConfig, config_path: str, validate: bool) -> PlanResult:
    """Enumerate, profile (or read a profile back), predict and rank; with ``validate``, run what this host can."""
    global_batch = target_batch(train, cfg)
    splits = enumerate_splits(train, global_batch, cfg.device_counts, cfg.strategy_names)
    reused = read_profile(cfg.profile.reuse) if cfg.profile.reuse else None  # before the folder is emptied
    out = claim_output_folder(Path(cfg.output_dir), OUTPUT_FILES, cfg.overwrite, "a plan")
    # The seam: measuring starts launches; everything above is checked first, in milliseconds.
    profile: Profile = reused or measure_profile(train, cfg, global_batch, out)
    write_profile(profile, out / PROFILE_FILE)
    link: Link = profile.link if cfg.link == MEASURED else LINK_CLASSES[cfg.link]
    candidates = predict_all(
        splits, profile, link, cfg.device_memory_bytes, cfg.reserved_memory_bytes, cfg.device_memory
    )
    best = candidates[0]
    result = PlanResult(
        config=config_path,
        global_batch_size=global_batch,
        devices=cfg.device_counts,
        device_memory_bytes=cfg.device_memory_bytes,
        reserved_memory_bytes=cfg.reserved_memory_bytes,
        link=link,
        profile=profile,
        candidates=candidates,
        recommended=best,
        why=reasons(best, candidates),
        settings=to_json(cfg),
    )
    if validate:
        from launcher.plan.validate import validate as run_validation

        result.validation, result.validation_notes = run_validation(train, cfg, global_batch, profile, out)
        if cfg.link == MEASURED:  # the plan's own candidates measured on this host's link
            measured = {e.label(): e for e in result.validation if e.num_machines == 1}
            for c in candidates:
                if c.label() in measured:
                    c.measured_step_time_s, c.mode = measured[c.label()].measured_step_time_s, measured[c.label()].mode
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train, cfg = load_plan_config(args.config, args.overrides)
        result = plan(train, cfg, args.config, args.validate)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: plan interrupted; its running launches were stopped", file=sys.stderr, flush=True)
        return 130
    from launcher.plan import report  # matplotlib: only once there is a plan to draw

    out = Path(cfg.output_dir)
    write_json_atomic(out / "plan.json", to_json(result))
    report.write_all(result, out)
    report.print_result(report.make_console(), result)
    print(f"plan: {out / 'plan.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
