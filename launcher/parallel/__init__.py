"""Ways to add devices. Each strategy wraps the model for the launch and owns one small sync control:
whether a micro-step's backward communicates gradients. The step calls nothing else of it."""

from __future__ import annotations

from launcher.config import Config
from launcher.parallel.ddp import DDP
from launcher.parallel.fsdp import FSDP

Strategy = DDP | FSDP

__all__ = ["DDP", "FSDP", "Strategy", "strategy_for"]


def strategy_for(cfg: Config) -> Strategy:
    if cfg.parallel.strategy == "fsdp":
        return FSDP(cfg.model.name, cfg.parallel.reshard_after_forward)
    return DDP()
