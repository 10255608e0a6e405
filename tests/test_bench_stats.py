"""The benchmark's statistics and its clock: pairing cancels drift, the interval covers the truth, noise is not a
figure, and the time left is shared among the launches to come."""

from __future__ import annotations

import math
import random

import pytest

from bench.stats import RESOLUTION, hodges_lehmann, run_statistic


def test_drift_common_to_a_pair_cancels():
    # The machine slows threefold over the run; B is 2% slower than A throughout.
    a = [10.0 * (1 + 2 * i / 7) for i in range(8)]
    b = [x * 1.02 for x in a]
    ratio = hodges_lehmann(b, a)
    assert ratio.estimate == pytest.approx(1.02)
    assert ratio.resolved and ratio.low == pytest.approx(1.02) and ratio.high == pytest.approx(1.02)


def test_the_interval_covers_a_known_ratio_under_noise():
    rng = random.Random(1)
    base = [rng.uniform(40, 60) for _ in range(12)]
    noisy = [x * 1.05 * rng.uniform(0.99, 1.01) for x in base]
    ratio = hodges_lehmann(noisy, base)
    assert ratio.low <= 1.05 <= ratio.high
    assert ratio.resolved and ratio.text().startswith(f"{ratio.estimate:.3f} [")


def test_noise_wider_than_the_resolution_is_unresolved():
    rng = random.Random(2)
    base = [50.0] * 6
    noisy = [x * rng.uniform(0.8, 1.25) for x in base]
    ratio = hodges_lehmann(noisy, base)
    assert ratio.high - ratio.low > RESOLUTION and not ratio.resolved
    assert ratio.text().startswith("unresolved (") and "6 pairs" in ratio.text()


def test_a_run_figure_leaves_the_warmup_out():
    assert run_statistic([9.0, 9.0, 1.0, 2.0, 3.0], warmup_steps=2) == 2.0
    with pytest.raises(ValueError, match="warm-up"):
        run_statistic([1.0, 2.0], warmup_steps=2)


def test_many_step_pairs_ignore_the_odd_slow_step():
    # 30 steps about 3% slower; then a 40% stall hits one step of each side. The signed-rank interval still
    # holds what the clean steps said, and still resolves.
    rng = random.Random(3)
    base = [rng.uniform(50, 70) for _ in range(30)]
    host = [x * 1.03 * rng.uniform(0.99, 1.01) for x in base]
    clean = hodges_lehmann(host, base)
    host[4] *= 1.4
    base[17] *= 1.4
    ratio = hodges_lehmann(host, base)
    assert ratio.low <= clean.estimate <= ratio.high and ratio.resolved
    assert ratio.high - ratio.low < 1.5 * (clean.high - clean.low)


def test_the_interval_is_the_signed_rank_tables():
    # 10 pairs: the exact two-sided 5% critical value of the signed-rank statistic is 8, so the interval runs from
    # the 9th smallest to the 9th largest of the 55 pairwise means; 20 pairs: 52, the 53rd of 210 from each end.
    for n, excluded in ((10, 8), (20, 52)):
        logs = [i / 100 for i in range(n)]
        means = sorted((a + b) / 2 for i, a in enumerate(logs) for b in logs[i:])
        ratio = hodges_lehmann([math.exp(x) for x in logs], [1.0] * n)
        assert ratio.low == pytest.approx(math.exp(means[excluded]))
        assert ratio.high == pytest.approx(math.exp(means[-1 - excluded]))
        assert ratio.estimate == pytest.approx(math.exp((logs[0] + logs[-1]) / 2))


def test_fewer_than_six_steps_give_no_interval():
    ratio = hodges_lehmann([1.1] * 5, [1.0] * 5)
    assert not ratio.resolved and ratio.text() == "unresolved (5 pairs: too few for an interval)"
    with pytest.raises(ValueError, match="same number"):
        hodges_lehmann([1.0], [])


def test_the_time_left_is_shared_and_what_a_launch_overran_comes_off_those_after_it():
    from bench.run import LAUNCHES, STARTUP_S, Allotment

    total_s = 1200.0
    share_sum = sum(share for legs in LAUNCHES.values() for share, _ in legs.values())
    allot = Allotment(total_s, min_pairs=6, steps={launch: dict.fromkeys(LAUNCHES[launch], 100) for launch in LAUNCHES})
    tiny = allot.lengths("tiny", warmup=5, toggled=("launcher",))
    left_s = total_s - sum(STARTUP_S.values())  # one start-up reserved per launch, not per leg
    for leg, (share, _) in LAUNCHES["tiny"].items():
        assert tiny[leg].seconds == pytest.approx(left_s * share / share_sum, abs=0.5)
    assert (tiny["launcher"].min_steps, tiny["launcher"].max_steps) == (5 + 13, 100)  # toggled: 2 x 6 pairs + 1
    assert tiny["trainer"].min_steps == 5 + 6

    # Time passing is the deadline moving nearer. The tiny launch took its budgets and its reserve; the
    # realistic one 100 s more than that: it is recorded, and the no_sync launch after it gets what is left.
    took_s = {"tiny": sum(n.seconds for n in tiny.values()) + STARTUP_S["tiny"]}
    allot.deadline -= took_s["tiny"]

    def realistic(lengths: dict) -> dict:
        took_s["realistic"] = sum(n.seconds for n in lengths.values()) + STARTUP_S["realistic"] + 100.0
        allot.deadline -= took_s["realistic"]
        return {"wall_s": took_s["realistic"]}

    allot.run("realistic", 2, realistic)
    assert allot.overrun_s["realistic"] == pytest.approx(STARTUP_S["realistic"] + 100.0)
    no_sync = allot.lengths("no_sync", warmup=3)
    left_s = total_s - sum(took_s.values()) - STARTUP_S["no_sync"]
    assert sum(n.seconds for n in no_sync.values()) == pytest.approx(left_s, abs=0.5)


def test_the_minutes_to_the_step_caps_add_each_short_legs_missing_pairs():
    from bench.run import STEPS, TRAINER, minutes_to_caps

    results = {
        "wall_time_s": 600.0,
        "overhead": {
            "steps": [STEPS["tiny"]["launcher"] - 10, STEPS["tiny"]["trainer"]],
            "pair_s": {"launcher": 0.1, TRAINER: 0.2},
        },
        "realistic": {
            "steps": [STEPS["realistic"]["launcher"] - 2, STEPS["realistic"]["trainer"] + 3],
            "pair_s": {"launcher": 5.0, TRAINER: 6.0},
        },
        "no_sync": [
            {"accum_steps": 1, "steps": STEPS["no_sync"]["k1"], "pair_s": 0.05},
            {"accum_steps": 8, "steps": STEPS["no_sync"]["k8"] - 20, "pair_s": 0.3},
        ],
    }
    # 10 tiny launcher pairs (1 s), 2 realistic ones (10 s), 20 at K=8 (6 s); a leg past its cap adds nothing.
    assert minutes_to_caps(results, STEPS) == pytest.approx((600 + 1 + 10 + 6) / 60)


def test_a_run_is_set_beside_the_one_it_replaces_ratio_by_ratio(tmp_path):
    """Two runs agree where their intervals overlap; the report and the results say which do not. Built on the
    committed docs/benchmarks.json, with one ratio moved clear of its interval."""
    import copy
    import json

    from bench.report import against_previous, labelled_ratios, write_report
    from bench.run import DOCS, read_previous

    before = read_previous(DOCS / "benchmarks.json")
    for label, ratio in labelled_ratios(before).items():  # as if two had resolved in both runs, whatever the file
        ratio["resolved"] = label in ("tiny launcher / plain", "tiny trainer / plain")
    now = copy.deepcopy(before)
    moved = now["no_sync"][1]["ratio"]
    width = moved["high"] - moved["low"]
    moved["low"], moved["high"] = before["no_sync"][1]["ratio"]["high"] + 0.01, moved["high"] + width + 0.01
    now["previous_run"] = against_previous(before, now)
    rows = {r["ratio"]: r["overlap"] for r in now["previous_run"]["ratios"]}
    assert set(rows) == set(labelled_ratios(before)) and len(rows) == 7
    assert [label for label, overlap in rows.items() if not overlap] == ["no_sync / every_step at K=8"]
    write_report(now, tmp_path)
    report = (tmp_path / "benchmarks.md").read_text()
    assert "6 of 7 overlap, 2 of them resolved in both runs" in report
    assert "| no_sync / every_step at K=8 |" in report and "| **no** |" in report
    # No earlier file, a broken one, or one without the ratios: nothing to set beside, and the run goes on.
    assert read_previous(tmp_path / "none.json") is None
    (tmp_path / "broken.json").write_text('{"no_sync": [')
    assert read_previous(tmp_path / "broken.json") is None
    assert against_previous(json.loads('{"overhead": {}}'), now)["ratios"] == []
