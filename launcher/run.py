"""What one training run is made of, built once by ``trainer.build`` and read by the step and the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator

from launcher.config import Config
from launcher.data import TokenDataset
from launcher.data.feed import WindowFeeder
from launcher.measure import MicroStepMeter
from launcher.parallel import Strategy
from launcher.rundir import DataInfo, RestartRecord, RunDir
from launcher.runplan import RunPlan
from launcher.state import TrainState
from launcher.timing import StepClock


@dataclass(frozen=True)
class Run:
    cfg: Config
    plan: RunPlan  # with the steps resolved
    accelerator: Accelerator
    strategy: Strategy
    state: TrainState  # the only part that changes while training
    dataset: TokenDataset
    feeder: WindowFeeder  # each step's micro-batches, prepared a step ahead
    task: str
    folder: RunDir
    data_info: DataInfo
    # evaluator(model, step) -> the eval result dict, the same on every rank; None without an eval set.
    evaluator: Callable[[Any, int], dict[str, Any]] | None = None
    stop_requested: Callable[[], bool] = lambda: False  # set by a signal on this rank
    resumed_from_step: int = 0
    num_labels: int = 0  # a classifier's classes (model.num_labels, or from the data)
    meter: MicroStepMeter | None = None  # memory a micro-step holds: activations, gradients between micro-steps
    restart: RestartRecord | None = None  # this attempt's restart, under the elastic agent (None: the first)
    clock: StepClock | None = None  # the per-step time breakdown (run.time_breakdown)
