"""Even pacing: the daily plan, the controller's properties, simulated days, and the harness."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.__main__ import main as bench_main
from bench.exchange.auction import Offer, run_auction
from bench.exchange.traffic import arrival_times
from bench.pacing import Day, lone_bidder_pays, simulate
from bidder.clock import parse_time
from bidder.pacing import DailyPlan, Pace, Pacer, PacingError, local_clock

START = parse_time("2026-12-01T00:00:00Z")  # a Tuesday, midnight UTC
DAY = 86400.0
SIM = dict(update_s=30.0, workers=2, notice_delay_s=2.0, headroom=2.0)


def market_day(seed: int, start: float = START, per_second: float = 1.0) -> Day:
    """A day of the simulator's diurnal arrivals with log-normal values and market prices."""
    times = arrival_times(seed, start, 24.0, per_second, None)
    rng = np.random.default_rng(seed)
    value = np.exp(rng.normal(1.5, 0.5, len(times)))
    market = np.exp(rng.normal(1.2, 0.45, len(times)))
    first = rng.random(len(times)) < 0.5
    paid = lone_bidder_pays(value, np.full(len(times), 0.5), market, first)
    return Day(start, times, value / 1000.0, paid / 1000.0)


@pytest.fixture(scope="module")
def learned_plan() -> DailyPlan:
    return DailyPlan.from_counts([market_day(100 + d, START - (3 - d) * DAY).hourly_counts() for d in range(3)])


@pytest.fixture(scope="module")
def today() -> Day:
    return market_day(1)


# the plan -----------------------------------------------------------------------------------------

def test_flat_plan_is_even_and_interpolates_within_the_hour():
    plan = DailyPlan.flat()
    assert plan.days == 0 and plan.hourly == (1 / 24,) * 24
    assert plan.fraction(0) == 0.0 and plan.fraction(24) == pytest.approx(1.0)
    assert plan.fraction(6.5) == pytest.approx(6.5 / 24)
    assert plan.fraction(-3) == 0.0 and plan.fraction(30) == pytest.approx(1.0)


def test_learned_plan_follows_traffic_with_a_floor_and_smoothing():
    counts = np.zeros((2, 24))
    counts[:, 20] = 1000  # all traffic at 20 h
    counts[:, 8] = 500
    plan = DailyPlan.from_counts(counts, floor=0.1, smoothing=0.25)
    shares = np.array(plan.hourly)
    assert plan.days == 2 and shares.sum() == pytest.approx(1.0)
    assert shares.argmax() == 20 and shares[8] > shares[3]
    assert shares[19] == pytest.approx(shares[21]) and shares[19] > shares[3]  # smoothed onto neighbours
    assert shares.min() >= 0.1 / 24 * 0.99  # the floor, after renormalising
    hours = np.linspace(0, 24, 97)
    assert np.all(np.diff([plan.fraction(h) for h in hours]) >= 0)


def test_learned_plan_weighs_recent_days_more_and_skips_empty_days():
    old, new = np.ones(24), np.ones(24)
    old[3], new[15] = 50, 50
    plan = DailyPlan.from_counts([old, new, np.zeros(24)], half_life_days=1.0, smoothing=0.0, floor=0.0)
    assert plan.days == 2
    assert plan.hourly[15] > plan.hourly[3]
    assert DailyPlan.from_counts(np.zeros((3, 24))) == DailyPlan.flat()
    assert DailyPlan.from_counts(np.zeros((0, 24))) == DailyPlan.flat()


def test_plan_json_round_trip(learned_plan):
    text = json.dumps(learned_plan.to_json())
    again = DailyPlan.from_json(json.loads(text))
    assert again == learned_plan
    assert again.fraction(13.25) == learned_plan.fraction(13.25)


@pytest.mark.parametrize("document, field", [
    ({"version": 2, "timezone": "UTC", "days": 0, "hourly": [1 / 24] * 24}, "plan.version"),
    ({"version": 1, "timezone": "UTC", "days": 0, "hourly": [1 / 23] * 23}, "plan.hourly"),
    ({"version": 1, "timezone": "UTC", "days": 0, "hourly": [0.0] + [1 / 23] * 23}, "plan.hourly[0]"),
    ({"version": 1, "timezone": "UTC", "days": 0, "hourly": [0.5] * 24}, "sum to 1"),
    ({"version": 1, "timezone": "Mars/Olympus", "days": 0, "hourly": [1 / 24] * 24}, "timezone"),
    ({"version": 1, "timezone": "UTC", "days": -1, "hourly": [1 / 24] * 24}, "plan.days"),
    ({"version": 1, "timezone": "UTC", "hourly": [1 / 24] * 24}, "plan.days: missing"),
    ([], "plan: expected an object"),
])
def test_plan_json_errors_name_the_field(document, field):
    with pytest.raises(PacingError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DailyPlan.from_json(document)


def test_counts_must_be_24_hours():
    with pytest.raises(PacingError, match="counts"):
        DailyPlan.from_counts(np.ones((2, 23)))
    with pytest.raises(PacingError, match="counts"):
        DailyPlan.from_counts([[-1] * 24])


def test_plan_runs_on_the_campaigns_local_clock():
    new_york = parse_time("2026-12-01T05:00:00Z")  # midnight in New York (UTC-5 in December)
    day, hours = local_clock(new_york + 1800, "America/New_York")
    assert str(day) == "2026-12-01" and hours == pytest.approx(0.5)
    plan = DailyPlan.flat("America/New_York")
    assert plan.fraction_at(new_york) == pytest.approx(0.0)
    assert plan.fraction_at(new_york + 6 * 3600) == pytest.approx(0.25)


# the controller ------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 600), st.floats(0, 50), st.floats(0, 200), st.integers(0, 500)),
                min_size=1, max_size=30),
       st.sampled_from(["even", "asap"]), st.floats(0.5, 24))
def test_pass_rate_stays_a_probability(steps, pacing, finish):
    pacer, plan, now, spent = Pacer(pacing, finish_hour=finish), DailyPlan.flat(), START, 0.0
    for gap, spend, budget, eligible in steps:
        now, spent = now + gap, spent + spend
        pace = pacer.update(now, spent, budget, plan, eligible)
        assert 0.0 <= pace.pass_rate <= 1.0
        assert pace.remaining == pytest.approx(max(budget - spent, 0.0))
        assert pace.lease(5.0) <= pace.remaining + 1e-9
        if budget <= spent:
            assert pace.pass_rate == 0.0 and pace.lease(5.0) == 0.0


def test_asap_passes_everything_until_the_budget_is_gone():
    pacer, plan = Pacer("asap"), DailyPlan.flat()
    assert pacer.update(START + 60, 0.0, 100.0, plan).pass_rate == 1.0
    assert pacer.update(START + 120, 99.99, 100.0, plan).pass_rate == 1.0
    assert pacer.update(START + 180, 100.0, 100.0, plan).pass_rate == 0.0
    assert pacer.update(START + 240, 90.0, 120.0, plan).pass_rate == 1.0  # raised budget: bids again


def test_even_pass_rate_solves_for_the_remaining_budget():
    plan = DailyPlan.flat()
    pacer = Pacer("even", finish_hour=24.0)
    first = pacer.update(START + 6 * 3600, 0.0, 100.0, plan)
    assert first.pass_rate == 1.0 and first.estimate is None  # nothing observed yet: probe
    # an hour at full pass spent 10 USD: the unconstrained day is 24 x 10 = 240 USD
    pace = pacer.update(START + 7 * 3600, 10.0, 100.0, plan)
    assert pace.estimate == pytest.approx(240.0)
    assert pace.pass_rate == pytest.approx(90.0 / (240.0 * 17 / 24))
    assert pace.spend_rate == pytest.approx(90.0 / (17 * 3600))
    # the budget raised: the same rule over the larger remainder
    assert pacer.update(START + 7 * 3600 + 1, 10.0, 200.0, plan).pass_rate > pace.pass_rate
    # a prior carried over from a previous process starts the day without a probe
    assert Pacer("even", estimate=240.0).update(START, 0.0, 120.0, plan).pass_rate < 1.0


def test_eligible_counts_split_the_estimate_and_requests_without_lease_do_not_shrink_it():
    plan = DailyPlan.flat()
    counted, starved = Pacer("even"), Pacer("even")
    for pacer in (counted, starved):
        pacer.update(START + 6 * 3600, 0.0, 100.0, plan)
    # an hour at pass 1: 1000 eligible requests, 10 USD spent; for `starved` half of them found no lease
    hour = counted.update(START + 7 * 3600, 10.0, 100.0, plan, eligible=1000)
    assert hour.estimate == pytest.approx(240.0)
    assert starved.update(START + 7 * 3600, 10.0, 100.0, plan, eligible=1000,
                          no_lease=500).estimate == pytest.approx(480.0)
    # the next hour is twice as busy at the same spend per request let through: the estimate rises
    busier = counted.update(START + 8 * 3600, 10.0 + 0.01 * hour.pass_rate * 2000, 100.0, plan, eligible=2000)
    assert 240.0 < busier.estimate < 480.0
    with pytest.raises(PacingError, match="no_lease"):
        Pacer().update(START, 0.0, 1.0, plan, eligible=3, no_lease=4)
    with pytest.raises(PacingError, match="no_lease"):
        Pacer().update(START, 0.0, 1.0, plan, no_lease=1)


def test_a_new_day_starts_without_counting_yesterdays_spend():
    plan = DailyPlan.flat()
    pacer = Pacer("even")
    pacer.update(START + DAY - 60, 99.0, 100.0, plan)
    pace = pacer.update(START + DAY + 5, 0.0, 100.0, plan)  # the ledger reset the day's spend
    assert pace.pass_rate == 1.0 and pace.estimate is None


@pytest.mark.parametrize("kwargs, field", [
    (dict(pacing="slow"), "pacing"), (dict(finish_hour=0), "finish_hour"), (dict(memory_s=0), "memory_s"),
    (dict(estimate=-1.0), "estimate"),
])
def test_pacer_options_are_checked(kwargs, field):
    with pytest.raises(PacingError, match=field):
        Pacer(**kwargs)


@pytest.mark.parametrize("args, field", [
    ((math.nan, 0.0, 1.0), "now"), ((START, math.inf, 1.0), "spent"), ((START, 0.0, -1.0), "budget"),
])
def test_update_inputs_are_checked(args, field):
    with pytest.raises(PacingError, match=field):
        Pacer().update(*args, DailyPlan.flat())
    with pytest.raises(PacingError, match="eligible"):
        Pacer().update(START, 0.0, 1.0, DailyPlan.flat(), eligible=-1)


def test_lease_follows_the_planned_rate():
    pace = Pace(pass_rate=0.5, spend_rate=0.01, remaining=100.0, planned=0.3, estimate=500.0)
    assert pace.lease(5.0) == pytest.approx(0.1)
    assert pace.lease(5.0, headroom=3.0) == pytest.approx(0.15)
    assert pace.lease(5.0, reserve_per_spend=2.5) == pytest.approx(0.25)
    assert pace.lease(5.0, floor=1.0) == pytest.approx(1.0)
    assert pace.lease(5.0, floor=1000.0) == pytest.approx(100.0)  # never more than is left
    assert Pace(1.0, math.inf, 7.0, 0.99, None).lease(5.0) == 7.0
    assert Pace(0.0, 0.0, 7.0, 0.5, 10.0).lease(5.0, floor=1.0) == 0.0  # throttle closed: no lease
    for bad in (dict(interval_s=0.0), dict(interval_s=5.0, headroom=0.5),
                dict(interval_s=5.0, reserve_per_spend=0.9), dict(interval_s=5.0, floor=-1.0)):
        with pytest.raises(PacingError, match="lease"):
            pace.lease(**bad)


# simulated days --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6, 0.8])
def test_even_pacing_spends_the_budget_and_not_before_90_percent_of_the_day(today, learned_plan, fraction):
    run = simulate(today, learned_plan, Pacer("even"), fraction * today.unconstrained(), seed=1, **SIM)
    summary = run.summary()
    assert summary["use"] >= 0.99
    assert summary["use"] <= 1.0 + 1e-9  # reservations keep the spend within the budget
    assert summary["exhausted_h"] is None or summary["exhausted_h"] >= 0.9 * 24
    assert np.all((run.pass_rate >= 0) & (run.pass_rate <= 1))


@pytest.mark.parametrize("fraction", [0.2, 0.8])
def test_a_first_day_on_the_flat_plan_also_spends_it(today, fraction):
    summary = simulate(today, DailyPlan.flat(), Pacer("even"), fraction * today.unconstrained(), seed=1,
                       **SIM).summary()
    assert summary["use"] >= 0.99 and summary["exhausted_h"] >= 0.9 * 24


def test_asap_runs_out_early_where_even_does_not(today, learned_plan):
    summary = simulate(today, learned_plan, Pacer("asap"), 0.4 * today.unconstrained(), seed=1, **SIM).summary()
    assert summary["use"] >= 0.99 and summary["exhausted_h"] < 0.9 * 24


def test_late_start_spends_the_day_in_what_is_left_of_it(today, learned_plan):
    noon = today.start + 12 * 3600
    late = Day(today.start, *(a[today.times >= noon] for a in (today.times, today.cost, today.paid)))
    summary = simulate(late, learned_plan, Pacer("even"), 0.6 * late.unconstrained(), seed=1, from_hour=12.0,
                       **SIM).summary()
    assert summary["use"] >= 0.99 and summary["exhausted_h"] >= 0.9 * 24


@pytest.mark.parametrize("before, after", [(0.3, 0.6), (0.6, 0.3), (0.6, 0.0)])
def test_budget_changed_mid_day(today, learned_plan, before, after):
    base = today.unconstrained()
    run = simulate(today, learned_plan, Pacer("even"), lambda h: (before if h < 13 else after) * base, seed=1,
                   **SIM)
    spent_by_13 = run.spent_usd[np.searchsorted(run.hours, 13.0)]
    if after * base > spent_by_13:
        summary = run.summary()
        assert summary["use"] >= 0.99 and summary["exhausted_h"] >= 0.9 * 24
    else:  # lowered below what is spent: the throttle closes and nothing more is bid
        assert np.all(run.pass_rate[run.hours >= 13.0] == 0.0)
        assert run.committed <= spent_by_13 + 1e-9


def test_a_quiet_morning_is_caught_up_later_without_running_out_early(today, learned_plan):
    quiet = today.thinned(lambda h: np.where((h >= 6) & (h < 15), 0.3, 1.0), seed=3)
    run = simulate(quiet, learned_plan, Pacer("even"), 0.6 * quiet.unconstrained(), seed=1, **SIM)
    summary = run.summary()
    assert run.spent[np.searchsorted(run.hours, 15.0)] < learned_plan.fraction(15.0) - 0.05  # behind at 15 h
    assert summary["use"] >= 0.99 and summary["exhausted_h"] >= 0.9 * 24


def test_slow_notices_keep_money_reserved_and_the_spend_within_budget(today, learned_plan):
    """Notices a minute late: spend = committed + reserved, so reservations in flight are not spent twice."""
    budget = 0.5 * today.unconstrained()
    run = simulate(today, learned_plan, Pacer("even"), budget, seed=1, **{**SIM, "notice_delay_s": 60.0})
    assert run.spent.max() <= 1.0 + 1e-9 and run.committed <= budget + 1e-9
    assert run.summary()["use"] >= 0.99


def test_lone_bidder_rule_matches_the_exchange_auction():
    rng = np.random.default_rng(0)
    bid, floor, market = rng.uniform(0, 3, 500), rng.uniform(0, 1, 500), rng.uniform(0, 3, 500)
    first = rng.random(500) < 0.5
    paid = lone_bidder_pays(bid, floor, market, first)
    for i in range(500):
        outcome = run_auction([Offer(0, float(bid[i]))], float(floor[i]), float(market[i]), bool(first[i]))
        assert paid[i] == pytest.approx(outcome.price if outcome.winner is not None else 0.0, abs=1e-6)


# the harness ---------------------------------------------------------------------------------------------

def test_harness_runs_on_a_tiny_day(tmp_path, capsys):
    code = bench_main(["pacing", "--out", str(tmp_path / "pacing"), "--seeds", "0", "--fractions", "0.5",
                       "--rate", "0.3", "--history-days", "1", "--update", "60", "--world-rows", "8000", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "pacing" / "pacing.json").read_text())
    assert (tmp_path / "pacing" / "pacing.png").stat().st_size > 10_000
    assert {r["mode"] for r in report["runs"]} == {"even", "even-flat", "asap"}
    assert len(report["scenarios"]) == 4
    even = next(r for r in report["table"] if r["mode"] == "even")
    assert even["use_min"] >= 0.99 and even["rmse_pp_mean"] >= 0
    assert json.loads(capsys.readouterr().out)["json"].endswith("pacing.json")


def test_harness_errors_are_one_line(tmp_path, capsys):
    code = bench_main(["pacing", "--out", str(tmp_path), "--campaign", "nope", "--world-rows", "8000", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --campaign nope") and "\n" not in err
    (tmp_path / "file").write_text("")
    assert bench_main(["pacing", "--out", str(tmp_path / "file"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --out {tmp_path / 'file'}: cannot create the folder") and "\n" not in err


def test_a_daylight_saving_day_plans_by_the_wall_clock():
    """2026-03-08 in New York: 02:00 EST is 03:00 EDT; the skipped hour's share falls due at once."""
    plan = DailyPlan.flat("America/New_York")
    before = parse_time("2026-03-08T06:59:59Z")  # 01:59:59 EST
    assert plan.fraction_at(before) == pytest.approx(2 / 24, abs=1e-4)
    assert plan.fraction_at(before + 1) == pytest.approx(3 / 24)
    assert local_clock(before + 1, "America/New_York")[1] == pytest.approx(3.0)
