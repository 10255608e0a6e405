"""BatchNorm under accumulation and DDP: what one statistic is taken over, and SyncBatchNorm on CPU.

BatchNorm normalizes each forward by the mean and variance of that forward's batch. Gradient
accumulation splits the global batch into micro-batches, so every statistic covers one micro-batch:
no loss normalization can make K small batches behave like one big one. SyncBatchNorm takes the
statistics over the same micro-step of every rank (world x micro samples), never over the micro-steps
of a window, which are separate forwards in time.

torch's ``nn.SyncBatchNorm`` runs on CUDA only (it refuses CPU tensors); ``CpuSyncBatchNorm`` is the
same idea for gloo: one differentiable all-reduce of per-rank sums per layer and forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

from launcher.rundir import BatchNormInfo
from launcher.runplan import batch_norm_micro_batch_error


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics cover the whole process group's batch, on any backend.

    Each rank contributes the sum, the sum of squares and the count of its samples per channel; one
    all-reduce gives the global mean and biased variance used to normalize, exactly what one process
    would compute over the concatenated batch. The all-reduce is the differentiable one, whose backward
    all-reduces the gradients of those sums: each rank's inputs get the gradient of every rank's loss
    through the shared statistics, as in a single big batch. Running statistics are updated with the
    unbiased variance over the global count, as BatchNorm1d does over a full batch.

    Without a process group, and in eval mode (running statistics), it is plain BatchNorm. Parameters and
    buffers are BatchNorm's, so state dicts (and checkpoints) are interchangeable with the unconverted model's.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a (N, C, ...) input, got {x.dim()} dimension(s)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.size(1)
        dims = [0, *range(2, x.dim())]  # every dimension but the channel: (N, C) or (N, C, L)
        count = torch.full((1,), x.numel() / channels, dtype=x.dtype, device=x.device)
        # The functional all-reduce is differentiable (its backward all-reduces the gradient); it is what torch
        # names as the successor of the deprecated torch.distributed.nn.functional.all_reduce.
        stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]), "sum", dist.group.WORLD)
        total, total_sq, n = stats[:channels], stats[channels : 2 * channels], stats[2 * channels]
        mean = total / n
        var = (total_sq / n - mean * mean).clamp(min=0)  # biased: what normalizes the batch
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp(min=1))
        return y

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        # momentum=None is a cumulative average, as in _BatchNorm.forward.
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def convert_sync_batchnorm(model: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm layer of ``model`` synced over the process group; call it before ``prepare()``
    (DDP registers the parameters and buffers it sees then). On CUDA, torch's own SyncBatchNorm."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        converted = CpuSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        # The same Parameter and buffer objects, as torch's convert_sync_batchnorm does: nothing is copied,
        # and an optimizer built before the conversion would still hold the right tensors.
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert_cpu(child))
    return converted


def samples_per_statistic(micro_batch_size: int, world_size: int, sync: bool) -> int:
    """Samples one BatchNorm statistic is taken over: one micro-batch, or one micro-step of every rank."""
    return micro_batch_size * (world_size if sync and world_size > 1 else 1)


def check_micro_batch(model_name: str, micro_batch_size: int, model: nn.Module) -> None:
    """Refuse a micro-batch of one sample for a model with BatchNorm layers (in training, torch cannot take the
    variance of one sample); the built-in mlp-bn is refused by name earlier, by ``plan.make_plan``."""
    if micro_batch_size < 2 and any(isinstance(m, _BatchNorm) for m in model.modules()):
        raise batch_norm_micro_batch_error(model_name, micro_batch_size)


def summary(model: nn.Module, micro_batch_size: int, world_size: int) -> BatchNormInfo | None:
    """summary.json's ``batch_norm``: None without BatchNorm layers; else how many, whether they are synced
    (converted, which needs more than one process) and how many samples each statistic covers."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not layers:
        return None
    sync = any(isinstance(m, (nn.SyncBatchNorm, CpuSyncBatchNorm)) for m in layers)
    return BatchNormInfo(len(layers), sync, samples_per_statistic(micro_batch_size, world_size, sync))
