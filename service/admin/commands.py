"""`salla-rewards admin ...`: what the /admin/ routes answer, straight from the service's Redis.

The commands parse, call `service.admin` and print; stdout carries their output, stderr the
progress and the summary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.commandline import (
    admin_url,
    interruptible,
    json_option,
    operator_settings,
    redis_option,
    with_redis,
    with_redis_and_queue,
)
from service.errors import AdminInputError, RuleError
from service.ids import ID
from service.settings import requested_log_format

if TYPE_CHECKING:
    from arq.connections import ArqRedis
    from redis.asyncio import Redis


@click.group()
def admin() -> None:
    """What the /admin/ routes answer, straight from the service's Redis."""
    from service.logging import configure_logging

    # Only warnings, on stderr: stdout carries the command's own output.
    configure_logging(requested_log_format(), "WARNING")


def _grant_line(g: dict[str, Any]) -> str:
    sent = f"sent {g['sent_at']}" if g["sent_at"] else g["state"]
    batch = f"  batch {g['batch']}" if g["batch"] else ""
    error = f"  ({g['error']})" if g["error"] else ""
    return (
        f"  {g['created_at']}  {g['signed_points']:+d}  customer {g['customer']}  "
        f"rule {g['rule']}  {sent}{batch}{error}  [{g['grant_id']}]"
    )


@admin.command("store")
@click.argument("merchant", type=ID)
@json_option
@redis_option
def admin_store(merchant: int, as_json: bool, redis_url: str | None) -> None:
    """A store's token, queue, rate-limit budget and failed grants."""
    from service.admin import queries

    settings = operator_settings()
    url = admin_url(redis_url)
    state = with_redis(url, lambda r: queries.store_state(r, settings, merchant))
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    token = state["token"]
    click.echo(f"store {merchant}: {state['status']}")
    if token:
        click.echo(
            f"  token valid until {token['valid_until'] or 'unknown'}"
            f" ({token['expires_in_s']} s), refreshable: {token['refreshable']}"
        )
    else:
        click.echo("  no usable token: grants are parked until app.store.authorize")
    queue_ = state["queue"]
    click.echo("  queue  " + "  ".join(f"{k} {v}" for k, v in queue_.items()))
    limit = state["rate_limit"]
    click.echo(
        f"  rate limit  {limit['available']:g} of {limit['capacity']} available"
        + (f", blocked for {limit['blocked_for_s']:g} s" if limit["blocked_for_s"] else "")
    )
    for grant in state["failed_grants"]:
        click.echo(_grant_line(grant))


# duplicates: `order` and `customer` are alike in shape (arguments, options, one view, JSON or
# lines); each prints its own view.
@admin.command("order")
@click.argument("merchant", type=ID)
@click.argument("order_id", type=ID)
@json_option
@redis_option
def admin_order(merchant: int, order_id: int, as_json: bool, redis_url: str | None) -> None:
    """The ledger for one order: each rule's points, and every grant with its batch."""
    from service.admin import queries

    url = admin_url(redis_url)
    view = with_redis(url, lambda r: queries.order_ledger(r, merchant, order_id))
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False))
    elif not view["found"]:
        click.echo(f"order {order_id} of store {merchant}: nothing in the ledger")
    else:
        click.echo(f"order {order_id} of store {merchant}: {view['granted']:+d} points granted")
        for scope in view["scopes"]:
            click.echo(f" {scope['scope']} (customer {scope['customer']})")
            for rule, record in scope["rules"].items():
                click.echo(
                    f"  rule {rule}: granted {record['granted']:+d}, deserves "
                    f"{record['deserved']:+d}  {record['reason']!r}"
                )
            for grant in scope["grants"]:
                click.echo(_grant_line(grant))
    if not view["found"]:
        sys.exit(1)


# duplicates: alike in shape to `order` (see there).
@admin.command("customer")
@click.argument("merchant", type=ID)
@click.argument("customer_id", type=ID)
@json_option
@redis_option
def admin_customer(merchant: int, customer_id: int, as_json: bool, redis_url: str | None) -> None:
    """One customer's grants, newest first, with totals by state."""
    from service.admin import queries

    url = admin_url(redis_url)
    view = with_redis(url, lambda r: queries.customer_ledger(r, merchant, customer_id))
    if as_json:
        click.echo(json.dumps(view, indent=2, ensure_ascii=False))
        return
    totals = ", ".join(f"{k} {v:+d}" for k, v in view["points_by_state"].items()) or "none"
    click.echo(f"customer {customer_id} of store {merchant}: {totals}")
    for grant in view["grants"]:
        click.echo(_grant_line(grant))


_since = click.option("--since", default=None, help="From this date or ISO time (UTC).")
_until = click.option(
    "--until", default=None, help="Up to this time; a date includes the whole day. Default now."
)


def _range(since: str | None, until: str | None) -> tuple[int, int]:
    from service.admin.times import time_range

    try:
        return time_range(since, until)
    except AdminInputError as exc:
        raise click.BadParameter(str(exc)) from None


@admin.command("export")
@_since
@_until
@click.option("--merchant", type=ID, default=None, help="One store only.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write here (atomically: the file appears only when complete). Default: stdout.",
)
@redis_option
def admin_export(
    since: str | None,
    until: str | None,
    merchant: int | None,
    fmt: str,
    output: Path | None,
    redis_url: str | None,
) -> None:
    """Export the ledger's grants created in a date range, as JSONL or CSV."""
    from service.admin import export as exporting

    start, end = _range(since, until)
    url = admin_url(redis_url)
    target = exporting.AtomicFile(output) if output else None

    async def write(redis: Redis) -> int | None:
        total = await exporting.count_grants(redis, start, end)
        out = target.open() if target else sys.stdout
        try:
            with interruptible() as stop:
                if fmt == "csv":
                    out.write(exporting.csv_header())
                with click.progressbar(
                    length=total, label="exporting", file=sys.stderr if target else None
                ) as bar:
                    return await exporting.write_rows(
                        redis, out, start, end, merchant=merchant, fmt=fmt, stop=stop,
                        advance=bar.update,
                    )  # fmt: skip
        finally:
            if target:
                out.close()

    written = with_redis(url, write)
    if written is None:
        if target:
            target.discard()
        click.echo("\ninterrupted: no file was written" if target else "\ninterrupted", err=True)
        sys.exit(130)
    if target:
        target.commit()
    click.echo(f"{written} grant(s) exported" + (f" to {output}" if output else ""), err=True)


@admin.command("replay")
@_since
@_until
@click.option("--merchant", type=ID, default=None, help="One store only.")
@click.option(
    "--apply",
    is_flag=True,
    help="Send the differences (through the ledger). Without it: a dry run that only shows them.",
)
@redis_option
def admin_replay(
    since: str | None,
    until: str | None,
    merchant: int | None,
    apply: bool,
    redis_url: str | None,
) -> None:
    """Run stored webhooks through the current rules and show (or send) what differs.

    Ctrl-C stops between two webhooks; run the same command again to finish (what was already
    applied is not applied twice).
    """
    from service.admin import replay as replaying
    from service.processing import ProcessingDeps
    from service.rules import load_rules

    settings = operator_settings()
    try:
        ruleset = load_rules(settings.rules_path)
    except RuleError as exc:
        raise click.ClickException("rules are invalid:\n" + str(exc)) from None
    start, end = _range(since, until)
    url = admin_url(redis_url)
    tally = replaying.ReplayTally()

    async def go(redis: Redis, pool: ArqRedis) -> bool:
        """True when the whole range was replayed; False when Ctrl-C stopped it."""
        deps = ProcessingDeps(settings, redis, pool, ruleset)
        total = await replaying.count_webhooks(
            redis, start, end, merchant, shards=settings.inbox_shards
        )
        with (
            interruptible() as stop,
            click.progressbar(
                length=total,
                label="replaying" if apply else "replaying (dry run)",
                file=sys.stderr,
            ) as bar,
        ):
            async for line in replaying.replay(
                deps, start, end, merchant=merchant, dry_run=not apply
            ):
                bar.update(1)
                tally.add(line)
                if line.skipped is not None:
                    click.echo(
                        f"{line.stream_id}  store {line.merchant}  {line.event}  "
                        f"skipped: {line.skipped}"
                    )
                if not line.diffs:
                    continue
                for diff in line.diffs:
                    click.echo(
                        f"{line.stream_id}  store {line.merchant}  {line.event}  "
                        f"{diff['scope']}  rule {diff['rule']}  customer {diff['customer']}  "
                        f"{diff['granted_before']:+d} -> {diff['granted_after']:+d} "
                        f"({diff['delta']:+d})"
                    )
                if stop.is_set():
                    return False
        return True

    if not with_redis_and_queue(url, go):
        click.echo(
            f"\ninterrupted after {tally.webhooks} webhook(s), last {tally.last or 'none'}; "
            "run the same command again to finish",
            err=True,
        )
        sys.exit(130)
    verb = "applied" if apply else "would apply (dry run; --apply sends them)"
    skipped = f"; {tally.skipped} skipped (not readable)" if tally.skipped else ""
    click.echo(
        f"{tally.webhooks} webhook(s) replayed; {tally.changed} differ; "
        f"{verb} {tally.points:+d} point(s){skipped}",
        err=True,
    )
