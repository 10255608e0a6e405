"""The pure parts: batch arithmetic, the split-independent sample order, config parsing, the run plan."""

from __future__ import annotations

import dataclasses

import pytest

from launcher.batching import BatchPlan, SampleOrder, micro_batch_ids, plan_batch
from launcher.config import ConfigError, load_config
from launcher.runplan import make_plan
from tests.helpers import TINY_LM


@pytest.mark.parametrize(
    ("given", "world", "expected"),
    [
        ((32, 4, None), 1, (4, 8)),
        ((32, 4, None), 2, (4, 4)),
        ((32, 4, None), 8, (4, 1)),
        ((32, None, 2), 4, (4, 2)),
        ((None, 4, 2), 2, (4, 2)),
        ((16, 4, 2), 2, (4, 2)),
        # Fewer than two set: the defaults fill in, global 16 and then micro 4 (the bare command's batch).
        ((None, None, None), 1, (4, 4)),
        ((None, 2, None), 2, (2, 4)),
        ((None, None, 2), 2, (4, 2)),
        ((32, None, None), 2, (4, 4)),
    ],
)
def test_plan_derives_the_missing_number(given, world, expected):
    plan = plan_batch(*given, world_size=world)
    assert (plan.micro_batch_size, plan.accum_steps) == expected
    assert plan.global_batch_size == plan.micro_batch_size * plan.accum_steps * world


@pytest.mark.parametrize(
    ("given", "world", "words"),
    [
        ((30, 4, None), 2, "multiple of 8"),
        ((8, 4, None), 4, "multiple of 16"),
        ((30, None, 4), 2, "multiple of 8"),
        ((32, 4, 2), 2, "!= batch.micro_batch_size=4 x batch.accum_steps=2 x world_size=2 = 16"),
    ],
)
def test_plan_errors_name_the_numbers(given, world, words):
    with pytest.raises(ConfigError, match=None) as err:
        plan_batch(*given, world_size=world)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("world", "accum"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_every_split_trains_the_same_samples_per_step(world, accum):
    num_samples, global_batch = 70, 16  # 70 = 4 full windows + a short one of 6
    order = SampleOrder(num_samples, global_batch, seed=3)
    plan = BatchPlan(world, global_batch // (world * accum), accum)
    reference = SampleOrder(num_samples, global_batch, seed=3)
    seen = []
    for step in range(2 * order.steps_per_epoch):
        window = order.window(step)
        parts = [micro_batch_ids(window, plan, r, m) for m in range(accum) for r in range(world)]
        assert sorted(i for p in parts for i in p) == sorted(reference.window(step))
        seen.extend(window)
    # Each epoch visits every sample exactly once, in a different order.
    assert sorted(seen[:num_samples]) == list(range(num_samples)) == sorted(seen[num_samples:])
    assert seen[:num_samples] != seen[num_samples:]


def test_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  max_steps: 3\noptim:\n  lr: 0.5\n")
    cfg = load_config(
        path, ["optim.lr=1e-3", "batch.global_batch_size=8", "batch.micro_batch_size=2", "run.overwrite=true"]
    )
    assert cfg.run.max_steps == 3
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.batch.global_batch_size == 8 and cfg.run.overwrite is True
    assert load_config(None, ["precision=no"]).precision == "no"  # not YAML's false


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("run.max_steps=2.5", "run.max_steps=2.5 has the wrong type: expected int"),
        ("run.overwrite=maybe", "run.overwrite='maybe' has the wrong type: expected bool"),
        ("model.dropout=1.5", "model.dropout=1.5 is not valid: must be in [0, 1)"),
        ("run.dtype=float16", "run.dtype='float16' is not valid; choose one of: float32, float64"),
        ("run.max_steps.x=1", "run.max_steps={'x': 1} has the wrong type"),
        ("precision=bf16", "precision='bf16' is not valid: mixed precision needs run.dtype=float32"),
    ],
)
def test_config_errors_are_one_line(override, words):
    extra = ["run.dtype=float64"] if override.startswith("precision") else []
    with pytest.raises(ConfigError) as err:
        load_config(None, [*extra, override])
    assert words in str(err.value)


def test_plan_resolves_the_steps_once_the_data_is_known():
    cfg = load_config(None, ["batch.global_batch_size=8", "batch.micro_batch_size=2", "run.max_epochs=1.5"])
    plan = make_plan(cfg, world_size=2)
    assert (plan.batch.accum_steps, plan.max_steps) == (2, None)
    resolved = plan.with_train_samples(40)  # 5 steps per epoch
    assert (resolved.steps_per_epoch, resolved.max_steps, resolved.train_samples) == (5, 8, 40)
    assert make_plan(load_config(None, ["batch.global_batch_size=8", "batch.micro_batch_size=2"]), 1).max_steps == 20


def test_a_config_is_frozen_once_built():
    cfg = load_config(None, ["batch.global_batch_size=8", "batch.micro_batch_size=2"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.max_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, words",
    [
        ("run.keep_checkpoints=0", ("run.keep_checkpoints", ">= 1")),
        ("run.checkpoint_every=-1", ("run.checkpoint_every", ">= 0")),
        ("run.on_nonfinite=ignore", ("run.on_nonfinite", "skip, stop")),
        ("run.max_consecutive_nonfinite=0", ("run.max_consecutive_nonfinite", ">= 1")),
    ],
)
def test_checkpoint_keys_are_validated(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY_LM, [override])
    for word in words:
        assert word in str(err.value)
