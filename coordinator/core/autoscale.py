"""How many replicas a deployment's load asks for: a pure function of the
load samples the coordinator sees (requests in flight and waiting, summed
over every caller that reports) and the autoscaler's own state.

It follows Ray Serve's autoscaler (``target_ongoing_requests``, upscale and
downscale delays, ``min_replicas: 0`` with a longer delay to zero) and takes
care of what its users report (ray #61551 pinned replicas, ray #43034
downscale during upscale, kubeai #67 flapping 0↔1):

- **sustained, not momentary**: the count changes only after the load asked
  for a change in the same direction for a whole delay (``upscale_delay_s``,
  ``downscale_delay_s``); a sample asking the other way, or nothing, restarts
  the wait. Up is short, down is long: a GPU load is expensive to undo;
- **hysteresis**: up when the load per replica exceeds ``target_in_flight``;
  down only to a count that would still be under ``DOWN_BAND`` of it, so a
  load just at a boundary does not flip between two counts;
- **one direction per window**: after a change, no change the other way for
  that direction's delay (the wait starts after the change);
- **the trend** (the load's slope over its last ``TREND_S``), looked at
  over the time a scale-up takes to serve (``upscale_delay_s`` and the
  model's cold start: ``startup_s``, or as long as the deployment's last
  starts took): a scale-up goes to the load a rising
  trend reaches by then, so a ramp is followed in one or two steps, not one
  step per delay (measured: a sine's 60 s rise took six); a scale-down waits
  while the trend would ask for the count back by then, so a load turning
  upward is not cut (measured: a sine's trough took 7 -> 4 replicas, and
  three steps back up 15 s later);
- **to zero** only after no request at all for ``downscale_to_zero_delay_s``,
  and **from zero** at once: a request waiting for a model with no replica is
  demand that cannot wait for a delay (the cold start is long enough); so is
  more of it while none of the replicas serves yet (a burst from zero gets
  its count, not one replica and the rest a delay later);
- bounded by ``min_replicas``/``max_replicas`` and by the worker managers
  available (never a count that cannot be placed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

#: A scale-down goes to the count whose load per replica would be at most this
#: share of ``target_in_flight`` (hysteresis: the count after a scale-down is
#: never one that would ask to scale up again at the same load).
DOWN_BAND = 0.8
#: Seconds of samples the load's trend (its least-squares slope) is taken over.
TREND_S = 10.0
#: Seconds a slope's samples must span: samples milliseconds apart (a decision
#: a caller's report or question asked for, beside the once-a-second one) say
#: nothing of a trend.
MIN_SPAN_S = 2.0
#: Seconds of its last samples a scale-down goes by: the most they asked for.
#: Not the whole delay's: a sharp drop's first samples, while callers finish
#: what they started, ask for more than the load that stays (measured: a
#: 20 -> 2 step took two delays to come down, 7 -> 5 -> 1).
DOWN_SETTLE_S = 10.0


class Autoscale(BaseModel):
    """A deployment's replica count follows its load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: NonNegativeInt = 1
    max_replicas: PositiveInt
    #: Requests in flight (and waiting) per replica the count aims at.
    target_in_flight: float = Field(2.0, gt=0)
    #: Seconds the load must ask for more replicas before they are started.
    upscale_delay_s: float = Field(5.0, ge=0)
    #: Seconds a new replica takes to serve: the model's cold start. With the
    #: upscale delay, how far ahead the load's trend is looked at (``horizon``).
    #: None: as long as this deployment's last starts took (the keeper times
    #: them; 0 until it has timed one).
    startup_s: float | None = Field(None, ge=0)
    #: Seconds the load must ask for fewer before they are (drained and) stopped.
    downscale_delay_s: float = Field(60.0, ge=0)
    #: Seconds without any request before the last replica is stopped
    #: (with ``min_replicas: 0``).
    downscale_to_zero_delay_s: float = Field(300.0, ge=0)
    #: Seconds a request for a model scaled to zero is held by its caller (a
    #: router, the gateway) while a replica starts; then it fails ("no
    #: instance", 503 with Retry-After at the gateway). Size it to a cold start.
    from_zero_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscale.min_replicas ({self.min_replicas}) must be at most "
                             f"autoscale.max_replicas ({self.max_replicas})")
        return self


@dataclass(frozen=True)
class ScaleState:
    """What the autoscaler remembers of one deployment between samples."""

    replicas: int
    #: Since when the load has asked for more (None: it does not now), and the
    #: most it asked for meanwhile.
    up_since: float | None = None
    up_to: int = 0
    #: Since when it has asked for fewer, and what its samples of the last
    #: DOWN_SETTLE_S asked for: (time, count) (a scale-down goes no lower).
    down_since: float | None = None
    asked: tuple[tuple[float, int], ...] = ()
    #: When the last request was seen (for the delay to zero).
    busy_at: float | None = None
    #: The last ``TREND_S`` of (time, load) samples: the load's trend.
    trend: tuple[tuple[float, float], ...] = ()
    #: The slope (load per second) the last change went ahead of the load by;
    #: 0: it went to the load seen.
    rising: float = 0.0


def horizon(policy: Autoscale, measured: float | None = None) -> float:
    """Seconds from a load asking for more to the replicas a scale-up then
    starts serving: the upscale delay and a cold start (``startup_s``, or the
    ``measured`` one when it is None)."""
    startup = policy.startup_s if policy.startup_s is not None else measured
    return policy.upscale_delay_s + (startup or 0.0)


def wanted(policy: Autoscale, load: float) -> tuple[int, int]:
    """(count to scale up to, count to scale down to) for ``load`` requests."""
    up = math.ceil(load / policy.target_in_flight)
    down = math.ceil(load / (policy.target_in_flight * DOWN_BAND))
    return up, down


def slope(samples: tuple[tuple[float, float], ...]) -> float:
    """Load per second: the least-squares slope of (time, load) samples (0
    for fewer than three, or spanning less than MIN_SPAN_S)."""
    if len(samples) < 3 or samples[-1][0] - samples[0][0] < MIN_SPAN_S:
        return 0.0
    mean_t = sum(t for t, _ in samples) / len(samples)
    mean_l = sum(x for _, x in samples) / len(samples)
    spread = sum((t - mean_t) ** 2 for t, _ in samples)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (x - mean_l) for t, x in samples) / spread


def sustained(samples: tuple[tuple[float, float], ...]) -> float:
    """The slope of ``samples`` that their later half keeps up (the smaller of
    the two): a step that reached the callers' reports over two or three
    samples rises steeply across them, then not at all — no ramp to project."""
    return min(slope(samples), slope(samples[len(samples) // 2:]))


def ahead(load: float, rate: float, seconds: float) -> float:
    """The load ``seconds`` on if it keeps rising at ``rate`` (a falling load: as it is)."""
    return load + max(rate, 0.0) * seconds


def next_replicas(policy: Autoscale, state: ScaleState, load: float, now: float,
                  placeable: int | None = None, startup_s: float | None = None,
                  ready: int | None = None) -> ScaleState:
    """The state after one load sample; its ``replicas`` is the count wanted now.

    ``load``: requests in flight plus waiting for the model, over every caller;
    ``placeable``: the most replicas the worker managers can hold (None: no bound);
    ``startup_s``: how long the model's starts were seen to take (for a policy without one);
    ``ready``: its replicas serving (None: not known)."""
    # The managers available bound a scale-up, never what runs: an outage of
    # some managers must not cut the count (their instances are waited for,
    # and stopped if the count dropped, when they come back).
    ceiling = policy.max_replicas if placeable is None else min(policy.max_replicas,
                                                                max(placeable, state.replicas))
    floor = min(policy.min_replicas, ceiling)
    current = min(max(state.replicas, floor), ceiling)  # the policy may have changed since
    # Idle counts from the first sample seen: a coordinator that just
    # (re)started knows nothing of the time before, and must not take it for idle.
    busy_at = now if load > 0 or state.busy_at is None else state.busy_at
    up, down = wanted(policy, load)
    up = min(max(up, floor), ceiling)
    down = min(max(down, floor), ceiling)
    trend = (*((t, x) for t, x in state.trend if now - t < TREND_S), (now, load))
    state = replace(state, replicas=current, busy_at=busy_at, trend=trend)

    if current == 0:  # from zero: at once, for any demand
        return replace(state, replicas=max(up, 1 if load > 0 and ceiling else 0), up_since=None, down_since=None,
                       rising=0.0)
    if ready == 0 and up > current:
        # Nothing serves yet (a start from zero under way, say, with the rest
        # of a burst arriving): every request waits, no delay proves anything.
        return ScaleState(replicas=up, busy_at=busy_at, trend=trend)

    if up > current:
        since = now if state.up_since is None else state.up_since
        most = max(up, state.up_to if state.up_since is not None else 0)
        if now - since >= policy.upscale_delay_s:
            # Sized for the load when a next scale-up could be serving, if the
            # load keeps rising as it has while it asked: one step for a ramp,
            # not one a window (and a step, flat since, is not taken for a ramp).
            rising = sustained(tuple((t, x) for t, x in trend if t >= since))
            projected = min(wanted(policy, ahead(load, rising, horizon(policy, startup_s)))[0], ceiling)
            return ScaleState(replicas=max(most, projected), busy_at=busy_at, trend=trend,
                              rising=rising if projected > most else 0.0)
        return replace(state, up_since=since, up_to=most, down_since=None, asked=())

    if down < current:
        since = now if state.down_since is None else state.down_since
        earlier = state.asked if state.down_since is not None else ()
        asked = (*((t, n) for t, n in earlier if now - t < DOWN_SETTLE_S), (now, down))
        target = max(n for _, n in asked)
        if target == 0:
            if now - busy_at < policy.downscale_to_zero_delay_s:
                target = 1  # not idle long enough for zero: one stays
        # A load on its way back up would ask for the count again before a
        # scale-up could bring it: wait (the window stays; the next sample may act).
        turning = wanted(policy, ahead(load, slope(trend), horizon(policy, startup_s)))[0] > target
        if target < current and now - since >= policy.downscale_delay_s and not turning:
            return ScaleState(replicas=target, busy_at=busy_at, trend=trend)
        return replace(state, down_since=since, asked=asked, up_since=None, up_to=0)

    return replace(state, up_since=None, up_to=0, down_since=None, asked=())


def why(policy: Autoscale, before: ScaleState, after: ScaleState, load: float) -> str:
    """What asked for the change from ``before`` to ``after``, for its event."""
    trend = f", rising {after.rising:.2g}/s" if after.replicas > before.replicas and after.rising > 0 else ""
    return f"{load:g} in flight{trend}, {policy.target_in_flight:g} per replica wanted"
