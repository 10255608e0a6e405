"""The learning rate: scaled once with the global batch, then shaped by warmup and schedule per optimizer step.

Pure arithmetic, no torch: the trainer, ``compare`` (before any launch) and the tests resolve the same way.

    k = global_batch_size / optim.base_global_batch_size
    linear: lr x k            sqrt: lr x sqrt(k)            then x optim.lr_multiplier (1 = off)
    sqrt + optim.scale_betas_eps (AdamW): beta -> 1 - k (1 - beta), eps -> eps / sqrt(k)

The betas line is the square-root scaling rule for Adam of Malladi et al., 2022 ("On the SDEs and Scaling
Rules for Adaptive Gradient Algorithms"): it keeps the averaging horizon of the moments constant in samples
seen, as the scaled lr keeps the noise scale of the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from launcher.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class ResolvedOptim:
    """``optim.*`` with the batch scaling applied: the values the optimizer and the schedule use."""

    cfg: OptimConfig
    global_batch_size: int
    lr: float  # the resolved peak learning rate; warmup and the schedule shape it per step
    beta1: float
    beta2: float
    eps: float

    @property
    def scale(self) -> float:
        """k = global batch / base global batch (1 without scaling)."""
        base = self.cfg.base_global_batch_size
        return self.global_batch_size / base if self.cfg.lr_scaling != "none" and base else 1.0

    def summary(self) -> dict[str, Any]:
        """summary.json's ``optim``: the base values asked for and the values used."""
        return {
            "lr": self.cfg.lr,
            "lr_scaling": self.cfg.lr_scaling,
            "lr_multiplier": self.cfg.lr_multiplier,
            "base_global_batch_size": self.cfg.base_global_batch_size,
            "lr_resolved": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
        }

    def describe(self) -> str:
        """``lr: 2e-05 x 3 (linear, global batch 60 / base 20) = 6e-05``, and the betas/eps when they moved."""
        cfg = self.cfg
        by_hand = f" x {cfg.lr_multiplier:g} (optim.lr_multiplier)" if cfg.lr_multiplier != 1 else ""
        if cfg.lr_scaling == "none":
            return f"lr: {cfg.lr:g}{by_hand} (optim.lr_scaling=none)" + (f" = {self.lr:.4g}" if by_hand else "")
        factor = self.scale if cfg.lr_scaling == "linear" else math.sqrt(self.scale)
        where = f"global batch {self.global_batch_size} / base {cfg.base_global_batch_size}"
        line = f"lr: {cfg.lr:g} x {factor:.4g} ({cfg.lr_scaling}, {where}){by_hand} = {self.lr:.4g}"
        if cfg.scale_betas_eps:
            line += (
                f"; beta1 {cfg.beta1:g} -> {self.beta1:.6g}, beta2 {cfg.beta2:g} -> {self.beta2:.6g}, "
                f"eps {cfg.eps:g} -> {self.eps:.4g}"
            )
        return line


def resolve_optim(cfg: OptimConfig, global_batch_size: int) -> ResolvedOptim:
    """The learning rate, betas and eps for ``global_batch_size`` under ``cfg.lr_scaling``.

    Raises ConfigError when the betas rule takes a beta out of [0, 1) (k > 1 / (1 - beta)).
    """
    base = cfg.base_global_batch_size
    if cfg.lr_scaling == "none" or not base:
        return ResolvedOptim(cfg, global_batch_size, cfg.lr * cfg.lr_multiplier, cfg.beta1, cfg.beta2, cfg.eps)
    k = global_batch_size / base
    lr = cfg.lr * (k if cfg.lr_scaling == "linear" else math.sqrt(k)) * cfg.lr_multiplier
    beta1, beta2, eps = cfg.beta1, cfg.beta2, cfg.eps
    if cfg.scale_betas_eps:  # validated: adamw with sqrt scaling only
        beta1, beta2 = (1.0 - k * (1.0 - beta) for beta in (cfg.beta1, cfg.beta2))
        for key, before, after in (("optim.beta1", cfg.beta1, beta1), ("optim.beta2", cfg.beta2, beta2)):
            if not 0.0 <= after < 1.0:
                raise ConfigError(
                    f"{key}={before:g} scaled by k={k:g} (global batch {global_batch_size} / base {base}) gives "
                    f"1 - k(1 - beta) = {after:g}, outside [0, 1); use a smaller global batch, a larger "
                    "optim.base_global_batch_size, or optim.scale_betas_eps=false"
                )
        eps = cfg.eps / math.sqrt(k)
    return ResolvedOptim(cfg, global_batch_size, lr, beta1, beta2, eps)


def lr_at(step: int, optim: ResolvedOptim, max_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): a pure function of the step, so every launch
    (any world size, any accumulation) applies the same rate at the same step. Warmup and the schedule
    shape the resolved (batch-scaled) peak."""
    cfg, peak = optim.cfg, optim.lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    progress = (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
