"""A minute of the chaos soak (bench/chaos.py): drivers operate while worker
processes, proxies, the watcher, the registry and the coordinator are killed
at random; every promise is checked at the end."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_a_minute_of_chaos_breaks_no_promise(ray_session):
    from bench.chaos import OPERATIONS, run, summary

    soak = run(60, seed=11)
    figures = summary(soak)
    assert soak.violations == [], soak.violations[:10]
    # It did real work, however fast the machine: every kind of operation got
    # through to a worker and back, things of several kinds were killed, and
    # after each kill an operation begun later succeeded (the drivers go on
    # after the chaos until one of theirs does).
    assert set(figures["worker_answered_by_kind"]) == set(OPERATIONS), figures
    assert len(soak.faults) >= 3, figures
    assert figures["unrecovered_faults"] == [], figures
