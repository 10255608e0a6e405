"""Running a planned comparison: preflight, every mode's launch with a live view, judging and the report."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import sys
from pathlib import Path

from launcher.compare import report
from launcher.compare.config import CompareConfig
from launcher.compare.judge import failure_lines, judge
from launcher.compare.modes import PlannedMode
from launcher.compare.preflight import preflight
from launcher.compare.results import SKIPPED
from launcher.config import ConfigError, dump_config
from launcher.data.sources import check_sources
from launcher.files import write_json_atomic, write_text_atomic
from launcher.launch import LOOPBACK, Job, LaunchOutcome, job_commands, launch_env, machine_logs
from launcher.models import model_spec
from launcher.netns import NamespacesUnavailable, on_hosts, two_hosts
from launcher.records import to_json
from launcher.rundir import RunDir
from launcher.terminal import ModesProgress


def run_mode(pm: PlannedMode, cfg: CompareConfig, threads: int, progress: ModesProgress) -> LaunchOutcome:
    """Launch one mode into a clean folder, one launch per machine, and follow its metrics.jsonl for the live
    view. Every machine reads the same config, so all point at the same run folder; only the job's main
    process (machine 0, rank 0) writes results there. A link mode's machines run on two namespace hosts whose
    link is shaped to its rate, removed when the mode ends; where they cannot be made, the mode is skipped."""
    if pm.run_dir.exists():
        shutil.rmtree(pm.run_dir)  # never judge a mode on files a previous comparison left
    pm.run_dir.mkdir(parents=True)
    config_path = pm.run_dir / "launch_config.yaml"
    write_text_atomic(config_path, dump_config(pm.train))
    tmp_dir = Path(cfg.output_dir) / "tmp" / pm.name
    env = launch_env(tmp_dir, threads, offline=False)  # a hub model or dataset loads where the network allows
    logs = machine_logs(pm.run_dir, pm.mode.num_machines)
    with contextlib.ExitStack() as stack:
        if pm.mode.link:
            try:
                hosts = stack.enter_context(two_hosts(pm.mode.link))
            except NamespacesUnavailable as err:
                progress.start(pm.name, pm.describe())
                return LaunchOutcome(None, 0.0, logs, note=f"{SKIPPED}: {err}")
        ip = hosts[0].addr if pm.mode.link else LOOPBACK
        commands = [
            [*command, "--config", str(config_path)]
            for command in job_commands(pm.plan.batch.world_size, pm.mode.num_machines, main_process_ip=ip)
        ]
        if pm.mode.link:
            commands = on_hosts(hosts, commands)
        return _follow(pm, cfg, Job(commands, logs, env), progress, tmp_dir)


def _follow(pm: PlannedMode, cfg: CompareConfig, job: Job, progress: ModesProgress, tmp_dir: Path) -> LaunchOutcome:
    """Run the mode's job to its end, its metrics.jsonl followed for the live view."""
    folder = RunDir(pm.run_dir)
    total_steps = pm.plan.max_steps

    def follow() -> None:
        nonlocal total_steps
        records = folder.read_metrics()
        total_steps = total_steps or folder.resolved_max_steps()
        progress.update(pm.name, len(records), records[-1].loss if records else None, total_steps)

    progress.start(pm.name, pm.describe())
    outcome = job.start().wait(cfg.timeout_s, follow)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return outcome


NOT_RUN = "not run: the reference failed"


def check_inputs(planned: list[PlannedMode]) -> None:
    """Every mode's model and data, checked before the first launch (a misspelt file found after the reference
    has trained would waste its run): the model's folder, config and tokenizer, the data's files, suffixes and
    columns. Each distinct model and data is checked once."""
    seen: set[str] = set()
    for pm in planned:
        key = json.dumps(
            [dataclasses.asdict(pm.train.model), dataclasses.asdict(pm.train.data), dataclasses.asdict(pm.train.eval)]
        )
        if key in seen:
            continue
        seen.add(key)
        try:
            spec = model_spec(pm.train.model)
            check_sources(pm.train.data, pm.train.eval, spec.task)
        except ConfigError as err:
            raise ConfigError(f"mode {pm.name!r}: {err}") from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_comparison(cfg: CompareConfig, planned: list[PlannedMode], out: Path, threads: int) -> int:
    """Run every mode, judge them, write compare.json and the report; the exit code (0 agree, 1 not, 130)."""
    console = report.make_console()
    reference = next(pm for pm in planned if pm.name == cfg.reference_name)
    warnings = preflight(planned, reference)
    report.print_plan(console, cfg, planned, warnings)
    outcomes: dict[str, LaunchOutcome] = {}
    progress = ModesProgress([(pm.name, pm.plan.max_steps) for pm in planned], console)
    # A scheduler's SIGTERM takes the same way out as Ctrl-C: every running launch is stopped (Job.wait).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for pm in planned:
            outcome = run_mode(pm, cfg, threads, progress)
            outcomes[pm.name] = outcome
            detail = f"{outcome.wall_s:.1f} s" if outcome.ok else outcome.reason()
            progress.finish(pm.name, outcome.ok, detail, [] if outcome.ok else outcome.log_tail())
            if pm.is_reference and not outcome.ok:
                # Nothing can be judged without the reference: the other modes are not run.
                for other in planned[1:]:
                    outcomes[other.name] = LaunchOutcome(None, 0.0, [other.run_dir / "train.log"], note=NOT_RUN)
                    progress.finish(other.name, False, NOT_RUN)
                break
    except KeyboardInterrupt:
        print("error: compare interrupted; its running launches were stopped", file=sys.stderr, flush=True)
        return 130
    finally:
        progress.close()
        shutil.rmtree(out / "tmp", ignore_errors=True)

    result = judge(cfg, planned, outcomes, warnings)
    result.threads_per_process = threads
    write_json_atomic(out / "compare.json", to_json(result))
    report.write_all(result, out)
    report.print_result(console, result)
    for line in failure_lines(result):
        print(f"error: {line}", file=sys.stderr, flush=True)
    return 0 if result.ok else 1
