"""Measuring the inputs of the cost model on this machine, with the real trainer: no training is reimplemented.

The compute and memory profile is one compare session (a subprocess, ``python -m launcher.compare``) whose
modes are short runs: one process at each profiled micro batch, and two processes syncing every micro-step
(DDP's buckets and how much of the all-reduce the backward hid), and FSDP (its gather calls). The link profile
is ``linkprobe`` launched over 2 processes (``launch.job_commands``), on loopback or on two namespace hosts.
Up to the subprocesses, nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from launcher.compare.results import Comparison, ModeResult, read_comparison
from launcher.config import Config, ConfigError, UserError, dump_config
from launcher.launch import LOOPBACK, REPO, Job, job_commands, launch_env, threads_per_device
from launcher.netns import on_hosts, two_hosts
from launcher.plan.config import PlanConfig, int_list
from launcher.plan.model import Link, Profile, fit_line, link_from_fit
from launcher.records import from_json, to_json

LINK_PROBE = REPO / "launcher" / "plan" / "linkprobe.py"
PROFILE_FILE = "profile.json"
SYNC_MODE, FSDP_MODE = "sync_2p", "fsdp_2p"
SHAPED = "tbf "  # a shaped link's name: "tbf 100mbit"


class PlanRunError(UserError):
    """A profiling or validation launch failed: the reason in one line (exit 1, not a config error)."""


def threads() -> int:
    """One core per process, as compare gives a 2-process mode here: a process stands for one device."""
    return threads_per_device(2)


def run_compare(
    modes: dict[str, Any], train: Config, out: Path, what: str, timeout_s: float, **extra: Any
) -> Comparison:
    """Run ``modes`` as one compare session over the resolved training config (its own subprocess: Accelerate's
    state is process-global) and read its compare.json back; compare's log is ``out/compare.log``."""
    out.mkdir(parents=True, exist_ok=True)
    base = out / "train_config.yaml"
    base.write_text(dump_config(train))
    config = {
        "base": str(base),
        "output_dir": str(out),
        "overwrite": True,
        "floor": {"control": False},  # time and memory are the question here, not rounding
        "threads_per_process": threads(),
        "timeout_s": timeout_s,
        "modes": modes,
        **extra,
    }
    config_path = out / "compare_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "launcher.compare", "--config", str(config_path)]
    outcome = Job([command], [out / "compare.log"], {**os.environ}).start().wait(timeout_s * (len(modes) + 1))
    if not (out / "compare.json").is_file():
        raise PlanRunError(f"{what}: compare did not finish ({outcome.reason()}); see {out / 'compare.log'}")
    result = read_comparison(out / "compare.json")
    failed = [m for m in result.modes if m.failed and not m.verdict.startswith("skipped")]
    if failed:
        raise PlanRunError(f"{what}: mode {failed[0].name!r} failed: {failed[0].error}; see {failed[0].log}")
    return result


def _mode(num_processes: int, mb: int, k: int, **overrides: Any) -> dict[str, Any]:
    batch = {"batch.global_batch_size": num_processes * mb * k, "batch.micro_batch_size": mb, "batch.accum_steps": k}
    return {"num_processes": num_processes, "expect": "sweep", "overrides": {**batch, **overrides}}


def _micro_step_s(m: ModeResult) -> float:
    phases = m.cost.time_breakdown or {}
    return (phases.get("forward_s", 0.0) + phases.get("backward_s", 0.0)) / m.plan.accum_steps


def _calls_per_micro_step(m: ModeResult, kind: str) -> float:
    return m.cost.collectives_per_step.get(kind, {}).get("calls", 0.0) / m.plan.accum_steps


def measure_link(cfg: PlanConfig, out: Path, rate: str | None = None) -> Link:
    """All-reduce, all-gather and reduce-scatter times of 2 processes against message size, fitted to latency +
    size / bandwidth: on loopback, or on two namespace hosts whose link is shaped to ``rate``."""
    name = f"{SHAPED}{rate}" if rate else "measured"
    folder = out / "link" / (rate or "loopback")
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "link.json"
    env = launch_env(folder / "tmp", threads())
    with contextlib.ExitStack() as stack:
        if rate:
            hosts = stack.enter_context(two_hosts(rate))
            commands = on_hosts(hosts, job_commands(2, 2, LINK_PROBE, main_process_ip=hosts[0].addr))
        else:
            commands = job_commands(2, 1, LINK_PROBE, main_process_ip=LOOPBACK)
        logs = [folder / f"probe{i}.log" for i in range(len(commands))]
        outcome = Job([[*c, str(result)] for c in commands], logs, env).start().wait(cfg.timeout_s)
    if not outcome.ok or not result.is_file():
        raise PlanRunError(f"link probe ({name}) failed: {outcome.reason()}; see {outcome.log}")
    probe = json.loads(result.read_text())
    sizes = probe["sizes_bytes"]
    fit = fit_line([float(s) for s in sizes], probe["all_reduce_s"])
    scale = probe["reduce_scatter_s"][-1] / probe["all_gather_s"][-1]  # at the largest size: bandwidth-bound
    where = f"two namespace hosts, veth shaped by tc tbf to {rate}" if rate else "2 processes on this host (loopback)"
    return link_from_fit(name, fit, f"measured: all-reduce over {where}, {probe['backend']}", scale)


def measure_profile(train: Config, cfg: PlanConfig, global_batch: int, out: Path) -> Profile:
    """The compute, memory and overlap profile of ``train`` on this machine, and the loopback link's."""
    p = cfg.profile
    k = p.accum_steps
    sizes = [mb for mb in int_list(p.micro_batches) if mb <= global_batch] or [1]
    common = {"run.max_steps": p.steps, "run.max_epochs": 0}
    modes = {f"mb{mb}": _mode(1, mb, k) for mb in sizes}
    modes[f"mb{sizes[0]}"]["expect"] = "equal"  # compare's reference
    mid = sizes[len(sizes) // 2]
    modes[SYNC_MODE] = _mode(2, mid, k, **{"batch.sync": "every_step"})
    if "fsdp" in cfg.strategy_names:
        modes[FSDP_MODE] = _mode(2, mid, k, **{"parallel.strategy": "fsdp"})
    link = measure_link(cfg, out)
    result = run_compare(modes, train, out / "profile", "profiling", cfg.timeout_s, overrides=common)
    return profile_from(result, link, sizes, train, f"measured on this machine ({out / 'profile'})")


def profile_from(result: Comparison, link: Link, sizes: list[int], train: Config, source: str) -> Profile:
    """The fitted profile from a profiling session's compare.json."""
    singles = [result.mode(f"mb{mb}") for mb in sizes]
    micro = fit_line([float(mb) for mb in sizes], [_micro_step_s(m) for m in singles])
    activation = fit_line([float(mb) for mb in sizes], [float(m.cost.activation_bytes) for m in singles])
    phases = [m.cost.time_breakdown or {} for m in singles]
    fixed_s = statistics.median(
        ph.get("data_s", 0.0) + ph.get("scalars_s", 0.0) + ph.get("other_s", 0.0) for ph in phases
    )
    ref = singles[0].cost
    # Two processes syncing every micro-step: this host's co-location slowdown, DDP's buckets, and what a synced
    # micro-step costs beyond the all-reduce's wire time.
    sync = result.mode(SYNC_MODE)
    alone_s = micro.at(sync.plan.micro_batch_size)
    slowdown = _micro_step_s(sync) / alone_s if alone_s > 0 else 1.0
    buckets = _calls_per_micro_step(sync, "all_reduce")
    exposed_s = (sync.cost.time_breakdown or {}).get("comm_exposed_s", 0.0) / sync.plan.accum_steps
    sync_extra_s = exposed_s - link.all_reduce_s(ref.held_grad_bytes or ref.params_bytes, 2, max(1, round(buckets)))
    units, fsdp_extra_s, fsdp_optimizer_s = train.model.num_layers + 1, 0.0, 0.0  # fsdp.py: each block, the root
    fsdp = next((m for m in result.modes if m.name == FSDP_MODE and m.cost), None)
    if fsdp is not None:
        units = max(1, round(_calls_per_micro_step(fsdp, "all_gather") / 2))
        k = fsdp.plan.accum_steps
        # Gathers for forward and backward each micro-step, one reduce-scatter per step (no_sync), at N=2.
        gathers_s = 2 * link.all_gather_s(ref.params_bytes, 2, units)
        scatter_s = link.reduce_scatter_s(ref.params_bytes, 2, units) / k
        plain_s = slowdown * micro.at(fsdp.plan.micro_batch_size)
        fsdp_extra_s = (_micro_step_s(fsdp) - plain_s - gathers_s - scatter_s) / slowdown
        fsdp_optimizer_s = (fsdp.cost.time_breakdown or {}).get("optimizer_s", 0.0) / slowdown
    return Profile(
        micro_step=micro,
        activation=activation,
        optimizer_s=statistics.median(ph.get("optimizer_s", 0.0) for ph in phases),
        fixed_s=fixed_s,
        params_bytes=ref.params_bytes,
        grad_bytes=ref.held_grad_bytes or ref.params_bytes,
        optimizer_bytes=ref.optimizer_bytes,
        tokens_per_sample=(ref.tokens_per_s or ref.samples_per_s or 0.0) / (ref.samples_per_s or 1.0),
        buckets_per_sync=buckets,
        sync_extra_s=sync_extra_s,
        colocated_slowdown=slowdown,
        fsdp_units=units,
        fsdp_extra_s=fsdp_extra_s,
        fsdp_optimizer_s=fsdp_optimizer_s,
        link=link,
        source=source,
    )


def write_profile(profile: Profile, path: Path) -> None:
    path.write_text(json.dumps(to_json(profile), indent=1))


def read_profile(path: str | Path) -> Profile:
    """A profile.json from an earlier plan, as ``profile.reuse`` names it."""
    try:
        data = json.loads(Path(path).read_text())
        profile = from_json(Profile, data)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"profile.reuse={str(path)!r} is not a profile.json a plan wrote: {err}") from None
    profile.source = f"read from {path}"
    return profile
