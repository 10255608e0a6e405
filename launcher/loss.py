"""The loss: targets, summed cross-entropy, the items that count, and each micro-step's scale.

Exact accumulation needs the loss of a window to be the sum of its items' losses divided by the window's
global item count, a number known before the first backward (every rank sees the whole window's labels).
DDP then averages gradients over the ranks, so each rank's scale carries a factor of the world size that
turns that average back into a sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from launcher.builtin import LM

IGNORE = -100  # label value that contributes no loss and is not counted


def targets(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Labels aligned with the logits: a causal LM predicts token t+1 from position t."""
    return labels[:, 1:] if task == LM else labels


def _aligned(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and their targets, flattened to (items, classes) and (items,)."""
    if task == LM:
        logits = logits[:, :-1]
    return logits.reshape(-1, logits.size(-1)), targets(labels, task).reshape(-1)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum (not mean) of per-item cross-entropy; ignored items add exactly zero."""
    return F.cross_entropy(*_aligned(logits, labels, task), ignore_index=IGNORE, reduction="sum")


def item_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy per item, ignored items exactly zero: shape (batch,) for a classifier, (batch, length - 1)
    for an LM."""
    return F.cross_entropy(*_aligned(logits, labels, task), ignore_index=IGNORE, reduction="none").view(
        targets(labels, task).shape
    )


def micro_step_scales(local_items: list[int], global_items: int, world_size: int, normalization: str) -> list[float]:
    """The factor each micro-step's summed loss is multiplied by before its backward.

    tokens: world_size / the window's global item count, the same for every micro-step (exact).
    mean: 1 / (this micro-batch's items x K), the naive per-micro-batch mean over K micro-steps, kept as the
    baseline it is: wrong whenever micro-batches hold different item counts.
    """
    if normalization == "tokens":
        return [world_size / max(global_items, 1)] * len(local_items)
    return [1.0 / (max(n, 1) * len(local_items)) for n in local_items]
