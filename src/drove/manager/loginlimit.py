"""A bound on password guessing: after a few failed logins of one user in a short time,
its password logins wait (429) until the window has passed. Tokens are not concerned:
they are random, nothing to guess."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from drove.manager.errors import ApiError

MAX_FAILURES = 5
"""Failed password logins of one user a window allows."""
WINDOW = 60.0
"""Seconds failed logins are counted over (and a refused user waits at most)."""
MAX_USERS = 10_000
"""Names followed at once (a flood of made-up names cannot grow this without bound)."""


class LoginLimit:
    """Counts failed password logins per user name, in this manager's memory."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()  # logins run in FastAPI's worker threads

    def check(self, user: str) -> None:
        """ApiError 429 while ``user`` has used up its failed logins."""
        with self._lock:
            recent = self._recent(user)
        if len(recent) >= self.max_failures:
            wait = max(1, int(recent[0] + self.window - self._clock()) + 1)
            raise ApiError(429, f"{len(recent)} failed logins of user {user} in "
                                f"{self.window:.0f} s: try again in {wait} s (or log in "
                                "with a token)")

    def failed(self, user: str) -> None:
        """Count a failed login of ``user``."""
        with self._lock:
            recent = self._recent(user)
            recent.append(self._clock())
            self._failures[user] = recent
            if len(self._failures) > MAX_USERS:
                now = self._clock()
                self._failures = {u: f for u, f in self._failures.items()
                                  if f and f[-1] > now - self.window}

    def succeeded(self, user: str) -> None:
        """Forget ``user``'s failed logins."""
        with self._lock:
            self._failures.pop(user, None)

    def _recent(self, user: str) -> list[float]:
        since = self._clock() - self.window
        return [t for t in self._failures.get(user, ()) if t > since]
