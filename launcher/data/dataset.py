"""Samples over flat token arrays, and the collate that turns sample ids into one micro-batch.

Two layouts of the same arrays: rows (one document per sample, padded to the longest of its micro-batch) and
blocks (fixed windows of data.seq_len + 1 tokens over a stream, for flat token files and packed documents).
Which samples a process trains on is decided by ``batching.SampleOrder``, not by a sharding sampler; every
collate is a handful of vectorized slices of the (memory-mapped) arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from launcher.builtin import LM
from launcher.loss import IGNORE


@dataclass
class TokenDataset:
    tokens: np.ndarray  # flat ids (often a memmap)
    pad_token_id: int
    starts: np.ndarray | None = None  # rows: where each sample starts in tokens
    lengths: np.ndarray | None = None  # rows: its length
    block: int = 0  # blocks: tokens per sample (seq_len + 1), one sample every block - 1 tokens
    num_blocks: int = 0
    labels: np.ndarray | None = None  # class per sample (classification) or None (causal LM)
    segments: np.ndarray | None = None  # like tokens: segment ids of text pairs

    def __len__(self) -> int:
        return len(self.starts) if self.starts is not None else self.num_blocks

    def spans(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of each sample in ``ids``."""
        if self.starts is not None:
            return self.starts[ids], self.lengths[ids]
        # Blocks overlap by one token: the last token of a block is the first target of the next.
        return ids * (self.block - 1), np.full(len(ids), self.block, dtype=np.int64)

    @property
    def mean_length(self) -> float:
        return float(self.block) if self.starts is None else float(self.lengths.mean())

    def sample_lengths(self, ids: np.ndarray | list[int]) -> np.ndarray:
        return self.spans(np.asarray(ids, dtype=np.int64))[1]

    def items(self, ids: np.ndarray | list[int], task: str) -> int:
        """Items that carry loss: next-token targets for an LM, samples for a classifier."""
        if task == LM:
            return int(np.maximum(self.sample_lengths(ids) - 1, 0).sum())
        return len(ids)

    def first(self, count: int) -> TokenDataset:
        """The first ``count`` samples (a view for blocks: nothing per sample)."""
        if self.starts is None:
            return TokenDataset(self.tokens, self.pad_token_id, block=self.block, num_blocks=min(count, len(self)))
        return self.subset(np.arange(min(count, len(self))))

    def subset(self, ids: np.ndarray | list[int]) -> TokenDataset:
        ids = np.asarray(ids, dtype=np.int64)
        starts, lengths = self.spans(ids)
        labels = self.labels[ids] if self.labels is not None else None
        return TokenDataset(self.tokens, self.pad_token_id, starts, lengths, labels=labels, segments=self.segments)

    def collate(self, ids: list[int] | np.ndarray, micro_batch_size: int, filler: int) -> dict[str, torch.Tensor]:
        """Pad ``ids`` to the longest sample; rows past ``len(ids)`` repeat sample ``filler`` with every label
        ignored, so a short last window keeps the same shapes on every rank and adds nothing to the loss."""
        real = len(ids)
        rows = np.asarray([*ids, *[filler] * (micro_batch_size - real)], dtype=np.int64)
        starts, lengths = self.spans(rows)
        width = int(lengths.max())
        positions = np.arange(width, dtype=np.int64)
        inside = positions[None, :] < lengths[:, None]
        index = np.where(inside, starts[:, None] + positions[None, :], 0)
        input_ids = torch.from_numpy(np.where(inside, self.tokens[index], self.pad_token_id).astype(np.int64))
        attention_mask = torch.from_numpy(inside.astype(np.int64))
        if self.labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
        else:
            labels = torch.from_numpy(self.labels[rows].astype(np.int64))
        labels[real:] = IGNORE
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.segments is not None:
            batch["token_type_ids"] = torch.from_numpy(np.where(inside, self.segments[index], 0).astype(np.int64))
        return batch


def rows_dataset(
    tokens: np.ndarray,
    offsets: np.ndarray,
    pad_token_id: int,
    labels: np.ndarray | None = None,
    segments: np.ndarray | None = None,
) -> TokenDataset:
    starts = np.asarray(offsets[:-1], dtype=np.int64)
    return TokenDataset(tokens, pad_token_id, starts, np.diff(offsets), labels=labels, segments=segments)


def blocks_dataset(tokens: np.ndarray, seq_len: int, pad_token_id: int) -> TokenDataset:
    """Windows of seq_len + 1 tokens every seq_len tokens: seq_len targets each, every token a target once."""
    return TokenDataset(tokens, pad_token_id, block=seq_len + 1, num_blocks=max(0, (len(tokens) - 1) // seq_len))
