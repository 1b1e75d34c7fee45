"""The local Valkey Cluster the tests run on, and the cluster rules the state's code must keep.

What the server refuses here (scripts and transactions over keys of several slots) is the
guard the cluster-safe code relies on: a store's keys share its hash tag `{m:<merchant>}`, so a
script or transaction over one store's keys runs, and one over two stores' keys is refused.
The failover check (a master killed, its replica promoted, nothing acknowledged by `WAIT 1`
lost) kills a node: it runs in `make chaos` on a cluster of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from service import keys
from tests.support.valkey_cluster import ValkeyCluster

#: Writes a store's record and lists it as pending: two keys of one store, one script.
TWO_KEYS = """
redis.call('HSET', KEYS[1], 'scope', ARGV[1])
redis.call('ZADD', KEYS[2], 1, ARGV[2])
return redis.call('ZCARD', KEYS[2])
"""
#: Reads a key the script names itself (in ARGV) rather than in KEYS.
UNDECLARED = "return redis.call('GET', ARGV[1])"


@pytest.fixture
async def cluster_client(valkey_cluster: ValkeyCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(valkey_cluster.seed_url, decode_responses=True)
    await client.flushall()  # on every master
    yield client
    await client.aclose()


def stores_per_master(cluster: ValkeyCluster, count: int) -> dict[int, list[int]]:
    """Store ids 1.. grouped by the port of the master that holds their keys, until every
    master holds `count` stores."""
    found: dict[int, list[int]] = {m.port: [] for m in cluster.masters()}
    merchant = 0
    while min(len(stores) for stores in found.values()) < count:
        merchant += 1
        found[cluster.master_of(keys.store(merchant)).port].append(merchant)
    return found


def three_stores(cluster: ValkeyCluster) -> tuple[int, int, int, int]:
    """A master's port, two stores it holds (in different slots) and a store another holds."""
    (port, mine), (_, theirs) = list(stores_per_master(cluster, count=2).items())[:2]
    here, same_node = mine[:2]
    assert cluster.slot_of(keys.store(here)) != cluster.slot_of(keys.store(same_node))
    return port, here, same_node, theirs[0]


class TestTheCluster:
    """Three masters with a replica each, reached through one seed node."""

    def test_three_masters_each_with_a_replica_covering_every_slot(
        self, valkey_cluster: ValkeyCluster
    ) -> None:
        masters, replicas = valkey_cluster.masters(), valkey_cluster.replicas()
        assert len(masters) == 3 and len(replicas) == 3
        assert sorted(r.master_id for r in replicas) == sorted(m.node_id for m in masters)
        covered = sum(last - first + 1 for m in masters for first, last in m.slots)
        assert covered == 16384
        assert valkey_cluster.seed_url in {m.url for m in masters}

    async def test_stores_spread_over_the_masters_and_each_keeps_its_keys_together(
        self, valkey_cluster: ValkeyCluster, cluster_client: RedisCluster
    ) -> None:
        placed = stores_per_master(valkey_cluster, count=2)
        for stores in placed.values():
            for merchant in stores:
                await cluster_client.hset(keys.store(merchant), "scope", "customers")
                await cluster_client.set(keys.settings(merchant), "{}")
                await cluster_client.zadd(keys.grant_set("pending", merchant), {"g": 1})
                slots = {valkey_cluster.slot_of(key) for key in (
                    keys.store(merchant), keys.settings(merchant),
                    keys.grant_set("pending", merchant), keys.entry(merchant, "order:7"),
                )}  # fmt: skip
                assert len(slots) == 1, (merchant, slots)
        # Each master holds exactly the keys of the stores whose slots it serves.
        for port, stores in placed.items():
            held = set(valkey_cluster.ask(port, lambda c: list(c.scan_iter(count=1000))))
            assert {keys.store_of(key) for key in held} == set(stores), port
            assert len(held) == 3 * len(stores)


class TestWhatTheClusterRefuses:
    """One store's keys in one script or transaction run; two stores' keys are refused."""

    async def test_a_script_over_one_stores_keys_runs(
        self, valkey_cluster: ValkeyCluster, cluster_client: RedisCluster
    ) -> None:
        merchant = 41
        store, pending = keys.store(merchant), keys.grant_set("pending", merchant)
        assert await cluster_client.eval(TWO_KEYS, 2, store, pending, "customers", "g1") == 1
        assert await cluster_client.hget(store, "scope") == "customers"
        master = valkey_cluster.master_of(store)
        assert valkey_cluster.ask(master.port, lambda c: c.zscore(pending, "g1")) == 1.0

    async def test_a_script_over_two_stores_keys_is_refused_with_crossslot(
        self, valkey_cluster: ValkeyCluster, cluster_client: RedisCluster
    ) -> None:
        port, here, same_node, elsewhere = three_stores(valkey_cluster)
        with valkey_cluster.connected(port) as node:
            for other in (elsewhere, same_node):  # another master's slot, or this one's
                two_stores = (keys.store(here), keys.grant_set("pending", other))
                with pytest.raises(ResponseError, match=r"^CROSSSLOT"):
                    node.eval(TWO_KEYS, 2, *two_stores, "customers", "g1")
                # the cluster client refuses it before sending
                with pytest.raises(RedisClusterException, match="same key slot"):
                    await cluster_client.eval(TWO_KEYS, 2, *two_stores, "customers", "g1")
            assert node.exists(keys.store(here)) == 0  # refused before it ran

    def test_a_script_is_refused_a_key_it_did_not_declare_only_when_another_node_has_it(
        self, valkey_cluster: ValkeyCluster
    ) -> None:
        """A script that builds another store's key itself is not caught by CROSSSLOT: the
        node runs it while that key's slot is its own and refuses it once the slot is on
        another node. Tests on a single Redis, or on a cluster that happens to place both
        stores on one node, do not see the mistake: every key goes in KEYS."""
        port, here, same_node, elsewhere = three_stores(valkey_cluster)
        with valkey_cluster.connected(port) as node:
            node.set(keys.settings(same_node), "{}")
            assert node.eval(UNDECLARED, 1, keys.store(here), keys.settings(same_node)) == "{}"
            with pytest.raises(ResponseError, match="non local key"):
                node.eval(UNDECLARED, 1, keys.store(here), keys.settings(elsewhere))

    async def test_a_transaction_over_two_stores_keys_is_refused(
        self, valkey_cluster: ValkeyCluster, cluster_client: RedisCluster
    ) -> None:
        port, here, same_node, _ = three_stores(valkey_cluster)
        with valkey_cluster.connected(port) as node:
            one_store = node.pipeline(transaction=True)
            one_store.set(keys.settings(here), "{}").hset(keys.store(here), "scope", "x")
            assert one_store.execute() == [True, 1]
            two_stores = node.pipeline(transaction=True)
            two_stores.set(keys.settings(same_node), "{}").delete(keys.settings(here))
            with pytest.raises(ResponseError, match="CROSSSLOT"):
                two_stores.execute()
            # nothing of it ran: the other store's key was not written, this one's not deleted
            assert node.exists(keys.settings(same_node)) == 0
            assert node.get(keys.settings(here)) == "{}"
        # redis-py's cluster client has no transactions at all: MULTI goes through a node
        with pytest.raises(RedisClusterException, match="transaction"):
            cluster_client.pipeline(transaction=True)


@pytest.mark.chaos
class TestFailover:
    """A master killed: its replica takes over its slots, with what `WAIT 1` confirmed."""

    async def test_writes_a_replica_acknowledged_survive_the_masters_death(
        self, tmp_path: Path
    ) -> None:
        with ValkeyCluster(tmp_path) as cluster:
            merchant = 7
            key = keys.grant_set("pending", merchant)
            master = cluster.master_of(key)
            its_replicas = {r.port for r in cluster.replicas() if r.master_id == master.node_id}
            with cluster.connected(master.port) as writer:
                for n in range(200):
                    # on one connection: WAIT counts the replicas that have this client's writes
                    done = writer.pipeline(transaction=False).zadd(key, {f"g{n}": n}).wait(1, 5000)
                    added, replicas = done.execute()
                    assert (added, replicas) == (1, 1), n
            client = RedisCluster.from_url(cluster.seed_url, decode_responses=True)
            try:
                assert await client.zcard(key) == 200  # the client knows the old master
                killed = cluster.kill_master_of(key)
                promoted = cluster.wait_for_failover()
                assert killed.port == master.port and promoted.port in its_replicas
                assert cluster.master_of(key).port == promoted.port
                # the same client follows the new topology and finds every acknowledged write
                assert await client.zcard(key) == 200
                assert await client.zscore(key, "g199") == 199
                await client.zadd(key, {"after": 1})
            finally:
                await client.aclose()
            assert cluster.ask(promoted.port, lambda c: c.zscore(key, "after")) == 1.0
