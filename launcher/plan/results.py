"""What a plan found, as typed records: plan.json is ``to_json(PlanResult)``; the report renders a ``PlanResult``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.plan.model import Link, Prediction, Profile, Split
from launcher.records import from_json


@dataclass
class Candidate:
    world_size: int
    micro_batch_size: int
    accum_steps: int
    strategy: str
    sync: str
    global_batch_size: int
    link: str  # the interconnect the prediction is for
    predicted_step_time_s: float
    predicted_samples_per_s: float
    predicted_tokens_per_s: float
    predicted_compute_s: float
    predicted_comm_exposed_s: float
    predicted_optimizer_s: float
    predicted_model_state_bytes: int
    predicted_activation_bytes: int
    predicted_memory_bytes: int  # per device: model state + one micro-step's activations + the reserve
    fits: bool
    bytes_per_step: dict[str, float]  # by collective, per device, as launcher.measure counts requested bytes
    rank: int | None = None  # 1 = recommended; None: does not fit
    measured_step_time_s: float | None = None  # validated candidates only
    mode: str = ""  # the validation mode that measured it
    num_machines: int = 1  # validation only: machines the mode ran on

    @property
    def split(self) -> Split:
        return Split(self.world_size, self.micro_batch_size, self.accum_steps, self.strategy, self.sync)

    @property
    def ratio(self) -> float | None:
        """Predicted over measured step time."""
        if not self.measured_step_time_s:
            return None
        return self.predicted_step_time_s / self.measured_step_time_s

    def label(self) -> str:
        return self.split.label()


def candidate(split: Split, prediction: Prediction, link: Link, memory_bytes: int) -> Candidate:
    return Candidate(
        world_size=split.world_size,
        micro_batch_size=split.micro_batch_size,
        accum_steps=split.accum_steps,
        strategy=split.strategy,
        sync=split.sync,
        global_batch_size=split.global_batch_size,
        link=link.name,
        predicted_step_time_s=prediction.step_time_s,
        predicted_samples_per_s=prediction.samples_per_s,
        predicted_tokens_per_s=prediction.tokens_per_s,
        predicted_compute_s=prediction.compute_s,
        predicted_comm_exposed_s=prediction.comm_exposed_s,
        predicted_optimizer_s=prediction.optimizer_s,
        predicted_model_state_bytes=prediction.model_state_bytes,
        predicted_activation_bytes=prediction.activation_bytes,
        predicted_memory_bytes=prediction.memory_bytes,
        fits=prediction.memory_bytes <= memory_bytes,
        bytes_per_step=prediction.bytes_per_step,
    )


@dataclass
class PlanResult:
    config: str  # the training config planned for
    global_batch_size: int
    devices: list[int]
    device_memory_bytes: int
    reserved_memory_bytes: int
    link: Link
    profile: Profile
    candidates: list[Candidate]  # ranked first (fitting, fastest first), then those that do not fit
    recommended: Candidate | None
    why: list[str]
    validation: list[Candidate] = field(default_factory=list)  # each with measured_step_time_s
    validation_notes: list[str] = field(default_factory=list)  # skipped modes and why
    settings: dict[str, Any] = field(default_factory=dict)  # the planner's config


def read_plan(path: str | Path) -> PlanResult:
    return from_json(PlanResult, json.loads(Path(path).read_text()))
