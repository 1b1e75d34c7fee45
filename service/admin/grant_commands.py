"""`salla-rewards grants ...` and `salla-rewards campaign`: look at grants, send them again,
grant points to many customers. The commands parse, call `service.admin` and print."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from service.commandline import (
    admin_url,
    exit_if_interrupted,
    redis_option,
    step_by_step,
    with_redis,
    with_redis_and_queue,
)
from service.errors import AdminInputError
from service.ids import ID, WHAT_AN_ID_IS

if TYPE_CHECKING:
    from arq.connections import ArqRedis
    from redis.asyncio import Redis

#: The states `grants failed --state` lists; all but "pending" can be retried.
GRANT_KINDS = ("failed", "review", "unknown", "parked", "pending")


@click.group()
def grants() -> None:
    """Inspect and retry grants (failed, in review, unknown outcome, parked)."""


@grants.command("failed")
@click.option("--merchant", type=ID, default=None, help="One store only.")
@click.option(
    "--state", "kind", type=click.Choice(GRANT_KINDS), default="failed", show_default=True
)
@redis_option
def grants_failed(merchant: int | None, kind: str, redis_url: str | None) -> None:
    """List grants in a state, with the reason each is there."""
    from service.admin import grants as granting

    url = admin_url(redis_url)
    found = with_redis(url, lambda redis: granting.in_state(redis, kind, merchant))
    for grant in found:
        click.echo(
            f"{grant.id}  store {grant.merchant}  customer {grant.customer}  "
            f"{grant.type} {grant.points}  rule {grant.rule}  {grant.reason!r}  "
            f"{grant.error}"
        )
    click.echo(f"{len(found)} {kind} grant(s)")


@grants.command("retry")
@click.argument("grant_ids", nargs=-1)
@click.option("--merchant", type=ID, default=None, help="Every grant of this store in --state.")
@click.option(
    "--state", "kind", type=click.Choice(GRANT_KINDS[:-1]), default="failed", show_default=True
)
@redis_option
def grants_retry(
    grant_ids: tuple[str, ...], merchant: int | None, kind: str, redis_url: str | None
) -> None:
    """Send grants again: the given GRANT_IDS, or all of --merchant in --state.

    Each grant moves back to pending atomically, so Ctrl-C leaves nothing half-done.
    """
    from service.admin import grants as granting

    if not grant_ids and merchant is None:
        raise click.UsageError("name grant ids, or --merchant for all of a store's grants")
    url = admin_url(redis_url)

    # duplicates: the shape of `campaign`'s run; both are service.commandline's Ctrl-C-safe
    # loop around a different unit of work (only the calls' shape is shared).
    async def retry(redis: Redis, pool: ArqRedis) -> tuple[int, bool]:
        chosen = await granting.chosen(redis, grant_ids, kind, merchant)
        return await step_by_step(
            chosen,
            f"retrying {len(chosen)} grant(s)",
            lambda grants, stop: granting.retry(redis, pool, grants, kind, stop),
        )

    moved, interrupted = with_redis_and_queue(url, retry)
    click.echo(f"{moved} grant(s) queued again")
    exit_if_interrupted(interrupted, "run the same command again for the rest")


@click.command()
@click.option("--merchant", type=ID, required=True)
@click.option(
    "--points",
    type=click.IntRange(1, 999_999),
    default=None,
    help="Points per customer (not with --reset).",
)
@click.option("--reason", required=True, help="Shown to customers; also names the campaign.")
@click.option(
    "--type", "grant_type", type=click.Choice(["plus", "minus"]), default="plus", show_default=True
)
@click.option("--channels", default="", help="Comma-separated: email,sms,mobile.")
@click.option(
    "--customers",
    "customers_file",
    type=click.Path(exists=True, path_type=Path),
    help="A file with one customer id per line (CSV: the first column).",
)
@click.option("--all", "everyone", is_flag=True, help="Every customer of the store (select_all).")
@click.option(
    "--reset", is_flag=True, help="Reset the customers' points (Salla's reset flag) instead."
)
@click.option(
    "--id",
    "campaign_id",
    default=None,
    help="Campaign id; running the same id again grants nothing twice.",
)
@redis_option
def campaign(
    merchant: int,
    points: int | None,
    reason: str,
    grant_type: str,
    channels: str,
    customers_file: Path | None,
    everyone: bool,
    reset: bool,
    campaign_id: str | None,
    redis_url: str | None,
) -> None:
    """Grant points to many customers through the ledger, batching and rate limits.

    With --reset the customers' points are reset instead; the ledger records the reset once
    but does not model balances, so reversals of earlier grants can still follow it.
    """
    from service.admin import campaigns

    if everyone == bool(customers_file):
        raise click.UsageError("give exactly one of --all or --customers FILE")
    if reset == (points is not None):
        raise click.UsageError("give --points N to grant, or --reset to reset (not both)")
    try:
        chosen = campaigns.plan(
            merchant,
            reason=reason,
            points=points,
            grant_type=grant_type,
            channels=tuple(c for c in channels.split(",") if c),
            everyone=everyone,
            reset=reset,
            campaign_id=campaign_id,
        )
    except AdminInputError as exc:
        raise click.UsageError(str(exc)) from None
    ids: list[int] = [0]  # a store-wide campaign is one grant, recorded for customer 0
    if customers_file:
        ids, skipped = campaigns.customer_ids(customers_file.read_text())
        if not ids:
            raise click.ClickException(f"{customers_file}: no customer ids found")
        if skipped:  # a CSV header, or ids in other digits: say so, go on
            click.echo(
                f"{customers_file}: {skipped} line(s) without a customer id in "
                f"the first column ({WHAT_AN_ID_IS}) skipped",
                err=True,
            )
    url = admin_url(redis_url)

    # duplicates: the shape of `grants retry`'s run (see there).
    async def grant_all(redis: Redis, pool: ArqRedis) -> tuple[int, bool]:
        return await step_by_step(
            ids,
            f"campaign {chosen.name}: {len(ids)} grant(s)",
            lambda customers, stop: campaigns.grant(redis, pool, chosen, customers, stop),
        )

    made, interrupted = with_redis_and_queue(url, grant_all)
    click.echo(f"campaign {chosen.name}: {made} new grant(s) queued for store {merchant}")
    exit_if_interrupted(
        interrupted, f"run the same command (campaign id {chosen.name}) again for the rest"
    )
