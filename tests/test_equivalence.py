"""Issue core: the same global batch gives the same model under accumulation, DDP and both.

One module-scoped set of real launches (float64, dropout 0, SGD, variable-length LM)
is shared by every assertion below: about 8 s a launch on 2 cores.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_run, rel_l2, run_ok

STEPS = 6
# 40 samples at global batch 16: windows of 16, 16, 8 per epoch, so short last windows are in the test.
COMMON = (
    "run.dtype=float64",
    "model.dropout=0.0",
    "optim.name=sgd",
    "optim.lr=0.5",
    "optim.schedule=cosine",
    "optim.warmup_steps=2",
    "optim.grad_clip=0",
    "data.num_samples=40",
    f"run.max_steps={STEPS}",
    "batch.global_batch_size=16",
    "batch.accum_steps=null",
)

# name: (processes, extra overrides)
RUNS = {
    "full_batch": (1, ("batch.micro_batch_size=16",)),  # 1 x K=1, the reference
    "accum_1x4": (1, ("batch.micro_batch_size=4",)),  # 1 x K=4
    "ddp_accum_2x2": (2, ("batch.micro_batch_size=4",)),  # 2 x K=2
    "ddp_2x1": (2, ("batch.micro_batch_size=8",)),  # 2 x K=1
    "ddp_accum_2x4": (2, ("batch.micro_batch_size=2",)),  # 2 x K=4, no_sync
    "every_step_2x4": (2, ("batch.micro_batch_size=2", "batch.sync=every_step")),
    "mean_1x4": (1, ("batch.micro_batch_size=4", "batch.loss_normalization=mean")),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("equivalence")
    return {name: read_run(run_ok(root, nproc, name, *COMMON, *extra)) for name, (nproc, extra) in RUNS.items()}


@pytest.mark.parametrize("name", ["accum_1x4", "ddp_accum_2x2", "ddp_2x1", "ddp_accum_2x4", "every_step_2x4"])
def test_splits_match_full_batch_weights(runs, name):
    distance = rel_l2(runs[name]["weights"], runs["full_batch"]["weights"])
    assert distance <= 1e-10, f"{name}: relative L2 {distance:.3e} from the full batch"


def test_splits_log_the_same_losses(runs):
    reference = [m["loss"] for m in runs["full_batch"]["metrics"]]
    for name in ("accum_1x4", "ddp_accum_2x2", "ddp_2x1"):
        losses = [m["loss"] for m in runs[name]["metrics"]]
        assert losses == pytest.approx(reference, rel=1e-10), name


def test_training_moved_the_weights(runs):
    # Guards the equivalence checks against a run that silently did nothing.
    first, last = runs["full_batch"]["metrics"][0]["loss"], runs["full_batch"]["metrics"][-1]["loss"]
    assert last < first


def test_mean_normalization_differs_from_full_batch(runs):
    distance = rel_l2(runs["mean_1x4"]["weights"], runs["full_batch"]["weights"])
    assert distance > 1e-6, f"naive mean normalization should differ; relative L2 {distance:.3e}"


def test_plan_is_derived_from_the_launch(runs):
    expected = {
        "full_batch": (1, 16, 1),
        "accum_1x4": (1, 4, 4),
        "ddp_accum_2x2": (2, 4, 2),
        "ddp_2x1": (2, 8, 1),
        "ddp_accum_2x4": (2, 2, 4),
    }
    for name, (world, micro, accum) in expected.items():
        s = runs[name]["summary"]
        assert (s["world_size"], s["micro_batch_size"], s["accum_steps"], s["global_batch_size"]) == (
            world,
            micro,
            accum,
            16,
        ), name


def test_two_cpu_processes_form_a_real_gloo_group(runs):
    s = runs["ddp_accum_2x2"]["summary"]
    assert s["world_size"] == 2
    assert s["backend"] == "gloo"
    assert len(s["peak_mem_bytes_per_rank"]) == 2


def test_no_sync_all_reduces_once_per_optimizer_step(runs):
    no_sync, every = runs["ddp_accum_2x4"], runs["every_step_2x4"]
    k = 4
    assert no_sync["summary"]["totals"]["sync_rounds"] == STEPS
    assert every["summary"]["totals"]["sync_rounds"] == STEPS * k
    assert [m["sync_rounds"] for m in no_sync["metrics"]] == [1] * STEPS
    bytes_no_sync = no_sync["summary"]["totals"]["allreduce_bytes"]
    assert bytes_no_sync > 0
    assert every["summary"]["totals"]["allreduce_bytes"] == k * bytes_no_sync


def test_single_process_sends_nothing(runs):
    assert runs["accum_1x4"]["summary"]["totals"]["allreduce_bytes"] == 0


def test_metrics_have_one_line_per_step(runs):
    for run in runs.values():
        assert [m["step"] for m in run["metrics"]] == list(range(1, STEPS + 1))
    keys = {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "items",
        "step_time_s",
        "sync_rounds",
        "allreduce_bytes",
        "peak_mem_bytes",
    }
    assert keys <= runs["ddp_accum_2x2"]["metrics"][0].keys()
    # The short last window of each epoch (40 = 16 + 16 + 8) is trained with its real size.
    assert [m["samples"] for m in runs["full_batch"]["metrics"]] == [16, 16, 8, 16, 16, 8]
