"""Checkpoints at optimizer-step boundaries: the format, atomic writes, pruning, finding and loading.

A checkpoint is a folder ``<output_dir>/checkpoints/step-NNNNNNNN/`` holding

    model.safetensors   the weights (tied tensors stored once)
    optimizer.pt        the optimizer state dict (tensors and plain values only)
    rng.pt              python and torch (CPU, CUDA) RNG states, one entry per rank
    scaler.pt           the AMP gradient scaler, when there is one
    meta.json           step, batch plan, model, dtype, and every file's size; written last

The step is the whole position of a run: the sample order (``batching.SampleOrder``) and the
learning rate (``lr.lr_at``) are pure functions of it. Nothing is loaded with pickle: ``.pt``
files go through ``torch.load(weights_only=True)``, the rest are safetensors and JSON.

A checkpoint is written into ``.tmp-step-NNNNNNNN/``, every file fsynced, then renamed: a folder
named ``step-*`` is complete by construction, and a save killed half-way leaves only a ``.tmp-``
folder that the next save or resume removes. Pruning runs after the rename, so the newest
complete checkpoint is never deleted before its successor exists.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from launcher.batching import BatchPlan
from launcher.config import Config, UserError
from launcher.distributed import gather_object
from launcher.metrics import write_json_atomic

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
META = "meta.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
SCALER = "scaler.pt"
# The model settings a checkpoint's weights depend on; a resume must match them all.
MODEL_KEYS = ("name", "task", "hidden_size", "num_layers", "num_heads", "num_labels")


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed (missing, incomplete, another model, another batch)."""


class NonFiniteModelError(RuntimeError):
    """The weights hold NaN or inf: such a model is never written as a checkpoint."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first (``.tmp-`` folders are never complete)."""
    found = []
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            suffix = path.name[len(PREFIX) :]
            if path.name.startswith(PREFIX) and suffix.isdigit() and (path / META).is_file():
                found.append((int(suffix), path))
    return sorted(found)


def remove_partial(output_dir: str | Path) -> None:
    """Delete ``.tmp-`` folders left by a save that was killed before its rename."""
    root = checkpoint_dir(output_dir)
    if root.is_dir():
        for path in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def remove_all(output_dir: str | Path) -> None:
    """Forget an earlier run's checkpoints (run.overwrite=true), so that resume=auto never picks one up."""
    shutil.rmtree(checkpoint_dir(output_dir), ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk; a rename is only durable once both are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_meta(cfg: Config) -> dict[str, Any]:
    return {key: getattr(cfg.model, key) for key in MODEL_KEYS}


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _weights_are_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def save_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    plan: BatchPlan,
    step: int,
) -> Path:
    """Write the checkpoint of optimizer step ``step`` (steps done) on rank 0; every rank must call it.

    Every rank checks its weights and hands its RNG state to rank 0, which writes the whole folder,
    so no shared file system is needed for writing.
    """
    # Identical weights on every rank under DDP, so every rank reaches the same verdict and none is left waiting.
    if not _weights_are_finite(model):
        raise NonFiniteModelError(f"the weights after step {step} are not finite; no checkpoint written")
    rng_states = gather_object(accelerator, _rng_state())
    final = checkpoint_dir(cfg.run.output_dir) / step_name(step)
    if accelerator.is_main_process and not final.exists():
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "global_batch_size": plan.global_batch_size,
            "world_size": plan.world_size,
            "micro_batch_size": plan.micro_batch_size,
            "accum_steps": plan.accum_steps,
            "model": _model_meta(cfg),
            "dtype": cfg.run.dtype,
            "optimizer": cfg.optim.name,
            "seed": cfg.run.seed,
            "max_steps": cfg.run.max_steps,
        }
        _write_checkpoint(final, meta, lambda folder: _write_files(folder, accelerator, model, optimizer, rng_states))
        prune(cfg.run.output_dir, cfg.run.keep_checkpoints)
    # The other ranks wait here rather than in the next collective: a rank that runs ahead into a
    # collective while rank 0 writes files made gloo abort at teardown (1 launch in ~5, measured).
    accelerator.wait_for_everyone()
    return final


def _write_checkpoint(final: Path, meta: dict[str, Any], write_files: Callable[[Path], None]) -> None:
    """Rank 0: a temporary folder, its files, meta.json (with every file's size) last, fsync, rename."""
    tmp = final.with_name(TMP_PREFIX + final.name)
    remove_partial(final.parent.parent)
    try:
        tmp.mkdir(parents=True)
        write_files(tmp)
        _pause_for_tests(meta["step"])
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        # meta.json last: it lists the sizes that a later resume checks every file against.
        write_json_atomic(tmp / META, meta)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(final.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {str(final)!r}: {err.strerror or err}; the earlier checkpoints are kept"
        ) from None


def _write_files(
    folder: Path,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng_states: list[dict[str, Any]],
) -> None:
    from safetensors.torch import save_model

    save_model(accelerator.unwrap_model(model), str(folder / WEIGHTS))
    torch.save(optimizer.state_dict(), folder / OPTIMIZER)
    torch.save(rng_states, folder / RNG)
    if accelerator.scaler is not None:
        torch.save(accelerator.scaler.state_dict(), folder / SCALER)
    for path in folder.iterdir():
        _fsync(path)


def _pause_for_tests(step: int) -> None:
    """Test hook: hold the save of ``step`` open (files written, not yet renamed) until a signal arrives, so a
    test can SIGKILL or SIGTERM a run at exactly that point."""
    if os.environ.get("ACCUM_TEST_PAUSE_IN_SAVE_AT_STEP") == str(step):
        signal.pause()


def prune(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint folder ``run.resume`` names: None for ``none`` (or ``auto`` with no checkpoint yet)."""
    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        found = list_checkpoints(cfg.run.output_dir)
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


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Read ``meta.json`` and check that every file it lists is there with its full size."""
    try:
        meta = json.loads((path / META).read_text())
        files = meta["files"]
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is incomplete: no readable {META} (a save that did not finish?)"
        ) from None
    for name, size in files.items():
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise CheckpointError(
                f"checkpoint {str(path)!r} is truncated or damaged: {name} is {found}, expected {size} bytes"
            )
    return CheckpointInfo(path, meta)


def check_compatible(info: CheckpointInfo, cfg: Config, plan: BatchPlan) -> None:
    """Refuse a checkpoint of another model, dtype or optimizer, or (unless allowed) another global batch."""
    where = f"checkpoint {str(info.path)!r}"
    for key, value in _model_meta(cfg).items():
        saved = info.meta["model"].get(key)
        if saved != value:
            raise CheckpointError(f"{where} is of another model: model.{key}={saved!r} there, {value!r} here")
    for key, saved, value in (
        ("run.dtype", info.meta["dtype"], cfg.run.dtype),
        ("optim.name", info.meta["optimizer"], cfg.optim.name),
    ):
        if saved != value:
            raise CheckpointError(f"{where} was written with {key}={saved!r}; this run has {value!r}")
    saved_batch = info.meta["global_batch_size"]
    if saved_batch != plan.global_batch_size and not cfg.run.allow_batch_change:
        raise CheckpointError(
            f"{where} was written with global_batch_size={saved_batch}, this run has {plan.global_batch_size}: "
            "the steps would not continue the same samples; set run.allow_batch_change=true to resume anyway"
        )


def check_step(info: CheckpointInfo, cfg: Config) -> None:
    """Refuse a checkpoint past the end of this run; called once run.max_steps is resolved (run.max_epochs
    needs the training set's size)."""
    if info.step > cfg.run.max_steps:
        raise CheckpointError(
            f"checkpoint {str(info.path)!r} is at step {info.step}, past run.max_steps={cfg.run.max_steps}"
        )


def _load_pt(path: Path) -> Any:
    # Always to CPU: a MULTI_CPU run tags its tensors "cpu:0", which torch.load cannot restore as such, and
    # the optimizer moves its state to each parameter's device itself.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing problem
        raise CheckpointError(f"checkpoint file {str(path)!r} cannot be read: {str(err).splitlines()[0]}") from None


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_model

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


def load_checkpoint(
    info: CheckpointInfo,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: BatchPlan,
) -> str:
    """Restore weights, optimizer, RNG and scaler in place on every rank; returns a note on the RNG restore."""
    _load_weights(info.path / WEIGHTS, accelerator.unwrap_model(model))
    optimizer.load_state_dict(_load_pt(info.path / OPTIMIZER))
    if accelerator.scaler is not None and (info.path / SCALER).is_file():
        accelerator.scaler.load_state_dict(_load_pt(info.path / SCALER))
    states = _load_pt(info.path / RNG)
    if len(states) != plan.world_size:
        # Per-rank streams (dropout) cannot map onto another number of ranks; seed them from the position instead.
        torch.manual_seed(int(info.meta["seed"]) * 1_000_003 + info.step * 1_009 + accelerator.process_index)
        return f"rng: the checkpoint has {len(states)} rank(s), this launch {plan.world_size}; streams re-seeded"
    state = states[accelerator.process_index]
    python_state = state["python"]
    # JSON-like containers come back as lists; random.setstate wants the tuples it gave.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return "rng: restored per rank"
