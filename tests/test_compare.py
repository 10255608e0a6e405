"""compare without its launches: config errors, preflight, the runner's failure reasons, judging and the report
from a golden compare.json; and one launch, a SIGTERM that must stop every machine of a running mode."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launcher.compare import preflight as preflight_module
from launcher.compare.config import ToleranceConfig, load_compare_config
from launcher.compare.judge import failure_lines, loss_agreement, verdict, weights_agreement, within
from launcher.compare.modes import plan_modes
from launcher.compare.preflight import batch_norm_layers, preflight
from launcher.compare.report import markdown, write_all
from launcher.compare.report.tables import cost_header, floor_lines, headline
from launcher.compare.results import (
    AGREES,
    AGREES_DESPITE,
    BY_TOLERANCE,
    DISAGREES,
    Agreement,
    Floor,
    read_comparison,
)
from launcher.launch import REPO, LaunchOutcome, Machine, accelerate_command, launch_env
from tests.helpers import (
    alive,
    assert_one_error_line,
    compare_in_process,
    descendants,
    wait_until,
    write_compare_config,
)

GOLDEN = Path(__file__).parent / "data" / "compare_golden.json"
COMMON = {
    "run.dtype": "float64",
    "run.max_steps": 3,
    "data.num_samples": 40,
    "optim.name": "sgd",
    "optim.lr": 0.5,
    "batch.global_batch_size": 8,
    "batch.accum_steps": None,
}
MODES = {
    "ddp_accum_2x2": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 2}},
    "accum_1x4": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 2}},
    "mean_1x4": {
        "num_processes": 1,
        "expect": "differ",
        "overrides": {"batch.micro_batch_size": 2, "batch.loss_normalization": "mean"},
    },
    "wrong_lr": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 8, "optim.lr": 0.7}},
    "two_machines": {"num_processes": 2, "num_machines": 2, "overrides": {"batch.micro_batch_size": 2}},
}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["modes.accum_1x4.nprocs=2"], ["unknown key 'modes.accum_1x4.nprocs'", "num_processes"]),
        (["modes.accum_1x4.expect=same"], ["modes.accum_1x4.expect='same'", "equal, differ"]),
        (
            ["modes.accum_1x4.overrides.optim.learning_rate=1"],
            ["mode 'accum_1x4'", "unknown key 'optim.learning_rate'"],
        ),
        (["reference=nope"], ["reference='nope'", "must name a mode"]),
        (["modes.accum_1x4.num_processes=3"], ["mode 'accum_1x4'", "not divisible", "world_size=3"]),
        (["modes.two_machines.num_processes=3"], ["modes.two_machines.num_processes=3", "multiple of num_machines=2"]),
        (["modes.two_machines.link=fast"], ["modes.two_machines.link='fast'", "100mbit or 1gbit"]),
        (["modes.accum_1x4.link=1gbit"], ["modes.accum_1x4.num_machines=1", "2 namespace hosts"]),
    ],
)
def test_bad_compare_config_gets_one_line(tmp_path, overrides, words):
    code, stderr = compare_in_process("--config", str(write_compare_config(tmp_path, MODES, COMMON)), *overrides)
    assert code == 2
    assert_one_error_line(stderr, words)
    assert not (tmp_path / "out").exists()  # refused before any launch


def test_preflight_names_what_breaks_equivalence(tmp_path):
    overrides = [
        "overrides.model.dropout=0.1",
        "modes.accum_1x4.overrides.optim.lr=0.9",
        "modes.wrong_lr.overrides.run.dtype=float32",
        "modes.wrong_lr.overrides.precision=bf16",
    ]
    planned = plan_modes(load_compare_config(write_compare_config(tmp_path, MODES, COMMON), overrides))
    warnings = "\n".join(preflight(planned, planned[0]))
    assert "all modes: model.dropout=0.1" in warnings
    assert "wrong_lr: precision=bf16" in warnings
    assert "mean_1x4: batch.loss_normalization=mean with variable lengths" in warnings
    assert "accum_1x4: changes more than the split" in warnings and "optim.lr: 0.5 -> 0.9" in warnings
    assert "BatchNorm" not in warnings  # GPT-2 has none


def test_preflight_names_batch_norm(tmp_path, monkeypatch):
    assert batch_norm_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) == ["BatchNorm1d"]
    monkeypatch.setattr(preflight_module, "look_at_model", lambda train: preflight_module.ModelLook(["BatchNorm1d"], 0))
    planned = plan_modes(load_compare_config(write_compare_config(tmp_path, MODES, COMMON)))
    # Only wrong_lr (micro batch 8) takes its statistics over other samples than the reference (micro batch 2).
    assert [w for w in preflight(planned, planned[0]) if "BatchNorm" in w] == [
        "wrong_lr: BatchNorm (BatchNorm1d): statistics over 8 samples per micro-step, the reference's over 2: "
        "normalization changes with the split"
    ]


def test_each_machine_launch_names_its_rank_and_the_shared_rendezvous():
    cmd = accelerate_command(4, machine=Machine(num_machines=2, machine_rank=1, main_process_port=29555))
    flags = ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")
    # --num_processes counts the processes of all machines, as accelerate does
    assert [cmd[cmd.index(flag) + 1] for flag in flags] == ["4", "2", "1", "127.0.0.1", "29555"]
    assert "--multi_gpu" in cmd
    with pytest.raises(ValueError, match="num_processes=3 does not divide over num_machines=2"):
        accelerate_command(3, machine=Machine(num_machines=2, machine_rank=0, main_process_port=29555))


def test_a_failed_machine_is_named_with_its_own_error_line(tmp_path):
    logs = [tmp_path / "train.log", tmp_path / "train.machine1.log"]
    logs[0].write_text("stopped because machine 1 failed\n")
    logs[1].write_text("error: rank 1: lost contact with the other processes\nTraceback ...\n")
    outcome = LaunchOutcome(returncode=4, wall_s=1.0, logs=logs, failed_machine=1)
    assert outcome.log == logs[1]
    assert outcome.reason() == "machine 1 exited 4: rank 1: lost contact with the other processes"


# ------------------------------------------------------------------ judging and the report, no launch


def test_weights_agreement_by_hand():
    ref = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(7)}  # the integer counter is not compared
    found = weights_agreement({"w": torch.tensor([3.0, 4.5]), "n": torch.tensor(9)}, ref)
    assert found["weights_max_abs_diff"] == pytest.approx(0.5)
    assert found["weights_rel_l2"] == pytest.approx(0.5 / 5.0)
    assert found["weights_cosine"] == pytest.approx((9 + 18) / (5 * (9 + 20.25) ** 0.5))
    with pytest.raises(ValueError, match="different parameters"):
        weights_agreement({"v": torch.zeros(2)}, ref)


def test_loss_agreement_and_the_rules(tmp_path):
    assert loss_agreement([1.0, 2.0], [1.0, 1.5])["loss_max_abs_diff"] == pytest.approx(0.5)
    assert loss_agreement([1.0], [1.0, 1.5])["loss_deviation"] is None  # other step counts: not the same data
    tolerance = ToleranceConfig()

    def agreement(rel: float, floor_ratio: float | None = None, loss_ratio: float | None = None) -> Agreement:
        return Agreement(0.0, 0.0, [], 0.0, rel, 1.0, 0.0, floor_ratio=floor_ratio, loss_floor_ratio=loss_ratio)

    floor = Floor("floor_control", "", 1e-5, 1e-6, 1e-7, 10.0, 1e-4)
    assert within(agreement(1e-12), floor, {"float64"}, tolerance)  # exact is exact, whatever the floor
    assert not within(agreement(1e-9), floor, {"float64"}, tolerance)
    assert within(agreement(1e-3, 3.0, 2.0), floor, {"float32"}, tolerance)  # bf16-sized, within the floor
    assert not within(agreement(1e-6, 3.0, 40.0), floor, {"float32"}, tolerance)  # its loss gap gives it away
    judged = agreement(1e-4)  # no floor: the fixed tolerance, 5e-5 of the weights' norm
    assert not within(judged, None, {"float32"}, tolerance) and judged.judged_by == BY_TOLERANCE
    config = write_compare_config(tmp_path, MODES, COMMON)
    assert not any(pm.is_control for pm in plan_modes(load_compare_config(config)))  # float64: the exact rule
    planned = {pm.name: pm for pm in plan_modes(load_compare_config(config, ["overrides.run.dtype=float32"]))}
    assert planned["ddp_accum_2x2"].is_reference and planned["floor_control"].is_control
    assert verdict(planned["accum_1x4"], True) == (AGREES, True)
    assert verdict(planned["accum_1x4"], False) == (DISAGREES, False)
    assert verdict(planned["wrong_lr"], True) == (AGREES_DESPITE, True)  # optim.lr changed: never silently
    assert verdict(planned["mean_1x4"], True)[1] and verdict(planned["mean_1x4"], False)[1]


def test_the_report_renders_from_compare_json_alone(tmp_path):
    result = read_comparison(GOLDEN)
    write_all(result, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "loss_curves.png").stat().st_size > 0 and (tmp_path / "cost.png").stat().st_size > 0
    agreement = report.split("## Agreement", 1)[1].split("\n## ", 1)[0]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in agreement.splitlines() if line.startswith("| ")}
    assert "| ddp_accum_2x4 | 2p x mb2 x K=4 | equal |" in rows["ddp_accum_2x4"]
    assert "DISAGREES" in rows["wrong_lr"] and "differs, as expected" in rows["mean_1x4"]
    assert f"**{headline(result)}.**" in report
    assert failure_lines(result) == [
        f"mode 'wrong_lr' is expected to equal 'full_batch' but its final weights are "
        f"{result.mode('wrong_lr').agreement.weights_rel_l2:.3e} away (relative L2; tolerance 1e-10)"
    ]
    assert "tokens/s" in cost_header(result)  # an LM: tokens are not its samples
    assert markdown(result) == report


def test_the_fixed_tolerance_is_named_only_where_it_judged():
    result = read_comparison(GOLDEN)  # float64 throughout: no floor is needed, nothing is judged by tolerance
    assert not any("fixed tolerance" in line for line in floor_lines(result))
    result.mode("accum_1x4").agreement.judged_by = BY_TOLERANCE
    assert any("fixed tolerance 5e-05" in line for line in floor_lines(result))


# ----------------------------------------------------------------------------------------- one launch


@pytest.mark.launch
def test_sigterm_stops_every_machine_launch(tmp_path):
    """A scheduler's SIGTERM to compare, mid-mode: every machine's launch and worker is stopped, exit 130."""
    config = write_compare_config(tmp_path, {"two_machines": MODES["two_machines"]}, COMMON)
    cmd = [sys.executable, "-m", "launcher.compare", "--config", str(config), "overrides.run.max_steps=100000"]
    with open(tmp_path / "compare.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(tmp_path / "tmp"), stdout=log, stderr=log)
    try:
        metrics = tmp_path / "out" / "modes" / "two_machines" / "metrics.jsonl"
        wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, 120, "training steps")
        workers = descendants(proc.pid)
        assert len(workers) >= 4  # 2 agents and their 2 workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130, (tmp_path / "compare.log").read_text()[-3000:]
        wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the launches to end")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "compare interrupted" in (tmp_path / "compare.log").read_text()
