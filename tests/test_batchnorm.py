"""BatchNorm: what accumulation cannot reproduce, measured by a real comparison of configs/compare/batchnorm.yaml.

One module-scoped comparison (its five modes, 4 optimizer steps, float64; three of the launches have 2
processes, about a minute on 2 cores) serves every check that needs runs; the CPU SyncBatchNorm module is
also checked on its own against nn.BatchNorm1d, in this process.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from launcher.batchnorm import CpuSyncBatchNorm, convert_sync_batchnorm
from launcher.compare.judge import without_running_stats
from launcher.compare.results import AGREES
from tests.helpers import assert_one_error_line, compare_in_process, compared, rel_l2, train_in_process

COMPARE = "configs/compare/batchnorm.yaml"
EXACT = 1e-10  # float64 relative L2 of equivalent runs (measured ~1e-13)
DRIFT = 1e-6  # far above float64 rounding: a real difference
# Samples each BatchNorm statistic covers, and whether the layers are synced, per mode of batchnorm.yaml.
EXPECTED_BN = {
    "full_1x16": (16, False),
    "accum_1x4": (4, False),
    "ddp_2x8": (8, False),
    "ddp_syncbn_2x8": (16, True),
    "ddp_accum_syncbn_2x4": (8, True),
}


@pytest.fixture(scope="module")
def bn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batchnorm")
    return compared(folder, COMPARE, f"output_dir={folder / 'out'}", "overrides.run.max_steps=4")


def drift(bn, name: str) -> float:
    return bn["modes"][name].agreement.weights_rel_l2


@pytest.mark.launch
def test_accumulation_and_plain_ddp_drift(bn):
    for name in ("accum_1x4", "ddp_2x8"):
        mode = bn["modes"][name]
        assert mode.status == "ok" and mode.agreement.weights_rel_l2 > DRIFT, name
        # Not only the running statistics: training itself went elsewhere.
        assert mode.agreement.parameters_rel_l2 > DRIFT, name
        assert mode.agreement.loss_max_abs_diff > DRIFT, name


@pytest.mark.launch
def test_sync_batchnorm_reproduces_the_big_batch_without_accumulation(bn):
    mode = bn["modes"]["ddp_syncbn_2x8"]
    assert mode.verdict == AGREES and mode.ok
    assert mode.agreement.weights_rel_l2 < EXACT  # running statistics included
    assert mode.agreement.loss_max_abs_diff < 1e-12
    assert bn["result"].ok and bn["result"].failed == []


@pytest.mark.launch
def test_sync_batchnorm_does_not_sync_micro_steps(bn):
    assert drift(bn, "ddp_accum_syncbn_2x4") > DRIFT
    # Its statistics cover the same 8-sample groups as plain DDP 2 x 8 (positions 0-7 and 8-15 of each window),
    # so it trains the same parameters; only the running statistics (updated twice per step) differ.
    weights = {
        name: load_file(bn["out"] / "modes" / name / "model.safetensors")
        for name in ("ddp_2x8", "ddp_accum_syncbn_2x4")
    }
    params = {name: without_running_stats(w) for name, w in weights.items()}
    assert rel_l2(params["ddp_accum_syncbn_2x4"], params["ddp_2x8"]) < EXACT
    assert rel_l2(weights["ddp_accum_syncbn_2x4"], weights["ddp_2x8"]) > DRIFT


@pytest.mark.launch
def test_each_run_says_what_a_statistic_covers(bn):
    for name, (samples, sync) in EXPECTED_BN.items():
        summary = json.loads((bn["out"] / "modes" / name / "summary.json").read_text())
        assert summary["batch_norm"] == {"layers": 2, "sync": sync, "samples_per_statistic": samples}, name
        assert bn["modes"][name].batch_norm == summary["batch_norm"]


@pytest.mark.launch
def test_preflight_and_report_explain_it(bn):
    warnings = "\n".join(bn["result"].warnings)
    assert (
        "accum_1x4: BatchNorm (BatchNorm1d): statistics over 4 samples per micro-step, the reference's over 16"
        in warnings
    )
    assert "ddp_accum_syncbn_2x4: BatchNorm (CpuSyncBatchNorm): statistics over 8 samples" in warnings
    assert "ddp_syncbn_2x8" not in warnings  # same statistics as the reference: nothing to warn about
    report = (bn["out"] / "report.md").read_text()
    section = report.split("## BatchNorm", 1)[1].split("\n## ", 1)[0]
    assert "SyncBatchNorm" in section
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert len({line.replace("\\|", "").count("|") for line in table}) == 1, table  # header and rows align
    for name, (samples, _) in EXPECTED_BN.items():
        row = next(line for line in table if line.startswith(f"| {name} |"))
        assert f"| {samples} | 16 |" in row, row


@pytest.mark.parametrize("entry", ["train", "compare"])
def test_a_micro_batch_of_one_is_one_line(tmp_path, entry):
    if entry == "train":
        overrides = [f"run.output_dir={tmp_path / 'out'}", "model.name=mlp-bn", "batch.micro_batch_size=1"]
        code, stderr = train_in_process(*overrides, config="configs/runs/tiny_cls.yaml")
    else:
        overrides = [f"output_dir={tmp_path / 'out'}", "modes.accum_1x4.overrides.batch.micro_batch_size=1"]
        code, stderr = compare_in_process("--config", COMPARE, *overrides)
    assert code == 2, stderr
    assert_one_error_line(stderr, ("batch.micro_batch_size=1", "model.name='mlp-bn'", ">= 2 samples"))
    assert not (tmp_path / "out").exists()  # refused before anything ran


# ----------------------------------------------------------------------------- the CPU SyncBatchNorm module


# The all-reduce path takes the variance as E[x^2] - E[x]^2, the reference in two passes: in float64 they
# agree to ~1e-12 relative for a batch of 2 with mean 2 and std 3. The Linear's bias before BatchNorm has a
# gradient of exactly 0 in exact arithmetic (the mean removes it): both sides are rounding noise there.
CLOSE = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(params=["one_process_group", "no_process_group"])
def group(request, tmp_path):
    """A real gloo group of one process runs the module's all-reduce path; without one it is BatchNorm1d's."""
    if request.param == "one_process_group":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield request.param
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cpu_sync_batchnorm_equals_batchnorm1d_in_one_process(group):
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5)).double()
    with torch.no_grad():
        reference[1].weight.uniform_(0.5, 1.5)
        reference[1].bias.uniform_(-1, 1)
    synced = convert_sync_batchnorm(copy.deepcopy(reference), cuda=False)
    assert isinstance(synced[1], CpuSyncBatchNorm)
    assert synced.state_dict().keys() == reference.state_dict().keys()  # checkpoints are interchangeable
    for batch in (7, 2, 16):
        x = torch.randn(batch, 3, dtype=torch.float64) * 3 + 2
        upstream = torch.randn(batch, 5, dtype=torch.float64)
        inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        outputs = [model(inp) for model, inp in zip((reference, synced), inputs, strict=True)]
        for out in outputs:
            (out * upstream).sum().backward()
        torch.testing.assert_close(outputs[1], outputs[0], **CLOSE)
        torch.testing.assert_close(inputs[1].grad, inputs[0].grad, **CLOSE)
    for (name, a), (_, b) in zip(reference.named_parameters(), synced.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, **CLOSE, msg=name)
    for key, value in reference.state_dict().items():  # running mean, variance and the forward count
        torch.testing.assert_close(synced.state_dict()[key], value, **CLOSE, msg=key)
    assert int(synced[1].num_batches_tracked) == 3
    reference.eval(), synced.eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(synced(x), reference(x), **CLOSE)
