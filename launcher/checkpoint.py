"""Checkpoints at optimizer-step boundaries: the format, atomic writes, finding and loading.

A checkpoint is a folder ``<output_dir>/checkpoints/step-NNNNNNNN/`` (paths and pruning: ``rundir``) holding

    model.safetensors   the weights (tied tensors stored once)                        } a full replica
    optimizer.pt        the optimizer state dict (tensors and plain values only)       } (DDP, one process)
    shards/             model and optimizer state, torch.distributed.checkpoint's format: sharded (FSDP)
    rng.pt              python and torch (CPU, CUDA) RNG states, one entry per rank
    scaler.pt           the AMP gradient scaler, when there is one
    meta.json           step, layout, batch plan, model, dtype, and every file's size; written last

Either layout resumes under any world size and either strategy.

What is saved is the ``TrainState`` (``state``) and the ranks' RNG streams. Nothing is loaded with pickle:
``.pt`` files go through ``torch.load(weights_only=True)``, the rest are safetensors and JSON.

A checkpoint is written into ``.tmp-step-NNNNNNNN/``, every file fsynced, then renamed: a folder named
``step-*`` is complete by construction, and a save killed half-way leaves only a ``.tmp-`` folder that the
next save or resume removes. Pruning runs after the rename, so the newest complete checkpoint is never
deleted before its successor exists.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from launcher import faults
from launcher.config import Config, UserError
from launcher.data.sources import first_line
from launcher.distributed import all_reduce_sum, gather_object
from launcher.files import fsync_path, write_json_atomic
from launcher.measure import COUNTER, local, model_state_bytes
from launcher.parallel import Strategy
from launcher.rundir import CHECKPOINT_META, PARTIAL_PREFIX, RunDir
from launcher.runplan import RunPlan
from launcher.state import TrainState

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
SCALER = "scaler.pt"
SHARDS = "shards"  # torch.distributed.checkpoint's folder of a sharded (FSDP) checkpoint
# The model settings a checkpoint's weights depend on; a resume must match them all.
MODEL_KEYS = ("name", "task", "hidden_size", "num_layers", "num_heads", "num_labels")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed (missing, incomplete, another model, another batch)."""


class NonFiniteModelError(RuntimeError):
    """The weights hold NaN or inf: such a model is never written as a checkpoint."""


def run_meta(cfg: Config, plan: RunPlan, num_labels: int) -> dict[str, Any]:
    """What every checkpoint of this run records besides its step: the batch plan, model (with the classes it
    was built for), dtype, optimizer."""
    batch = plan.batch
    return {
        "format": FORMAT_VERSION,
        "global_batch_size": batch.global_batch_size,
        "world_size": batch.world_size,
        "micro_batch_size": batch.micro_batch_size,
        "accum_steps": batch.accum_steps,
        "model": {**{key: getattr(cfg.model, key) for key in MODEL_KEYS}, "num_labels": num_labels},
        "dtype": cfg.run.dtype,
        "optimizer": cfg.optim.name,
        "seed": cfg.run.seed,
        "max_steps": plan.max_steps,
    }


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _weights_are_finite(accelerator: Accelerator, model: torch.nn.Module) -> bool:
    """Every rank's verdict on its own tensors (a shard under FSDP), agreed so that none is left waiting."""
    bad = sum(not bool(torch.isfinite(local(p)).all()) for p in model.parameters())
    with COUNTER.scalar():
        (bad_ranks,) = all_reduce_sum(accelerator, [float(bad > 0)])
    return bad_ranks == 0


def save_checkpoint(
    accelerator: Accelerator, state: TrainState, strategy: Strategy, run: RunDir, meta: dict[str, Any], keep: int
) -> Path:
    """Write the checkpoint of ``state.step`` (steps done); every rank must call it.

    A full replica (DDP, one process) is written by rank 0 alone, so no shared file system is needed for
    writing. Sharded state (FSDP) is written by every rank, its shards through torch.distributed.checkpoint, into
    the same folder: across machines that folder must be shared. Rank 0 writes the rest and renames.
    """
    if not _weights_are_finite(accelerator, state.model):
        raise NonFiniteModelError(f"the weights after step {state.step} are not finite; no checkpoint written")
    rng_states = gather_object(accelerator, _rng_state())
    final = run.checkpoint_path(state.step)
    tmp = final.with_name(PARTIAL_PREFIX + final.name)
    main = accelerator.is_main_process
    with COUNTER.scalar():
        (exists,) = all_reduce_sum(accelerator, [float(main and final.exists())])
    if exists:
        return final
    meta = {**meta, "step": state.step, "layout": "sharded" if strategy.sharded else "full"}
    needed = _bytes_needed(state, accelerator.num_processes if strategy.sharded else 1)
    try:
        if main:
            run.remove_partial_checkpoints()
            run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            # Refused before anything is written when the disk cannot hold it; a disk that fills up while
            # writing is caught below, the same way.
            if shutil.disk_usage(run.checkpoints_dir).free < needed:
                raise _no_room(run, state.step, needed, while_writing=False)
            tmp.mkdir(parents=True)
        if strategy.sharded:
            accelerator.wait_for_everyone()  # the folder exists before any rank writes into it
            model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
            dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(tmp / SHARDS))
        if main:
            _write_rank0_files(tmp, state, rng_states, full=not strategy.sharded)
            faults.pause_in_save(state.step)
            meta["files"] = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            # meta.json last: it lists the sizes that a later resume checks every file against.
            write_json_atomic(tmp / CHECKPOINT_META, meta)
            fsync_path(tmp)
            os.rename(tmp, final)
            fsync_path(final.parent)
            run.prune_checkpoints(keep)
    except (Exception, CheckpointException) as err:
        # torch.save and safetensors report a full disk as their own errors carrying the OS's message.
        full = getattr(err, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(err)
        if not (full or isinstance(err, (OSError, CheckpointException))):
            raise  # a collective that failed (main() reports it), or a bug
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _no_room(run, state.step, needed, while_writing=True) from None
        reason = getattr(err, "strerror", None) or first_line(err)
        raise CheckpointError(
            f"could not write checkpoint {str(final)!r}: {reason}; the earlier checkpoints are kept"
        ) from None
    # The other ranks wait here rather than in the next collective: a rank that runs ahead into a
    # collective while rank 0 writes files made gloo abort at teardown (1 launch in ~5, measured).
    accelerator.wait_for_everyone()
    return final


def _bytes_needed(state: TrainState, shards: int) -> int:
    """About what a checkpoint takes on disk: the model and optimizer state (this rank's shard times the shards)."""
    sizes = model_state_bytes(state.model, state.optimizer)
    return (sizes.params + sizes.optimizer) * shards


def _no_room(run: RunDir, step: int, needed: int, while_writing: bool) -> CheckpointError:
    free = shutil.disk_usage(run.checkpoints_dir).free
    when = "the disk filled up while writing it" if while_writing else "refused before writing"
    return CheckpointError(
        f"run.output_dir={str(run.path)!r}: no room for the checkpoint of step {step} ({when}): it needs about "
        f"{needed:,} bytes and {free:,} are free; the earlier checkpoints are kept: free some space (bytes or "
        "files) and resume with run.resume=auto"
    )


def _write_rank0_files(folder: Path, state: TrainState, rng_states: list[dict[str, Any]], full: bool) -> None:
    if full:
        save_model(state.module, str(folder / WEIGHTS))  # not state_dict(): save_model stores tied tensors once
        torch.save(state.optimizer.state_dict(), folder / OPTIMIZER)
    torch.save(rng_states, folder / RNG)
    if state.scaler is not None:
        torch.save(state.scaler.state_dict(), folder / SCALER)
    for path in folder.iterdir():
        if path.is_file():
            fsync_path(path)


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint folder ``run.resume`` names: None for ``none`` (or ``auto`` with no checkpoint yet)."""
    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        found = RunDir(cfg.run.output_dir).checkpoints()
        return found[-1][1] if found else None
    path = Path(cfg.run.resume)
    if not path.is_dir():
        raise CheckpointError(f"run.resume={cfg.run.resume!r}: no such checkpoint folder")
    return path


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def in_folder(self, run: RunDir) -> bool:
        """Whether this is one of ``run``'s own checkpoints (a resume that continues the run there)."""
        return self.path.resolve().parent == run.checkpoints_dir.resolve()


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Read ``meta.json`` and check that every file it lists is there with its full size."""
    try:
        meta = json.loads((path / CHECKPOINT_META).read_text())
        files = meta["files"]
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete: no readable {CHECKPOINT_META} (a save that did not finish?)"
        ) from None
    for name, size in files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise CheckpointError(
                f"checkpoint {str(path)!r} is truncated or damaged: {name} is {found}, expected {size} bytes"
            )
    return CheckpointInfo(path, meta)


def check_compatible(info: CheckpointInfo, cfg: Config, plan: RunPlan) -> None:
    """Refuse a checkpoint of another model, dtype or optimizer, or (unless allowed) another global batch."""
    where = f"checkpoint {str(info.path)!r}"
    for key in MODEL_KEYS:
        saved, value = info.meta["model"].get(key), getattr(cfg.model, key)
        if key == "num_labels" and not value:
            continue  # from the data: the weights' shapes are checked when they load
        if saved != value:
            raise CheckpointError(f"{where} is of another model: model.{key}={saved!r} there, {value!r} here")
    for key, saved, value in (
        ("run.dtype", info.meta["dtype"], cfg.run.dtype),
        ("optim.name", info.meta["optimizer"], cfg.optim.name),
    ):
        if saved != value:
            raise CheckpointError(f"{where} was written with {key}={saved!r}; this run has {value!r}")
    saved_batch, batch = info.meta["global_batch_size"], plan.batch.global_batch_size
    if saved_batch != batch and not cfg.run.allow_batch_change:
        raise CheckpointError(
            f"{where} was written with global_batch_size={saved_batch}, this run has {batch}: "
            "the steps would not continue the same samples; set run.allow_batch_change=true to resume anyway"
        )


def check_step(info: CheckpointInfo, max_steps: int) -> None:
    """Refuse a checkpoint past the end of this run; called once the steps are resolved (run.max_epochs needs
    the training set's size)."""
    if info.step > max_steps:
        raise CheckpointError(f"checkpoint {str(info.path)!r} is at step {info.step}, past run.max_steps={max_steps}")


def _load_pt(path: Path) -> Any:
    # Always to CPU: a MULTI_CPU run tags its tensors "cpu:0", which torch.load cannot restore as such, and
    # the optimizer moves its state to each parameter's device itself.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = tuple(f.get_slice(key).get_shape())
                if expected.get(key, shape) != shape:
                    raise CheckpointError(
                        f"checkpoint weights {str(path)!r} are of another model: {key} has shape {list(shape)}, "
                        f"this model {list(expected[key])}"
                    )
        missing, unexpected = load_model(model, str(path), strict=False)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"checkpoint weights {str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights {str(path)!r} are of another model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )


def load_weights(info: CheckpointInfo, module: torch.nn.Module) -> None:
    """A full checkpoint's weights, into the model before the strategy wraps or shards it (sharded ones load
    with the rest of the state, after)."""
    if info.meta.get("layout", "full") == "full":
        _load_weights(info.path / WEIGHTS, module)


def load_checkpoint(info: CheckpointInfo, state: TrainState, strategy: Strategy, rank: int, world_size: int) -> str:
    """Restore the train state and this rank's RNG streams in place, whatever strategy and world size wrote the
    checkpoint; returns a note on the RNG restore."""
    if info.meta.get("layout", "full") == "sharded":
        _load_shards(info, state)
    elif strategy.sharded:
        # A full optimizer state, keyed by parameter index, onto sharded parameters: the same parameters in the
        # same order, named, then scattered by torch's state-dict API.
        names = [name for name, p in state.module.named_parameters() if p.requires_grad]
        saved = _load_pt(info.path / OPTIMIZER)
        named = {
            "state": {names[i]: v for i, v in saved["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
        }
        # Stateless SGD has no tensors to scatter (torch's API then cannot tell the device): nothing to restore.
        if any(isinstance(v, torch.Tensor) for s in named["state"].values() for v in s.values()):
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(state.model, state.optimizer, optim_state_dict=named, options=options)
    else:
        state.optimizer.load_state_dict(_load_pt(info.path / OPTIMIZER))
    state.step = info.step
    scaler = info.path / SCALER
    if state.scaler is not None and scaler.is_file():
        state.scaler.load_state_dict(_load_pt(scaler))
    return _restore_rng(info, rank, world_size)


def _load_shards(info: CheckpointInfo, state: TrainState) -> None:
    """Sharded state into this launch's model, sharded or not: torch.distributed.checkpoint reads the shards it
    needs, whatever world size wrote them."""
    model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
    try:
        with warnings.catch_warnings():
            # A 1-process run has no process group and reads every shard, which is what torch warns it assumes.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(info.path / SHARDS))
    except (CheckpointException, RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(info.path)!r} does not fit this model: {first_line(err)}") from None
    set_state_dict(state.model, state.optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def _restore_rng(info: CheckpointInfo, rank: int, world_size: int) -> str:
    states = _load_pt(info.path / RNG)
    if len(states) != world_size:
        # Per-rank streams (dropout) cannot map onto another number of ranks; seed them from the position instead.
        torch.manual_seed(int(info.meta["seed"]) * 1_000_003 + info.step * 1_009 + rank)
        return f"rng: the checkpoint has {len(states)} rank(s), this launch {world_size}; streams re-seeded"
    own = states[rank]
    python_state = own["python"]
    # JSON-like containers come back as lists; random.setstate wants the tuples it gave.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    torch.set_rng_state(own["torch"])
    if own["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(own["cuda"])
    return "rng: restored per rank"
