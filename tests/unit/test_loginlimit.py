"""The bound on password guessing, on a clock the test moves."""

from __future__ import annotations

import pytest

from drove.manager.errors import ApiError
from drove.manager.loginlimit import LoginLimit


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_window_make_a_user_wait_then_pass():
    clock = Clock()
    limit = LoginLimit(max_failures=3, window=60, clock=clock)
    for _ in range(3):
        limit.check("bob")
        limit.failed("bob")
        clock.now += 1
    with pytest.raises(ApiError) as err:
        limit.check("bob")
    assert err.value.status == 429 and "try again in 58 s" in str(err.value)
    limit.check("carol")  # others are not concerned
    clock.now += 58  # the first failure leaves the window
    limit.check("bob")


def test_a_success_forgets_the_failures():
    limit = LoginLimit(max_failures=2, window=60, clock=Clock())
    limit.failed("bob")
    limit.succeeded("bob")
    limit.failed("bob")
    limit.check("bob")
