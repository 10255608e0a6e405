"""Planning the modes: every mode's full training config and run plan, resolved before anything runs. No torch.

The reference runs first (nothing can be judged without it), then the floor's control, then the other modes
in the config's order.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.compare.config import CONTROL, EQUAL, CompareConfig, ModeConfig
from launcher.config import Config, ConfigError, build_config, flatten, read_yaml, set_dotted
from launcher.runplan import RunPlan, make_plan

# Keys a mode may change and still be expected to train the same model: how the global batch is split,
# how often it syncs (SyncBatchNorm changes how BatchNorm's statistics are computed over the split, not the
# model), the order of the samples within a step, and where and what it writes. Anything else that differs
# from the reference is flagged, and never judged "agrees" silently.
SPLIT_KEYS = frozenset(
    {
        "batch.micro_batch_size",
        "batch.accum_steps",
        "batch.sync",
        "batch.window_order",
        "model.sync_batchnorm",
        "run.output_dir",
        "run.overwrite",
        "run.log_every_steps",
        "run.expected_world_size",
        "run.save_initial_weights",
        "run.final_checkpoint",
        "run.checkpoint_every",
        "run.keep_checkpoints",
        # Another way to add devices: sharding changes where the state lives, not the training.
        "parallel.strategy",
        "parallel.reshard_after_forward",
    }
)


@dataclass(frozen=True)
class PlannedMode:
    name: str
    mode: ModeConfig
    train: Config
    plan: RunPlan
    overrides: dict[str, Any]  # the mode's own, flat
    is_reference: bool = False
    is_control: bool = False  # the reference with reversed windows: the measured rounding floor
    changed: tuple[str, ...] = ()  # "key: reference's -> this mode's", beyond the split

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
            "fsdp" if t.parallel.strategy == "fsdp" else "",
            "no reshard" if t.parallel.strategy == "fsdp" and not t.parallel.reshard_after_forward else "",
            t.batch.sync if t.batch.sync != "no_sync" else "",
            t.batch.loss_normalization if t.batch.loss_normalization != "tokens" else "",
            t.precision if t.precision != "no" else "",
            "reversed windows" if t.batch.window_order == "reversed" else "",
            f"link {self.mode.link}" if self.mode.link else "",
        ]
        return ", ".join([self.launch, *[e for e in extras if e]])

    def describe(self) -> str:
        return f"{self.launch}, {self.train.batch.sync}"


def mode_config(base: dict[str, Any], cfg: CompareConfig, name: str, mode: ModeConfig, **own: Any) -> Config:
    """The training config of one mode: the base, the comparison's overrides, the mode's own, and what compare
    owns (the run folder, the world size the launch must give, and ``own``'s dotted keys)."""
    data = copy.deepcopy(base)
    fixed = {
        "run.output_dir": str(Path(cfg.output_dir) / "modes" / name),
        "run.overwrite": True,  # compare clears the mode folders before each launch
        "run.final_checkpoint": cfg.keep_checkpoints,
        # A launch that gives another world size (a wrong accelerate default) fails, not trains another mode.
        "run.expected_world_size": mode.num_processes,
        **own,
    }
    for key, value in [*flatten(cfg.overrides).items(), *flatten(mode.overrides).items(), *fixed.items()]:
        set_dotted(data, key.split("."), value)
    return build_config(data)


def changed_keys(train: Config, reference: Config) -> tuple[str, ...]:
    theirs, ours = flatten(reference.to_dict()), flatten(train.to_dict())
    return tuple(f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in ours if k not in SPLIT_KEYS and ours[k] != theirs[k])


def _planned(base: dict[str, Any], cfg: CompareConfig, name: str, mode: ModeConfig, **own: Any) -> PlannedMode:
    try:
        train = mode_config(base, cfg, name, mode, **own)
        plan = make_plan(train, mode.num_processes)  # num_processes: the total over the mode's machines
    except ConfigError as err:
        raise ConfigError(f"mode {name!r}: {err}") from None
    return PlannedMode(name, mode, train, plan, flatten(mode.overrides))


def plan_modes(cfg: CompareConfig) -> list[PlannedMode]:
    """Every mode's training config, validated with the trainer's own rules, so a bad mode stops the
    comparison before the first launch rather than after the others have run."""
    base = read_yaml(cfg.base, key="base")
    ref_name = cfg.reference_name
    ref_mode = cfg.modes[ref_name]
    # The reference keeps its initial weights: distances are measured against what training changed.
    reference = dataclasses.replace(
        _planned(base, cfg, ref_name, ref_mode, **{"run.save_initial_weights": True}), is_reference=True
    )
    others = [_planned(base, cfg, name, mode) for name, mode in cfg.modes.items() if name != ref_name]
    planned = [reference]
    # float64 is judged by exact arithmetic's rule: the control runs only where rounding decides.
    if cfg.floor.control and any(pm.train.run.dtype != "float64" for pm in [reference, *others]):
        name = CONTROL
        while name in cfg.modes:
            name += "_"
        control = dataclasses.replace(ref_mode, expect=EQUAL, description="the reference with reversed windows")
        planned.append(
            dataclasses.replace(
                _planned(base, cfg, name, control, **{"batch.window_order": "reversed"}), is_control=True
            )
        )
    planned += [dataclasses.replace(pm, changed=changed_keys(pm.train, reference.train)) for pm in others]
    return planned
