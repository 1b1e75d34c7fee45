"""What an operator asks of a running service, answered from Redis. Used by /admin/ and the CLI.

Every function here only reads, except `replay` without `dry_run`, which goes through the
ledger like any webhook and so can only add what the current rules say is still owed.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

from service import keys, ledger, tokens
from service.delivery.flush import plan_bucket
from service.delivery.ratelimit import RateLimiter
from service.errors import WebhookError
from service.keys import WEBHOOK_STREAM
from service.ledger import order_state
from service.ledger.facts import OrderFacts
from service.ledger.order_state import RuleRecord
from service.processing import ProcessingDeps, replay_event
from service.settings import Settings

#: The columns of a CSV export, in order (JSONL lines carry the same keys).
EXPORT_FIELDS = (
    "grant_id",
    "merchant",
    "customer",
    "rule",
    "scope",
    "type",
    "points",
    "signed_points",
    "reason",
    "state",
    "created_at",
    "sent_at",
    "batch",
    "attempts",
    "error",
    "trace_id",
)
PAGE = 500
LEAP_SECOND = re.compile(r"(?<=\d\d:\d\d):60(?=$|[.Z+-])")


class AdminInputError(ValueError):
    """An operator's request that cannot be answered as asked (a bad date, a bad range)."""


def parse_time(value: str, *, end_of_day: bool = False) -> dt.datetime:
    """`2026-11-01` (a whole UTC day) or an ISO 8601 time; a time without a zone is UTC."""
    text = LEAP_SECOND.sub(":59", value.strip().upper())  # RFC 3339 allows 't', 'z' and :60
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            moment = dt.datetime.combine(day, dt.time(), dt.UTC)
            return moment + dt.timedelta(days=1) if end_of_day and day < dt.date.max else moment
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AdminInputError(
            f"{value!r} is not a date (2026-11-01) or an ISO 8601 time (2026-11-01T09:30:00Z)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _epoch_ms(moment: dt.datetime) -> int:
    try:
        return int(moment.timestamp() * 1000)
    except (OverflowError, ValueError):  # 0001-01-01T00:00:00+14:00 is before year 1 in UTC
        raise AdminInputError(f"{moment.isoformat()} is out of range") from None


def time_range(since: str | None, until: str | None) -> tuple[int, int]:
    """Milliseconds [since, until): defaults are the beginning of time and now."""
    start = max(0, _epoch_ms(parse_time(since))) if since else 0
    end = _epoch_ms(parse_time(until, end_of_day=True)) if until else int(time.time() * 1000) + 1
    if end <= start:
        raise AdminInputError("the range is empty: --until must be after --since")
    return start, end


def _iso_ms(ms: int | str | None) -> str | None:
    """An epoch in milliseconds as ISO 8601; None when absent or past what a date can show
    (a record written before such values were refused must not break the view)."""
    value = int(ms or 0)
    if not value:
        return None
    try:
        moment = dt.datetime.fromtimestamp(value / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds")


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
        "created_at": _iso_ms(grant.created_ms),
        "sent_at": _iso_ms(doc.get("done_ms")) if grant.state == "sent" else None,
        "batch": grant.batch or None,
        "attempts": grant.attempts,
        "error": grant.error or None,
        "trace_id": grant.trace_id or None,
    }


async def _grant_docs(redis: Redis, ids: Iterable[str]) -> list[dict[str, str]]:
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
            "valid_until": _iso_ms(token.expires_at_s * 1000) if token.expires_at_s else None,
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
            "installed_at": _iso_ms(int(doc["installed_at_s"]) * 1000)
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
        "failed_grants": [grant_view(d) for d in await _grant_docs(redis, failed_ids)],
    }


async def _scope_view(redis: Redis, merchant: int, scope: str) -> dict[str, Any]:
    raw: dict[str, str] = await redis.hgetall(keys.entry(merchant, scope))  # type: ignore[misc]
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
        "grants": [grant_view(d) for d in await _grant_docs(redis, ids)],
    }


async def order_ledger(redis: Redis, merchant: int, order_id: int) -> dict[str, Any]:
    """Everything the ledger holds because of one order: per rule, and each grant."""
    others: set[str] = await redis.smembers(keys.order_index(merchant, order_id))  # type: ignore[misc]
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
    grants = [grant_view(d) for d in await _grant_docs(redis, ids)]
    totals: dict[str, int] = {}
    for grant in grants:
        totals[grant["state"]] = totals.get(grant["state"], 0) + grant["signed_points"]
    return {
        "merchant": merchant,
        "customer": customer,
        "points_by_state": totals,
        "grants": grants,
    }


async def count_grants(redis: Redis, start_ms: int, end_ms: int) -> int:
    return int(await redis.zcount(keys.GRANT_LOG, start_ms, f"({end_ms}"))


async def export_grants(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Grants created in [start_ms, end_ms), oldest first, a page at a time."""
    offset = 0
    while True:
        ids: list[str] = await redis.zrangebyscore(
            keys.GRANT_LOG, start_ms, f"({end_ms}", start=offset, num=PAGE
        )
        if not ids:
            return
        offset += len(ids)
        for doc in await _grant_docs(redis, ids):
            if merchant is None or int(doc["merchant"]) == merchant:
                yield grant_view(doc)


def csv_header() -> str:
    return _csv_line(dict(zip(EXPORT_FIELDS, EXPORT_FIELDS, strict=True)))


def _csv_line(row: dict[str, Any]) -> str:
    out = io.StringIO()
    csv.DictWriter(out, EXPORT_FIELDS, extrasaction="ignore", lineterminator="\n").writerow(
        {k: "" if row.get(k) is None else row[k] for k in EXPORT_FIELDS}
    )
    return out.getvalue()


def export_line(row: dict[str, Any], fmt: str) -> str:
    if fmt == "csv":
        return _csv_line(row)
    return json.dumps(row, ensure_ascii=False) + "\n"


@dataclass(frozen=True, slots=True)
class StoredWebhook:
    stream_id: str
    merchant: int
    event: str
    delivery: str
    body: bytes

    @property
    def received_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(int(self.stream_id.split("-")[0]) / 1000, dt.UTC)


async def stored_webhooks(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None
) -> AsyncIterator[StoredWebhook]:
    """Webhooks kept for replay, in the order they were first processed."""
    cursor = str(start_ms)
    while True:
        entries = await redis.xrange(WEBHOOK_STREAM, min=cursor, max=f"({end_ms}", count=PAGE)
        if not entries:
            return
        for stream_id, fields in entries:
            webhook = StoredWebhook(
                stream_id=stream_id,
                merchant=int(fields.get("merchant", 0)),
                event=fields.get("event", ""),
                delivery=fields.get("delivery", ""),
                body=fields.get("body", "").encode(),
            )
            if merchant is None or webhook.merchant == merchant:
                yield webhook
        cursor = "(" + entries[-1][0]


# KEYS[1] stream; ARGV: min id, max id (exclusive form allowed), merchant ("" = any), count.
# Returns {entries counted, last id seen} so the caller pages without moving bodies over the wire.
_COUNT_WEBHOOKS = """
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[4]))
local n = 0
for _, entry in ipairs(entries) do
  if ARGV[3] == '' then
    n = n + 1
  else
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'merchant' then
        if fields[i + 1] == ARGV[3] then n = n + 1 end
        break
      end
    end
  end
end
local last = ''
if #entries > 0 then last = entries[#entries][1] end
return {n, last}
"""


async def count_webhooks(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None
) -> int:
    """How many stored webhooks a replay of this range would read (counted inside Redis)."""
    cursor, total = str(start_ms), 0
    while True:
        counted, last = await redis.eval(  # type: ignore[misc]
            _COUNT_WEBHOOKS,
            1,
            WEBHOOK_STREAM,
            cursor,
            f"({end_ms}",
            "" if merchant is None else str(merchant),
            "10000",
        )
        total += int(counted)
        if not last:
            return total
        cursor = f"({last}"


@dataclass(frozen=True, slots=True)
class ReplayLine:
    """One replayed webhook and what it changed (or would change)."""

    stream_id: str
    merchant: int
    event: str
    outcome: str
    diffs: tuple[dict[str, Any], ...]
    #: Why the webhook could not be run (its body is not one the rules can read), or None.
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def replay(
    deps: ProcessingDeps,
    start_ms: int,
    end_ms: int,
    *,
    merchant: int | None = None,
    dry_run: bool = True,
) -> AsyncIterator[ReplayLine]:
    """Run stored webhooks through the current rules, oldest first; yield each one's changes.

    Stopping between two webhooks is always safe: each one's ledger changes are atomic, and
    running the range again only finds what is still owed.
    """
    async for webhook in stored_webhooks(deps.redis, start_ms, end_ms, merchant):
        try:
            replayed = await replay_event(
                deps,
                webhook.body,
                webhook.delivery,
                received_at=webhook.received_at,
                dry_run=dry_run,
                stream_id=webhook.stream_id,
            )
            outcome, diffs, skipped = replayed.outcome, replayed.diffs, None
        except WebhookError as exc:
            # A body the rules cannot read (an id in other digits, a number beyond a double):
            # the worker rejected it too. Report it and go on with the range.
            outcome, diffs, skipped = "skipped", [], exc.message
        yield ReplayLine(
            stream_id=webhook.stream_id,
            merchant=webhook.merchant,
            event=webhook.event,
            outcome=outcome,
            diffs=tuple(
                {**asdict(d), "delta": d.delta} for d in diffs if d.delta or d.netted_grants
            ),
            skipped=skipped,
        )
