"""The only module that touches Accelerator, ranks, launch environment variables and process groups."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import InitProcessGroupKwargs, LoggerType

from launcher.config import Config, ConfigError
from launcher.preflight import LaunchError, check_launch, launch_from_torchrun_env


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: each machine's logs need the one error line, not only rank 0's."""
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class Attempt:
    """This process's start within its launch: 0 the first; n once its workers were started n times before,
    by torchrun's elastic agent (``--max_restarts``) or by a machine's launch started again by hand."""

    number: int
    store: dist.Store | None = None  # the launch's store (torchrun's agent hosts it), this attempt's keys apart


def join_launch(timeout_s: float) -> Attempt:
    """Count this start in the launch's store, before anything else is decided.

    Under torchrun's agent the store outlives the workers, and what an attempt leaves in it (each rank's
    address, for the process group) is read by the next one: a rank that reads a stale address connects to a
    dead process (measured: "Gloo connectFullMesh failed ... Connection refused" on about half of the
    restarts). Each rank counts its own starts there; every rank of one attempt counts the same, also across
    machines where the agents' own restart counts differ (a machine restarted by hand starts at 0).
    """
    if launched_world_size() == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return Attempt(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    store, rank, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    return Attempt(store.add(f"accum-launcher/starts/rank{rank}", 1) - 1, store)


def restarts_used_up() -> tuple[int, bool]:
    """(the restarts this machine's elastic agent allows, whether they are all used) (0, False) outside one."""
    allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    return allowed, allowed > 0 and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) >= allowed


PIN_CORES_ENV = "ACCUM_PIN_CORES"


def pin_to_core() -> None:
    """With ACCUM_PIN_CORES=1 (the benchmarks), keep this process on one core of its own: the local rank's
    among the cores it may use, so that ranks neither share nor swap cores between runs."""
    if os.environ.get(PIN_CORES_ENV) != "1":
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[local_rank() % len(cores)]})


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(cfg: Config) -> None:
    """Check the launch's interfaces, machine rank, world size and rendezvous before the group forms.

    The connect is bounded by the collective timeout, so a dead machine 0 fails no later than it would.
    """
    check_launch(launch_from_torchrun_env(os.environ), cfg.run.expected_world_size, os.environ, cfg.run.dist_timeout_s)


# Trackers with an optional-dependency extra of this package (pyproject.toml); the others install by their own name.
TRACKER_EXTRAS = {"tensorboard": "accum-launcher[tensorboard]"}
TRACKER_PROJECT = "accum-launcher"


def tracker_names(log_with: str) -> list[str]:
    """``run.log_with`` as Accelerate tracker names ([] for none).

    Accelerate drops a tracker whose package is missing with a debug-level log line, so a run asked to
    log to TensorBoard would train without it; refuse instead, naming the install command.
    """
    names = [name.strip() for name in log_with.split(",") if name.strip()]
    if names == ["none"]:
        return []
    valid = [t.value for t in LoggerType if t is not LoggerType.ALL]
    available = {str(t.value) for t in get_available_trackers()}
    for name in names:
        if name not in valid:
            raise ConfigError(
                f"run.log_with={log_with!r}: unknown tracker {name!r}; choose none or from: {', '.join(valid)}"
            )
        if name not in available:
            package = TRACKER_EXTRAS.get(name, name)
            raise ConfigError(
                f"run.log_with={log_with!r}: the {name} tracker's package is not installed (Accelerate would drop "
                f"it silently); install it with: pip install '{package}'"
            )
    return list(dict.fromkeys(names))


def tracker_values(record: dict[str, object]) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record for an experiment tracker (nested ones, like an
    evaluation's, as ``eval/loss``); the step is passed separately, flags and lists are left out."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            values.update({f"{key}/{k}": v for k, v in tracker_values(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            values[key] = value
    return values


def start_trackers(accelerator: Accelerator, config: dict[str, object], resumed_from_step: int, run_id: str) -> None:
    """Open the trackers of ``run.log_with`` (main process) with the run's flat config as hyperparameters.

    A resumed or restarted run continues the same tracker run: TensorBoard drops what the earlier session
    logged after ``resumed_from_step`` (those steps are trained again), W&B reopens the run ``run_id``.
    """
    if not accelerator.log_with:
        return
    # TensorBoard's hparams take bool, int, float and str only; a null (a derived batch size) is shown as one.
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}
    continued = {
        "tensorboard": {"purge_step": resumed_from_step + 1} if resumed_from_step else {},
        "wandb": {"id": run_id, "resume": "allow"},
    }
    accelerator.init_trackers(TRACKER_PROJECT, config=hparams, init_kwargs=continued)


def init_accelerator(cfg: Config, trackers: list[str] | None = None, attempt: Attempt | None = None) -> Accelerator:
    """Form the process group the launch asked for, on GPUs when there are any, else on CPU with gloo.

    On a host without CUDA, ``accelerate launch --multi_gpu`` still starts N processes, but a plain
    ``Accelerator()`` then reports one process each: N silent, independent trainings. ``cpu=True``
    makes Accelerate form the MULTI_CPU gloo group instead, and the size check below refuses any
    other mismatch.
    """
    use_cpu = not torch.cuda.is_available()
    if cfg.precision == "fp16" and use_cpu:
        raise ConfigError("precision='fp16' needs a CUDA device; on CPU use precision=bf16 or precision=no")
    launched = launched_world_size()
    timeout = timedelta(seconds=cfg.run.dist_timeout_s)
    try:
        form_group(attempt or Attempt(0), use_cpu, timeout)
        accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=cfg.precision,
            # Trackers that write files (TensorBoard) write under <output_dir>/logs/<TRACKER_PROJECT>/.
            log_with=trackers or None,
            project_dir=str(Path(cfg.run.output_dir) / "logs") if trackers else None,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
        )
    except (ValueError, RuntimeError) as err:  # a half-set launch environment: say what is missing, in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LaunchError(f"could not form the process group for WORLD_SIZE={launched}: {first}") from None
    formed = dist.get_world_size() if dist.is_initialized() else 1
    if launched != formed or accelerator.num_processes != formed:
        raise LaunchError(
            f"WORLD_SIZE={launched} but the process group has {formed} process(es) "
            f"(accelerate reports {accelerator.num_processes}); check the launch command and its accelerate config"
        )
    return accelerator


def form_group(attempt: Attempt, use_cpu: bool, timeout: timedelta) -> None:
    """Form the process group on this attempt's own keys of the launch's store (join_launch says why);
    Accelerate keeps a group that is already formed."""
    if attempt.store is None or dist.is_initialized():
        return
    dist.init_process_group(
        "gloo" if use_cpu else "nccl",
        store=dist.PrefixStore(f"accum-launcher/attempt-{attempt.number}", attempt.store),
        rank=env_rank(),
        world_size=launched_world_size(),
        timeout=timeout,
    )


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def start_all_reduce_sum(accelerator: Accelerator, values: list[float]) -> Callable[[], list[float]]:
    """Sum a few scalars over all ranks in one collective (float64 keeps integer counts exact), launched now;
    the returned function waits for the sums. What the caller does in between hides the collective's latency."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True) if accelerator.num_processes > 1 else None

    def result() -> list[float]:
        if work is not None:
            work.wait()
        return tensor.tolist()

    return result


def all_reduce_sum(accelerator: Accelerator, values: list[float]) -> list[float]:
    """``start_all_reduce_sum``, waited for at once."""
    return start_all_reduce_sum(accelerator, values)()


def gather_object(accelerator: Accelerator, value: object) -> list:
    """Every rank's ``value``, in rank order (a list of one when not distributed)."""
    if accelerator.num_processes == 1:
        return [value]
    out: list = [None] * accelerator.num_processes
    dist.all_gather_object(out, value)
    return out


# Words that mark a RuntimeError as a failed collective (DDP's comm hook wraps gloo's error in its own).
_COMM_MARKERS = ("gloo", "NCCL", "c10d", "ProcessGroup", "Connection closed by peer", "Connection reset by peer")


def comm_failure_message(err: BaseException) -> str | None:
    """One line for a collective that failed or timed out (a lost machine, a cut link); None for other errors.

    gloo's own text is a wrapped C++ message; its innermost reason ("Timed out waiting 20000ms for
    recv operation to complete", "Connection closed by peer ...") is the part a user can act on.
    """
    text = str(err)
    if not (isinstance(err, dist.DistError) or any(m in text for m in _COMM_MARKERS)):
        return None
    reasons = re.findall(r"\] ([^\[\]\n]+)", text)
    reason = (reasons[-1] if reasons else text.splitlines()[0] if text else type(err).__name__).strip()
    return (
        f"lost contact with the other processes: a collective failed or did not finish within "
        f"run.dist_timeout_s ({reason}); check the network between the machines and the other machines' logs"
    )


@contextmanager
def local_main_first(accelerator: Accelerator) -> Iterator[None]:
    """Run the block on each machine's first process, then on the others (a cold tokenization cache is
    filled once per machine, then read by the rest).

    Unlike ``accelerator.local_main_process_first()``, the first process reaches the barrier even when the
    block raises, so the others are released, run the block themselves and raise the same user error
    instead of waiting for a collective timeout. The block's work must finish within run.dist_timeout_s.
    """
    if not accelerator.is_local_main_process:
        accelerator.wait_for_everyone()
    try:
        yield
    finally:
        if accelerator.is_local_main_process:
            accelerator.wait_for_everyone()


def broadcast_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics among them) to every rank: rank 0's model is the
    one saved, so an evaluation on every rank then measures the saved model."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def shutdown(accelerator: Accelerator | None = None) -> None:
    """Close the trackers (Accelerate's end_training, which also tears down the group), drop Accelerate's
    references to the prepared model and optimizer, and destroy the group.

    The DDP model holds the process group: once nothing references it (the caller drops its own), the group
    and its gloo worker threads go away here, while the interpreter is fully alive, not during its finalization.
    """
    if accelerator is not None:
        if accelerator.trackers:
            accelerator.end_training()
        accelerator.free_memory()  # clears its lists of prepared objects, then collects garbage
    if dist.is_initialized():
        dist.destroy_process_group()
