"""Find orders whose webhooks never came: compare Salla's order list with the ledger.

Salla gives up on a webhook after three re-sends about five minutes apart, so an outage longer
than that loses events for good. Periodically (`ORDERS_RECONCILE_EVERY_S`), for each store, the
orders created in the last `ORDERS_RECONCILE_DAYS` days are listed (`GET /orders`: whole days,
Salla has no "updated since"); each order's status and total (all the list shows) are compared
with the newest state the ledger applied; only orders that differ, or that the ledger never saw,
take one `GET /orders/{id}` each, whose state is applied as a fetched state
(service/orders/truth.py): it can never credit twice. Orders created before the store installed
the app are left to `orders backfill`.

A run keeps its place (`sr:orders-rec:<store>`): deferred by the plan bucket, it resumes at the
page it stopped on, so the list calls stay `ceil(orders in window / page size)`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from zoneinfo import ZoneInfo

from arq.worker import Retry

from service import keys, ledger, tokens
from service.events import parse_order, salla_date_ms, to_decimal
from service.logging import get_logger
from service.orders import truth
from service.orders.truth import Deps
from service.salla import RateLimitInfo, TokenSet

log = get_logger("service.orders")

#: Salla's stores keep Riyadh time; the list filters on the order's creation day there.
STORE_ZONE = ZoneInfo("Asia/Riyadh")


@dataclass
class Report:
    """What one reconciliation (or backfill) of a store found and did."""

    merchant: int
    from_date: str
    to_date: str
    pages: int = 0
    listed: int = 0
    differing: int = 0
    fetched: int = 0
    changed: int = 0
    grants: int = 0
    points: int = 0
    before_install: int = 0
    changes: list[dict[str, object]] = field(default_factory=list)
    unavailable: str = ""

    def as_log(self) -> dict[str, object]:
        fields = asdict(self)
        fields.pop("changes")
        return fields


def window_days(deps: Deps) -> int:
    """`ORDERS_RECONCILE_DAYS`, or the longest hold of the rules plus 2 days."""
    configured = deps.processing.settings.orders_reconcile_days
    if configured:
        return configured
    rules = deps.processing.rules.rules
    longest = max((float(r.hold_days) for r in rules), default=0.0)
    return int(longest) + 2


def _progress_key(merchant: int) -> str:
    return keys.orders_reconcile(merchant)


async def run_store(
    deps: Deps,
    merchant: int,
    *,
    since: dt.date | None = None,
    until: dt.date | None = None,
    backfill: bool = False,
    dry_run: bool = False,
    in_job: bool = True,
    on_page: Callable[[int, int], None] | None = None,
) -> Report:
    """Reconcile (or, with `backfill`, catch up on orders before the install) one store.

    `in_job`: a worker job defers itself for the rate limit (arq `Retry`) and keeps its place;
    the CLI waits instead. `on_page(page, pages)` reports progress.
    """
    redis = deps.redis
    today = dt.datetime.now(STORE_ZONE).date()
    start = since or today - dt.timedelta(days=window_days(deps))
    end = until or today
    report = Report(merchant, start.isoformat(), end.isoformat())
    token = await truth.orders_token(deps, merchant)
    if token is None:
        record = await redis.hgetall(tokens.store_key(merchant))  # type: ignore[misc]
        report.unavailable = (
            f"store {merchant}: {record.get(tokens.ORDER_TRUTH_UNAVAILABLE) or 'no usable token'}"
            if record
            else f"store {merchant} is unknown to the service (it never installed the app)"
        )
        return report
    installed_s = await tokens.installed_at(redis, merchant)
    page = await _resume(deps, merchant, report) if in_job else 1
    pages = page
    while page <= pages:
        await _take(deps, merchant, in_job)
        orders, pages, limits = await _list_page(deps, token.access_token, report, page)
        await truth.observe_limits(deps.delivery, merchant, limits)
        report.pages += 1
        report.listed += len(orders)
        for item in orders:
            await _one(deps, merchant, item, installed_s, token, report, backfill, dry_run, in_job)
        if on_page is not None:
            on_page(page, pages)
        page += 1
        if in_job:
            await redis.set(
                _progress_key(merchant),
                json.dumps({"from": report.from_date, "to": report.to_date, "page": page}),
                ex=86400,
            )
    if in_job:
        await redis.delete(_progress_key(merchant))
    log.info("orders_reconciled", **report.as_log(), dry_run=dry_run, backfill=backfill)
    return report


async def _resume(deps: Deps, merchant: int, report: Report) -> int:
    raw = await deps.redis.get(_progress_key(merchant))
    if not raw:
        return 1
    saved = json.loads(raw)
    if (saved.get("from"), saved.get("to")) != (report.from_date, report.to_date):
        return 1
    return max(1, int(saved.get("page", 1)))


async def _take(deps: Deps, merchant: int, in_job: bool) -> None:
    while (wait := await deps.delivery.plan.take(merchant)) > 0:
        if in_job:
            raise Retry(defer=wait)
        await asyncio.sleep(wait)


async def _list_page(
    deps: Deps, access_token: str, report: Report, page: int
) -> tuple[list[dict[str, object]], int, RateLimitInfo]:
    orders, pages, limits = await deps.delivery.salla.orders_page(
        access_token, from_date=report.from_date, to_date=report.to_date, page=page
    )
    return [dict(o) for o in orders], pages, limits


async def _one(
    deps: Deps,
    merchant: int,
    item: dict[str, object],
    installed_s: int | None,
    token: TokenSet,
    report: Report,
    backfill: bool,
    dry_run: bool,
    in_job: bool,
) -> None:
    listed = parse_order(item)
    if not listed.id:
        return
    created_ms = salla_date_ms(item.get("date"))
    before_install = bool(installed_s and created_ms and created_ms < installed_s * 1000)
    if before_install != backfill:
        report.before_install += int(before_install)
        return
    read = await ledger.read_order(deps.redis, merchant, listed.id)
    facts = read.facts
    same = (
        facts.newest is not None
        and facts.status == listed.status
        and to_decimal(facts.total) == listed.total
    )
    if same and not backfill:
        return
    report.differing += 1
    await _take(deps, merchant, in_job)
    fetched = await truth.fetch(deps, merchant, listed.id, token)
    if fetched is None:
        return
    report.fetched += 1
    diffs: list[ledger.Diff] = []
    applied = await truth.apply_fetched(
        deps, merchant, listed.id, fetched, expect=read.version, dry_run=dry_run, diffs=diffs
    )
    if applied.conflict:  # an event of it is being applied right now: the next run looks again
        return
    if diffs:
        report.changed += 1
        report.grants += len(applied.grants)
        report.points += sum(g.signed_points for g in applied.grants)
        report.changes.append(
            {
                "order_id": listed.id,
                "status": listed.status,
                "total": str(listed.total),
                "points": sum(g.signed_points for g in applied.grants),
            }
        )
    if applied.grants and not dry_run:
        await truth.flush_if(deps, merchant, len(applied.grants))
