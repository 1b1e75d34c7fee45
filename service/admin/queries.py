"""What an operator asks of a running service, answered from Redis. Used by /admin/ and the CLI.

Every function here only reads. Exports are in `export`, replays (which may write through the
ledger) in `replay`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis

from service import keys, ledger, tokens
from service.admin.times import iso_ms
from service.delivery.deps import plan_bucket
from service.delivery.ratelimit import RateLimiter
from service.ledger import order_state
from service.ledger.compact import read_stored
from service.ledger.facts import OrderFacts
from service.ledger.order_state import RuleRecord
from service.ledger.views import entry_fields
from service.settings import Settings


def grant_view(doc: dict[str, str]) -> dict[str, Any]:
    """One grant as operators see it: what, for whom, by which rule, sent when, in which batch."""
    grant = ledger.Grant.from_redis(doc)
    return {
        "grant_id": grant.id,
        "merchant": grant.merchant,
        "customer": grant.customer,
        "rule": grant.rule,
        "scope": grant.scope,
        "type": grant.type,
        "points": grant.points,
        "signed_points": grant.signed_points,
        "reason": grant.reason,
        "state": grant.state,
        "created_at": iso_ms(grant.created_ms),
        "sent_at": iso_ms(doc.get("done_ms")) if grant.state == "sent" else None,
        "batch": grant.batch or None,
        "attempts": grant.attempts,
        "error": grant.error or None,
        "trace_id": grant.trace_id or None,
    }


async def grant_docs(redis: Redis, ids: Iterable[str]) -> list[dict[str, str]]:
    async with redis.pipeline(transaction=False) as pipe:
        for grant_id in ids:
            pipe.hgetall(keys.grant(grant_id))
        docs: list[dict[str, str]] = await pipe.execute()
    return [doc for doc in docs if doc]  # settled grants expire after SETTLED_GRANT_TTL_S


async def store_state(redis: Redis, settings: Settings, merchant: int) -> dict[str, Any]:
    """Token, queue, rate-limit budget and failed grants of one store."""
    doc: dict[str, str] = await redis.hgetall(tokens.store_key(merchant))  # type: ignore[misc]
    token = tokens.from_record(doc)
    now = time.time()
    gauges = await ledger.store_gauges(redis, merchant)
    async with redis.pipeline(transaction=False) as pipe:
        for kind in ("claimed", "unknown"):
            pipe.zcard(keys.grant_set(kind, merchant))
        pipe.zcount(keys.grant_set("pending", merchant), "-inf", ledger.now_ms())
        claimed, unknown, due = await pipe.execute()
    failed_ids: list[str] = await redis.zrange(keys.grant_set("failed", merchant), 0, 99)
    bucket = RateLimiter(redis, settings.rate_limit_requests, settings.rate_limit_window_s)
    return {
        "merchant": merchant,
        "known": bool(doc),
        "status": doc.get("status", "unknown"),
        "token": None
        if token is None
        else {
            "valid_until": iso_ms(token.expires_at_s * 1000) if token.expires_at_s else None,
            "expires_in_s": max(0, int(token.expires_at_s - now)) if token.expires_at_s else None,
            "refreshable": bool(token.refresh_token),
            "scope": token.scope,
        },
        # Whether Salla's orders API can decide ambiguous events, confirm held points and
        # recover lost webhooks for this store, and if not, why.
        "orders_api": {
            "available": token is not None
            and bool({"orders.read", "orders.read_write"} & set(token.scope.split()))
            and not doc.get(tokens.ORDER_TRUTH_UNAVAILABLE),
            "why_not": doc.get(tokens.ORDER_TRUTH_UNAVAILABLE) or None,
            "installed_at": iso_ms(int(doc["installed_at_s"]) * 1000)
            if doc.get("installed_at_s", "").isdigit()
            else None,
        },
        "queue": {
            "pending": int(gauges["pending"]),
            "due_now": int(due),
            "oldest_due_age_s": round(gauges["oldest_age_s"], 3),
            "in_flight": int(claimed),
            "parked": int(gauges["parked"]),
            "failed": int(gauges["failed"]),
            "review": int(gauges["review"]),
            "unknown_outcome": int(unknown),
        },
        "rate_limit": await bucket.peek(merchant),
        "plan_rate_limit": await plan_bucket(redis, settings).peek(merchant),
        "failed_grants": [grant_view(d) for d in await grant_docs(redis, failed_ids)],
    }


async def _scope_view(redis: Redis, merchant: int, scope: str) -> dict[str, Any]:
    raw = await entry_fields(redis, merchant, scope)
    rules = {}
    for name, value in raw.items():
        if name.startswith("r:"):
            record = RuleRecord.decode(value)
            holder = order_state.holder(record)
            rules[name[2:]] = {
                "granted": record.granted_total,
                "deserved": sum(order_state.target(record).values()),
                "granted_by_customer": {str(c): p for c, p in record.granted.items()},
                "decided_by": {
                    str(order): {"points": v.points, "customer": v.customer or None}
                    for order, v in record.verdicts.items()
                },
                "holder_order": holder.order if holder else None,
                "reason": record.reason,
                "rule_version": record.version,
            }
    ids: list[str] = await redis.zrange(keys.scope_grants(merchant, scope), 0, -1)
    facts = OrderFacts.from_fields(raw)
    return {
        "scope": scope,
        "customer": facts.customer or None,
        "order_state": {
            "status": facts.status,
            "total": facts.total,
            "ever_completed": facts.completed,
            "gone": facts.gone,
        }
        if scope.startswith("order:") and facts.newest
        else None,
        "rules": rules,
        "grants": [grant_view(d) for d in await grant_docs(redis, ids)],
    }


async def order_ledger(redis: Redis, merchant: int, order_id: int) -> dict[str, Any]:
    """Everything the ledger holds because of one order: per rule, and each grant."""
    others: set[str] = await redis.smembers(keys.order_index(merchant, order_id))  # type: ignore[misc]
    others |= set((await read_stored(redis, merchant, order_id)).linked)  # compacted: folded in
    scopes = [f"order:{order_id}", *sorted(others)]
    views = [await _scope_view(redis, merchant, scope) for scope in scopes]
    views = [v for v in views if v["rules"] or v["grants"]]
    return {
        "merchant": merchant,
        "order_id": order_id,
        "found": bool(views),
        "granted": sum(r["granted"] for v in views for r in v["rules"].values()),
        "scopes": views,
    }


async def customer_ledger(
    redis: Redis, merchant: int, customer: int, limit: int = 1000
) -> dict[str, Any]:
    """A customer's grants, newest first, with totals by state."""
    ids: list[str] = await redis.zrevrange(keys.customer_grants(merchant, customer), 0, limit - 1)
    grants = [grant_view(d) for d in await grant_docs(redis, ids)]
    totals: dict[str, int] = {}
    for grant in grants:
        totals[grant["state"]] = totals.get(grant["state"], 0) + grant["signed_points"]
    return {
        "merchant": merchant,
        "customer": customer,
        "points_by_state": totals,
        "grants": grants,
    }
