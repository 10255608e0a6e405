"""The planner's own keys, beside the training config's: what to plan for, how to profile, how to validate. No torch.

On the command line, a key whose first part is a training config section (``batch.micro_batch_size``,
``model.hidden_size``) changes the training config; every other key is the planner's (``devices=8,32``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from launcher.config import Config, Section, apply_overrides, build_section, check, load_config, option
from launcher.netns import RATE
from launcher.plan.model import LINK_CLASSES

MEASURED = "measured"
MEMORY = re.compile(r"^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?$")
MEMORY_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
}
TRAINING_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config))


def memory_bytes(text: str) -> int | None:
    """``80GiB`` -> 85899345920; None for anything that is not a size."""
    match = MEMORY.match(str(text).strip())
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2)]) if match else None


def int_list(text: str | int) -> list[int] | None:
    """``1,2,4`` -> [1, 2, 4]; None when an item is not an integer."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    return [int(item) for item in items] if items and all(re.fullmatch(r"-?\d+", i) for i in items) else None


def str_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


@dataclass(frozen=True)
class ProfileConfig(Section):
    micro_batches: str | int = option(
        "1,2,4,8", "micro batches profiled on one process (those above the global batch drop)"
    )
    accum_steps: int = option(4, "micro-steps per profiled step: its forward+backward time is divided by them")
    steps: int = option(12, "optimizer steps per profiled run (the trainer's median step is read)")
    reuse: str = option("", "a profile.json written by an earlier plan: plan from it without measuring again")

    def check(self) -> None:
        sizes = int_list(self.micro_batches)
        check(sizes is not None and all(s >= 1 for s in sizes), "micro_batches", self.micro_batches, "e.g. 1,2,4,8")
        check(self.accum_steps >= 1, "accum_steps", self.accum_steps, "must be >= 1")
        check(self.steps >= 2, "steps", self.steps, "must be >= 2 (a median of one step is its warm-up)")


@dataclass(frozen=True)
class ValidateConfig(Section):
    micro_batch_size: int = option(2, "micro batch of the validated modes (the smallest with K >= 2 if it does not)")
    steps: int = option(12, "optimizer steps per validated mode")
    links: str = option(
        "1gbit,100mbit", "rates of the two-namespace-host link the 2-process modes also run over ('' = none)"
    )

    def check(self) -> None:
        check(self.micro_batch_size >= 1, "micro_batch_size", self.micro_batch_size, "must be >= 1")
        check(self.steps >= 2, "steps", self.steps, "must be >= 2")
        for rate in str_list(self.links):
            check(RATE.match(rate.lower()) is not None, "links", self.links, "tc rates such as 1gbit,100mbit")


@dataclass(frozen=True)
class PlanConfig(Section):
    output_dir: str = option("runs/plan", "folder for plan.json, plan.md, the plot, profile.json and the runs")
    overwrite: bool = option(False, "allow replacing a finished plan in output_dir")
    global_batch_size: int | None = option(None, "samples per optimizer step to reach (null: the training config's)")
    devices: str | int = option("1,2,4,8,16,32,64", "device counts to plan for, a comma list")
    device_memory: str = option("80GiB", "memory of one device: bytes, or with a unit (GiB, MiB, GB)")
    reserved_memory: str = option("1GiB", "of each device's memory, what the runtime takes (context, allocator)")
    link: str = option(
        MEASURED,
        "interconnect between devices: measured (2 processes here) or a class: " + ", ".join(LINK_CLASSES),
        (MEASURED, *LINK_CLASSES),
    )
    strategies: str = option("ddp,fsdp", "strategies to plan: ddp, fsdp (fsdp needs 2 or more devices)")
    timeout_s: float = option(600.0, "wall-clock limit per profiling or validation session")
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)

    @property
    def device_counts(self) -> list[int]:
        return int_list(self.devices) or []

    @property
    def strategy_names(self) -> list[str]:
        return str_list(self.strategies)

    @property
    def device_memory_bytes(self) -> int:
        return memory_bytes(self.device_memory) or 0

    @property
    def reserved_memory_bytes(self) -> int:
        return memory_bytes(self.reserved_memory) or 0

    def check(self) -> None:
        counts = int_list(self.devices)
        check(counts is not None, "devices", self.devices, "a comma list of device counts, e.g. 1,2,4,8")
        check(all(n >= 1 for n in counts), "devices", self.devices, "every device count must be >= 1")
        check(
            self.global_batch_size is None or self.global_batch_size >= 1,
            "global_batch_size",
            self.global_batch_size,
            "must be >= 1 (or null: the training config's)",
        )
        for key in ("device_memory", "reserved_memory"):
            check(memory_bytes(getattr(self, key)) is not None, key, getattr(self, key), "a size: 80GiB, 512MiB")
        check(self.device_memory_bytes > 0, "device_memory", self.device_memory, "must be > 0")
        names = self.strategy_names
        check(bool(names) and set(names) <= {"ddp", "fsdp"}, "strategies", self.strategies, "a comma list of ddp, fsdp")
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(training config overrides, planner overrides), by the key's first part."""
    train, plan = [], []
    for text in overrides:
        (train if text.split("=", 1)[0].split(".", 1)[0] in TRAINING_SECTIONS else plan).append(text)
    return train, plan


def load_plan_config(config_path: str, overrides: list[str]) -> tuple[Config, PlanConfig]:
    """The training config (its file and its overrides) and the planner's config (its overrides)."""
    train_overrides, plan_overrides = split_overrides(overrides)
    train = load_config(config_path, train_overrides)
    data: dict[str, Any] = apply_overrides({}, plan_overrides)
    return train, build_section(PlanConfig, data)
