"""The compare config: a base training config, the modes to run, and how they are judged. No torch."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.config import Section, apply_overrides, build_section, check, option, read_yaml
from launcher.netns import RATE

EQUAL, DIFFER, SWEEP = "equal", "differ", "sweep"
CONTROL = "floor_control"  # the name of the control mode (another name if a mode already has it)
MULTIPLE = 10.0
MODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # becomes a folder name


@dataclass(frozen=True)
class ModeConfig(Section):
    num_processes: int = option(
        1, "processes over all machines, as accelerate launch --num_processes counts them: the world size"
    )
    num_machines: int = option(
        1,
        "machines: one accelerate launch each, num_processes / num_machines processes per machine, all on this "
        "host over loopback (a rehearsal of the multi-node launch: separate agents, one rendezvous, gloo over TCP)",
    )
    link: str = option(
        "",
        "run the mode's 2 machines on two network-namespace hosts joined by a veth shaped to this rate (tc tbf, "
        "e.g. 1gbit, 100mbit): a multi-node link on one host; '' = loopback (needs root and iproute2, else skipped)",
    )
    expect: str = option(
        EQUAL,
        "equal: must agree with the reference within tolerance; differ: a baseline; sweep: another setting "
        "(batch, lr), reported and never judged",
        (EQUAL, DIFFER, SWEEP),
    )
    baseline: bool = option(False, "shown for contrast (costs more, or trains differently); expect=differ implies it")
    description: str = option("", "one line for the report")
    overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "training-config keys for this mode, dotted (batch.sync: every_step) or nested"},
    )

    def check(self) -> None:
        check(self.num_processes >= 1, "num_processes", self.num_processes, "must be >= 1")
        check(self.num_machines >= 1, "num_machines", self.num_machines, "must be >= 1")
        check(
            self.num_processes % self.num_machines == 0,
            "num_processes",
            self.num_processes,
            f"counts the processes of all {self.num_machines} machines (as accelerate does), so it must be a "
            f"multiple of num_machines={self.num_machines}",
        )
        if self.link:
            check(self.num_machines == 2, "num_machines", self.num_machines, "a link mode runs on 2 namespace hosts: 2")
            check(RATE.match(self.link.lower()) is not None, "link", self.link, "a tc rate such as 100mbit or 1gbit")


@dataclass(frozen=True)
class ToleranceConfig(Section):
    float64: float = option(1e-10, "largest relative L2 distance of final weights that counts as equal, float64")
    # 10 x the largest distance measured between float32 splits of the tiny LM: 4.7e-6 over 3 seeds x 4
    # splits, AdamW, 30 steps (docs/verdict.md). Used only where no floor is measured (floor.control=false).
    float32: float = option(5e-5, "the same for float32 and mixed-precision runs when no floor is measured")

    def check(self) -> None:
        for dtype in ("float64", "float32"):
            check(getattr(self, dtype) > 0, dtype, getattr(self, dtype), "must be > 0")


@dataclass(frozen=True)
class FloorConfig(Section):
    control: bool = option(
        True,
        "run one control launch: the reference with each step's samples in reverse order, the same training in "
        "exact arithmetic with other rounding; its distance from the reference is this comparison's floor",
    )
    # Measured on the tiny LM and a pretrained MiniLM, float32 and bf16 (docs/verdict.md).
    multiple: float = option(
        MULTIPLE,
        "an equal mode agrees when its distance relative to the update, and its largest loss gap, are within "
        "this multiple of the control's",
    )

    def check(self) -> None:
        check(self.multiple >= 1, "multiple", self.multiple, "must be >= 1")


@dataclass(frozen=True)
class CompareConfig(Section):
    base: str = option("configs/runs/tiny_lm.yaml", "training config every mode starts from")
    output_dir: str = option("runs/compare", "folder for compare.json, report.md, the plots and modes/<name>/")
    overwrite: bool = option(False, "allow replacing a finished comparison in output_dir")
    keep_checkpoints: bool = option(
        False, "let each mode write its final checkpoint (off: only model.safetensors, a fraction of the disk)"
    )
    reference: str | None = option(None, "mode the others are judged against (null = the first mode)")
    timeout_s: float = option(900.0, "wall-clock limit per mode; a mode past it is stopped and reported failed")
    threads_per_process: int = option(
        0, "OMP_NUM_THREADS of every process (0: $OMP_NUM_THREADS if set, else cores / the largest mode's processes)"
    )
    overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "training-config keys applied to every mode, before its own"}
    )
    modes: dict[str, ModeConfig] = field(default_factory=dict, metadata={"help": "name -> mode, in run order"})
    tolerance: ToleranceConfig = field(default_factory=ToleranceConfig)
    floor: FloorConfig = field(default_factory=FloorConfig)

    @property
    def reference_name(self) -> str:
        return self.reference or next(iter(self.modes))

    def check(self) -> None:
        check(bool(self.modes), "modes", self.modes, "name at least one mode")
        for name in self.modes:
            check(
                bool(MODE_NAME.match(name)), f"modes.{name}", name, "a mode name is a folder name: letters, digits, _.-"
            )
        check(
            self.reference is None or self.reference in self.modes,
            "reference",
            self.reference,
            f"must name a mode: {', '.join(self.modes)}",
        )
        reference = self.modes[self.reference_name]
        check(
            reference.expect == EQUAL, f"modes.{self.reference_name}.expect", reference.expect, "the reference is equal"
        )
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        check(self.threads_per_process >= 0, "threads_per_process", self.threads_per_process, "must be >= 0 (0 = auto)")


def load_compare_config(path: str | Path, overrides: list[str] = ()) -> CompareConfig:
    data = read_yaml(path)
    apply_overrides(data, list(overrides))
    return build_section(CompareConfig, data)
