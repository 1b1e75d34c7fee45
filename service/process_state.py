"""Every piece of process-wide mutable state the service keeps, fenced in one place.

Each is a cache or a counter that only makes the process faster or orders its own work; none
holds data that must survive (Redis does). Tests that need a clean process call `reset()`.
structlog's configuration is global too; it is made in `service.logging.configure_logging`,
as structlog intends, and reset by calling that again.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

#: The flush job this process last enqueued per store (`service.queue.enqueue_flush`): asking
#: arq again for the same window is a no-op that costs four round trips.
last_flush: dict[int, str] = {}

#: When this process last listed each store in `stores:pending` (`time.time()`), so that a busy
#: store's events do not each pay that cross-store command (`service.ledger.apply`).
listed_stores: dict[int, float] = {}

#: When this process last made sure each store is in `stores:compact` (`time.time()`): once per
#: store and hour, not once per new order (`service.ledger.compact.store_due`).
compaction_listed: dict[int, float] = {}

#: Labelled metric children already looked up, per label pair (`service.app`).
metric_children: dict[tuple[str, str], Any] = {}

#: The auto-pipeline of each Redis client (`service.autopipe.auto`).
auto_pipes: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

#: The order this process saw events in that did not come through the inbox
#: (`service.processing`): the arrival part of their key.
arrivals: itertools.count[int] = itertools.count()


def reset() -> None:
    """Forget everything above (tests)."""
    global arrivals
    last_flush.clear()
    listed_stores.clear()
    compaction_listed.clear()
    metric_children.clear()
    auto_pipes.clear()
    arrivals = itertools.count()
    from service.webhooks import event_time  # a cache of parsed stamps

    event_time.cache_clear()
