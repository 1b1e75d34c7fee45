"""Grant records past their retention leave Redis through JSONL files, each line once."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
from redis.asyncio import Redis

from service import keys, ledger
from service.admin import archive
from service.admin.export import export_line
from service.admin.queries import grant_view
from tests.support.outcomes import grant_outcome

M = 7_200_001
DAY_MS = 86_400_000


async def sent_grants(redis: Redis, orders: int) -> list[ledger.Grant]:
    """One grant per order, walked through claim → sending → sent."""
    for order in range(1, orders + 1):
        await ledger.apply_outcomes(
            redis, M, [grant_outcome(10 + order, scope=f"order:{order}")], customer=5,
            order_id=order,
        )  # fmt: skip
    claim = await ledger.claim_due(redis, M, limit=1000, claim_timeout_ms=60_000, token="t")
    await ledger.mark_sending(redis, M, claim.grants, "b", token="t")
    await ledger.finish(redis, M, claim.grants, "sent")
    return claim.grants


def archived(directory: Path) -> list[dict[str, object]]:
    files = sorted(directory.glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def dead_batch(path: Path, lines: str) -> int:
    """An earlier batch's line in the file, then a dead run's lines (the last one torn);
    returns the length the dead run noted before writing."""
    path.write_text('{"grant_id": "from an earlier batch"}\n')
    before = path.stat().st_size
    with path.open("a") as out:
        out.write(lines[:-30])
    return before


LATER = ledger.now_ms() + 85 * DAY_MS  # past ARCHIVE_AFTER_DAYS


class TestArchive:
    """Settled grants past retention are in a file before they leave Redis."""

    async def test_due_grants_go_to_a_day_file_and_leave_redis(
        self, redis: Redis, tmp_path: Path
    ) -> None:
        grants = await sent_grants(redis, 3)
        assert await archive.archive_due(redis, tmp_path, ledger.now_ms()) == 0  # too young
        assert await archive.archive_due(redis, tmp_path, LATER) == 3
        lines = archived(tmp_path)
        assert sorted(x["grant_id"] for x in lines) == sorted(g.id for g in grants)
        assert {x["state"] for x in lines} == {"sent"}
        assert names(tmp_path) == [archive.day_file(tmp_path, grants[0].created_ms).name]
        assert await ledger.load(redis, [g.id for g in grants]) == []
        assert await redis.zcard(keys.grant_log(keys.index_shard(M))) == 0
        assert await archive.archive_due(redis, tmp_path, LATER) == 0  # nothing twice
        assert len(archived(tmp_path)) == 3

    async def test_an_unsettled_grant_stays_in_redis(self, redis: Redis, tmp_path: Path) -> None:
        await ledger.apply_outcomes(redis, M, [grant_outcome(7)], customer=5, order_id=1)
        assert await archive.archive_due(redis, tmp_path, LATER) == 0
        assert archived(tmp_path) == []
        assert len(await ledger.grants_in(redis, "pending", M)) == 1

    async def test_a_batch_cut_short_after_writing_is_written_once(
        self, redis: Redis, tmp_path: Path
    ) -> None:
        """What a process killed between the fsync and the delete leaves: its lines in the
        file, its note in Redis, the records still there. The next run writes each once."""
        grants = await sent_grants(redis, 2)
        path = archive.day_file(tmp_path, grants[0].created_ms)
        docs = [await redis.hgetall(keys.grant(g.id)) for g in grants]  # type: ignore[misc]
        before = dead_batch(path, "".join(export_line(grant_view(d), "jsonl") for d in docs))
        intent = keys.archive_intent(keys.index_shard(M))
        await redis.set(intent, orjson.dumps({str(path): before}))
        assert await archive.archive_due(redis, tmp_path, LATER) == 2
        lines = archived(tmp_path)
        assert [x["grant_id"] for x in lines].count("from an earlier batch") == 1
        assert sorted(x["grant_id"] for x in lines[1:]) == sorted(g.id for g in grants)
        assert not await redis.exists(intent)

    async def test_one_archiver_at_a_time(self, redis: Redis, tmp_path: Path) -> None:
        await sent_grants(redis, 1)
        await redis.set(keys.ARCHIVE_LOCK, "another worker")
        assert await archive.archive_due(redis, tmp_path, LATER) == 0
        assert await redis.get(keys.ARCHIVE_LOCK) == "another worker"
        await redis.delete(keys.ARCHIVE_LOCK)
        assert await archive.archive_due(redis, tmp_path, LATER) == 1
