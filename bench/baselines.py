"""The loops the launcher is measured against, on the launcher's own model and data builders (the same initial
weights and the same samples in the same order as a launcher run with the same seed).

    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py plain   --out plain.json ...
    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py trainer --out trainer.json ...
    accelerate launch --multi_gpu --num_processes 2 bench/baselines.py hosts+plain --out both.json \
        --accum-steps 4,4 --steps 240,160 ... key=value ...

``plain`` is a hand-written DDP loop the nanoGPT way: ``require_backward_grad_sync`` set on the last micro-step
only, the loss divided by K, DDP's built-in all-reduce. ``trainer`` is the Transformers Trainer with
``gradient_accumulation_steps``. ``hosts+plain`` runs the launcher, then the Trainer, each with ``plain`` beside
it, a step of each in turn; ``no_sync+every_step`` runs the launcher's two sync policies side by side, once per
K. Each writes its per-step wall times (seconds) as JSON on rank 0.

A launch runs its loops in legs, one after the other, each with its own K, step cap and time budget (the
comma-separated ``--accum-steps``, ``--steps``, ``--budget-s`` and ``--min-steps``, a value per leg): a second
leg in the same process spares the benchmark a launch's start-up (imports, a process group; 13-40 s here).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from launcher.run import Run
from launcher.rundir import RunDir, StepRecord

SEED = 0
SYNC_POLICIES = ("no_sync", "every_step")
LEG_COUNTS = {"plain": 1, "trainer": 1, "hosts+plain": 2}  # no_sync+every_step: a leg per K, any number


@dataclass(frozen=True)
class Leg:
    """One loop's turn in a launch: its K, and its length (Budget)."""

    accum_steps: int
    steps: int
    budget_s: float | None
    min_steps: int


def listed(kind: Callable[[str], float]) -> Callable[[str], list]:
    """An option's comma-separated values, a leg each."""
    return lambda text: [kind(value) for value in text.split(",")]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("loop", choices=list(LOOPS))
    p.add_argument("--out", required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--accum-steps", type=listed(int), required=True, help="K, a value per leg")
    p.add_argument("--steps", type=listed(int), help="each leg's steps; with --budget-s, the most (default 12)")
    p.add_argument("--budget-s", type=listed(float), help="each leg stops at its first step past these seconds")
    p.add_argument("--min-steps", type=listed(int), help="never stop a leg for its budget before these (default 1)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=1024)
    p.add_argument("--toggle-breakdown", action="store_true", help="hosts+plain: the launcher's breakdown on/off")
    p.add_argument("overrides", nargs="*", help="the launcher's overrides (hosts+plain, no_sync+every_step)")
    args = p.parse_intermixed_args()
    count = len(args.accum_steps)
    args.steps, args.min_steps = args.steps or [12] * count, args.min_steps or [1] * count
    args.budget_s = args.budget_s or [None] * count
    wanted = LEG_COUNTS.get(args.loop, count)
    if count != wanted:
        p.error(f"{args.loop} runs {wanted} leg(s): --accum-steps takes {wanted} value(s), not {count}")
    if not len(args.steps) == len(args.min_steps) == len(args.budget_s) == count:
        p.error(f"--accum-steps gives {count} leg(s): --steps, --budget-s and --min-steps need a value each")
    values = zip(args.accum_steps, args.steps, args.budget_s, args.min_steps, strict=True)
    args.legs = [Leg(*leg) for leg in values]
    return args


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


class PlainLoop:
    """The hand-written DDP loop, one optimizer step per ``step()`` call, on the default process group."""

    def __init__(self, args: argparse.Namespace, leg: Leg, device: torch.device) -> None:
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.device = device
        model, self.data = build(args)
        self.model = torch.nn.parallel.DistributedDataParallel(model.to(device))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.plan = BatchPlan(world, args.micro_batch_size, leg.accum_steps)
        self.order = SampleOrder(len(self.data), self.plan.global_batch_size, SEED)

    def step(self, step: int) -> float:
        """Train optimizer step ``step`` (0-based); returns its wall time (s)."""
        start = time.perf_counter()
        window, plan, model = self.order.window(step), self.plan, self.model
        for m in range(plan.accum_steps):
            batch = self.data.collate(micro_batch_ids(window, plan, self.rank, m), plan.micro_batch_size, window[0])
            batch = {k: v.to(self.device) for k, v in batch.items()}
            model.require_backward_grad_sync = m == plan.accum_steps - 1  # all-reduce on the last only
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
            )
            (loss / plan.accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def plain(args: argparse.Namespace) -> dict[str, list[float]]:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    (leg,) = args.legs
    loop = PlainLoop(args, leg, device)
    return {"step_time_s": [loop.step(step) for step in range(leg.steps)]}


class Budget:
    """A leg's length: ``leg.steps``, or fewer once ``leg.budget_s`` seconds have passed (after at least
    ``leg.min_steps``), so that a slow machine ends on time with fewer pairs instead of running long.
    Rank 0's clock decides and every rank hears it, so all stop at the same step."""

    def __init__(self, leg: Leg) -> None:
        self.steps, self.seconds, self.min_steps = leg.steps, leg.budget_s, leg.min_steps
        self.began: float | None = None  # the first call: the steps' time, not the launch's start-up

    def over(self, done: int, device: torch.device) -> bool:
        """After ``done`` steps: stop now? (A broadcast when a budget is set: call it on every rank.)"""
        if done >= self.steps:
            return True
        if self.began is None:
            self.began = time.perf_counter()
        if self.seconds is None or done < self.min_steps:
            return False
        spent = torch.tensor([float(time.perf_counter() - self.began >= self.seconds)], device=device)
        dist.broadcast(spent, src=0)
        return bool(spent.item())


class Alternation:
    """Called after each step of a host loop (the launcher, the Trainer): times the host's step from the end of
    the last call, then, with ``with_plain``, runs the plain loop's step of the same number, timed apart. Both
    loops train their own copy of the same model on the same samples, a step of each in turn, so whatever makes
    one launch or one second faster than another falls on both. Returns whether the host should stop (Budget)."""

    def __init__(self, args: argparse.Namespace, leg: Leg, with_plain: bool) -> None:
        self.args, self.leg, self.with_plain = args, leg, with_plain
        self.times: dict[str, list[float]] = {"host_step_s": [], "plain_step_s": []}
        self._loop: PlainLoop | None = None
        self._mark = math.nan  # when the last call returned: the host's next step starts there
        self._budget = Budget(leg)

    def start(self) -> None:
        self._mark = time.perf_counter()

    def __call__(self, step: int, device: torch.device) -> bool:
        """After the host's step ``step`` (1-based) on ``device``."""
        self.times["host_step_s"].append(time.perf_counter() - self._mark)
        if self.with_plain:
            if self._loop is None:  # built once the host's process group exists
                self._loop = PlainLoop(self.args, self.leg, device)
            self.times["plain_step_s"].append(self._loop.step(step - 1))
        over = self._budget.over(step, device)
        if over:
            self._loop = None  # its DDP model holds the group: released before the host tears it down
            gc.collect()
        self.start()
        return over


def launcher_plain(args: argparse.Namespace, leg: Leg) -> dict[str, list]:
    """The launcher (train.py's train() on the overrides) alternating with the plain loop. Its first step has
    no start mark (NaN). With ``--toggle-breakdown`` its time breakdown is on every other step only."""
    from launcher.config import load_config
    from launcher.measure import COUNTER
    from launcher.train import train

    COUNTER.install()
    alternation, timed = Alternation(args, leg, with_plain=True), []

    def after_step(run: Run, record: StepRecord) -> bool:
        timed.append(record.time_breakdown is not None)
        if args.toggle_breakdown:
            run.clock.enabled = not run.clock.enabled
        return alternation(record.step, run.accelerator.device)

    train(load_config(None, args.overrides), after_step)
    return {**alternation.times, "host_timed": timed}


def hosts_plain(args: argparse.Namespace) -> dict[str, dict]:
    """The launcher's leg, then the Trainer's, each alternating with the plain loop, in one launch."""
    from accelerate.state import AcceleratorState, GradientState

    launcher_leg, trainer_leg = args.legs
    got = {"launcher": launcher_plain(args, launcher_leg)}
    # The launcher tore its process group down at its end, but Accelerate's state still holds it: forgotten,
    # so that the Trainer forms its own. The two groups' keys in the launch's store differ (the launcher's
    # carry its attempt's prefix: launcher/distributed.py form_group), so no stale address is read.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    got["trainer"] = trainer(args, trainer_leg, with_plain=True)
    return got


def sync_policies(args: argparse.Namespace) -> dict[str, dict[str, list]]:
    """Two launcher runs in one process on their own copies of the model, ``batch.sync=no_sync`` and
    ``every_step``, a step of each in turn through the launcher's own ``train_step``: what no_sync saves, in
    a leg per K (keyed ``k1``, ``k8``, ...). At K=1 both do the same work, the method's own check."""
    from launcher import trainer
    from launcher.config import load_config
    from launcher.distributed import init_accelerator, join_launch, launched_world_size, shutdown
    from launcher.measure import COUNTER
    from launcher.runplan import make_plan
    from launcher.step import train_step

    COUNTER.install()
    accelerator, got = None, {}
    for leg in args.legs:
        k = leg.accum_steps
        per_k = [*args.overrides, f"batch.accum_steps={k}"]
        cfgs = {
            sync: load_config(None, [*per_k, f"batch.sync={sync}", f"run.output_dir={args.out}.k{k}.{sync}"])
            for sync in SYNC_POLICIES
        }
        if accelerator is None:
            accelerator = init_accelerator(cfgs["no_sync"], [], join_launch(cfgs["no_sync"].run.dist_timeout_s))
        runs = {
            sync: trainer.build(
                cfg, make_plan(cfg, launched_world_size()), accelerator, RunDir(cfg.run.output_dir), None, lambda: False
            )[0]
            for sync, cfg in cfgs.items()
        }
        fields = ("step_s", "allreduce_bytes", "time_breakdown")
        out: dict[str, list] = {f"{sync}_{field}": [] for sync in runs for field in fields}
        budget, step = Budget(leg), 0
        while not budget.over(step, accelerator.device):
            for sync in SYNC_POLICIES if step % 2 == 0 else SYNC_POLICIES[::-1]:  # each goes first every other step
                record, _ = train_step(runs[sync], step)
                out[f"{sync}_step_s"].append(record.step_time_s)
                out[f"{sync}_allreduce_bytes"].append(record.allreduce_bytes)
                out[f"{sync}_time_breakdown"].append(record.time_breakdown)
            step += 1
        for run in runs.values():
            run.feeder.close()
        runs.clear()  # the DDP models hold the group: released before it is torn down
        accelerator.free_memory()  # and Accelerate's references to them
        got[f"k{k}"] = out
    shutdown(accelerator)
    return got


def trainer(args: argparse.Namespace, leg: Leg | None = None, with_plain: bool = False) -> dict[str, list[float]]:
    """The Transformers Trainer on the same model and samples, alone or alternating with the plain loop."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data = build(args)
    # The Trainer draws its own sample order; its collator pads like the launcher's.
    rows = [{"id": i} for i in range(len(data))]

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        return data.collate([item["id"] for item in items], len(items), items[0]["id"])

    if leg is None:  # the Trainer alone
        (leg,) = args.legs
    alternation = Alternation(args, leg, with_plain)

    class StepClock(TrainerCallback):
        def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003
            alternation.start()

        def on_step_end(self, targs, state, control, **k):  # noqa: ANN001, ANN003
            control.should_training_stop = alternation(state.global_step, targs.device)

    cuda = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=leg.accum_steps,
        max_steps=leg.steps,
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
    return alternation.times if with_plain else {"step_time_s": alternation.times["host_step_s"]}


LOOPS = {
    "plain": plain,
    "trainer": trainer,
    "hosts+plain": hosts_plain,
    "no_sync+every_step": sync_policies,
}


def main() -> None:
    pin_to_core()
    args = parse()
    times = LOOPS[args.loop](args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(times))
    # The DDP model, gone with plain()'s frame but held by reference cycles, owns the group: collected here,
    # while the interpreter is alive (its gloo threads torn down at finalization abort the process).
    gc.collect()
    if dist.is_initialized():  # gloo aborts a process that exits while its peer still holds the group
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
