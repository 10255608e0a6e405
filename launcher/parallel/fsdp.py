"""FSDP2: parameters, gradients and optimizer state sharded over the processes (torch's ``fully_shard``).

Each transformer block is its own unit (found by the model's ``_no_split_modules``, the block classes
transformers marks), the root holds the rest. A unit's parameters are all-gathered before its forward and
again before its backward (unless ``parallel.reshard_after_forward=false``), and its gradients reduce-
scattered after a backward that syncs. The sync control is FSDP's own ``set_requires_gradient_sync``: a
no_sync micro-step holds the unsharded gradients until the window's last one; every_step reduce-scatters each
micro-step and keeps them sharded, at K times the bytes.

Accelerate does not shard on CPU (it gives a DDP model there, silently), so the launcher calls ``fully_shard``
itself, on CUDA and CPU alike: one code path, checked by the wrapper it produced.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from launcher.config import ConfigError
from launcher.measure import local


def block_classes(model: torch.nn.Module, name: str) -> tuple[type, ...]:
    """The model's transformer block classes, by the names transformers lists in ``_no_split_modules``; () for
    a model without blocks (the built-in mlp-bn: the root is its one unit)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names and not name.startswith("hf:"):
        return ()
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(
            f"parallel.strategy=fsdp cannot find the blocks of model.name={name!r} (block classes "
            f"{sorted(names) or 'not declared'} match none of its modules); use parallel.strategy=ddp"
        )
    return tuple(found)


class FSDP:
    name = "fsdp"
    sharded = True  # checkpoints: every rank writes its shards (torch.distributed.checkpoint)

    def __init__(self, model_name: str, reshard_after_forward: bool) -> None:
        self.model_name = model_name
        self.reshard_after_forward = reshard_after_forward

    def prepare(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        if accelerator.num_processes < 2:
            raise ConfigError("parallel.strategy=fsdp shards over processes: this launch has 1; launch 2 or more")
        model.to(accelerator.device)
        mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
        blocks = block_classes(model, self.model_name)
        for module in [m for m in model.modules() if isinstance(m, blocks)]:
            fully_shard(module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        if not isinstance(model, FSDPModule):
            raise ConfigError("parallel.strategy=fsdp did not produce an FSDP model; use parallel.strategy=ddp")
        if accelerator.mixed_precision != "no":
            # As Accelerate does for the models it prepares: the forward under autocast, parameters in float32.
            dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
            forward = torch.autocast(accelerator.device.type, dtype=dtype)(type(model).forward)
            model.forward = types.MethodType(forward, model)
        # The optimizer after sharding: it must hold the sharded parameters.
        return model, accelerator.prepare(make_optimizer(model))

    def sync(self, model: torch.nn.Module, enabled: bool) -> AbstractContextManager:
        return self._micro_step(model, enabled)

    @contextlib.contextmanager
    def _micro_step(self, model: FSDPModule, enabled: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(enabled)
        if not self.reshard_after_forward:
            # Keep the gathered parameters through the window: reshard only after its last backward.
            model.set_reshard_after_backward(enabled)
        yield

    def held_gradient_bytes(self, model: torch.nn.Module) -> int:
        """Gradients this rank holds between micro-steps: the sharded ones, and the unsharded ones a no_sync
        window accumulates on FSDP's parameter objects (torch 2.13 has no public accessor for them)."""
        grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
        for module in model.modules():
            if not isinstance(module, FSDPModule):
                continue
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for param in group.fsdp_params:
                    unsharded = getattr(param, "_unsharded_param", None)
                    grads += [param.unsharded_accumulated_grad, unsharded.grad if unsharded is not None else None]
        storages = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes() for g in grads if g is not None}
        return sum(storages.values())

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Rank 0's full (unsharded) weights, tied tensors stored once under the name safetensors' save_model
        would keep (the first in sorted order), so that every strategy writes the same model.safetensors."""
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() != 0:
            return None
        names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(param), []).append(name)
        dropped = {n for group in names.values() for n in sorted(group)[1:]}
        return {k: v for k, v in full.items() if k not in dropped}
