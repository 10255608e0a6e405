"""The train state: everything a checkpoint saves and a resume restores.

The model, the optimizer, the AMP gradient scaler and the optimizer steps done. The sample order and the
learning rate are pure functions of the step, so nothing else is needed to continue a run; the per-rank
RNG streams are saved beside it by the checkpoint (they belong to the process, not to the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TrainState:
    model: torch.nn.Module  # as prepared for the launch (DDP-wrapped under several processes)
    module: torch.nn.Module  # the model itself, unwrapped: what is saved
    optimizer: torch.optim.Optimizer
    scaler: Any | None = None  # torch.amp.GradScaler under fp16
    step: int = 0  # optimizer steps done

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore in place; ``state["model"]`` may be left out when the weights were loaded already."""
        if state.get("model") is not None:
            self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
