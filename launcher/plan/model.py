"""The cost model: a split's step time, memory and bytes per collective, from a measured profile. Pure Python.

Every assumption is written beside the line that makes it, and in docs/planner.md. The inputs are measured
(``Profile``: the local device's compute and memory, an interconnect's fit); only the named link classes are
taken from vendor figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 1024**3


def size_text(n_bytes: float) -> str:
    """Bytes as GiB, or MiB below one GiB (a tiny model's state is far below a GiB)."""
    return f"{n_bytes / GIB:.3g} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.3g} MiB"


@dataclass
class Fit:
    """``y = intercept + slope * x``, least squares over the measured points."""

    intercept: float
    slope: float
    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def at(self, x: float) -> float:
        return self.intercept + self.slope * x


def fit_line(xs: list[float], ys: list[float]) -> Fit:
    """The least-squares line through the points, never falling; one point (or one distinct x) gives a line
    through the origin scaled to it, which is the best a single measurement can say."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"a fit needs matching, non-empty points: {len(xs)} x, {len(ys)} y")
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var_x = sum((x - mean_x) ** 2 for x in xs)
    if var_x == 0:
        return Fit(0.0, mean_y / mean_x if mean_x else 0.0, list(xs), list(ys))
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var_x
    # Time and bytes never fall as the size grows: a negative slope is noise (a tiny model's micro-step is
    # mostly per-operation overhead), and the best non-decreasing line is flat at the mean.
    slope = max(slope, 0.0)
    return Fit(mean_y - slope * mean_x, slope, list(xs), list(ys))


@dataclass
class Link:
    """An interconnect as the ring algorithms see it: per-direction bandwidth of each device's link, and the
    latency of one step of the ring (software included)."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float
    source: str
    # A reduce-scatter's time over an all-gather's of the same bytes: 1 for a ring; about 2 on gloo, which
    # builds reduce-scatter from all-reduce (trap 12), measured by the link probe.
    reduce_scatter_scale: float = 1.0

    def all_reduce_s(self, n_bytes: float, world_size: int, calls: int = 1) -> float:
        """Ring all-reduce: 2(N-1)/N of the bytes cross each link, in 2(N-1) latency-bound steps per call."""
        if world_size < 2:
            return 0.0
        n = world_size
        return 2 * (n - 1) / n * n_bytes / self.bandwidth_bytes_per_s + calls * 2 * (n - 1) * self.latency_s

    def all_gather_s(self, n_bytes: float, world_size: int, calls: int = 1) -> float:
        """Ring all-gather (or reduce-scatter) of ``n_bytes`` in all: (N-1)/N of them, N-1 steps per call."""
        if world_size < 2:
            return 0.0
        n = world_size
        return (n - 1) / n * n_bytes / self.bandwidth_bytes_per_s + calls * (n - 1) * self.latency_s

    def reduce_scatter_s(self, n_bytes: float, world_size: int, calls: int = 1) -> float:
        return self.reduce_scatter_scale * self.all_gather_s(n_bytes, world_size, calls)


# Named classes: nominal per-direction bandwidth per device and an assumed per-step latency (docs/planner.md
# gives each source). Nominal rates are upper bounds: NCCL reaches 70-90 % of them on large messages.
LINK_CLASSES = {
    "nvlink": Link("nvlink", 450e9, 3e-6, "NVLink 4 (H100 SXM): 900 GB/s bidirectional per GPU, 450 GB/s each way"),
    "ib-200g": Link("ib-200g", 25e9, 5e-6, "InfiniBand HDR 200 Gb/s per GPU (ConnectX-6): 25 GB/s each way"),
    "eth-25g": Link("eth-25g", 3.125e9, 25e-6, "25 Gb/s Ethernet (IEEE 802.3by), TCP: 3.125 GB/s each way"),
    "eth-1g": Link("eth-1g", 125e6, 50e-6, "1 Gb/s Ethernet (IEEE 802.3ab), TCP: 125 MB/s each way"),
}


def link_from_fit(name: str, fit: Fit, source: str, reduce_scatter_scale: float = 1.0) -> Link:
    """A link from all-reduce times of 2 processes against message bytes: at N=2 the ring's time is
    bytes / bandwidth + 2 x latency, so the slope is 1 / bandwidth and the intercept twice the latency."""
    bandwidth = 1 / fit.slope if fit.slope > 0 else math.inf
    return Link(name, bandwidth, max(fit.intercept, 0.0) / 2, source, reduce_scatter_scale)


@dataclass
class Profile:
    """What the planner measured on this machine: per micro-step compute and memory against micro batch, the
    optimizer step, and what a synced micro-step and an FSDP micro-step cost beyond the wire time."""

    micro_step: Fit  # forward + backward seconds of one micro-step, against micro batch (1 process)
    activation: Fit  # bytes saved for backward by one micro-step, against micro batch
    optimizer_s: float  # clip + step + zero_grad, one full replica
    fixed_s: float  # the rest of a step (data, the launcher's scalars, the record): per step, not per micro-step
    params_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    tokens_per_sample: float  # loss-carrying tokens per sample: tokens/s from samples/s
    buckets_per_sync: float  # gradient all-reduce calls per synced micro-step (DDP's buckets), measured at N=2
    # Per synced DDP micro-step, measured at N=2: the exposed communication minus the all-reduce's wire time on
    # the measured link. Positive: bucket copies and the wait for the slower rank; negative: hidden by backward.
    sync_extra_s: float
    # Compute of one process when 2 share this host, over one alone (measured: both at the same micro batch).
    # Applied only to predictions of runs on this host (validation), never to devices of their own.
    colocated_slowdown: float
    fsdp_units: int  # fully_shard groups (blocks + root): all-gather and reduce-scatter calls per pass
    # Per FSDP micro-step beyond the plain micro-step and the gathers' wire time (unsharding, copies, frees), and
    # FSDP's optimizer step (DTensor shards): both measured at N=2, 0 when FSDP was not profiled.
    fsdp_extra_s: float
    fsdp_optimizer_s: float
    link: Link  # the interconnect measured here (2 processes on loopback)
    source: str = ""  # where it came from: measured now, or a profile.json read back


@dataclass
class Split:
    world_size: int
    micro_batch_size: int
    accum_steps: int
    strategy: str  # ddp | fsdp
    sync: str  # no_sync | every_step

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.accum_steps

    @property
    def sync_rounds(self) -> int:
        """Micro-steps per optimizer step whose backward reduces gradients."""
        return self.accum_steps if self.sync == "every_step" else 1

    def label(self) -> str:
        return f"{self.world_size}x mb{self.micro_batch_size} K={self.accum_steps} {self.strategy} {self.sync}"


@dataclass
class Prediction:
    step_time_s: float
    compute_s: float
    comm_exposed_s: float
    optimizer_s: float
    samples_per_s: float
    tokens_per_s: float
    model_state_bytes: int
    activation_bytes: int
    memory_bytes: int
    bytes_per_step: dict[str, float]  # by collective: what each device sends and receives through the ring


def predict(split: Split, profile: Profile, link: Link, reserved_bytes: int = 0, colocated: bool = False) -> Prediction:
    """One split's step time, memory per device and bytes per step by collective. ``colocated``: the N
    processes share this host's cores (validation here), so each computes ``colocated_slowdown`` slower."""
    n, k, mb = split.world_size, split.accum_steps, split.micro_batch_size
    slowdown = profile.colocated_slowdown if colocated and n > 1 else 1.0
    micro_s = slowdown * profile.micro_step.at(mb)
    compute_s = k * micro_s
    grads, params, optim = profile.grad_bytes, profile.params_bytes, profile.optimizer_bytes
    rounds = split.sync_rounds
    # The launcher all-reduces one small tensor per step (the logged loss, the agreements): latency only.
    scalar_s = link.all_reduce_s(0, n)
    if split.strategy == "ddp":
        # Each synced micro-step all-reduces every gradient (DDP's buckets, launched during backward), plus what
        # a synced micro-step measured beyond the wire time at N=2 (copies, rank skew; negative where hidden).
        ar_s = link.all_reduce_s(grads, n, calls=max(1, round(profile.buckets_per_sync)))
        exposed_s = rounds * max(ar_s + profile.sync_extra_s, 0.0) if n > 1 else 0.0
        optimizer_s = slowdown * profile.optimizer_s
        sent = {"all_reduce": rounds * grads if n > 1 else 0.0}
        # A replica: parameters, gradients, optimizer state; DDP's buckets hold a second copy of the gradients.
        state = params + grads + optim + (grads if n > 1 else 0)
    else:
        # FSDP2, reshard after forward: each micro-step gathers the parameters for its forward and again for
        # its backward; a synced one reduce-scatters the gradients. Counted as fully exposed (no overlap model),
        # with the per-micro-step work FSDP measured beyond that at N=2.
        units = profile.fsdp_units
        gathers_s = 2 * k * link.all_gather_s(params, n, calls=units)
        scatter_s = rounds * link.reduce_scatter_s(grads, n, calls=units)
        exposed_s = gathers_s + scatter_s + k * slowdown * profile.fsdp_extra_s
        # Each rank steps its shard; measured at N=2, and kept for any N: DTensor's cost per parameter, not byte.
        optimizer_s = slowdown * profile.fsdp_optimizer_s
        sent = {"all_gather": 2 * k * params, "reduce_scatter": rounds * grads}
        # Sharded state, plus the gathered parameters (counted whole: an upper bound on one unit at a time),
        # plus the gradients: no_sync holds them unsharded through the window, every_step keeps them sharded.
        held_grads = grads if split.sync == "no_sync" and k > 1 else grads / n
        state = int(params / n + optim / n + params + held_grads)
    step_s = compute_s + exposed_s + optimizer_s + profile.fixed_s + scalar_s
    activation = int(max(profile.activation.at(mb), 0.0))
    samples_per_s = split.global_batch_size / step_s
    return Prediction(
        step_time_s=step_s,
        compute_s=compute_s,
        comm_exposed_s=exposed_s + scalar_s,
        optimizer_s=optimizer_s,
        samples_per_s=samples_per_s,
        tokens_per_s=samples_per_s * profile.tokens_per_sample,
        model_state_bytes=int(state),
        activation_bytes=activation,
        memory_bytes=int(state) + activation + reserved_bytes,
        bytes_per_step={kind: float(b) for kind, b in sent.items()},
    )
