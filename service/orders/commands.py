"""`salla-rewards orders ...`: reconcile a store's recent orders, or catch up on older ones.

Both run in the foreground with the service's settings (the same environment as `worker`),
wait for the store's plan bucket instead of deferring, and can be run again at any time: an
order the ledger already reflects changes nothing, and nothing is ever credited twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import click
import httpx

from service import state_store
from service.delivery.deps import Deps as DeliveryDeps
from service.errors import RuleError
from service.ids import ID
from service.orders import reconcile, truth
from service.processing import ProcessingDeps
from service.queue import connect, target
from service.rules.reloader import RulesHolder
from service.salla import SallaClient
from service.settings import Settings


@click.group()
def orders() -> None:
    """Compare stores' orders on Salla with the ledger (webhooks Salla gave up on)."""


def _date(_ctx: click.Context, _param: click.Parameter, value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date like 2026-11-30") from None


@orders.command("reconcile")
@click.option("--merchant", type=ID, required=True, help="The store id.")
@click.option(
    "--since",
    callback=_date,
    default=None,
    help="First creation day to look at (default: ORDERS_RECONCILE_DAYS ago).",
)
@click.option("--dry-run", is_flag=True, help="Say what would change; write nothing.")
def reconcile_command(merchant: int, since: dt.date | None, dry_run: bool) -> None:
    """Apply what Salla says of the store's orders since the install that the ledger missed."""
    report = _run(merchant, since=since, backfill=False, dry_run=dry_run)
    _print(report, dry_run=dry_run)


@orders.command("backfill")
@click.option("--merchant", type=ID, required=True, help="The store id.")
@click.option("--since", callback=_date, required=True, help="First creation day, e.g. 2026-01-01.")
@click.option("--apply", "apply_", is_flag=True, help="Grant the points (default: a dry run).")
def backfill_command(merchant: int, since: dt.date, apply_: bool) -> None:
    """Points for orders created before the store installed the app (a dry run by default)."""
    report = _run(merchant, since=since, backfill=True, dry_run=not apply_)
    _print(report, dry_run=not apply_)
    if not apply_ and report.fetched:
        click.echo("dry run: run again with --apply to grant these points")


def _run(
    merchant: int, *, since: dt.date | None, backfill: bool, dry_run: bool
) -> reconcile.Report:
    from service.commandline import redis_url, service_settings

    settings = service_settings()
    try:
        holder = RulesHolder(settings.rules_path)
    except RuleError as exc:
        raise click.ClickException(f"the rules do not load: {exc}") from None
    url = redis_url(settings)

    async def go() -> reconcile.Report:
        async with _deps(settings, url, holder) as deps:
            with click.progressbar(length=1, label=f"store {merchant}: orders pages") as bar:

                def on_page(page: int, pages: int) -> None:
                    bar.length = max(pages, 1)
                    bar.update(1)

                return await reconcile.run_store(
                    deps,
                    merchant,
                    since=since,
                    backfill=backfill,
                    dry_run=dry_run,
                    in_job=False,
                    on_page=on_page,
                )

    return asyncio.run(go())


@asynccontextmanager
async def _deps(settings: Settings, url: str, holder: RulesHolder) -> AsyncIterator[truth.Deps]:
    redis = state_store.text_client(url, cluster=settings.redis_cluster)
    pool = await connect(target(settings, url))
    http = httpx.AsyncClient(timeout=settings.salla_timeout_s)
    try:
        processing = ProcessingDeps(settings, redis, pool, holder)
        delivery = DeliveryDeps(settings, redis, pool, SallaClient(http, settings.salla_api_base))
        yield truth.Deps(processing, delivery)
    finally:
        await http.aclose()
        await pool.aclose()
        await redis.aclose()


def _print(report: reconcile.Report, *, dry_run: bool) -> None:
    if report.unavailable:
        raise click.ClickException(report.unavailable)
    verb = "would change" if dry_run else "changed"
    click.echo(
        f"store {report.merchant}, orders created {report.from_date}..{report.to_date}: "
        f"{report.listed} listed in {report.pages} page(s), {report.differing} differed from "
        f"the ledger, {report.fetched} fetched, {report.changed} {verb} "
        f"({report.points:+d} points in {report.grants} grant(s)); "
        f"{report.before_install} left out (before the install)"
    )
    for change in report.changes:
        click.echo(
            f"  order {change['order_id']}: {change['status']}, total {change['total']}, "
            f"{int(str(change['points'])):+d} points"
        )
