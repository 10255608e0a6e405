"""The core promise, from one real comparison: the same global batch gives the same model under accumulation,
DDP, and both (two machines: test_multinode); no_sync all-reduces once per optimizer step; compare judges it all
from the files the runs wrote.

One module-scoped comparison (float64, dropout 0, SGD, a variable-length LM, 40 samples so that epochs end in
short 8-sample windows) serves every assertion. One of its modes is expected to agree but trains with
another learning rate, so the command must exit 1 and name it, while the other modes are still run and judged.
"""

from __future__ import annotations

import pytest

from launcher.compare.results import AGREES, DIFFERS, DISAGREES
from launcher.timing import PHASES
from tests.helpers import compared, read_run, rel_l2, write_compare_config

pytestmark = pytest.mark.launch

STEPS = 6
COMMON = {
    "run.dtype": "float64",
    "model.dropout": 0.0,
    "optim.name": "sgd",
    "optim.lr": 0.5,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 2,
    "optim.grad_clip": 0,
    "data.num_samples": 40,  # at global batch 16: windows of 16, 16, 8 per epoch
    "run.max_steps": STEPS,
    "batch.global_batch_size": 16,
    "batch.accum_steps": None,
}
K = 4  # micro-steps of the 2-process modes with micro batch 2
MODES = {
    "full_batch": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 16}},  # 1 x K=1, the reference
    "accum_1x4": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 4}},
    "ddp_accum_2x2": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 4}},
    "ddp_2x1": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 8}},
    "ddp_accum_2x4": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 2}},
    "every_step_2x4": {
        "num_processes": 2,
        "baseline": True,
        "overrides": {"batch": {"micro_batch_size": 2, "sync": "every_step"}},
    },
    "mean_1x4": {
        "num_processes": 1,
        "expect": "differ",
        "overrides": {"batch.micro_batch_size": 4, "batch.loss_normalization": "mean"},
    },
    # Expected to agree, but given another learning rate: must fail the comparison, by name.
    "wrong_lr": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 16, "optim.lr": 0.7}},
}
EQUAL_SPLITS = ["accum_1x4", "ddp_accum_2x2", "ddp_2x1", "ddp_accum_2x4", "every_step_2x4"]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    folder = tmp_path_factory.mktemp("core")
    found = compared(folder, write_compare_config(folder, MODES, COMMON), returncode=1)  # 1: wrong_lr disagrees
    found["runs"] = {name: read_run(found["out"] / "modes" / name) for name in MODES}
    return found


@pytest.mark.parametrize("name", EQUAL_SPLITS)
def test_splits_match_full_batch_weights(core, name):
    distance = rel_l2(core["runs"][name].weights, core["runs"]["full_batch"].weights)
    assert distance <= 1e-10, f"{name}: relative L2 {distance:.3e} from the full batch"
    mode = core["modes"][name]
    assert mode.verdict == AGREES and mode.ok
    assert mode.agreement.weights_rel_l2 == pytest.approx(distance, rel=1e-12)  # compare read the same files
    assert mode.agreement.loss_max_abs_diff <= 1e-10
    assert mode.agreement.weights_cosine == pytest.approx(1.0, abs=1e-12)


def test_splits_log_the_same_losses(core):
    reference = core["runs"]["full_batch"].losses
    for name in ("accum_1x4", "ddp_accum_2x2", "ddp_2x1"):
        assert core["runs"][name].losses == pytest.approx(reference, rel=1e-10), name
    assert core["modes"]["mean_1x4"].losses == core["runs"]["mean_1x4"].losses


def test_training_moved_the_weights(core):
    # Guards the equivalence checks against a run that silently did nothing.
    losses = core["runs"]["full_batch"].losses
    assert losses[-1] < losses[0]


def test_mean_normalization_differs_and_is_shown(core):
    distance = rel_l2(core["runs"]["mean_1x4"].weights, core["runs"]["full_batch"].weights)
    assert distance > 1e-6, f"naive mean normalization should differ; relative L2 {distance:.3e}"
    mean = core["modes"]["mean_1x4"]
    assert mean.ok and mean.verdict == DIFFERS
    assert mean.agreement.loss_max_abs_diff > 0


def test_plan_is_derived_from_the_launch(core):
    expected = {
        "full_batch": (1, 16, 1),
        "accum_1x4": (1, 4, 4),
        "ddp_accum_2x2": (2, 4, 2),
        "ddp_2x1": (2, 8, 1),
        "ddp_accum_2x4": (2, 2, 4),
    }
    for name, (world, micro, accum) in expected.items():
        s = core["runs"][name].summary
        assert (s.world_size, s.micro_batch_size, s.accum_steps, s.global_batch_size) == (world, micro, accum, 16)


def test_two_cpu_processes_form_a_real_gloo_group(core):
    s = core["runs"]["ddp_accum_2x2"].summary
    assert (s.world_size, s.backend) == (2, "gloo")
    assert len(s.peak_mem_bytes_per_rank) == 2  # one figure per process


def test_no_sync_all_reduces_once_per_optimizer_step(core):
    no_sync, every = core["runs"]["ddp_accum_2x4"], core["runs"]["every_step_2x4"]
    assert no_sync.summary.totals.sync_rounds == STEPS
    assert every.summary.totals.sync_rounds == STEPS * K
    assert [m.sync_rounds for m in no_sync.metrics] == [1] * STEPS
    assert no_sync.summary.totals.allreduce_bytes > 0
    assert every.summary.totals.allreduce_bytes == K * no_sync.summary.totals.allreduce_bytes
    cost = core["modes"]["every_step_2x4"].cost
    assert (cost.sync_rounds_per_step, core["modes"]["ddp_accum_2x4"].cost.sync_rounds_per_step) == (K, 1)


def test_every_step_has_its_time_breakdown(core):
    """The phases (launcher.timing) account for each step's time; only a backward that syncs waits on
    communication. Structural checks only: timings are compared in bench/, never here."""
    for name in ("accum_1x4", "ddp_accum_2x4", "every_step_2x4"):
        for m in core["runs"][name].metrics:
            phases = m.time_breakdown
            assert set(phases) == {f"{p}_s" for p in PHASES} | {"other_s"}, name
            assert all(v >= 0 for v in phases.values()) and phases["forward_s"] > 0 and phases["backward_s"] > 0
            assert sum(phases.values()) == pytest.approx(m.step_time_s, rel=1e-9, abs=1e-9), name
            assert (phases["comm_exposed_s"] > 0) == (name != "accum_1x4"), (name, phases)
        assert core["modes"][name].cost.time_breakdown == core["runs"][name].summary.median_time_breakdown
    table = (core["out"] / "report.md").read_text().split("| mode | median step | data |", 1)[1]
    assert "| every_step_2x4 |" in table.split("\n\n", 1)[0]


def test_single_process_sends_nothing(core):
    assert core["runs"]["accum_1x4"].summary.totals.allreduce_bytes == 0
    assert core["modes"]["accum_1x4"].cost.allreduce_bytes_per_step == 0


def test_metrics_have_one_line_per_step(core):
    for run in core["runs"].values():
        assert [m.step for m in run.metrics] == list(range(1, STEPS + 1))
    # The short last window of each epoch (40 = 16 + 16 + 8) is trained with its real size.
    assert [m.samples for m in core["runs"]["full_batch"].metrics] == [16, 16, 8, 16, 16, 8]


def test_writes_every_output(core):
    for name in ("compare.json", "report.md", "loss_curves.png", "cost.png"):
        assert (core["out"] / name).stat().st_size > 0, name
    report = (core["out"] / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in report and "![cost](cost.png)" in report
    for name in MODES:
        assert name in report
    assert core["result"].reference == "full_batch"  # the first mode, none named


def test_cost_comes_from_each_summary(core):
    for name in MODES:
        mode, summary = core["modes"][name], core["runs"][name].summary
        assert mode.cost.median_step_time_s == summary.median_step_time_s
        assert len(mode.cost.peak_mem_bytes_per_process) == mode.plan.world_size
        assert mode.cost.tokens_per_s > 0 and mode.cost.wall_time_s > 0
    assert core["modes"]["full_batch"].cost.step_time_ratio == 1.0


def test_a_mode_that_should_agree_but_does_not_fails_by_name(core):
    errors = [line for line in core["proc"].stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, core["proc"].stderr
    assert "mode 'wrong_lr'" in errors[0] and "expected to equal 'full_batch'" in errors[0]
    assert core["result"].failed == ["wrong_lr"] and not core["result"].ok
    wrong = core["modes"]["wrong_lr"]
    assert wrong.verdict == DISAGREES
    assert wrong.agreement.weights_rel_l2 > wrong.agreement.tolerance_rel_l2
    # The preflight said why before anything ran.
    assert "wrong_lr: changes more than the split" in core["proc"].stdout
