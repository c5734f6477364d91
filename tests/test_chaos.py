"""A minute of the chaos soak (bench/chaos.py): drivers operate while worker
processes, proxies, the watcher, the registry and the coordinator are killed
at random; every promise is checked at the end."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_a_minute_of_chaos_breaks_no_promise(ray_session):
    from bench.chaos import run, summary

    soak = run(60, seed=11)
    figures = summary(soak)
    assert figures["calls"] >= 50 and sum(figures["faults"].values()) >= 10, figures
    assert soak.violations == [], soak.violations[:10]
