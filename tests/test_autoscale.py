"""The autoscaling decision (coordinator/core/autoscale.py), pure: a table of
load traces and the counts they lead to, and properties over random traces —
never outside the bounds, never back and forth within a window, no flapping
at a constant load."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from coordinator.core.autoscale import Autoscale, ScaleState, next_replicas, slope, why

POLICY = Autoscale(min_replicas=1, max_replicas=8, target_in_flight=2, upscale_delay_s=5, downscale_delay_s=30,
                   downscale_to_zero_delay_s=120)


def run(policy: Autoscale, trace: list[tuple[float, float]], start: int = 1,
        placeable: int | None = None) -> list[int]:
    """The count after each (time, load) sample."""
    state, counts = ScaleState(replicas=start), []
    for now, load in trace:
        state = next_replicas(policy, state, load, now, placeable)
        counts.append(state.replicas)
    return counts


def every(seconds: float, until: float, load: float, start: float = 0.0) -> list[tuple[float, float]]:
    samples, t = [], start
    while t <= until:
        samples.append((t, load))
        t += seconds
    return samples


def test_a_step_up_scales_after_the_upscale_delay_to_what_the_load_asks():
    counts = run(POLICY, every(1, 10, load=9))  # 9 in flight at 2 each: 5 replicas
    assert counts[:5] == [1] * 5  # not for a moment's load
    assert counts[5] == 5 and counts[-1] == 5


def test_a_blip_does_not_scale():
    trace = every(1, 3, load=9) + every(1, 20, load=1, start=4)
    assert set(run(POLICY, trace)) == {1}


def test_down_waits_longer_and_keeps_a_band():
    trace = every(1, 10, load=9) + every(1, 80, load=3, start=11)
    counts = run(POLICY, trace)
    assert max(counts) == 5
    # 3 in flight: 2 replicas would be 1.5 each (up to target), but the band
    # keeps 3 (3 / (2 x 0.8) -> 2 is 1.875 < 2... ceil(3 / 1.6) = 2).
    assert counts[-1] == 2
    down_at = counts.index(2)
    assert trace[down_at][0] - 11 >= 30  # not before the downscale delay


def test_a_load_at_a_boundary_does_not_flap():
    # 4 in flight: up asks for 2, the band's down asks for 3 -> nothing moves from 2 or 3.
    for start in (2, 3):
        assert set(run(POLICY, every(1, 200, load=4), start=start)) == {start}


def test_to_zero_only_after_the_idle_delay_and_from_zero_at_once():
    policy = POLICY.model_copy(update={"min_replicas": 0})
    trace = every(1, 100, load=0)
    counts = run(policy, trace, start=1)
    assert set(counts) == {1}  # downscale_delay passed, but not 120 s idle
    counts = run(policy, every(1, 200, load=0), start=1)
    assert counts[-1] == 0 and counts.index(0) >= 120
    # Zero, and one request waiting: a replica at once, no delay.
    assert run(policy, [(0, 0), (1, 1)], start=0) == [0, 1]
    assert run(policy, [(0, 7)], start=0) == [4]


def test_bounds_and_the_managers_available():
    assert run(POLICY, every(1, 10, load=100))[-1] == 8
    assert run(POLICY, every(1, 10, load=100), placeable=3)[-1] == 3
    assert run(POLICY, every(1, 60, load=0), start=4)[-1] == 1  # min_replicas


def test_bad_settings_name_the_field():
    with pytest.raises(ValidationError, match="min_replicas"):
        Autoscale(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError, match="target_in_flight"):
        Autoscale(max_replicas=2, target_in_flight=0)


loads = st.lists(st.tuples(st.floats(0.1, 10), st.floats(0, 40)), min_size=1, max_size=80)


@settings(max_examples=200, deadline=None)
@given(loads, st.integers(0, 8), st.one_of(st.none(), st.integers(0, 10)), st.sampled_from([0.0, 10.0]))
def test_never_outside_the_bounds_and_never_back_and_forth_within_a_window(steps, start, placeable, startup_s):
    policy = POLICY.model_copy(update={"min_replicas": 0, "startup_s": startup_s})
    state, now = ScaleState(replicas=start), 0.0
    changes: list[tuple[float, int]] = []  # (when, direction)
    last = None
    for dt, load in steps:
        now += dt
        before = state.replicas
        state = next_replicas(policy, state, load, now, placeable)
        ceiling = 8 if placeable is None else min(8, placeable)
        assert 0 <= state.replicas <= 8
        if state.replicas > before:  # a scale-up never beyond the managers available
            assert state.replicas <= ceiling
        if last is not None and state.replicas != before and before == last:
            direction = 1 if state.replicas > before else -1
            if changes and changes[-1][1] != direction and before != 0:
                # A change against the last one waits that direction's delay after it.
                delay = policy.upscale_delay_s if direction > 0 else policy.downscale_delay_s
                assert now - changes[-1][0] >= delay
            changes.append((now, direction))
        last = state.replicas


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 30), st.integers(1, 8), st.sampled_from([0.0, 10.0]))
def test_a_constant_load_settles_on_one_count(load, start, startup_s):
    counts = run(POLICY.model_copy(update={"startup_s": startup_s}), every(1, 400, load=load), start=start)
    assert len(set(counts[-200:])) == 1  # settled, and stays


def test_a_sharp_drop_comes_down_in_one_step_to_what_the_load_settled_at():
    # 20 in flight, then a drop: the first seconds of it still ask for 5 (callers finishing), then 2 stay.
    trace = every(1, 10, load=20) + every(1, 3, load=9, start=11) + every(1, 60, load=2, start=15)
    counts = run(POLICY, trace)
    assert max(counts) == 8
    after = counts[counts.index(8):]
    assert [c for i, c in enumerate(after) if i == 0 or c != after[i - 1]] == [8, 2]  # one step down, not 8 -> 5 -> 2


def test_managers_out_of_sight_bound_a_scale_up_but_never_cut_what_runs():
    state = ScaleState(replicas=8)
    state = next_replicas(POLICY, state, load=16, now=0, placeable=4)  # half the managers unreachable
    assert state.replicas == 8
    state = next_replicas(POLICY, state, load=16, now=1, placeable=0)
    assert state.replicas == 8
    up = run(POLICY, every(1, 10, load=100), start=2, placeable=3)
    assert up[-1] == 3


# The trend: the load's slope, looked at over an upscale delay and a cold start.

TRENDED = Autoscale(min_replicas=1, max_replicas=7, target_in_flight=3, upscale_delay_s=5, downscale_delay_s=30,
                    startup_s=10)


def sine(t: float) -> float:
    """bench/demand.py's sine: 2 up to 20 and back every 120 s."""
    return 2 + 9 * (1 - math.cos(2 * math.pi * t / 120))


def changes(counts: list[int]) -> list[tuple[int, int]]:
    """(sample, count) at each change."""
    return [(i, c) for i, c in enumerate(counts) if i and c != counts[i - 1]]


def test_a_ramp_is_followed_in_two_steps_not_one_a_window():
    big = TRENDED.model_copy(update={"max_replicas": 100})  # no cap hides an overshoot
    trace = [(t, sine(t)) for t in range(0, 61)]  # a rise: 2 to 20 over 60 s
    trended = changes(run(big, trace))
    seen = changes(run(big.model_copy(update={"startup_s": 0.0}), trace))
    assert [c for _, c in trended] == [3, 7]  # ahead of the load, to the top in two steps
    assert len(seen) >= 3  # the load seen alone: a step per delay or so


@pytest.mark.parametrize("seen_as", [[20], [11, 20], [8, 14, 20]])
def test_a_step_is_not_taken_for_a_ramp(seen_as):
    """However many samples the callers' reports bring it in: a rise that
    stopped is no trend to project (20 / 3 -> 7, though the last 10 s rose by 18)."""
    big = TRENDED.model_copy(update={"max_replicas": 100})
    trace = every(1, 59, load=2) + [(60 + k, x) for k, x in enumerate(seen_as)]
    trace += every(1, 120, load=20, start=60 + len(seen_as))
    for startup_s in (10.0, 60.0):
        counts = run(big.model_copy(update={"startup_s": startup_s}), trace)
        assert [c for _, c in changes(counts)] == [7], (seen_as, startup_s)


def test_samples_close_together_make_no_trend():
    assert slope(((0.0, 0.0), (0.001, 1.0), (0.002, 1.0))) == 0.0
    assert slope(((0.0, 0.0), (1.0, 1.0), (2.0, 2.0))) == pytest.approx(1.0)


def test_a_burst_from_zero_gets_its_count_at_once():
    """The first request takes the count from zero to one; the rest of the
    burst, arriving while that replica still starts, takes it to what they
    ask at once (no replica serves: no delay proves anything)."""
    policy = TRENDED.model_copy(update={"min_replicas": 0})
    state = next_replicas(policy, ScaleState(replicas=0), 1, now=0, ready=0)
    assert state.replicas == 1
    state = next_replicas(policy, state, 20, now=0.3, ready=0)
    assert state.replicas == 7
    # Once one serves, more load waits for the upscale delay again.
    state = next_replicas(policy, ScaleState(replicas=1), 20, now=1, ready=1)
    assert state.replicas == 1


def test_a_load_turning_upward_is_not_cut():
    # 7 replicas at 20 in flight; the load falls to 2, then turns back up right as
    # the downscale delay passes: the scale-down waits while the trend would ask
    # for the replicas back before a scale-up could have them serving.
    fall = [(t, 20 - 18 * t / 35) for t in range(0, 36)]
    rise = [(t, 2 + 0.6 * (t - 35)) for t in range(36, 66)]
    counts = run(TRENDED, fall + rise, start=7)
    assert min(counts) == 7
    # The same fall with a load that stays down: down, as soon as the delay has passed.
    flat = every(1, 100, load=2, start=36)
    counts = run(TRENDED, fall + flat, start=7)
    assert changes(counts)[0][0] <= 45 and counts[-1] == 1


def test_the_benchmarks_sine_in_at_most_two_actions_per_change():
    # Two periods (four changes), then the callers stop: the pure function's count of
    # actions, as bench/demand.py counts the fleet's.
    trace = [(t, sine(t) if t < 240 else 0.0) for t in range(0, 361)]
    assert len(changes(run(TRENDED, trace))) <= 2 * 4


def test_a_scale_up_ahead_of_the_load_says_it_follows_a_rise():
    state, before = ScaleState(replicas=1), None
    for t in range(0, 16):
        before, state = state, next_replicas(TRENDED, state, sine(t), t)
    assert state.replicas > before.replicas and state.replicas > math.ceil(sine(15) / 3)
    assert re.fullmatch(r"\d+(\.\d+)? in flight, rising 0\.\d+/s, 3 per replica wanted",
                        why(TRENDED, before, state, sine(15)))
    flat = ScaleState(replicas=1)
    for t in range(0, 6):
        before, flat = flat, next_replicas(TRENDED, flat, 9, t)
    assert why(TRENDED, before, flat, 9) == "9 in flight, 3 per replica wanted"
    # A step: the last 10 s rose, but the count went to the load seen — no "rising".
    step = ScaleState(replicas=1)
    for t, x in every(1, 9, load=2) + every(1, 16, load=20, start=10):
        before, step = step, next_replicas(TRENDED, step, x, t)
        if step.replicas != before.replicas:
            assert step.replicas == 7 and why(TRENDED, before, step, x) == "20 in flight, 3 per replica wanted"
