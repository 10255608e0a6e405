"""Build a run for the launch: model, data, plan with its steps, strategy, train state, evaluator, resume."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from launcher import batchnorm, checkpoint, distributed
from launcher.batching import SampleOrder
from launcher.builtin import LM
from launcher.config import Config
from launcher.data import build_datasets
from launcher.data.feed import WindowFeeder
from launcher.evaluate import Evaluator
from launcher.lr import ResolvedOptim
from launcher.measure import MicroStepMeter
from launcher.models import build_model, model_spec
from launcher.parallel import strategy_for
from launcher.run import Run
from launcher.rundir import DataInfo, RestartRecord, RunDir
from launcher.runplan import RunPlan
from launcher.state import TrainState
from launcher.timing import StepClock

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_optimizer(optim: ResolvedOptim, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer with the batch-scaled values; the lr set here is replaced by ``lr_at`` before every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = optim.cfg
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=cfg.weight_decay
    )


def build(
    cfg: Config,
    plan: RunPlan,
    accelerator: Accelerator,
    folder: RunDir,
    resume: checkpoint.CheckpointInfo | None,
    stop_requested: Callable[[], bool],
    restart: RestartRecord | None = None,
) -> tuple[Run, str]:
    """The run, prepared for the launch (same seed: same initial weights) and restored from ``resume``; returns
    it with a note on what the resume restored."""
    set_seed(cfg.run.seed)
    spec = model_spec(cfg.model)  # the tokenizer and what the architecture says of the task: no weights yet
    # Each machine's first process tokenizes (and fills the token store); the others then map the store. The
    # task and the classes of a base model come from the data, so labels are checked before any weight loads.
    with distributed.local_main_first(accelerator):
        data = build_datasets(cfg.data, cfg.eval, cfg.model, spec, cfg.run.seed, distributed.local_rank() == 0)
    plan = plan.with_train_samples(len(data.train))
    if resume is not None:
        checkpoint.check_step(resume, plan.max_steps)
    model = build_model(spec, data.task, data.num_labels, data.positions(cfg.data.seq_len), DTYPES[cfg.run.dtype])
    batchnorm.check_micro_batch(cfg.model.name, plan.batch.micro_batch_size, model)  # hf: models too
    # DDP's default broadcast_buffers=True copies rank 0's buffers to every rank at the first forward after
    # each synced backward (once per optimizer step). With SyncBatchNorm every rank computes the same running
    # statistics, so the copy changes nothing; with plain BatchNorm it discards the other ranks' updates: the
    # running statistics (used in eval, saved from rank 0) follow rank 0's micro-batches alone.
    if cfg.model.sync_batchnorm and accelerator.num_processes > 1:
        # Before prepare(): DDP must wrap, and register the buffers of, the layers that will run.
        model = batchnorm.convert_sync_batchnorm(model, cuda=accelerator.device.type == "cuda")
    if resume is not None:
        checkpoint.load_weights(resume, model)  # a full replica's, before the strategy wraps or shards the model
    strategy = strategy_for(cfg)
    # Only model and optimizer go through the strategy: the sample order and the LR are owned by the loop.
    prepared, optimizer = strategy.prepare(accelerator, model, lambda m: build_optimizer(plan.optim, m))
    state = TrainState(prepared, accelerator.unwrap_model(prepared), optimizer, accelerator.scaler)
    # Different dropout draws per rank, as separate devices would have; identical runs stay identical.
    torch.manual_seed(cfg.run.seed + 1 + accelerator.process_index)
    note = ""
    if resume is not None:
        note = checkpoint.load_checkpoint(resume, state, strategy, accelerator.process_index, plan.batch.world_size)
    evaluator = None
    if data.eval is not None:
        eval_batch = cfg.eval.batch_size or plan.batch.micro_batch_size
        evaluator = Evaluator(accelerator, data.eval, eval_batch, data.task)
    run = Run(
        cfg=cfg,
        plan=plan,
        accelerator=accelerator,
        strategy=strategy,
        state=state,
        dataset=data.train,
        feeder=WindowFeeder(
            data.train,
            SampleOrder(
                len(data.train), plan.batch.global_batch_size, cfg.run.seed, cfg.batch.window_order == "reversed"
            ),
            plan.batch,
            accelerator.process_index,
            data.task,
            pin=accelerator.device.type == "cuda",
        ),
        task=data.task,
        folder=folder,
        data_info=DataInfo(**data.info, layout=data.layout),
        num_labels=data.num_labels,
        evaluator=evaluator,
        stop_requested=stop_requested,
        resumed_from_step=state.step,
        meter=MicroStepMeter(strategy, state.model),
        restart=restart,
        clock=StepClock(accelerator.device, cfg.run.time_breakdown),
    )
    return run, note


def describe(run: Run) -> str:
    """The plan lines printed at start: the batch plan, the launch, the steps and data, the learning rate."""
    cfg, plan = run.cfg, run.plan
    line = f"plan: {plan.batch.describe()} samples/step"
    if run.task == LM:
        line += f" (~{(run.dataset.mean_length - 1) * plan.batch.global_batch_size:,.0f} tokens/step)"
    per_epoch = f"{plan.steps_per_epoch} steps/epoch"
    if plan.max_epochs > 0:
        per_epoch = f"run.max_epochs={plan.max_epochs:g} x {per_epoch}, rounded up"
    info = run.data_info
    what = "blocks" if info.layout == "blocks" else "rows"
    return (
        f"{line}\n      backend={distributed.backend_name()} device={run.accelerator.device} dtype={cfg.run.dtype} "
        f"precision={cfg.precision} sync={cfg.batch.sync} loss_normalization={cfg.batch.loss_normalization}\n"
        f"      steps={plan.max_steps} ({per_epoch}) samples={len(run.dataset)} "
        f"eval_samples={info.eval_samples} tokenized_cache={info.tokenized_cache}\n"
        f"      data: {info.rows_used} of {info.source_rows} {what} used, {info.truncated_rows} cut at "
        f"data.seq_len={cfg.data.seq_len}, task={run.task}"
        + (f" with {run.num_labels} classes" if run.num_labels else "")
        + f"\n      {plan.optim.describe()}"
    )
