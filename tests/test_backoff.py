"""Every back-off in the code base is bounded arithmetic: any count of failures
in a row gives a delay between ``initial`` and ``maximum``. ``initial * 2 ** n``
overflows a float after ~1,024 failures (a source down for a weekend at a
30 s maximum), and the OverflowError killed the loop that asked."""

from __future__ import annotations

from coordinator.core.config import BackoffSettings
from coordinator.core.deployments import backed_off

FAILURES = 10_000


def test_watcher_backoff_stays_at_its_maximum_for_any_count_of_failures():
    b = BackoffSettings(initial=0.5, maximum=30)
    delays = [b.delay(n) for n in range(FAILURES + 1)]
    assert delays[:8] == [0.5, 0.5, 1, 2, 4, 8, 16, 30]  # 0 failures: as after the first
    assert set(delays[7:]) == {30.0}
    assert b.delay(10**18) == 30.0


def test_a_backoff_whose_maximum_is_huge_still_doubles_without_overflow():
    b = BackoffSettings(initial=1e-6, maximum=1e300)
    assert all(0 < b.delay(n) <= 1e300 for n in range(0, FAILURES, 97))
    assert b.delay(FAILURES) > b.delay(10)


def test_keeper_backoff_survives_ten_thousand_failures():
    b = None
    for n in range(FAILURES):
        b = backed_off(b, now=100.0, error="boom", initial=1.0, maximum=300.0)
    assert b.failures == FAILURES and b.retry_at == 100.0 + 300.0 and b.last_error == "boom"
    assert backed_off(None, 0.0, "e", 1.0, 300.0).retry_at == 1.0
