"""Every command the service sends the state store is valid on a Redis Cluster: one slot each.

The state store here is a real valkey-server (the embedded Valkey 8.1) in cluster mode that
owns all 16384 slots, so every key is local and a plain `redis.asyncio` client reaches it. What
such a node still refuses, even owning every slot (`TestTheServerRefuses` checks each, so a
server that stopped refusing fails here first):

* a command whose keys are in two slots (MGET, SUNION, EVAL naming keys of two slots):
  `CROSSSLOT`;
* a MULTI/EXEC whose commands touch two slots: `CROSSSLOT`;
* a script starting `#!lua` that touches a key of another slot than the first it touched
  (declared in KEYS or not): "Script attempted to access keys that do not hash to the same
  slot".

What it does not refuse, so these tests guard it another way:

* a script *without* `#!lua` may touch keys of any slot its node owns (Valkey keeps this for
  old scripts): every script of service/ starts `#!lua` (`TestScripts`, read from the source);
* `EVAL script 0` (no key named): fine on one node, but a cluster client sends it to any node.
  The client these tests drive the service with records each command it sends (its
  connection class; the commands still go to the server), and every EVAL and EVALSHA must
  name a key (and every script sent, by EVAL or SCRIPT LOAD, start `#!lua`);
* a MULTI/EXEC in one slot is valid on a cluster, but redis-py's cluster client cannot send
  one: none may be sent at all;
* SCAN and KEYS read one node of a cluster: this server refuses both (an ACL), so a reader
  that finds stores by scanning fails.

The service is driven through its own functions, as the ledger, delivery, token, admin and
archive tests drive it, and the results are asserted as they are there.
"""

from __future__ import annotations

import ast
import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from redis.asyncio import Connection, Redis
from redis.crc import key_slot
from redis.exceptions import NoPermissionError, ResponseError

from service import keys, ledger, lifecycle, lua, queue, sweeper, tokens
from service.admin import archive, export
from service.delivery.deps import Deps
from service.delivery.ratelimit import RateLimiter
from service.embedded import EmbeddedRedis
from service.ledger import compact
from service.processing import ProcessingDeps, apply_rules
from service.rules import parse_rules_text
from service.salla import SallaClient, TokenSet
from service.webhooks import event_time, parse_envelope
from tests.conftest import make_settings
from tests.support.order_bodies import order_body
from tests.support.servers import free_port

M, OTHER = 7_300_001, 7_300_002
CUSTOMER = 900_031
DAY_MS = 86_400_000
SERVICE = Path(__file__).parent.parent / "service"
#: Scripts not yet `#!lua`, each with why (remove a line when its script gains the line).
NOT_YET_SHEBANG: dict[tuple[str, str], str] = {}
# duplicates: rule files as test data, like test_compaction's (each file reads alone).
RULES = """
version: 1
rules:
  - id: purchase
    on: [order.created, order.updated, order.status.updated]
    when: order.completed_once
    points: order.total / 10
    type: plus
    reason: "order {order.reference_id}"
    channels: [sms]
    caps: {per_customer_per_day: 1000}
  - id: first_order
    on: [order.status.updated]
    when: order.completed_once
    once_per: customer
    points: 50
    type: plus
    reason: "first order bonus"
"""


class Recording(Connection):
    """A connection that notes every command it sends (then sends it)."""

    sent: ClassVar[list[tuple[Any, ...]]] = []

    def pack_command(self, *args: Any) -> list[bytes]:
        Recording.sent.append(args)
        return super().pack_command(*args)


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A valkey-server in cluster mode owning every slot; SCAN and KEYS refused (ACL)."""
    folder = tmp_path_factory.mktemp("cluster-node")
    options = (
        *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
        *("--cluster-config-file", str(folder / "nodes.conf")),
        *("--user", "default", "on", "nopass", "~*", "&*", "+@all", "-scan", "-keys"),
    )
    server = EmbeddedRedis(folder, free_port(), extra_args=options)
    url = server.start()
    try:
        asyncio.run(_own_every_slot(url))
        yield url
    finally:
        server.stop()


async def _own_every_slot(url: str) -> None:
    client = Redis.from_url(url, decode_responses=True)
    try:
        await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        for _ in range(500):
            if "cluster_state:ok" in await client.execute_command("CLUSTER", "INFO"):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the node did not reach cluster_state:ok")
    finally:
        await client.aclose()


@pytest.fixture
async def state(cluster_node: str) -> AsyncIterator[Redis]:
    """The state store as the service's client, every command it sends recorded and checked
    after the test: no MULTI, and every script names a key and starts `#!lua`."""
    client = Redis.from_url(cluster_node, decode_responses=True, connection_class=Recording)
    await client.flushall()
    await client.script_flush()  # so each test's first commit loads it (and is recorded)
    Recording.sent.clear()
    yield client
    await client.aclose()
    for args in Recording.sent:
        name = str(args[0]).upper()
        assert name not in {"MULTI", "EXEC", "WATCH"}, f"a transaction was sent: {args[:3]}"
        if name in {"EVAL", "SCRIPT LOAD"}:
            assert str(args[1]).startswith("#!lua"), f"a script without #!lua: {args[1][:60]!r}"
        if name in {"EVAL", "EVALSHA"}:
            named = [str(k) for k in args[3 : 3 + int(args[2])]]
            assert named, f"a script naming no key: {str(args[1])[:60]!r}"
            assert len({key_slot(k.encode()) for k in named}) == 1, named


class Store:
    """One store's order events through the real processing path, on the cluster node."""

    def __init__(self, deps: ProcessingDeps, merchant: int) -> None:
        self.deps = deps
        self.merchant = merchant
        self.arrival = 0

    async def event(self, event: str, order_id: int, status: str, total: int, at: int) -> Any:
        self.arrival += 1
        raw = order_body(
            event, self.merchant, order_id, status, total, at, customer=CUSTOMER, history=at
        )
        env = parse_envelope(raw)
        arrival = (int(event_time(env.created_at) or 0) * 1000 + self.arrival, 0)
        return await apply_rules(self.deps, env, f"d{self.arrival}", "t", arrival=arrival)

    async def complete(self, order_id: int, total: int, at: int) -> None:
        await self.event("order.created", order_id, "under_review", total, at)
        await self.event("order.status.updated", order_id, "completed", total, at + 1)

    async def claim(self, *, timeout_ms: int = 60_000) -> list[ledger.Grant]:
        redis, merchant = self.deps.redis, self.merchant
        claim = await ledger.claim_due(
            redis, merchant, limit=100, claim_timeout_ms=timeout_ms, token="t"
        )
        return claim.grants

    async def send(self, grants: list[ledger.Grant]) -> list[ledger.Grant]:
        return await ledger.mark_sending(self.deps.redis, self.merchant, grants, "b", token="t")


@pytest.fixture
async def stores(state: Redis, redis_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores in different index shards and slots; arq's queue on a Redis of its own (arq
    sends MULTI, and the queue is never a cluster)."""
    pool = await queue.connect(redis_url)
    deps = ProcessingDeps(make_settings(), state, pool, parse_rules_text(RULES))
    yield Store(deps, M), Store(deps, OTHER)
    await pool.aclose()


def archived(directory: Path) -> list[dict[str, Any]]:
    files = sorted(directory.glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


NOW = int(time.time())
T0 = NOW - 90 * 86400  # when the orders happened
LATER = NOW + 30 * 86400  # past every window and the compaction queue's first look


class TestTheServerRefuses:
    """What a cluster-mode node owning every slot refuses, and what it lets through."""

    async def test_keys_of_two_slots_in_one_command(self, state: Redis) -> None:
        with pytest.raises(ResponseError, match="CROSSSLOT"):
            await state.mget(["{a}x", "{b}x"])
        with pytest.raises(ResponseError, match="CROSSSLOT"):
            await state.eval("#!lua\nreturn 1", 2, "{a}x", "{b}x")
        assert await state.mget(["{a}x", "{a}y"]) == [None, None], "one slot is fine"
        Recording.sent.clear()  # the script naming two slots was this test's own

    async def test_a_transaction_across_slots(self, state: Redis) -> None:
        pipe = state.pipeline(transaction=True)
        pipe.set("{a}x", 1)
        pipe.set("{b}x", 1)
        with pytest.raises(ResponseError, match="CROSSSLOT"):
            await pipe.execute()
        Recording.sent.clear()  # the transaction was this test's own

    async def test_a_lua_script_reaching_into_another_slot(self, state: Redis) -> None:
        reach = "#!lua\nredis.call('SET', '{b}x', '1') return 1"
        with pytest.raises(ResponseError, match="do not hash to the same slot"):
            await state.eval(reach, 1, "{a}x")
        with pytest.raises(ResponseError, match="do not hash to the same slot"):
            await state.eval(reach.replace("return", "redis.call('SET', '{a}x', '1') return"), 0)
        Recording.sent.clear()  # these scripts name no key on purpose

    async def test_but_not_an_old_script_without_the_lua_line(self, state: Redis) -> None:
        """Why every script starts `#!lua`: without it, the node runs this."""
        assert await state.eval("redis.call('SET', '{b}x', '1') return 1", 1, "{a}x") == 1
        Recording.sent.clear()

    async def test_scan_and_keys(self, state: Redis) -> None:
        with pytest.raises(NoPermissionError):
            await state.scan(0)
        with pytest.raises(NoPermissionError):
            await state.keys("*")


class TestScripts:
    def test_every_script_of_the_service_starts_with_the_lua_line(self) -> None:
        """Read from the source: every module-level string holding `redis.call`."""
        found, missing = [], []
        for path in sorted(SERVICE.rglob("*.py")):
            if "sandbox" in path.parts:
                continue
            for node in ast.parse(path.read_text()).body:
                value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
                if isinstance(value, ast.Call) and getattr(value.func, "attr", "") == "Script":
                    value = value.args[0]  # lua.Script("""...""")
                if not isinstance(value, ast.Constant) or not isinstance(value.value, str):
                    continue
                if "redis.call(" not in value.value:
                    continue
                target = node.targets[0] if isinstance(node, ast.Assign) else node.target  # type: ignore[union-attr]
                name = (path.name, getattr(target, "id", ""))
                found.append(name)
                if not value.value.startswith("#!lua") and name not in NOT_YET_SHEBANG:
                    missing.append(name)
        assert len(found) >= 15, found
        assert missing == []
        assert set(NOT_YET_SHEBANG) <= set(found), "an exception names a script that is gone"

    async def test_a_script_goes_by_its_sha_and_again_to_a_server_that_forgot_it(
        self, redis: Redis
    ) -> None:
        script = lua.Script("#!lua\nreturn redis.call('INCR', KEYS[1])")
        stats = await redis.info("commandstats")
        before = int(stats.get("cmdstat_eval", {}).get("calls", 0))
        assert await script.run(redis, ["n"]) == 1  # the server lacks it: the body, once
        assert await script.run(redis, ["n"]) == 2
        await redis.script_flush()  # a restart, or a replica promoted
        assert await script.run(redis, ["n"]) == 3
        stats = await redis.info("commandstats")
        assert int(stats["cmdstat_eval"]["calls"]) - before == 2
        with pytest.raises(ValueError, match="#!lua"):
            lua.Script("return 1")


class TestLedgerOnOneSlotPerCommand:
    """The ledger's whole path against the cluster node, results as the ledger tests assert."""

    async def test_orders_and_every_grant_transition(
        self, stores: tuple[Store, Store], state: Redis
    ) -> None:
        store, other = stores
        assert keys.index_shard(M) != keys.index_shard(OTHER)
        assert key_slot(keys.entry(M, "x").encode()) != key_slot(keys.entry(OTHER, "x").encode())
        await store.complete(1, 154, T0)
        await other.complete(1, 99, T0)
        assert await ledger.stores_with_work(state) == [M, OTHER]
        pending = await ledger.grants_in(state, "pending", M)
        assert sorted((g.rule, g.points) for g in pending) == [
            ("first_order", 50),
            ("purchase", 15),
        ]

        grants = await store.claim()
        assert len(await store.send(grants)) == 2
        await ledger.unsend(state, grants)  # a 422 for the whole call
        assert {g.state for g in await ledger.load(state, [g.id for g in grants])} == {"claimed"}
        first, second = await store.send(grants)
        await ledger.finish(state, M, [first], "sent")
        await ledger.release(state, M, [second], ledger.now_ms(), "429", isolate=True)
        [second] = await store.claim()
        await ledger.park(state, M, [second], "no token")
        assert await ledger.stores_with(state, "parked") == [M]
        assert await ledger.unpark(state, M) == 1
        [second] = await store.send(await store.claim())
        await ledger.finish(state, M, [second], "unknown")
        assert await ledger.stores_with_unknown(state) == [M]
        [second] = await ledger.unknown_since(state, M, ledger.now_ms() + 1)
        await ledger.resolve_unknown(state, M, [second], "review", "no marker")
        assert await ledger.stores_with(state, "review") == [M]
        assert await ledger.requeue(state, M, second, "review")
        assert not await ledger.requeue(state, M, second, "review"), "moved already"
        [second] = await store.send(await store.claim())
        await ledger.finish(state, M, [second], "failed", "422")
        assert await ledger.stores_with(state, "failed") == [M]
        assert await ledger.requeue(state, M, second, "failed")
        [second] = await store.send(await store.claim())
        await ledger.finish(state, M, [second], "unknown")
        await ledger.resolve_unknown(state, M, [second], "sent", "found in history")
        done = await ledger.load(state, [first.id, second.id])
        assert [g.state for g in done] == ["sent", "sent"]
        assert await ledger.stores_with(state, "failed") == []  # listed, but its set is empty
        await ledger.forget_unknown_store_if_empty(state, M)
        assert await ledger.stores_with_unknown(state) == []

        stale = await other.claim(timeout_ms=-1)  # a dead worker's claims
        await ledger.mark_sending(state, OTHER, stale[:1], "b", token="t", call_timeout_ms=-1)
        assert await ledger.sweep_claims(state, OTHER) == (1, 1)
        assert await ledger.stores_with_unknown(state) == [OTHER]
        assert len(await ledger.verifying_overdue(state, OTHER)) == 0
        await ledger.extend_claims(state, OTHER, stale, 1000)
        for _ in range(2):
            await ledger.forget_store_if_idle(state, M, at_ms=ledger.now_ms() + 120_000)
        assert await ledger.stores_with_work(state) == [OTHER]
        assert await ledger.due_count(state, OTHER) == 1
        gauges = await ledger.store_gauges(state, OTHER)
        assert gauges["pending"] == 1
        loaded = [a[1] for a in Recording.sent if str(a[0]).upper() == "SCRIPT LOAD"]
        assert len(loaded) == 1, "the commit's script, loaded once and checked at teardown"

    async def test_the_sweeps_rotation_cursor_and_gauges(
        self, stores: tuple[Store, Store], state: Redis
    ) -> None:
        """The sweep's cycle (service/sweeper.py): its cursor is one key on its own, each
        shard's gauges one key of the shard's slot; one store a cycle reaches both."""
        store, other = stores
        await store.complete(1, 154, T0)
        await other.complete(1, 99, T0)
        pool = store.deps.pool
        await pool.delete("arq:queue")  # the flushes processing queued: the sweep's to remake

        async def flushes() -> set[int]:
            jobs = [j.decode() for j in await pool.zrange("arq:queue", 0, -1)]
            return {int(j.split(":")[1]) for j in jobs if j.startswith("flush:")}

        async with httpx.AsyncClient() as http:
            settings = make_settings(sweep_stores_per_cycle=1)
            deps = Deps(settings, state, pool, SallaClient(http, settings.salla_api_base))
            assert (await sweeper.visit_stores(deps)).stores == 1
            assert await flushes() == {M}
            assert (await sweeper.visit_stores(deps)).stores == 1
            assert await flushes() == {M, OTHER}
        counted = await state.hgetall(keys.sweep_gauges(keys.index_shard(OTHER)))
        assert float(counted["pending"]) == 2
        assert await state.hget(keys.SWEEP_CURSOR, "shard") == str(keys.index_shard(OTHER) + 1)

    async def test_compaction_retirement_and_a_late_cancel(
        self, stores: tuple[Store, Store], state: Redis
    ) -> None:
        store, other = stores
        for one in (store, other):
            await one.complete(2, 154, T0)
            await ledger.finish(state, one.merchant, await one.send(await one.claim()), "sent")
        done = await compact.compact_due_stores(state, LATER * 1000, 400)
        assert (done.stores, done.compacted) == (2, 2)
        assert await ledger.entry(state, M, "order:2") == {"purchase": 15}
        await store.event("order.status.updated", 2, "canceled", 154, LATER)
        reversals = await ledger.grants_in(state, "pending", M)
        assert sorted(g.signed_points for g in reversals) == [-50, -15]
        retire_at = (LATER + 420 * 86400) * 1000
        assert (await compact.compact_store(state, OTHER, retire_at, 400)).retired == 1
        assert (await ledger.read_order(state, OTHER, 2)).stored.retired

    async def test_grant_log_export_trim_and_archive(
        self, stores: tuple[Store, Store], state: Redis, tmp_path: Path
    ) -> None:
        made = []
        for one in stores:
            await one.complete(3, 154, T0)
            grants = await one.send(await one.claim())
            await ledger.finish(state, one.merchant, grants, "sent")
            made += grants
        start, end = ledger.now_ms() - DAY_MS, ledger.now_ms() + DAY_MS
        assert await export.count_grants(state, start, end) == 4
        rows = [row async for row in export.export_grants(state, start, end)]
        assert sorted(r["grant_id"] for r in rows) == sorted(g.id for g in made)
        assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
        mine = [row async for row in export.export_grants(state, start, end, merchant=OTHER)]
        assert {r["merchant"] for r in mine} == {OTHER}
        assert await ledger.trim_grant_log(state) == 0
        later = ledger.now_ms() + (archive.ARCHIVE_AFTER_DAYS + 1) * DAY_MS
        assert await archive.archive_due(state, tmp_path, later) == 4
        lines = archived(tmp_path)
        assert sorted(x["grant_id"] for x in lines) == sorted(g.id for g in made)
        assert await ledger.load(state, [g.id for g in made]) == []
        assert await export.count_grants(state, start, end) == 0


class TestStoresOnOneSlotPerCommand:
    async def test_tokens_settings_and_rate_limits(self, state: Redis) -> None:
        fresh = TokenSet("access", "refresh", int(time.time()) + 60, "scope")
        for merchant in (M, OTHER):
            await tokens.save(state, merchant, fresh)
            await tokens.note_install_time(state, merchant, 1_700_000_000)
            assert await tokens.lifecycle_is_current(state, merchant, 1_700_000_000.0)
        assert await tokens.authorized_stores(state) == [M, OTHER]
        assert [m for m, _ in await tokens.expiring(state, 3600)] == [M, OTHER]
        await tokens.revoke(state, M, "uninstalled")
        assert await tokens.get(state, M) is None
        assert await tokens.authorized_stores(state) == [OTHER]
        assert await tokens.installed_at(state, M) == 1_700_000_000

        await state.set(keys.settings(M), json.dumps({"multiplier": 2}))
        many = await lifecycle.store_settings_many(state, {M, OTHER})
        assert many == {M: {"multiplier": 2}, OTHER: {}}

        per_store = RateLimiter(state, 2, 60)
        plan = RateLimiter(state, 100, 60, name="rl-plan", resize=True)
        assert await per_store.take(M, also=plan) == 0
        assert await per_store.take(M, also=plan) == 0
        assert await per_store.take(M, also=plan) > 0, "the store's bucket is empty"
        await plan.observe(M, remaining=0, limit=100)
