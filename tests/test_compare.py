"""compare: real launches of a tiny 2-process comparison, judged from the files the runs wrote.

One module-scoped comparison (5 modes, float64, 3 steps, about 10 s a launch on 2 cores) is shared by
every check that needs runs. One of its modes is expected to agree but trains with another learning
rate, so the command must exit 1 and name it, while the other modes are still run and judged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.compare import load_compare_config, plan_modes, preflight
from launcher.launch import REPO, launch_env
from tests.conftest import TINY_LM, read_run, rel_l2

K = 2  # micro-steps per optimizer step of the 2-process modes
COMMON = {
    "run.dtype": "float64",
    "run.max_steps": 3,
    "data.num_samples": 40,
    "optim.name": "sgd",
    "optim.lr": 0.5,
    "optim.warmup_steps": 0,
    "optim.grad_clip": 0,
    "batch.global_batch_size": 8,
    "batch.accum_steps": None,
}
MODES = {
    "ddp_accum_2x2": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 2}},
    "accum_1x4": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 2}},
    "every_step_2x2": {"num_processes": 2, "overrides": {"batch": {"micro_batch_size": 2, "sync": "every_step"}}},
    "mean_1x4": {
        "num_processes": 1,
        "expect": "differ",
        "overrides": {"batch.micro_batch_size": 2, "batch.loss_normalization": "mean"},
    },
    # Expected to agree, but given another learning rate: must fail the comparison, by name.
    "wrong_lr": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 8, "optim.lr": 0.7}},
}


def write_config(folder: Path, modes: dict, **extra) -> Path:
    path = folder / "compare.yaml"
    data = {"base": str(REPO / TINY_LM), "output_dir": str(folder / "out"), "overrides": COMMON, "modes": modes}
    path.write_text(yaml.safe_dump({**data, **extra}, sort_keys=False))
    return path


def compare(folder: Path, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.compare", "--config", str(config), *overrides]
    return subprocess.run(cmd, cwd=REPO, env=launch_env(folder / "tmp"), capture_output=True, text=True, timeout=400)


def compared(folder: Path, modes: dict, returncode: int = 0) -> dict:
    """Run a comparison of ``modes`` and read its compare.json back, failing the test unless it exits
    ``returncode`` (a negative code is a kill, 2 a config error)."""
    proc = compare(folder, write_config(folder, modes))
    assert proc.returncode == returncode, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    out = folder / "out"
    result = json.loads((out / "compare.json").read_text())
    return {"out": out, "result": result, "modes": {m["name"]: m for m in result["modes"]}, "proc": proc}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return compared(tmp_path_factory.mktemp("compare"), MODES, returncode=1)  # 1: wrong_lr disagrees


def test_writes_every_output(tiny):
    for name in ("compare.json", "report.md", "loss_curves.png", "cost.png"):
        assert (tiny["out"] / name).stat().st_size > 0, name
    report = (tiny["out"] / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in report and "![cost](cost.png)" in report
    for name in MODES:
        assert name in report
        assert (tiny["out"] / "modes" / name / "model.safetensors").is_file()
    assert tiny["result"]["reference"] == "ddp_accum_2x2"  # the first mode, none named


def test_equal_modes_agree_exactly(tiny):
    for name in ("accum_1x4", "every_step_2x2"):
        a = tiny["modes"][name]["agreement"]
        assert a["weights_rel_l2"] <= 1e-10, (name, a)
        assert a["loss_max_abs_diff"] <= 1e-10, (name, a)
        assert a["weights_cosine"] == pytest.approx(1.0, abs=1e-12)
        assert tiny["modes"][name]["verdict"] == "agrees"


def test_mean_baseline_shows_its_deviation(tiny):
    mean = tiny["modes"]["mean_1x4"]
    assert mean["ok"] and mean["verdict"] == "differs, as expected"
    assert mean["agreement"]["weights_rel_l2"] > 1e-6
    assert mean["agreement"]["loss_max_abs_diff"] > 0


def test_agreement_is_read_from_the_saved_weights(tiny):
    # The same distance, recomputed here from the two runs' model.safetensors.
    runs = {name: read_run(tiny["out"] / "modes" / name) for name in ("ddp_accum_2x2", "mean_1x4")}
    expected = rel_l2(runs["mean_1x4"]["weights"], runs["ddp_accum_2x2"]["weights"])
    assert tiny["modes"]["mean_1x4"]["agreement"]["weights_rel_l2"] == pytest.approx(expected, rel=1e-12)
    assert tiny["modes"]["mean_1x4"]["losses"] == [m["loss"] for m in runs["mean_1x4"]["metrics"]]


def test_every_step_costs_k_times_the_bytes(tiny):
    no_sync, every = tiny["modes"]["ddp_accum_2x2"]["cost"], tiny["modes"]["every_step_2x2"]["cost"]
    assert no_sync["allreduce_bytes_per_step"] > 0
    assert every["allreduce_bytes_per_step"] == K * no_sync["allreduce_bytes_per_step"]
    assert (no_sync["sync_rounds_per_step"], every["sync_rounds_per_step"]) == (1, K)
    assert tiny["modes"]["accum_1x4"]["cost"]["allreduce_bytes_per_step"] == 0


def test_cost_comes_from_each_summary(tiny):
    for name, mode in tiny["modes"].items():
        summary = read_run(tiny["out"] / "modes" / name)["summary"]
        cost = mode["cost"]
        assert cost["median_step_time_s"] == summary["median_step_time_s"]
        assert len(cost["peak_mem_bytes_per_process"]) == mode["plan"]["world_size"]
        assert cost["tokens_per_s"] > 0 and cost["wall_time_s"] > 0
    assert tiny["modes"]["ddp_accum_2x2"]["cost"]["step_time_ratio"] == 1.0


def test_preflight_names_what_breaks_equivalence(tmp_path):
    # Nothing launches here: the warnings come from the resolved configs alone.
    config = write_config(tmp_path, MODES)
    overrides = [
        "overrides.model.dropout=0.1",
        "modes.accum_1x4.overrides.optim.lr=0.9",
        "modes.every_step_2x2.overrides.run.dtype=float32",
        "modes.every_step_2x2.overrides.precision=bf16",
    ]
    cfg = load_compare_config(config, overrides)
    planned = plan_modes(cfg)
    warnings = "\n".join(preflight(planned, planned[0]))
    assert "all modes: model.dropout=0.1" in warnings
    assert "every_step_2x2: precision=bf16" in warnings
    assert "mean_1x4: batch.loss_normalization=mean with variable lengths" in warnings
    assert "accum_1x4: changes more than the split" in warnings and "optim.lr: 0.5 -> 0.9" in warnings
    assert "BatchNorm" not in warnings  # GPT-2 has none


def test_preflight_names_batch_norm(tmp_path, monkeypatch):
    from torch import nn

    from launcher import compare as compare_module

    assert compare_module.batch_norm_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))) == ["BatchNorm1d"]
    monkeypatch.setattr(compare_module, "model_batch_norm", lambda train: ["BatchNorm1d"])
    planned = plan_modes(load_compare_config(write_config(tmp_path, MODES)))
    warnings = preflight(planned, planned[0])
    # Only wrong_lr (micro batch 8) takes its statistics over other samples than the reference (micro batch 2).
    bn_warnings = [w for w in warnings if "BatchNorm" in w]
    assert bn_warnings == [
        "wrong_lr: BatchNorm (BatchNorm1d): statistics over 8 samples per micro-step, the reference's over 2: "
        "normalization changes with the split"
    ]


def test_a_mode_that_should_agree_but_does_not_fails_by_name(tiny):
    errors = [line for line in tiny["proc"].stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, tiny["proc"].stderr
    assert "mode 'wrong_lr'" in errors[0] and "expected to equal 'ddp_accum_2x2'" in errors[0]
    assert tiny["result"]["failed"] == ["wrong_lr"] and not tiny["result"]["ok"]
    wrong = tiny["modes"]["wrong_lr"]
    assert wrong["verdict"] == "DISAGREES"
    assert wrong["agreement"]["weights_rel_l2"] > wrong["agreement"]["tolerance_rel_l2"]
    # The preflight said why before anything ran.
    assert "wrong_lr: changes more than the split" in tiny["proc"].stdout


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
    ],
)
def test_bad_compare_config_gets_one_line(tmp_path, overrides, words):
    proc = compare(tmp_path, write_config(tmp_path, MODES), *overrides)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert not (tmp_path / "out").exists()  # refused before any launch
