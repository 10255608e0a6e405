"""Learning-rate scaling with the global batch, run.max_epochs, sweeps in compare, and trackers.

The resolution rules are pure arithmetic (unit tests). One module-scoped comparison runs
configs/compare/lr_scaling.yaml on a short budget (five 1-process launches); TensorBoard across a resume is
checked on the run of tests/test_first_contact.py that stops and resumes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from launcher.compare.config import load_compare_config
from launcher.compare.judge import judge
from launcher.compare.modes import plan_modes
from launcher.compare.results import NOT_COMPARABLE, REFERENCE, SWEPT
from launcher.config import ConfigError, OptimConfig
from launcher.launch import REPO, LaunchOutcome
from launcher.lr import lr_at, resolve_optim
from launcher.runplan import steps_for_epochs
from tests.helpers import (
    assert_one_error_line,
    compared,
    pair_rows,
    save_tiny_pretrained_bert,
    train_in_process,
)

LR_SCALING = "configs/compare/lr_scaling.yaml"
MAX_EPOCHS = 1.5
NUM_SAMPLES = 120


def optim(**kwargs) -> OptimConfig:
    return OptimConfig(**{"lr": 2e-5, "base_global_batch_size": 20, **kwargs})


# ------------------------------------------------------------------------------------------ the rules


def test_linear_scaling_multiplies_by_k():
    resolved = resolve_optim(optim(lr_scaling="linear"), 60)
    assert resolved.lr == pytest.approx(6e-5, rel=1e-12)
    assert (resolved.beta1, resolved.beta2, resolved.eps) == (0.9, 0.999, 1e-8)
    assert resolved.describe() == "lr: 2e-05 x 3 (linear, global batch 60 / base 20) = 6e-05"


def test_sqrt_scaling_multiplies_by_root_k():
    resolved = resolve_optim(optim(lr_scaling="sqrt"), 60)
    assert resolved.lr == pytest.approx(2e-5 * math.sqrt(3), rel=1e-12)
    assert resolved.summary() == {
        "lr": 2e-5,
        "lr_scaling": "sqrt",
        "lr_multiplier": 1.0,
        "base_global_batch_size": 20,
        "lr_resolved": resolved.lr,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
    }


def test_sqrt_with_betas_and_eps_follows_malladi():
    resolved = resolve_optim(optim(lr_scaling="sqrt", scale_betas_eps=True), 40)  # k = 2
    assert resolved.lr == pytest.approx(2e-5 * math.sqrt(2), rel=1e-12)
    assert resolved.beta1 == pytest.approx(1 - 2 * 0.1, rel=1e-12)
    assert resolved.beta2 == pytest.approx(1 - 2 * 0.001, rel=1e-12)
    assert resolved.eps == pytest.approx(1e-8 / math.sqrt(2), rel=1e-12)
    # A smaller batch than the base moves the betas towards 1.
    assert resolve_optim(optim(lr_scaling="sqrt", scale_betas_eps=True), 10).beta1 == pytest.approx(0.95)


def test_a_beta_pushed_out_of_range_is_one_line():
    with pytest.raises(ConfigError) as err:
        resolve_optim(optim(lr_scaling="sqrt", scale_betas_eps=True, base_global_batch_size=1), 16)
    message = str(err.value)
    assert "\n" not in message
    for word in ("optim.beta1=0.9", "k=16", "-0.6", "[0, 1)"):
        assert word in message, message


def test_no_scaling_keeps_the_configured_values():
    resolved = resolve_optim(optim(lr_scaling="none"), 60)
    assert (resolved.lr, resolved.scale) == (2e-5, 1.0)
    assert resolved.describe() == "lr: 2e-05 (optim.lr_scaling=none)"


def test_warmup_and_schedule_shape_the_resolved_peak():
    resolved = resolve_optim(optim(lr_scaling="linear", warmup_steps=2, schedule="linear"), 60)
    assert [lr_at(s, resolved, 6) for s in range(6)] == pytest.approx([3e-5, 6e-5, 6e-5, 4.5e-5, 3e-5, 1.5e-5])


def test_max_epochs_rounds_up_to_whole_steps():
    assert steps_for_epochs(2.0, 7) == 14
    assert steps_for_epochs(1.5, 7) == 11  # 10.5 steps: the half step is trained, not dropped
    assert steps_for_epochs(0.3, 10) == 3  # 0.3 x 10 = 3.0000000000000004 in floating point


# ------------------------------------------------------------------------------ the sweep, end to end


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """lr_scaling.yaml pointed at a local "pretrained" BERT and a local sentence-pair CSV, as a user would point
    it at theirs (base=...): the study of the issue, end to end, on a short budget."""
    folder = tmp_path_factory.mktemp("lr_scaling")
    save_tiny_pretrained_bert(folder / "bert")
    (folder / "pairs.csv").write_text("\n".join(pair_rows(NUM_SAMPLES, seed=3)) + "\n")
    base = yaml.safe_load((REPO / "configs/runs/tiny_cls.yaml").read_text())
    base["model"] = {"name": f"hf:{folder / 'bert'}", "num_labels": 2}
    base["data"] = {
        "name": str(folder / "pairs.csv"),
        "text_column": "sentence1",
        "text_pair_column": "sentence2",
        "seq_len": 24,
        "cache_dir": str(folder / "cache"),
    }
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    overrides = [
        f"base={folder / 'base.yaml'}",
        f"output_dir={folder / 'out'}",
        f"overrides.run.max_epochs={MAX_EPOCHS}",
    ]
    found = compared(folder, LR_SCALING, *overrides)
    return {**found, "overrides": overrides, "config": yaml.safe_load((REPO / LR_SCALING).read_text())}


@pytest.mark.launch
def test_every_mode_is_reported_and_none_fails(sweep):
    assert [name for name, m in sweep["modes"].items() if not m.is_control] == list(sweep["config"]["modes"])
    for name, mode in sweep["modes"].items():
        assert mode.status == "ok", (name, mode.error)
        assert mode.verdict == (REFERENCE if name == "batch20_lr_base" else SWEPT)
        # eval.fraction=0.2 of the 120 rows, scored after the last step of every mode
        assert mode.eval["num_samples"] == NUM_SAMPLES // 5 and 0 <= mode.eval["macro_f1"] <= 1, name
        assert mode.eval["step"] == mode.max_steps
    assert sweep["result"].ok and sweep["result"].failed == []


@pytest.mark.launch
def test_lr_resolved_follows_the_rule(sweep):
    base_lr = float(sweep["config"]["overrides"]["optim.lr"])
    expected = {
        "batch20_lr_base": base_lr,
        "accum10x2_lr_base": base_lr,
        "accum10x6_linear": 3 * base_lr,  # global 60 / base 20
        "accum10x6_sqrt": math.sqrt(3) * base_lr,
        "accum10x6_fixed": 2.5 * base_lr,  # optim.lr_multiplier: it follows the base, whatever base it is
    }
    for name, lr in expected.items():
        mode = sweep["modes"][name]
        assert mode.lr_resolved == pytest.approx(lr, rel=1e-12), name
        summary = json.loads((Path(mode.run_dir) / "summary.json").read_text())
        assert summary["optim"]["lr_resolved"] == mode.lr_resolved
        # The rate actually applied: no warmup and a constant schedule, so every step at the resolved peak.
        lrs = [json.loads(line)["lr"] for line in (Path(mode.run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert lrs == pytest.approx([lr] * len(lrs), rel=1e-12), name


@pytest.mark.launch
def test_steps_follow_epochs_and_global_batch(sweep):
    for name, mode in sweep["modes"].items():
        summary = json.loads((Path(mode.run_dir) / "summary.json").read_text())
        batch, train_samples = mode.plan.global_batch_size, summary["data"]["train_samples"]
        assert mode.max_steps == math.ceil(MAX_EPOCHS * math.ceil(train_samples / batch)), name
        assert len(mode.losses) == mode.max_steps == summary["steps"]
        assert mode.epochs == pytest.approx(summary["totals"]["samples"] / train_samples)
        assert MAX_EPOCHS <= mode.epochs < MAX_EPOCHS + batch / train_samples
        config = yaml.safe_load((Path(mode.run_dir) / "config.yaml").read_text())
        assert config["run"]["max_steps"] == mode.max_steps  # the resolved value is what the run records
    # Other global batches, other step counts: the weights are still compared, the per-step losses are not.
    linear = sweep["modes"]["accum10x6_linear"]
    assert linear.max_steps < sweep["modes"]["batch20_lr_base"].max_steps
    assert linear.agreement.weights_rel_l2 > 0 and linear.agreement.loss_max_abs_diff is None
    assert sweep["modes"]["accum10x2_lr_base"].agreement.loss_max_abs_diff is not None


@pytest.mark.launch
def test_report_has_the_evaluation_table(sweep):
    report = (sweep["out"] / "report.md").read_text()
    section = report.split("## Evaluation", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert "final train loss" in header and "lr" in header and "epochs" in header
    assert "eval loss" in header and "macro-F1" in header and "accuracy" in header
    assert [row.split(" | ")[0].removeprefix("| ") for row in body] == list(sweep["modes"])
    assert sum("(best)" in row for row in body) >= 1
    assert "(linear x3)" in section and "(sqrt x1.73)" in section


@pytest.mark.launch
def test_an_equal_mode_with_other_steps_is_not_comparable(sweep):
    # Judge the same finished runs again (no launch), with the linear mode expected to be equal.
    cfg = load_compare_config(REPO / LR_SCALING, [*sweep["overrides"], "modes.accum10x6_linear.expect=equal"])
    planned = plan_modes(cfg)
    outcomes = {pm.name: LaunchOutcome(0, 0.0, [pm.run_dir / "train.log"]) for pm in planned}
    linear = judge(cfg, planned, outcomes, []).mode("accum10x6_linear")
    assert linear.verdict == NOT_COMPARABLE and not linear.ok
    assert "optimizer steps vs" in linear.error


# ---------------------------------------------------------------------------------------- trackers


def missing_tracker() -> str:
    from accelerate.tracking import get_available_trackers

    available = {str(t.value) for t in get_available_trackers()}
    candidates = ("wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
    missing = [name for name in candidates if name not in available]
    if not missing:
        pytest.skip("every tracker package is installed here")
    return missing[0]


@pytest.mark.parametrize(
    "log_with, words",
    [
        ("nope", ["run.log_with='nope'", "unknown tracker 'nope'", "tensorboard, wandb"]),
        (None, ["run.log_with=", "not installed", "pip install"]),
    ],
)
def test_tracker_errors_are_one_line(tmp_path, log_with, words):
    log_with = log_with or missing_tracker()
    code, stderr = train_in_process(
        f"run.output_dir={tmp_path / 'out'}", f"run.log_with={log_with}", config="configs/runs/tiny_cls.yaml"
    )
    assert code == 2, stderr
    assert_one_error_line(stderr, [*words, log_with])
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
