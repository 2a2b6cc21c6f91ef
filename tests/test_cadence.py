"""Young/Daly and the adaptive checkpoint interval, against hand-computed values."""

from __future__ import annotations

import logging
import math

import pytest

from harness.cadence import AdaptiveInterval, estimate_mtbi_s, interval_steps, young_daly_interval_s


@pytest.mark.parametrize(("cost_s", "mtbi_s", "expected_s"), [
    (2.0, 7200.0, 169.7056),  # sqrt(2 * 2 * 7200) = sqrt(28800)
    (30.0, 4 * 3600.0, 929.5160),  # sqrt(2 * 30 * 14400) = sqrt(864000)
    (0.5, 50.0, 7.0711),  # sqrt(50)
    (0.0, 3600.0, 0.0),
])
def test_young_daly(cost_s, mtbi_s, expected_s):
    assert young_daly_interval_s(cost_s, mtbi_s) == pytest.approx(expected_s, abs=1e-4)


def test_interval_in_steps_is_rounded_and_clamped():
    assert interval_steps(2.0, 7200.0, 2.0, 10_000) == 85  # 169.7 s / 2 s
    assert interval_steps(2.0, 7200.0, 2.0, 50) == 50
    assert interval_steps(0.0, 7200.0, 2.0, 50) == 1


@pytest.mark.parametrize(("args", "message"), [
    ((-1.0, 3600.0), "checkpoint cost"),
    ((1.0, 0.0), "MTBI"),
    ((1.0, -5.0), "MTBI"),
    ((1.0, math.nan), "MTBI"),
])
def test_young_daly_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        young_daly_interval_s(*args)


def test_interval_steps_rejects_zero_step_time():
    with pytest.raises(ValueError, match="step time"):
        interval_steps(1.0, 3600.0, 0.0, 100)


def test_adaptive_interval_follows_measurements_and_logs_each_change(caplog):
    adaptive = AdaptiveInterval(max_steps=10_000, initial_steps=50, smoothing=1.0)
    with caplog.at_level(logging.INFO, logger="harness.cadence"):
        assert adaptive.update(blocking_s=2.0, step_time_s=2.0, mtbi_s=7200.0) == 85
        assert adaptive.update(blocking_s=2.1, step_time_s=2.0, mtbi_s=7200.0) == 85  # +2.5%: kept
        assert adaptive.update(blocking_s=8.0, step_time_s=2.0, mtbi_s=7200.0) == 170  # sqrt(115200)/2
        assert adaptive.update(blocking_s=8.0, step_time_s=2.0, mtbi_s=1e9) == 10_000  # clamped
    changes = [r.getMessage() for r in caplog.records]
    assert len(changes) == 3 and changes[0].startswith("checkpoint interval 50 -> 85 steps")


def test_adaptive_interval_smooths_outliers():
    adaptive = AdaptiveInterval(max_steps=10_000, initial_steps=85, smoothing=0.3)
    adaptive.update(2.0, 2.0, 7200.0)
    # One 20 s outlier moves the smoothed blocking to 2 + 0.3 * 18 = 7.4 s: 163 steps, not 268.
    assert adaptive.update(20.0, 2.0, 7200.0) == round(math.sqrt(2 * 7.4 * 7200) / 2) == 163


def test_observed_mtbi_starts_at_the_prior_and_follows_interruptions():
    assert estimate_mtbi_s(0.0, 0, 3600.0) == 3600.0
    assert estimate_mtbi_s(1800.0, 0, 3600.0) == 5400.0  # no interruption yet: longer than the prior
    assert estimate_mtbi_s(10 * 600.0, 9, 3600.0) == pytest.approx((6000 + 3600) / 10)
