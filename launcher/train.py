"""Train one model under whatever the launch gives: 1 process or N, accumulation derived from the global batch.

    accelerate launch launcher/train.py --config configs/runs/tiny_lm.yaml [key=value ...]
    python launcher/train.py --config configs/runs/tiny_lm.yaml        # one process, no launcher

The same config trains the same optimizer steps on the same samples under every launch:
accum_steps = global_batch_size / (micro_batch_size x world_size).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate.utils import set_seed

from launcher import distributed
from launcher.batching import SampleOrder, plan_batch
from launcher.config import Config, UserError, load_config
from launcher.data import build_dataset
from launcher.loop import StepContext, build_optimizer, run_loop
from launcher.metrics import check_output_dir
from launcher.models import LM, build_model

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launcher/train.py",
        description="Train under accumulation, DDP or both; the launch decides the world size.",
    )
    parser.add_argument("--config", help="training config (YAML); defaults apply without one")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.01")
    return parser.parse_args(argv)


def build(cfg: Config, accelerator) -> StepContext:
    """Model, data, batch plan and optimizer, prepared for the launch (same seed: same initial weights)."""
    set_seed(cfg.run.seed)
    bundle = build_model(cfg.model, cfg.data.seq_len, DTYPES[cfg.run.dtype])
    dataset = build_dataset(cfg.data, bundle, cfg.run.seed, cfg.model.num_labels)
    plan = plan_batch(
        cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.batch.accum_steps, accelerator.num_processes
    )
    optimizer = build_optimizer(cfg.optim, bundle.model)
    # Only model and optimizer go through prepare(): the sample order and the LR are owned by the loop.
    model, optimizer = accelerator.prepare(bundle.model, optimizer)
    # Different dropout draws per rank, as separate devices would have; identical runs stay identical.
    torch.manual_seed(cfg.run.seed + 1 + accelerator.process_index)
    order = SampleOrder(len(dataset), plan.global_batch_size, cfg.run.seed)
    return StepContext(cfg, accelerator, model, optimizer, dataset, plan, order, bundle.task)


def describe_plan(ctx: StepContext) -> str:
    line = f"plan: {ctx.plan.describe()} samples/step"
    if ctx.task == LM:
        mean_targets = sum(len(e) - 1 for e in ctx.dataset.examples) / len(ctx.dataset)
        line += f" (~{mean_targets * ctx.plan.global_batch_size:,.0f} tokens/step)"
    cfg = ctx.cfg
    return (
        f"{line}\n      backend={distributed.backend_name()} device={ctx.accelerator.device} dtype={cfg.run.dtype} "
        f"precision={cfg.precision} sync={cfg.batch.sync} loss_normalization={cfg.batch.loss_normalization} "
        f"steps={cfg.run.max_steps} samples={len(ctx.dataset)} ({ctx.order.steps_per_epoch} steps/epoch)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Checks that need no process group run first, identically on every rank.
        plan_batch(
            cfg.batch.global_batch_size,
            cfg.batch.micro_batch_size,
            cfg.batch.accum_steps,
            distributed.launched_world_size(),
        )
        check_output_dir(Path(cfg.run.output_dir), cfg.run.overwrite)
        distributed.preflight(cfg)
        accelerator = distributed.init_accelerator(cfg)
        ctx = build(cfg, accelerator)
        if accelerator.is_main_process:
            print(describe_plan(ctx), flush=True)
        run_loop(ctx)
    except UserError as err:
        if distributed.local_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:
        message = distributed.comm_failure_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 3
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
