"""FSDP2, the second way to add devices: exact under every accumulation policy, measured by collective and by
the memory each rank holds, and resumable across world sizes and strategies.

One module-scoped run of configs/compare/fsdp.yaml (float64, AdamW, 6 steps, 1 x K=8 against 2 processes x
K=4 under DDP and three FSDP policies), whose DDP and FSDP modes keep checkpoints; three resumes start from
them: FSDP -> FSDP (the same launch), FSDP -> 1 process, DDP -> FSDP.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from launcher.compare.results import AGREES
from launcher.config import ConfigError
from launcher.parallel.fsdp import block_classes
from tests.helpers import assert_one_error_line, compared, read_run, rel_l2, run_split, train_in_process

CONFIG = "configs/compare/fsdp.yaml"
K, UNITS = 4, 3  # micro-steps per window on 2 processes; FSDP units of the tiny GPT-2: 2 blocks and the root
FSDP_MODES = ("fsdp_2x4", "fsdp_every_step_2x4", "fsdp_no_reshard_2x4")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    overrides = [
        f"output_dir={folder / 'out'}",
        "keep_checkpoints=true",
        "overrides.run.max_steps=6",
        "overrides.data.num_samples=40",
        "overrides.model.hidden_size=64",
        "modes.ddp_2x4.overrides.run.checkpoint_every=2",
        "modes.fsdp_2x4.overrides.run.checkpoint_every=2",
    ]
    found = compared(folder, CONFIG, *overrides)
    modes = folder / "out" / "modes"
    found["runs"] = {name: read_run(modes / name) for name in found["modes"]}

    def resume(name: str, nproc: int, mode: str, strategy: str) -> dict:
        """The mode's own training config, resumed from its step-4 checkpoint into a fresh folder (1 process: in
        this process)."""
        checkpoint = modes / mode / "checkpoints" / "step-00000004"
        args = [f"run.resume={checkpoint}", f"parallel.strategy={strategy}", f"run.expected_world_size={nproc}"]
        return read_run(run_split(folder, nproc, name, *args, config=str(modes / mode / "launch_config.yaml")))

    found["resumed"] = {
        "fsdp_to_fsdp": resume("fsdp_to_fsdp", 2, "fsdp_2x4", "fsdp"),
        "fsdp_to_one": resume("fsdp_to_one", 1, "fsdp_2x4", "ddp"),
        "ddp_to_fsdp": resume("ddp_to_fsdp", 2, "ddp_2x4", "fsdp"),
    }
    return found


@pytest.mark.launch
@pytest.mark.parametrize("name", FSDP_MODES)
def test_every_fsdp_policy_is_exact(fsdp, name):
    mode = fsdp["modes"][name]
    assert mode.verdict == AGREES and mode.agreement.weights_rel_l2 <= 1e-10, (name, mode.agreement)
    assert rel_l2(fsdp["runs"][name].weights, fsdp["runs"]["ddp_2x4"].weights) <= 1e-10
    assert fsdp["runs"][name].summary.strategy == "fsdp"
    # Clipping over the shards: the logged norm is the full model's, the one DDP computes.
    ddp_norms = [m.grad_norm for m in fsdp["runs"]["ddp_2x4"].metrics]
    assert [m.grad_norm for m in fsdp["runs"][name].metrics] == pytest.approx(ddp_norms, rel=1e-10)


@pytest.mark.launch
def test_collectives_are_counted_for_every_strategy(fsdp):
    per_step = {name: run.summary.collectives_per_step for name, run in fsdp["runs"].items()}
    ddp_params = fsdp["runs"]["ddp_2x4"].summary.memory_per_rank[0].params_bytes
    # DDP: one all-reduce of every gradient per step, in buckets: what the comm hook counted, and the same
    # figure as the old all-reduce fields.
    assert per_step["ddp_2x4"]["all_reduce"]["bytes"] == ddp_params
    assert fsdp["modes"]["ddp_2x4"].cost.allreduce_bytes_per_step == ddp_params
    assert "reduce_scatter" not in per_step["ddp_2x4"] and "all_gather" not in per_step["ddp_2x4"]
    # FSDP: no_sync reduce-scatters once per unit per step, every_step K times; each all-gathers every unit
    # before its forward and again before its backward, but without resharding once per step.
    assert per_step["fsdp_2x4"]["reduce_scatter"]["calls"] == UNITS
    assert per_step["fsdp_every_step_2x4"]["reduce_scatter"]["calls"] == K * UNITS
    assert (
        per_step["fsdp_every_step_2x4"]["reduce_scatter"]["bytes"]
        == K * per_step["fsdp_2x4"]["reduce_scatter"]["bytes"]
    )
    assert per_step["fsdp_no_reshard_2x4"]["all_gather"]["calls"] == UNITS
    assert per_step["fsdp_2x4"]["all_gather"]["calls"] > K * UNITS
    assert "all_reduce" not in per_step["fsdp_2x4"]
    assert [m.sync_rounds for m in fsdp["runs"]["fsdp_2x4"].metrics] == [1] * 6
    assert [m.sync_rounds for m in fsdp["runs"]["fsdp_every_step_2x4"].metrics] == [K] * 6


@pytest.mark.launch
def test_memory_per_rank_comes_from_the_shards(fsdp):
    memory = {
        name: max(run.summary.memory_per_rank, key=lambda m: m.params_bytes) for name, run in fsdp["runs"].items()
    }
    ddp, no_sync, every = memory["ddp_2x4"], memory["fsdp_2x4"], memory["fsdp_every_step_2x4"]
    assert 0.45 <= no_sync.params_bytes / ddp.params_bytes <= 0.6  # half, give or take the shards' padding
    assert 0.45 <= no_sync.optimizer_bytes / ddp.optimizer_bytes <= 0.6
    # no_sync holds the unsharded gradients between micro-steps (a full replica's, as DDP); every_step, shards.
    assert no_sync.held_grad_bytes == ddp.held_grad_bytes == ddp.params_bytes
    assert every.held_grad_bytes == every.params_bytes
    assert all(m.activation_bytes > 0 for m in memory.values())
    report = (fsdp["out"] / "report.md").read_text()
    assert "| fsdp_every_step_2x4 | 2p x mb2 x K=4, fsdp, every_step |" in report
    warnings = "\n".join(fsdp["result"].warnings)
    assert "fsdp_2x4" in warnings and "holds the window's gradients unsharded" in warnings


@pytest.mark.launch
def test_fsdp_resumes_bitwise_and_across_world_sizes_and_strategies(fsdp):
    straight = fsdp["runs"]["fsdp_2x4"]
    same = fsdp["resumed"]["fsdp_to_fsdp"]
    assert all(torch.equal(same.weights[k], straight.weights[k]) for k in straight.weights)
    assert same.losses == straight.losses[4:] and same.summary.resumed_from_step == 4
    assert rel_l2(fsdp["resumed"]["fsdp_to_one"].weights, fsdp["runs"]["accum_1x8"].weights) <= 1e-10
    assert fsdp["resumed"]["fsdp_to_one"].summary.world_size == 1
    assert rel_l2(fsdp["resumed"]["ddp_to_fsdp"].weights, straight.weights) <= 1e-10
    assert fsdp["resumed"]["ddp_to_fsdp"].summary.strategy == "fsdp"


@pytest.mark.launch
def test_a_checkpoint_with_a_missing_shard_is_one_line(fsdp, tmp_path):
    checkpoint = tmp_path / "step-00000004"
    shutil.copytree(fsdp["out"] / "modes" / "fsdp_2x4" / "checkpoints" / "step-00000004", checkpoint)
    next((checkpoint / "shards").glob("*.distcp")).unlink()
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", f"run.resume={checkpoint}")
    assert code == 2
    assert_one_error_line(stderr, ("truncated or damaged", ".distcp", "missing"))


def test_fsdp_needs_two_processes(tmp_path):
    code, stderr = train_in_process(f"run.output_dir={tmp_path / 'out'}", "parallel.strategy=fsdp")
    assert code == 2
    assert_one_error_line(stderr, ("parallel.strategy='fsdp'", "the launch has 1", "parallel.strategy=ddp"))


def test_an_hf_model_whose_blocks_cannot_be_found_is_refused():
    model = nn.Sequential(nn.Linear(2, 2))
    model._no_split_modules = ["NoSuchBlock"]
    with pytest.raises(ConfigError, match="cannot find the blocks of model.name='hf:./odd'"):
        block_classes(model, "hf:./odd")
    assert block_classes(nn.Sequential(nn.Linear(2, 2)), "mlp-bn") == ()  # no blocks: the root is the one unit
