"""The verdict against a floor measured in the same comparison, in bf16 and float32 fine-tuning.

Two real comparisons, each with its control (the reference with reversed windows):
- bf16 mixed precision on the tiny LM: the equivalent splits agree although they sit about 1e-2 apart (what a
  fixed tolerance called DISAGREES), and the naive mean loss still differs;
- float32 fine-tuning of a locally saved pretrained classifier at lr 5e-5, where training moves the weights
  by a tiny share of their norm: a mode at a 3% higher learning rate, declared equal, is caught and named.
"""

from __future__ import annotations

import pytest

from launcher.compare.results import AGREES, BY_FLOOR, DIFFERS, DISAGREES
from tests.helpers import compared, pair_rows, save_tiny_pretrained_bert, write_compare_config

pytestmark = pytest.mark.launch

BF16 = {
    "precision": "bf16",
    "run.max_steps": 20,
    "data.num_samples": 160,
    "batch.global_batch_size": 16,
    "batch.accum_steps": None,
}
BF16_MODES = {
    "accum_1x4": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 4}},
    "ddp_2x2": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 4}},
    "mean_1x4": {  # the naive mean differs however the window is split: one process is enough to show it
        "num_processes": 1,
        "expect": "differ",
        "overrides": {"batch.micro_batch_size": 4, "batch.loss_normalization": "mean"},
    },
}
LR = 5e-5
FINETUNE_MODES = {
    "accum_1x2": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 4}},
    "ddp_2x1": {"num_processes": 2, "overrides": {"batch.micro_batch_size": 4}},
    "lr_plus_3pct": {"num_processes": 1, "overrides": {"batch.micro_batch_size": 4, "optim.lr": LR * 1.03}},
}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    return compared(folder, write_compare_config(folder, BF16_MODES, BF16))


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_f32")
    save_tiny_pretrained_bert(folder / "bert")
    (folder / "pairs.csv").write_text("\n".join(pair_rows(64, seed=5)) + "\n")
    common = {
        "model.name": f"hf:{folder / 'bert'}",
        "data.name": str(folder / "pairs.csv"),
        "data.text_column": "sentence1",
        "data.text_pair_column": "sentence2",
        "data.seq_len": 24,
        "data.cache_dir": str(folder / "cache"),
        "run.max_steps": 4,
        "optim.lr": LR,
        "optim.warmup_steps": 0,
        "batch.global_batch_size": 8,
        "batch.accum_steps": None,
    }
    return compared(folder, write_compare_config(folder, FINETUNE_MODES, common), returncode=1)


def test_bf16_equivalent_splits_agree_within_the_floor(bf16):
    floor = bf16["result"].floor
    assert floor is not None and floor.control == "floor_control"
    assert floor.update_rel_l2 > 1e-4  # bf16 rounding: far above float32's
    for name in ("ddp_2x2",):
        mode = bf16["modes"][name]
        assert mode.verdict == AGREES and mode.agreement.judged_by == BY_FLOOR, name
        # The fixed tolerance of the weights' norm would have called it a disagreement.
        assert mode.agreement.weights_rel_l2 > bf16["result"].tolerance["float32"], name
        assert mode.agreement.floor_ratio <= floor.multiple and mode.agreement.loss_floor_ratio <= floor.multiple
    assert bf16["result"].ok and bf16["proc"].returncode == 0


def test_bf16_mean_normalization_still_differs(bf16):
    mean = bf16["modes"]["mean_1x4"]
    assert mean.verdict == DIFFERS and mean.ok
    assert max(mean.agreement.floor_ratio, mean.agreement.loss_floor_ratio) > bf16["result"].floor.multiple


def test_float32_finetuning_names_the_mode_with_another_lr(finetune):
    result = finetune["result"]
    assert result.failed == ["lr_plus_3pct"] and not result.ok
    wrong = finetune["modes"]["lr_plus_3pct"]
    assert wrong.verdict == DISAGREES and wrong.agreement.judged_by == BY_FLOOR
    assert wrong.agreement.floor_ratio > result.floor.multiple
    # Training moved the weights by a small share of their norm: the fixed rule (relative L2 of the weights
    # within 5e-5) would have let the 3% lr through.
    assert wrong.agreement.weights_rel_l2 < result.tolerance["float32"]
    errors = [line for line in finetune["proc"].stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "mode 'lr_plus_3pct'" in errors[0] and "x the floor" in errors[0], errors
    assert "optim.lr" in "; ".join(wrong.changed)
    equal = finetune["modes"]["ddp_2x1"]
    assert equal.verdict == AGREES and equal.agreement.floor_ratio <= result.floor.multiple


def test_the_report_shows_the_floor_and_the_band(bf16):
    result = bf16["result"]
    report = (bf16["out"] / "report.md").read_text()
    assert f"measured by `{result.floor.control}`" in report and "the shaded band in the loss plot" in report
    agreement = report.split("## Agreement", 1)[1].split("\n## ", 1)[0]
    row = next(line for line in agreement.splitlines() if line.startswith("| ddp_2x2 |"))
    assert f"| {result.mode('ddp_2x2').agreement.floor_ratio:.3g} |" in row
    band = result.floor.loss_band
    deviation = [abs(d) for d in result.mode(result.floor.control).agreement.loss_deviation]
    assert len(band) == len(result.mode("accum_1x4").losses)
    assert band[-1] == pytest.approx(result.floor.multiple * max(deviation))
    assert all(a <= b for a, b in zip(band, band[1:], strict=False))  # an envelope: it never shrinks
