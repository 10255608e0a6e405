"""Each optimizer step's micro-batches, prepared one step ahead in a background thread.

A window is the global batch of one optimizer step: every rank knows all of it, so the window's item count
(the loss divisor) is counted here from the samples' lengths, with no collective. The next window is collated
while the current step computes; on CUDA its tensors go to pinned memory for non-blocking copies.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from launcher.batching import BatchPlan, SampleOrder, micro_batch_ids
from launcher.data.dataset import TokenDataset


@dataclass
class Window:
    step: int
    samples: int  # in the window, over every rank (an epoch's last window may be short)
    global_items: int  # items that carry loss in the whole window
    local_items: list[int]  # this rank's, per micro-step
    batches: list[dict[str, torch.Tensor]]  # this rank's micro-batches, on the host


class WindowFeeder:
    def __init__(self, dataset: TokenDataset, order: SampleOrder, plan: BatchPlan, rank: int, task: str, pin: bool):
        self.dataset, self.order, self.plan, self.rank, self.task, self.pin = dataset, order, plan, rank, task, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-feeder")
        self._ahead: tuple[int, Future] | None = None

    def _prepare(self, step: int) -> Window:
        window = self.order.window(step)
        micro = [micro_batch_ids(window, self.plan, self.rank, m) for m in range(self.plan.accum_steps)]
        batches = [self.dataset.collate(ids, self.plan.micro_batch_size, window[0]) for ids in micro]
        if self.pin:
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return Window(
            step,
            len(window),
            self.dataset.items(window, self.task),
            [self.dataset.items(ids, self.task) for ids in micro],
            batches,
        )

    def window(self, step: int, last_step: int) -> Window:
        """Step ``step``'s window (prepared ahead when it was the one expected), and the next one started."""
        if self._ahead is not None and self._ahead[0] == step:
            window = self._ahead[1].result()
        else:
            window = self._prepare(step)
        self._ahead = (step + 1, self._pool.submit(self._prepare, step + 1)) if step + 1 < last_step else None
        return window

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
