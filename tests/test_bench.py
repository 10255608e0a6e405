"""The benchmark's step-by-step alternation: the launcher's after-step hook runs the plain loop's step in the same
launch, and the time breakdown can be switched off on every other step. Timings are not judged here (bench/)."""

from __future__ import annotations

import math

import pytest

from bench.run import TINY, Length, Split, alternating
from launcher.rundir import RunDir

pytestmark = pytest.mark.launch
STEPS, TRAINER_STEPS, PLANNED = 6, 3, 50


def test_the_launcher_then_the_trainer_alternate_with_the_plain_loop_in_one_launch(tmp_path):
    # Spent budgets end each leg at its minimum steps (of PLANNED): the launcher's after-step hook ended
    # its run there, and it was summarized as finished.
    lengths = {"launcher": Length(0.0, STEPS, PLANNED), "trainer": Length(0.0, TRAINER_STEPS, PLANNED)}
    got = alternating(tmp_path, TINY, Split(2, 2, 2), lengths, toggle=True)
    launcher, trainer = got["launcher"], got["trainer"]
    # The plain loop trained every step beside the launcher.
    assert len(launcher["plain_step_s"]) == len(launcher["host_step_s"]) == STEPS
    assert all(t > 0 for t in launcher["plain_step_s"])
    assert math.isnan(launcher["host_step_s"][0]) and all(t > 0 for t in launcher["host_step_s"][1:])
    assert launcher["summary"].steps == STEPS and launcher["summary"].max_steps == PLANNED
    # The breakdown was on for the first step and every other one after it, and metrics.jsonl shows exactly that.
    assert launcher["host_timed"] == [step % 2 == 0 for step in range(STEPS)]
    records = RunDir(tmp_path / "hosts_plain_64").read_metrics()
    assert [r.time_breakdown is not None for r in records] == launcher["host_timed"]
    # Then, after the launcher had torn its process group down, the Trainer formed its own in the same
    # processes, and trained its leg's steps beside a new plain loop.
    assert len(trainer["host_step_s"]) == len(trainer["plain_step_s"]) == TRAINER_STEPS
    assert all(t > 0 for t in trainer["host_step_s"] + trainer["plain_step_s"])
