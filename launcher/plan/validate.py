"""Holding the model against measurement: the splits this machine can run, run through compare, predicted vs
measured step time.

The validated modes share one micro batch: 1 process; 2 processes on this host under no_sync and every_step
(and FSDP when planned); and 2 processes on two namespace hosts over a link shaped to each of
``validate.links``, predicted with that link as the probe measures it through the namespaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from launcher.config import Config
from launcher.netns import NamespacesUnavailable, missing_tools
from launcher.plan.config import PlanConfig, str_list
from launcher.plan.enumerate import divisors
from launcher.plan.model import Link, Profile, Split, predict
from launcher.plan.profile import SHAPED, measure_link, run_compare
from launcher.plan.results import Candidate, candidate

LOCAL_PROCESSES = 2  # what 2 cores run as 2 devices


def validation_micro_batch(global_batch: int, wanted: int) -> int:
    """``wanted`` when 2 processes reach the global batch with it in K >= 2 micro-steps (so that the sync
    policies differ), else the smallest micro batch that does; 1 when none does."""
    per_rank = global_batch // LOCAL_PROCESSES if global_batch % LOCAL_PROCESSES == 0 else 0
    usable = [mb for mb in divisors(per_rank) if per_rank // mb >= 2] if per_rank else []
    return wanted if wanted in usable else (usable[0] if usable else 1)


def _entry(name: str, split: Split, profile: Profile, link: Link, cfg: PlanConfig, machines: int = 1) -> Candidate:
    # Every validated process runs on this host: the co-location slowdown applies (profile.colocated_slowdown).
    prediction = predict(split, profile, link, cfg.reserved_memory_bytes, colocated=True)
    c = candidate(split, prediction, link, cfg.device_memory_bytes)
    c.mode, c.num_machines = name, machines
    return c


def validation_entries(global_batch: int, profile: Profile, cfg: PlanConfig, links: dict[str, Link]) -> list[Candidate]:
    """The modes to run, each with its prediction; ``links``: rate -> the shaped link as measured."""
    mb = validation_micro_batch(global_batch, cfg.validate.micro_batch_size)
    entries = [_entry("1p", Split(1, mb, global_batch // mb, "ddp", "no_sync"), profile, profile.link, cfg)]
    if global_batch % (LOCAL_PROCESSES * mb) == 0:
        k = global_batch // (LOCAL_PROCESSES * mb)
        policies = ["no_sync", "every_step"] if k > 1 else ["no_sync"]
        local = [("ddp", sync) for sync in policies] + ([("fsdp", "no_sync")] if "fsdp" in cfg.strategy_names else [])
        for strategy, sync in local:
            split = Split(LOCAL_PROCESSES, mb, k, strategy, sync)
            entries.append(_entry(f"2p_{strategy}_{sync}", split, profile, profile.link, cfg))
        for rate, link in links.items():
            for sync in policies:
                split = Split(LOCAL_PROCESSES, mb, k, "ddp", sync)
                entries.append(_entry(f"2h_{rate}_{sync}", split, profile, link, cfg, machines=2))
    return entries


def _mode(entry: Candidate) -> dict[str, Any]:
    mode: dict[str, Any] = {
        "num_processes": entry.world_size,
        "expect": "equal" if entry.mode == "1p" else "sweep",
        "overrides": {
            "batch.micro_batch_size": entry.micro_batch_size,
            "batch.accum_steps": entry.accum_steps,
            "batch.sync": entry.sync,
            "parallel.strategy": entry.strategy,
        },
    }
    if entry.num_machines > 1:
        mode.update(num_machines=entry.num_machines, link=entry.link.removeprefix(SHAPED))
    return mode


def validate(train: Config, cfg: PlanConfig, global_batch: int, profile: Profile, out: Path) -> tuple[list, list]:
    """Run the validation modes through compare; (the entries with their measured step times, notes on what
    was skipped and why)."""
    notes, links = [], {}
    rates = str_list(cfg.validate.links)
    reason = missing_tools(rates[0]) if rates else ""
    if reason:
        notes.append(f"the namespace-link modes were skipped: {reason}")
    else:
        for rate in rates:
            try:
                links[rate] = measure_link(cfg, out, rate)
            except NamespacesUnavailable as err:
                notes.append(f"the {rate} link modes were skipped: {err}")
    entries = validation_entries(global_batch, profile, cfg, links)
    modes = {e.mode: _mode(e) for e in entries}
    overrides = {"run.max_steps": cfg.validate.steps, "run.max_epochs": 0, "batch.global_batch_size": global_batch}
    result = run_compare(modes, train, out / "validate", "validation", cfg.timeout_s, overrides=overrides)
    for entry in entries:
        mode = result.mode(entry.mode)
        entry.measured_step_time_s = mode.cost.median_step_time_s if mode.cost else None
        if mode.verdict.startswith("skipped"):
            notes.append(f"{entry.mode}: {mode.verdict}")
    return [e for e in entries if e.measured_step_time_s], notes
