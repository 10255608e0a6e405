"""The loops the launcher is measured against, on the launcher's own model and data builders (the same initial
weights and the same samples in the same order as a launcher run with the same seed).

    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py plain   --out plain.json ...
    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py trainer --out trainer.json ...

``plain`` is a hand-written DDP loop the nanoGPT way: ``require_backward_grad_sync`` set on the last micro-step
only, the loss divided by K, DDP's built-in all-reduce. ``trainer`` is the Transformers Trainer with
``gradient_accumulation_steps``. Each writes its per-step wall times (seconds) as JSON on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils import set_seed

from launcher.batching import BatchPlan, SampleOrder, micro_batch_ids
from launcher.builtin import LM
from launcher.config import DataConfig, EvalConfig, ModelConfig
from launcher.data import build_datasets
from launcher.data.dataset import TokenDataset
from launcher.distributed import pin_to_core
from launcher.loss import IGNORE, summed_loss, targets
from launcher.models import build_model, model_spec

SEED = 0


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("loop", choices=["plain", "trainer"])
    p.add_argument("--out", required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--accum-steps", type=int, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1024)
    return p.parse_args()


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, TokenDataset]:
    """What trainer.build makes of the same settings, in the same order from the same seed."""
    set_seed(SEED)
    model_cfg = ModelConfig(hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads)
    spec = model_spec(model_cfg)
    data = build_datasets(
        DataConfig(num_samples=args.num_samples, seq_len=args.seq_len, packing=True),
        EvalConfig(),
        model_cfg,
        spec,
        SEED,
    )
    return build_model(spec, data.task, data.num_labels, data.positions(args.seq_len), torch.float32), data.train


def plain(args: argparse.Namespace) -> list[float]:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    model, data = build(args)
    model = torch.nn.parallel.DistributedDataParallel(model.to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plan = BatchPlan(world, args.micro_batch_size, args.accum_steps)
    order = SampleOrder(len(data), plan.global_batch_size, SEED)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        window = order.window(step)
        for m in range(plan.accum_steps):
            batch = data.collate(micro_batch_ids(window, plan, rank, m), plan.micro_batch_size, window[0])
            batch = {k: v.to(device) for k, v in batch.items()}
            model.require_backward_grad_sync = m == plan.accum_steps - 1  # all-reduce on the last only
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
            )
            (loss / plan.accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def trainer(args: argparse.Namespace) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = build(args)
    # The Trainer draws its own sample order; its collator pads like the launcher's.
    rows = [{"id": i} for i in range(len(data))]

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return data.collate([item["id"] for item in items], len(items), items[0]["id"])

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003
            ends.append(time.perf_counter())

    cuda = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.accum_steps,
        max_steps=args.steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_torch",
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_backend=None if cuda else "gloo",
        ddp_find_unused_parameters=False,
        seed=SEED,
    )

    def loss(outputs: object, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
        # The built-in model returns logits only: the launcher's summed loss over the Trainer's window count.
        items = num_items_in_batch or int((targets(labels, LM) != IGNORE).sum())
        return summed_loss(outputs.logits, labels, LM) / items

    Trainer(
        model=model,
        args=targs,
        train_dataset=rows,
        data_collator=collate,
        callbacks=[StepClock()],
        compute_loss_func=loss,
    ).train()
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    pin_to_core()
    args = parse()
    times = plain(args) if args.loop == "plain" else trainer(args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({"step_time_s": times}))
    # The DDP model, gone with plain()'s frame but held by reference cycles, owns the group: collected here,
    # while the interpreter is alive (its gloo threads torn down at finalization abort the process).
    gc.collect()
    if dist.is_initialized():  # gloo aborts a process that exits while its peer still holds the group
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
