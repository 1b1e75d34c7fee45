"""Prometheus metrics, fenced in one module. Web and worker each expose their own registry.

Counters are incremented where the event happens; the grant gauges (queue depth, oldest
pending grant, grants needing attention) are totals over every store, without a store label,
kept by the sweep in the index shards' `gauges` hashes; every worker sets them (and the inbox
backlog) from Redis every 5 s on its own (`sweeper.keep_gauges_fresh`), so all workers report
the same figures: aggregate them with `max` (or read any one), not `sum`.

Every label value comes from a bounded set: what the sender writes (an event name) is used as a
label only when it is one of Salla's documented names (`event_label`), else it counts as
`other`: 5,000 made-up names once made 5,000 series (a 1.5 MB /metrics). Rule labels are the
rule files' ids, with every campaign counted as `campaign` (`rule_label`); Salla's answers are
HTTP statuses; stores are the stores that hold grants.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.webhooks import APP_EVENTS, STORE_EVENTS

#: The event label of a refused delivery, whose body was not read (or not a Salla envelope).
UNREAD_EVENT = "unknown"
_EVENT_LABELS = STORE_EVENTS | APP_EVENTS | {UNREAD_EVENT}

REGISTRY = CollectorRegistry(auto_describe=True)

WEBHOOKS = Counter(
    "salla_rewards_webhooks_total",
    "Webhook deliveries by Salla event and outcome.",
    ["salla_event", "outcome"],
    registry=REGISTRY,
)
CONNECTIONS_CLOSED = Counter(
    "salla_rewards_connections_closed_total",
    "Connections the web process closed before their request headers arrived, by reason "
    "(header_timeout; evicted: at MAX_CONNECTIONS, the longest-waiting made room).",
    ["reason"],
    registry=REGISTRY,
)
EVENTS = Counter(
    "salla_rewards_events_processed_total",
    "Events processed by the worker, by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
GRANTS = Counter(
    "salla_rewards_grants_total",
    "Grant state changes, by rule and new state.",
    ["rule", "state"],
    registry=REGISTRY,
)
SALLA_CALLS = Counter(
    "salla_rewards_salla_calls_total",
    "Calls to POST /customers/loyalty/points, by answer.",
    ["status"],
    registry=REGISTRY,
)
SALLA_SECONDS = Histogram(
    "salla_rewards_salla_call_seconds",
    "Latency of calls to Salla.",
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RATE_LIMIT_WAITS = Counter(
    "salla_rewards_rate_limit_waits_total",
    "Flushes that waited for a store's rate limit.",
    registry=REGISTRY,
)
# No gauge is labelled by store: 50,000 stores would be 50,000 series per gauge. A store's own
# figures are the admin commands' (`grants pending|failed|... --merchant M`).
PENDING = Gauge(
    "salla_rewards_pending_grants",
    "Grants waiting to be sent, in every store with work (as the sweep last counted each "
    "index shard).",
    registry=REGISTRY,
)
OLDEST_PENDING = Gauge(
    "salla_rewards_oldest_pending_grant_age_seconds",
    "Age of the oldest due grant not yet sent, in any store (as the sweep last counted each "
    "index shard).",
    registry=REGISTRY,
)
ATTENTION = Gauge(
    "salla_rewards_grants_needing_attention",
    "Grants that will not go out by themselves, by kind (failed, review, parked), in every "
    "store with work (as the sweep last counted each index shard).",
    ["kind"],
    registry=REGISTRY,
)
INBOX_BACKLOG = Gauge(
    "salla_rewards_inbox_backlog",
    "Webhooks accepted and not processed yet, by state (pending: read by a worker and not "
    "acknowledged; unread).",
    ["state"],
    registry=REGISTRY,
)
INBOX_OLDEST = Gauge(
    "salla_rewards_inbox_oldest_seconds",
    "Age of the oldest webhook accepted and not processed yet.",
    registry=REGISTRY,
)


def event_label(event: str) -> str:
    """A Salla event name as a label value: documented names as they are, anything else `other`."""
    return event if event in _EVENT_LABELS else "other"


def rule_label(rule: str) -> str:
    """A grant's rule as a label value: each campaign is a rule of its own (`campaign:<name>`),
    one per operator command, so they count together as `campaign`."""
    return "campaign" if rule.startswith("campaign:") else rule
