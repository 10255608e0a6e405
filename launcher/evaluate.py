"""Evaluation on the held-out set: sharded over the ranks, every sample counted exactly once.

The eval set goes through an Accelerate-prepared DataLoader: each rank reads its own batches, and
Accelerate pads the last round with repeated samples so every rank runs the same number of forwards.
``gather_for_metrics`` drops those repeats again, so the metrics below see each sample once, whatever
the number of processes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from launcher.builtin import CLS, LM
from launcher.data import TokenDataset
from launcher.distributed import broadcast_buffers
from launcher.loss import IGNORE, item_losses
from launcher.measure import now_s, synchronize


def accuracy(labels: list[int], predictions: list[int]) -> float:
    return sum(a == b for a, b in zip(labels, predictions, strict=True)) / len(labels)


def macro_f1(labels: list[int], predictions: list[int]) -> float:
    """Unweighted mean of the per-class F1 over the classes present in the labels or the predictions (as
    scikit-learn's ``f1_score(average="macro")``): F1 = 2 TP / (2 TP + FP + FN), 0 for a class never
    predicted correctly."""
    pairs = list(zip(labels, predictions, strict=True))
    classes = sorted(set(labels) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(a == c and b == c for a, b in pairs)
        fp = sum(a != c and b == c for a, b in pairs)
        fn = sum(a == c and b != c for a, b in pairs)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


class Evaluator:
    """Evaluates the model on ``dataset``; called by the loop every eval.every_steps and after the last step."""

    def __init__(self, accelerator: Accelerator, dataset: TokenDataset, batch_size: int, task: str) -> None:
        self.accelerator = accelerator
        self.task = task
        loader = DataLoader(
            range(len(dataset)),
            batch_size=batch_size,
            shuffle=False,
            # Padded to the longest sample of the batch, no filler rows (the batch is exactly these samples).
            collate_fn=lambda ids: dataset.collate(list(ids), len(ids), ids[0]),
        )
        self.loader = accelerator.prepare_data_loader(loader)

    def _per_sample(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What each sample contributes: (loss, prediction, label) for a classifier, (summed loss, tokens) for
        an LM; float64 so that sums over the set do not round."""
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        losses = item_losses(logits, batch["labels"], self.task).double()
        if self.task == CLS:
            return losses, logits.argmax(-1), batch["labels"]
        return losses.sum(-1), (batch["labels"][:, 1:] != IGNORE).sum(-1)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, Any]:
        acc = self.accelerator
        started = now_s()
        module = acc.unwrap_model(model)
        # The forwards below go to the unwrapped module: no DDP buffer broadcast or reducer at each of them.
        broadcast_buffers(acc, module)
        gathered: list[list[torch.Tensor]] = []
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.loader:
                    logits = module(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    gathered.append([t.cpu() for t in acc.gather_for_metrics(self._per_sample(batch, logits))])
        finally:
            model.train()
        columns = [torch.cat(parts) for parts in zip(*gathered, strict=True)]
        result: dict[str, Any] = {"step": step, "num_samples": len(columns[0])}
        if self.task == LM:
            losses, tokens = columns
            loss = float(losses.sum()) / max(int(tokens.sum()), 1)
            result.update(loss=loss, perplexity=math.exp(loss), tokens=int(tokens.sum()))
        else:
            losses, predictions, labels = columns
            result.update(
                loss=float(losses.mean()),
                accuracy=accuracy(labels.tolist(), predictions.tolist()),
                macro_f1=macro_f1(labels.tolist(), predictions.tolist()),
            )
        synchronize(acc.device)
        result["time_s"] = now_s() - started
        return result
