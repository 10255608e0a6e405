"""The loops the launcher is measured against, on the launcher's own model and data builders.

    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py plain   --out plain.json ...
    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py trainer --out trainer.json ...

`plain` is a hand-written DDP loop the nanoGPT way: `require_backward_grad_sync` set on the last
micro-step only, loss divided by K. `trainer` is the Transformers Trainer with
`gradient_accumulation_steps`. Each writes its per-step wall times (seconds) as JSON on rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.batching import BatchPlan, SampleOrder, micro_batch_ids
from launcher.config import DataConfig, EvalConfig, ModelConfig
from launcher.data import build_datasets
from launcher.loss import IGNORE
from launcher.models import build_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("loop", choices=["plain", "trainer"])
    p.add_argument("--out", required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--accum-steps", type=int, required=True)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1024)
    return p.parse_args()


def build(args: argparse.Namespace):
    torch.manual_seed(0)
    bundle = build_model(
        ModelConfig(name="tiny-gpt2", hidden_size=args.hidden_size, num_layers=args.num_layers),
        args.seq_len,
        torch.float32,
    )
    data = build_datasets(
        DataConfig(name="synthetic-lm", num_samples=args.num_samples, seq_len=args.seq_len),
        EvalConfig(),
        bundle,
        seed=0,
        num_labels=2,
    )
    return bundle.model, data.train


def plain(args: argparse.Namespace) -> list[float]:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    model, data = build(args)
    model = torch.nn.parallel.DistributedDataParallel(model.to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plan = BatchPlan(world, args.micro_batch_size, args.accum_steps)
    order = SampleOrder(len(data), plan.global_batch_size, seed=0)
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
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = build(args)
    rows = [{"input_ids": e} for e in data.examples]

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), width), data.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, item in enumerate(items):
            ids[r, : len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[r, : len(item["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}

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
        seed=0,
    )
    Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[StepClock()]).train()
    return [b - a for a, b in zip(ends, ends[1:], strict=False)]


def main() -> None:
    args = parse()
    times = plain(args) if args.loop == "plain" else trainer(args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({"step_time_s": times}))
    if dist.is_initialized():  # gloo aborts a process that exits while its peer still holds the group
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
