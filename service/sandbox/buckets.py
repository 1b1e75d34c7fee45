"""Salla's per-store rate limits: leaky buckets, and a call that takes from several at once.

A store has two (FACTS section 4): the plan bucket every Admin API call counts against (120, 360
or 720 a minute by plan) and the customers endpoints' bucket (500 per 10 minutes), which the
loyalty endpoints take from too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


@dataclass
class Bucket:
    """Salla's leaky bucket: `limit` requests per `window_s`, leaking continuously."""

    limit: int
    window_s: float
    level: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    @property
    def leak_per_s(self) -> float:
        return self.limit / self.window_s

    def _leak(self, now: float) -> None:
        self.level = max(0.0, self.level - (now - self.updated) * self.leak_per_s)
        self.updated = now

    def wait_s(self) -> float:
        """Seconds until one more request fits (0 when it fits now)."""
        self._leak(time.monotonic())
        if self.level + 1 > self.limit:
            return (self.level + 1 - self.limit) / self.leak_per_s
        return 0.0

    def take(self) -> tuple[bool, float]:
        """Take one request: `(True, 0)`, or `(False, seconds to wait)` leaving the bucket as is."""
        wait = self.wait_s()
        if wait > 0:
            return False, wait
        self.level += 1
        return True, 0.0

    def headers(self) -> dict[str, str]:
        remaining = max(0, math.floor(self.limit - self.level))
        reset = int(time.time() + self.level / self.leak_per_s)
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": str(reset),
        }


def take_all(*buckets: Bucket) -> tuple[bool, float]:
    """Take one request from every bucket, or from none: a call refused by one bucket does not
    use up room in the others. `(False, seconds)` names the longest wait."""
    wait = max(bucket.wait_s() for bucket in buckets)
    if wait > 0:
        return False, wait
    for bucket in buckets:
        bucket.level += 1
    return True, 0.0
