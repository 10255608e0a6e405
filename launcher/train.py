"""Train one model under whatever the launch gives: 1 process or N, accumulation derived from the global batch.

    accelerate launch launcher/train.py --config configs/runs/tiny_lm.yaml [key=value ...]
    python launcher/train.py --config configs/runs/tiny_lm.yaml        # one process, no launcher

The same config trains the same optimizer steps on the same samples under every launch:
accum_steps = global_batch_size / (micro_batch_size x world_size).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher import checkpoint, distributed, trainer
from launcher.config import Config, UserError, dump_config, flatten, keys_help, load_config
from launcher.loop import AfterStep, NonFiniteError, run_loop
from launcher.measure import COUNTER
from launcher.rundir import RestartRecord, RunDir
from launcher.runplan import RunPlan, make_plan

# Exit codes (README, "Checkpoints and resume").
EXIT_USER_ERROR = 2  # bad config, checkpoint or output folder: one "error:" line
EXIT_NONFINITE = 3  # non-finite loss/gradients with run.on_nonfinite=stop, or too many skipped steps in a row
EXIT_COLLECTIVE = 4  # a collective failed: another rank died, or one hung past run.dist_timeout_s
EXIT_REPEATED = 5  # a self-healing run failed at the same step on two attempts in a row: not restarted again
USER_ERROR_GRACE_S = 10.0  # how long ranks that do not print a shared error wait for the one that does
# Stopped by a signal after writing a checkpoint: 128 + the signal number, the code schedulers already read
# as "preempted" (Slurm, Kubernetes).
EXIT_ON_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopSignals:
    """Turns SIGTERM/SIGINT into a request that the loop honours at the next optimizer-step boundary.

    Every rank records its own signal; the loop all-reduces the request with the step's other scalars, so
    all ranks checkpoint and stop after the same step even when the signals arrive at different times.
    A second signal changes nothing, and is not fatal: Ctrl-C reaches each rank twice (terminal and agent).
    Installed for the training loop only: before the first step there is nothing to checkpoint, and a signal
    then (the launcher stopping the ranks after another one's error, say) ends the process as usual.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle the stop signals from now on (the first step is about to run)."""
        self._previous = {sig: signal.signal(sig, self._handle) for sig in EXIT_ON_SIGNAL}

    def restore(self) -> None:
        """The handlers from before ``install``: once the outcome, an error line included, is out."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            print(
                f"rank {distributed.env_rank()}: got {signal.Signals(signum).name}; "
                "checkpointing at the next step boundary",
                file=sys.stderr,
                flush=True,
            )
            self.received = signum

    def __call__(self) -> bool:
        return self.received is not None


STOP_SIGNALS = StopSignals()  # this process's: main() installs it, cli() reads whether the launcher stopped us


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launcher/train.py",
        description="Train under accumulation, DDP or both; the launch decides the world size. Without --config "
        "the embedded default trains: a tiny GPT-2 on synthetic sequences, global batch 16.",
        epilog="config keys (YAML sections, or dotted key=value after the options):\n\n" + keys_help(Config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="training config (YAML); defaults apply without one")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and the batch plan for this launch, then exit without training",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.01")
    return parser.parse_args(argv)


def print_config(cfg: Config) -> None:
    plan = make_plan(cfg, distributed.launched_world_size())
    print(dump_config(cfg, {"run.max_steps": plan.max_steps or f"from run.max_epochs={cfg.run.max_epochs:g}"}), end="")
    print(f"# plan: {plan.batch.describe()}; {plan.optim.describe()}")


def error_line(message: str, every_rank: bool = False) -> None:
    """One line on stderr: from each machine's first process for errors every rank shares, from each rank
    for its own failure."""
    rank = distributed.env_rank()
    if every_rank and distributed.launched_world_size() > 1:
        print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
    elif distributed.local_rank() == 0:  # once per machine: each node's log shows it
        print(f"error: {message}", file=sys.stderr, flush=True)


class RepeatedFailure(Exception):
    """Two attempts in a row of a run with restarts failed at the same step: restarting again would fail too."""


def healing(cfg: Config, folder: RunDir, attempt: distributed.Attempt) -> tuple[Config, RestartRecord | None]:
    """A restarted attempt resumes from the newest complete checkpoint, whatever run.resume says: the folder
    holds this run. Returns the config to train and the restart's record (None on the first attempt), whose
    resume step is filled in later. Raises RepeatedFailure when the attempt before got no further than the
    one before it."""
    if attempt.number == 0:
        return cfg, None
    reached = max((r.step for r in folder.read_metrics()), default=0)
    history = folder.restarts()
    if history and history[-1].previous_reached_step == reached:
        raise RepeatedFailure(
            f"attempts {attempt.number - 2} and {attempt.number - 1} both failed after step {reached}: the same "
            f"failure again, not restarted{newest_checkpoint(folder)}; fix it and resume with run.resume=auto"
        )
    restarted = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, resume="auto"))
    return restarted, RestartRecord(attempt.number, reached, 0)


def newest_checkpoint(folder: RunDir) -> str:
    complete = folder.checkpoints()
    return f"; the last complete checkpoint is {complete[-1][1]}" if complete else "; no complete checkpoint"


def budget_note(cfg: Config | None) -> str:
    """What an error line adds on the last attempt of a run with restarts: the budget is spent."""
    allowed, used_up = distributed.restarts_used_up()
    if not used_up:
        return ""
    where = newest_checkpoint(RunDir(cfg.run.output_dir)) if cfg is not None else ""
    return f"; restarts used up ({allowed} of {allowed}){where}"


def resume_point(cfg: Config, plan: RunPlan) -> checkpoint.CheckpointInfo | None:
    """The checkpoint to resume, checked against this run before anything is written."""
    path = checkpoint.resolve_resume(cfg)
    if path is None:
        return None
    info = checkpoint.read_checkpoint(path)
    checkpoint.check_compatible(info, cfg, plan)
    return info


def train(cfg: Config, after_step: AfterStep | None = None) -> bool:
    """Train ``cfg`` under this process's launch; returns whether the run stopped early (a signal or
    run.stop_at_step) after its checkpoint. ``after_step``: run_loop's hook."""
    trackers = distributed.tracker_names(cfg.run.log_with)
    folder = RunDir(cfg.run.output_dir)
    distributed.preflight(cfg)  # the launch's interfaces, rank and rendezvous, before joining it
    attempt = distributed.join_launch(cfg.run.dist_timeout_s)
    cfg, restart = healing(cfg, folder, attempt)
    # Checks that need no process group run first, identically on every rank.
    plan = make_plan(cfg, distributed.launched_world_size())
    resume = resume_point(cfg, plan)
    if restart is not None and resume is not None:
        restart = dataclasses.replace(restart, resumed_from_step=resume.step)
    # Every rank checks, on every machine: on a shared filesystem they all see the same folder and refuse
    # together, at once, instead of leaving the other machines waiting in the rendezvous for a rank 0 that
    # has quit. Only the main process writes there, and only after the process group has formed (the gloo
    # connect, or DDP's first broadcast under NCCL, waits for every rank), hence after every rank's check:
    # a slower machine never finds the results of the run it belongs to (measured: 2 machines, one folder).
    # Continuing a run in its own folder is let in; a checkpoint from elsewhere never writes over a run here.
    folder.check(cfg.run.overwrite, resuming=restart is not None or (resume is not None and resume.in_folder(folder)))
    accelerator = distributed.init_accelerator(cfg, trackers, attempt)
    run = None
    try:
        run, note = trainer.build(cfg, plan, accelerator, folder, resume, STOP_SIGNALS, restart)
        if accelerator.is_main_process:
            print(trainer.describe(run), flush=True)
            if restart is not None:
                print(
                    f"restart {restart.attempt}: the attempt before failed after step {restart.previous_reached_step}",
                    flush=True,
                )
            if resume is not None:
                print(f"resume: step {resume.step} from {resume.path} ({note})", flush=True)
        if accelerator.is_main_process and trackers:
            continued = run.resumed_from_step > 0 or restart is not None
            distributed.start_trackers(
                accelerator,
                {**flatten(cfg.to_dict()), "optim.lr_resolved": run.plan.optim.lr},
                run.resumed_from_step,
                folder.tracker_run_id(continued),
            )
        STOP_SIGNALS.install()
        outcome = run_loop(run, after_step)
        if outcome.stopped and accelerator.is_main_process:
            print(
                f"stopped after step {outcome.step}; checkpoint {folder.checkpoint_path(outcome.step)}; "
                "resume with run.resume=auto",
                flush=True,
            )
        return outcome.stopped
    finally:
        run = None  # the DDP model in it holds the process group: released before the group is destroyed
        distributed.shutdown(accelerator)


def main(argv: list[str] | None = None) -> int:
    """Train from the command line's config; the exit code (README, "Exit codes")."""
    args = parse_args(argv)
    distributed.pin_to_core()
    STOP_SIGNALS.received = None
    COUNTER.install()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print_config(cfg)
            return 0
        stopped = train(cfg)
    except RepeatedFailure as err:
        error_line(str(err))
        if distributed.local_rank() == 0 and distributed.restarts_used_up()[0]:
            os.kill(os.getppid(), signal.SIGTERM)  # the elastic agent: restarting again would fail the same way
        return EXIT_REPEATED
    except UserError as err:
        error_line(f"{err}{budget_note(cfg)}")
        return EXIT_USER_ERROR
    except (NonFiniteError, checkpoint.NonFiniteModelError) as err:
        error_line(f"{err}; the last checkpoint holds the last finite model{budget_note(cfg)}")
        return EXIT_NONFINITE
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = err.filename or (cfg.run.output_dir if cfg else "")
        error_line(
            f"no space left on the device of {where!r}; free some space and resume with run.resume=auto "
            f"(the complete checkpoints are kept){budget_note(cfg)}"
        )
        return EXIT_USER_ERROR
    except RuntimeError as err:  # DistError is one too
        message = distributed.comm_failure_message(err)
        if message is None:
            raise
        error_line(f"{message}{budget_note(cfg)}", every_rank=True)
        return EXIT_COLLECTIVE
    finally:
        COUNTER.uninstall()
        STOP_SIGNALS.restore()
    if stopped and STOP_SIGNALS.received is not None:
        return EXIT_ON_SIGNAL[STOP_SIGNALS.received]
    return 0


def cli() -> None:
    """The command-line entry (``accelerate launch launcher/train.py``, ``accum-train``)."""
    code = main()
    if code in (EXIT_USER_ERROR, EXIT_REPEATED) and distributed.local_rank() != 0 and STOP_SIGNALS.received is None:
        # A shared error is printed by each machine's first process only, and the launcher stops every rank as
        # soon as one exits: wait here (the launcher ends the wait when that process exits) so that this rank, if it
        # got there first, does not get the printing process killed before its line is out. A repeated failure's
        # first process stops the agent: an exit here first would have the agent start another attempt.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(USER_ERROR_GRACE_S)
    # Every result is written and fsynced, the trackers are closed and the process group is destroyed. Leave
    # without interpreter finalization: a finished 2-process gloo run was seen (once in some hundred launches)
    # to abort there with "terminate called without an active exception" (a C++ thread still joinable while
    # the interpreter tears down), turning a successful run into exit -6 for the launcher.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
