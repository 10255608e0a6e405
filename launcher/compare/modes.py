"""Planning the modes: every mode's full training config and run plan, resolved before anything runs. No torch."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.compare.config import CompareConfig, ModeConfig
from launcher.config import Config, ConfigError, build_config, flatten, read_yaml, set_dotted
from launcher.plan import RunPlan, make_plan


@dataclass(frozen=True)
class PlannedMode:
    name: str
    mode: ModeConfig
    train: Config
    plan: RunPlan
    overrides: dict[str, Any]  # the mode's own, flat

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run.output_dir)

    @property
    def launch(self) -> str:
        """``2p x mb1 x K=8``: processes (machines) x micro batch x accumulation."""
        return self.plan.batch.short(self.mode.num_machines)

    @property
    def label(self) -> str:
        """The launch, with what else differs from the defaults: ``2p x mb1 x K=8, every_step, mean``."""
        t = self.train
        extras = [
            t.batch.sync if t.batch.sync != "no_sync" else "",
            t.batch.loss_normalization if t.batch.loss_normalization != "tokens" else "",
            t.precision if t.precision != "no" else "",
        ]
        return ", ".join([self.launch, *[e for e in extras if e]])

    def describe(self) -> str:
        return f"{self.launch}, {self.train.batch.sync}"


def mode_config(base: dict[str, Any], cfg: CompareConfig, name: str, mode: ModeConfig) -> Config:
    """The training config of one mode: the base, the comparison's overrides, the mode's own, and what compare
    owns (the run folder, and the world size the launch must give)."""
    data = copy.deepcopy(base)
    for key, value in [*flatten(cfg.overrides).items(), *flatten(mode.overrides).items()]:
        set_dotted(data, key.split("."), value)
    set_dotted(data, ["run", "output_dir"], str(Path(cfg.output_dir) / "modes" / name))
    set_dotted(data, ["run", "overwrite"], True)  # compare clears the mode folders before each launch
    # A launch that gives another world size (a wrong accelerate default) fails, not trains another mode.
    set_dotted(data, ["run", "expected_world_size"], mode.num_processes)
    return build_config(data)


def plan_modes(cfg: CompareConfig) -> list[PlannedMode]:
    """Every mode's training config, validated with the trainer's own rules, so a bad mode stops the
    comparison before the first launch rather than after the others have run."""
    base = read_yaml(cfg.base, key="base")
    planned = []
    for name, mode in cfg.modes.items():
        try:
            train = mode_config(base, cfg, name, mode)
            plan = make_plan(train, mode.num_processes)  # num_processes: the total over the mode's machines
        except ConfigError as err:
            raise ConfigError(f"mode {name!r}: {err}") from None
        planned.append(PlannedMode(name, mode, train, plan, flatten(mode.overrides)))
    return planned
