"""Stored webhooks run again through the current rules (`admin replay`, POST /admin/replay).

Without `dry_run` a replay goes through the ledger like any webhook, and so can only add what
the current rules say is still owed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis

from service import body_codec, keys, lua
from service.errors import WebhookError
from service.processing import ProcessingDeps, replay_event

PAGE = 500


# duplicates: a frozen record like sandbox.orders.Status; only the dataclass shape is shared.
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


def _streams(shards: int, merchant: int | None) -> list[str]:
    """The inbox streams holding a store's webhooks (its shard's), or every store's."""
    if merchant is None:
        return keys.webhook_streams(shards)
    return [keys.webhook_stream(keys.inbox_shard(merchant, shards), shards)]


async def stored_webhooks(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None, *, shards: int = 1
) -> AsyncIterator[StoredWebhook]:
    """Webhooks kept for replay: shard by shard (`INBOX_SHARDS`), each in the order it was
    first processed (a store's webhooks are all in one shard, so in order)."""
    for stream in _streams(shards, merchant):
        async for webhook in _stored_in(redis, stream, start_ms, end_ms, merchant):
            yield webhook


async def _stored_in(
    redis: Redis, stream: str, start_ms: int, end_ms: int, merchant: int | None
) -> AsyncIterator[StoredWebhook]:
    cursor = str(start_ms)
    while True:
        # Bodies are binary (service/body_codec.py): read undecoded whatever the client does.
        entries = await redis.execute_command(  # type: ignore[no-untyped-call]
            "XRANGE", stream, cursor, f"({end_ms}", "COUNT", PAGE, NEVER_DECODE=True
        )
        if not entries:
            return
        for raw_id, fields in entries:
            stream_id = raw_id.decode()
            try:
                body = body_codec.decode(fields.get(b"body", b""))
            except ValueError:
                body = fields.get(b"body", b"")  # refused as unreadable by the replay, reported
            webhook = StoredWebhook(
                stream_id=stream_id,
                merchant=int(fields.get(b"merchant", 0)),
                event=fields.get(b"event", b"").decode(),
                delivery=fields.get(b"delivery", b"").decode(),
                body=body,
            )
            if merchant is None or webhook.merchant == merchant:
                yield webhook
        cursor = "(" + entries[-1][0].decode()


# KEYS[1] stream; ARGV: min id, max id (exclusive form allowed), merchant ("" = any), count.
# Returns {entries counted, last id seen} so the caller pages without moving bodies over the wire.
_COUNT_WEBHOOKS = lua.Script("""#!lua flags=no-writes
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
""")


async def count_webhooks(
    redis: Redis, start_ms: int, end_ms: int, merchant: int | None = None, *, shards: int = 1
) -> int:
    """How many stored webhooks a replay of this range would read (counted inside Redis)."""
    total = 0
    for stream in _streams(shards, merchant):
        total += await _count_in(redis, stream, start_ms, end_ms, merchant)
    return total


async def _count_in(
    redis: Redis, stream: str, start_ms: int, end_ms: int, merchant: int | None
) -> int:
    cursor, total = str(start_ms), 0
    while True:
        counted, last = await _COUNT_WEBHOOKS.run(
            redis,
            [stream],
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
    shards = deps.settings.inbox_shards
    async for webhook in stored_webhooks(deps.redis, start_ms, end_ms, merchant, shards=shards):
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


@dataclass
class ReplayTally:
    """Running totals of a replay, as `admin replay` and POST /admin/replay report them."""

    webhooks: int = 0
    #: Webhooks whose replay changes (or would change) the ledger.
    changed: int = 0
    skipped: int = 0
    #: The points those changes add up to.
    points: int = 0
    #: The stream id of the last webhook replayed ("" before the first).
    last: str = ""

    def add(self, line: ReplayLine) -> None:
        self.webhooks += 1
        self.last = line.stream_id
        self.skipped += line.skipped is not None
        if line.diffs:
            self.changed += 1
            self.points += sum(diff["delta"] for diff in line.diffs)
