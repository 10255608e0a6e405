"""Train one model under whatever the launch gives: 1 process or N, accumulation derived from the global batch.

    accelerate launch launcher/train.py --config configs/runs/tiny_lm.yaml [key=value ...]
    python launcher/train.py --config configs/runs/tiny_lm.yaml        # one process, no launcher

The same config trains the same optimizer steps on the same samples under every launch:
accum_steps = global_batch_size / (micro_batch_size x world_size).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate.utils import set_seed

from launcher import batchnorm, checkpoint, distributed
from launcher.batching import BatchPlan, SampleOrder, plan_batch, resolve_max_steps
from launcher.config import Config, UserError, flatten, load_config
from launcher.data import build_datasets
from launcher.evaluate import Evaluator
from launcher.loop import NonFiniteError, StepContext, build_optimizer, run_loop
from launcher.lr import resolve_optim
from launcher.metrics import check_output_dir
from launcher.models import LM, build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Exit codes (README, "Checkpoints and resume").
EXIT_USER_ERROR = 2  # bad config, checkpoint or output folder: one "error:" line
EXIT_NONFINITE = 3  # non-finite loss/gradients with run.on_nonfinite=stop, or too many skipped steps in a row
EXIT_COLLECTIVE = 4  # a collective failed: another rank died, or one hung past run.dist_timeout_s
USER_ERROR_GRACE_S = 10.0  # how long ranks that do not print a shared error wait for the one that does
# Stopped by a signal after writing a checkpoint: 128 + the signal number, the code schedulers already read
# as "preempted" (Slurm, Kubernetes).
EXIT_ON_SIGNAL = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopSignals:
    """Turns SIGTERM/SIGINT into a request that the loop honours at the next optimizer-step boundary.

    Every rank records its own signal; the loop all-reduces the request with the step's other scalars, so
    all ranks checkpoint and stop after the same step even when the signals arrive at different times.
    A second signal changes nothing, and is not fatal: Ctrl-C reaches each rank twice (terminal and agent).
    """

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> None:
        for sig in EXIT_ON_SIGNAL:
            signal.signal(sig, self._handle)

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
        description="Train under accumulation, DDP or both; the launch decides the world size.",
    )
    parser.add_argument("--config", help="training config (YAML); defaults apply without one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.01")
    return parser.parse_args(argv)


def build(cfg: Config, accelerator) -> StepContext:
    """Model, data, batch plan, optimizer and evaluator, prepared for the launch (same seed: same initial weights).

    Resolves ``cfg.run.max_steps`` in place from run.max_epochs, once the training set's size is known: every
    later reader (schedule, progress, checkpoints, config.yaml) sees the number of steps actually trained.
    """
    set_seed(cfg.run.seed)
    bundle = build_model(cfg.model, cfg.data.seq_len, DTYPES[cfg.run.dtype])
    # Each machine's first process tokenizes (and fills the cache); the others then read the cache.
    with distributed.local_main_first(accelerator):
        data = build_datasets(cfg.data, cfg.eval, bundle, cfg.run.seed, cfg.model.num_labels)
    plan = plan_batch(
        cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.batch.accum_steps, accelerator.num_processes
    )
    batchnorm.check_micro_batch(cfg.model, plan.micro_batch_size, bundle.model)  # a hub model may have BatchNorm
    # DDP's default broadcast_buffers=True copies rank 0's buffers to every rank at the first forward after
    # each synced backward (once per optimizer step). With SyncBatchNorm every rank computes the same running
    # statistics, so the copy changes nothing; with plain BatchNorm it discards the other ranks' updates: the
    # running statistics (used in eval, saved from rank 0) follow rank 0's micro-batches alone.
    model = bundle.model
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        # Before prepare(): DDP must wrap, and register the buffers of, the layers that will run.
        model = batchnorm.convert_sync_batchnorm(model, cuda=accelerator.device.type == "cuda")
    optim = resolve_optim(cfg.optim, plan.global_batch_size)
    optimizer = build_optimizer(optim, model)
    # Only model and optimizer go through prepare(): the sample order and the LR are owned by the loop.
    model, optimizer = accelerator.prepare(model, optimizer)
    # Different dropout draws per rank, as separate devices would have; identical runs stay identical.
    torch.manual_seed(cfg.run.seed + 1 + accelerator.process_index)
    order = SampleOrder(len(data.train), plan.global_batch_size, cfg.run.seed)
    cfg.run.max_steps = resolve_max_steps(cfg.run.max_steps, cfg.run.max_epochs, order.steps_per_epoch)
    evaluator = None
    if data.eval is not None:
        evaluator = Evaluator(accelerator, data.eval, cfg.eval.batch_size or plan.micro_batch_size, bundle.task)
    return StepContext(
        cfg,
        accelerator,
        model,
        optimizer,
        data.train,
        plan,
        order,
        bundle.task,
        optim,
        evaluator=evaluator,
        data_info=data.info,
    )


def describe_plan(ctx: StepContext) -> str:
    line = f"plan: {ctx.plan.describe()} samples/step"
    if ctx.task == LM:
        mean_targets = sum(len(e) - 1 for e in ctx.dataset.examples) / len(ctx.dataset)
        line += f" (~{mean_targets * ctx.plan.global_batch_size:,.0f} tokens/step)"
    cfg = ctx.cfg
    per_epoch = f"{ctx.order.steps_per_epoch} steps/epoch"
    if cfg.run.max_epochs > 0:
        per_epoch = f"run.max_epochs={cfg.run.max_epochs:g} x {per_epoch}, rounded up"
    return (
        f"{line}\n      backend={distributed.backend_name()} device={ctx.accelerator.device} dtype={cfg.run.dtype} "
        f"precision={cfg.precision} sync={cfg.batch.sync} loss_normalization={cfg.batch.loss_normalization}\n"
        f"      steps={cfg.run.max_steps} ({per_epoch}) samples={len(ctx.dataset)} "
        f"eval_samples={ctx.data_info['eval_samples']} tokenized_cache={ctx.data_info['tokenized_cache']}\n"
        f"      {ctx.optim.describe()}"
    )


def error_line(message: str, every_rank: bool = False) -> None:
    """One line on stderr: from each machine's first process for errors every rank shares, from each rank
    for its own failure."""
    rank = distributed.env_rank()
    if every_rank and distributed.launched_world_size() > 1:
        print(f"error: rank {rank}: {message}", file=sys.stderr, flush=True)
    elif distributed.local_rank() == 0:  # once per machine: each node's log shows it
        print(f"error: {message}", file=sys.stderr, flush=True)


def resume_point(cfg: Config, plan: BatchPlan) -> checkpoint.CheckpointInfo | None:
    """The checkpoint to resume, checked against this run before anything is written."""
    path = checkpoint.resolve_resume(cfg)
    if path is None:
        return None
    info = checkpoint.read_checkpoint(path)
    checkpoint.check_compatible(info, cfg, plan)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signals = STOP_SIGNALS
    signals.install()
    accelerator = ctx = None
    try:
        cfg = load_config(args.config, args.overrides)
        trackers = distributed.tracker_names(cfg.run.log_with)
        # Checks that need no process group run first, identically on every rank.
        plan = plan_batch(
            cfg.batch.global_batch_size,
            cfg.batch.micro_batch_size,
            cfg.batch.accum_steps,
            distributed.launched_world_size(),
        )
        batchnorm.check_micro_batch(cfg.model, plan.micro_batch_size)
        resume = resume_point(cfg, plan)
        # Continuing a run in its own folder is let in; a checkpoint from elsewhere never writes over a run here.
        own = (
            resume is not None
            and resume.path.resolve().parent == checkpoint.checkpoint_dir(cfg.run.output_dir).resolve()
        )
        # Every rank checks, on every machine: on a shared filesystem they all see the same folder and refuse
        # together, at once, instead of leaving the other machines waiting in the rendezvous for a rank 0 that
        # has quit. Only the main process writes there, and only after the process group has formed (the gloo
        # connect, or DDP's first broadcast under NCCL, waits for every rank), hence after every rank's check:
        # a slower machine never finds the results of the run it belongs to (measured: 2 machines, one folder).
        check_output_dir(Path(cfg.run.output_dir), cfg.run.overwrite, resuming=own)
        distributed.preflight(cfg)
        accelerator = distributed.init_accelerator(cfg, trackers)
        ctx = build(cfg, accelerator)
        ctx.stop_requested = signals
        note = ""
        if resume is not None:
            checkpoint.check_step(resume, cfg)  # against the resolved run.max_steps
            note = checkpoint.load_checkpoint(resume, accelerator, ctx.model, ctx.optimizer, ctx.plan)
            ctx.start_step = resume.step
        if accelerator.is_main_process:
            print(describe_plan(ctx), flush=True)
            if resume is not None:
                print(f"resume: step {resume.step} from {resume.path} ({note})", flush=True)
        distributed.start_trackers(accelerator, {**flatten(cfg.to_dict()), "optim.lr_resolved": ctx.optim.lr})
        summary = run_loop(ctx)
    except UserError as err:
        error_line(str(err))
        return EXIT_USER_ERROR
    except (NonFiniteError, checkpoint.NonFiniteModelError) as err:
        error_line(f"{err}; the last checkpoint holds the last finite model")
        return EXIT_NONFINITE
    except RuntimeError as err:  # DistError is one too
        message = distributed.comm_failure_message(err)
        if message is None:
            raise
        error_line(message, every_rank=True)
        return EXIT_COLLECTIVE
    finally:
        ctx = None  # the DDP model in it holds the process group: released before the group is destroyed
        distributed.shutdown(accelerator)
    if summary["stopped"] and signals.received is not None:
        return EXIT_ON_SIGNAL[signals.received]
    return 0


def cli() -> None:
    """The command-line entry (``accelerate launch launcher/train.py``, ``accum-train``)."""
    code = main()
    if code == EXIT_USER_ERROR and distributed.local_rank() != 0 and STOP_SIGNALS.received is None:
        # A shared error is printed by each machine's first process only, and the launcher stops every rank as
        # soon as one exits: wait here (the launcher ends the wait when that process exits) so that this rank, if it
        # got there first, does not get the printing process killed before its line is out.
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
