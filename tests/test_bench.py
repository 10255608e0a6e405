"""The benchmark's step-by-step alternation: the launcher's after-step hook runs the plain loop's step in the same
launch, and the time breakdown can be switched off on every other step. Timings are not judged here (bench/)."""

from __future__ import annotations

import math

import pytest

from bench.run import TINY, Length, Split, alternating
from launcher.rundir import RunDir

pytestmark = pytest.mark.launch
STEPS, PLANNED = 6, 50


def test_the_launcher_and_the_plain_loop_alternate_step_by_step(tmp_path):
    # A spent budget ends the run at its minimum steps (of PLANNED): the launcher's after-step hook
    # ended it there, and it was summarized as finished.
    got = alternating(tmp_path, "launcher", TINY, Split(2, 2, 2), Length(0.0, STEPS, PLANNED), toggle=True)
    # The plain loop trained every step beside the launcher.
    assert len(got["plain_step_s"]) == len(got["host_step_s"]) == STEPS
    assert all(t > 0 for t in got["plain_step_s"])
    assert math.isnan(got["host_step_s"][0]) and all(t > 0 for t in got["host_step_s"][1:])
    assert got["summary"].steps == STEPS and got["summary"].max_steps == PLANNED
    # The breakdown was on for the first step and every other one after it, and metrics.jsonl shows exactly that.
    assert got["host_timed"] == [step % 2 == 0 for step in range(STEPS)]
    records = RunDir(tmp_path / "launcher_plain_64").read_metrics()
    assert [r.time_breakdown is not None for r in records] == got["host_timed"]
