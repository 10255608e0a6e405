"""Preflight: warnings (never refusals) about what will break equivalence in a mode, before anything runs."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from launcher.batchnorm import convert_sync_batchnorm, samples_per_statistic
from launcher.builtin import BUILTIN_TASKS, SYNTHETIC_TASKS
from launcher.compare.config import EQUAL
from launcher.compare.modes import PlannedMode
from launcher.config import Config
from launcher.models import build_model, model_spec, pretrained_config


def known_task(train: Config) -> str | None:
    """lm / cls when the config says so without loading anything; None when only the model knows."""
    if train.model.task != "auto":
        return train.model.task
    return BUILTIN_TASKS.get(train.model.name) or SYNTHETIC_TASKS.get(train.data.name)


def batch_norm_layers(model: Any) -> list[str]:
    """Types of the BatchNorm layers (SyncBatchNorm included) among ``model``'s modules."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)})


def model_dropout(train: Config) -> float:
    """The dropout the mode trains with: model.dropout, else the model's own (0 for the built-in models)."""
    if train.model.dropout is not None or train.model.name in BUILTIN_TASKS:
        return train.model.dropout or 0.0
    try:
        config = pretrained_config(train.model.name)
    except (OSError, ValueError):
        return 0.0  # the launch reports the model that cannot load
    return max(
        (v for k, v in vars(config).items() if isinstance(v, float) and ("dropout" in k or "pdrop" in k)), default=0.0
    )


@dataclass(frozen=True)
class ModelLook:
    batch_norm: list[str]  # BatchNorm layer types, as the mode's launch will train them
    param_bytes: int  # the full model's parameters in the run's dtype


def look_at_model(train: Config) -> ModelLook:
    """The model a mode's config names, built on the meta device (the module tree, no memory, no weights
    download): its BatchNorm layers (synced when model.sync_batchnorm is set and the mode has more than one
    process; plan_modes sets run.expected_world_size to its process count) and its size."""
    with torch.device("meta"):
        if train.model.name in BUILTIN_TASKS:
            task = BUILTIN_TASKS[train.model.name]
            model = build_model(model_spec(train.model), task, 2, train.data.seq_len, torch.float32)
        else:
            from transformers import AutoModel  # an hf: model's classes only: the built-in ones need none

            model = AutoModel.from_config(pretrained_config(train.model.name))
    if train.model.sync_batchnorm and train.run.expected_world_size > 1:
        model = convert_sync_batchnorm(model, cuda=torch.cuda.is_available())
    width = 8 if train.run.dtype == "float64" else 4
    return ModelLook(batch_norm_layers(model), sum(p.numel() for p in model.parameters()) * width)


def _mode_warnings(pm: PlannedMode, reference: PlannedMode, look: ModelLook) -> list[str]:
    train, why, bn_layers = pm.train, [], look.batch_norm
    dropout = model_dropout(train)
    if dropout > 0:
        why.append(f"model.dropout={dropout:g} > 0: each split draws different dropout masks")
    if train.precision != "no":
        why.append(f"precision={train.precision}: low-precision rounding differs with the micro-batch split")
    if train.batch.loss_normalization == "mean":
        # A classifier's items are samples, equal per micro-batch but in an epoch's short last window; an LM's
        # are tokens, which vary with every sequence length (and an hf: model of unknown task may be an LM).
        # num_samples=0 takes every row of a file: the window sizes are unknown until it is read.
        global_batch = pm.plan.batch.global_batch_size
        short_window = train.data.num_samples == 0 or train.data.num_samples % global_batch != 0
        if known_task(train) != "cls":
            why.append(
                "batch.loss_normalization=mean with variable lengths: a mean per micro-batch weighs tokens "
                "unequally when micro-batches hold different token counts"
            )
        elif short_window:
            why.append("batch.loss_normalization=mean: the short last window of an epoch is averaged per micro-batch")
    if bn_layers and pm is not reference:
        ours, theirs = (
            samples_per_statistic(p.plan.batch.micro_batch_size, p.plan.batch.world_size, p.train.model.sync_batchnorm)
            for p in (pm, reference)
        )
        if ours != theirs:
            why.append(
                f"BatchNorm ({', '.join(bn_layers)}): statistics over {ours} samples per micro-step, the "
                f"reference's over {theirs}: normalization changes with the split"
            )
    if pm.mode.expect == EQUAL and pm.changed:
        why.append(f"changes more than the split vs reference {reference.name!r} ({'; '.join(pm.changed)})")
    if train.parallel.strategy == "fsdp" and train.batch.sync == "no_sync" and pm.plan.batch.accum_steps > 1:
        why.append(
            f"FSDP with batch.sync=no_sync holds the window's gradients unsharded between micro-steps: about "
            f"{look.param_bytes / 2**20:,.1f} MiB per rank, a full replica's (batch.sync=every_step keeps them "
            f"sharded, at {pm.plan.batch.accum_steps}x the reduce-scatter bytes)"
        )
    if pm.plan.batch.world_size > (os.cpu_count() or 1):
        why.append(f"{pm.plan.batch.world_size} processes on {os.cpu_count()} cores: timings are oversubscribed")
    return why


def preflight(planned: list[PlannedMode], reference: PlannedMode) -> list[str]:
    """Warnings about what will break equivalence, one line per cause, naming the modes."""
    looks: dict[str, ModelLook] = {}
    by_cause: dict[str, list[str]] = {}
    for pm in planned:
        key = json.dumps([dataclasses.asdict(pm.train.model), pm.train.data.seq_len, pm.plan.batch.world_size])
        if key not in looks:
            try:
                looks[key] = look_at_model(pm.train)
            except Exception as err:  # inspection is best effort: a model that cannot load fails its run, reported
                cause = f"could not inspect the model ({type(err).__name__})"
                by_cause.setdefault(cause, []).append(pm.name)
                looks[key] = ModelLook([], 0)
        for cause in _mode_warnings(pm, reference, looks[key]):
            by_cause.setdefault(cause, []).append(pm.name)
    everyone = len(planned)
    return [
        f"{'all modes' if len(names) == everyone and everyone > 1 else ', '.join(names)}: {cause}"
        for cause, names in by_cause.items()
    ]
