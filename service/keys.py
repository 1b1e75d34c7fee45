"""Every Redis key the service uses, built here and nowhere else. A typo in a key name is silent
data loss; a builder is checked by mypy and found by grep.

The schema (all under `sr:`):

Keys of one store carry the store's hash tag `{m:<merchant>}`, so everything one store owns
hashes to one Redis Cluster slot and one Lua script can touch any of it:

    sr:{m:M}:led:<scope>              hash  a ledger entry: v (its version), r:<rule> -> a
                                            `RuleRecord`; the order's own entry (scope
                                            order:<id>) also holds its `OrderFacts`
    sr:{m:M}:led-index:order:<id>     set   other scopes an order's events granted
    sr:{m:M}:cap:<rule>:<c>:<day>     int   points a rule granted a customer on a local day
    sr:{m:M}:grant:<grant id>         hash  one grant (`service.ledger.records.Grant`); a grant
                                            id starts with its store ("<merchant>-<hex>"), so
                                            its key is found from the id alone
    sr:{m:M}:<state>                  zset  grant ids by time, one per state: pending, claimed,
                                            verifying, parked, failed, unknown,
                                            review
    sr:{m:M}:gidx:scope:<scope>       zset  grant ids of a scope by creation (admin views)
    sr:{m:M}:gidx:customer:<c>        zset  grant ids of a customer by creation (admin views)
    sr:{m:M}:idle                     str   the sweep found the store idle once
    sr:{m:M}:listed-at                str   when a worker last listed the store in
                                            stores:pending (ms; see ledger/sweep.py)
    sr:{m:M}:asked                    zset  orders asked about (an `order_truth` job) by when,
                                            until the job settles them (ledger/asked.py)
    sr:{m:M}:replicated               str   on a cluster, written just before a `WAIT 1` that
                                            confirms the store's grant transitions reached a
                                            replica (service/state_store.py, `ReplicaWait`)
    sr:{m:M}:store                    hash  tokens, scope, install time (service/tokens.py)
    sr:{m:M}:lock:refresh             str   the token refresh lock
    sr:{m:M}:settings                 str   the store's app settings (JSON)
    sr:{m:M}:rl / sr:{m:M}:rl-plan    hash  the customers and plan rate-limit buckets
    sr:{m:M}:orders-rec               hash  a reconciliation's place
    sr:{m:M}:orders-rec-slot          str   the period a reconciliation last started in
                                            (`<period>+`: started, lost, and queued again)
    sr:{m:M}:orders-rec-done          str   the period a reconciliation last finished in (a
                                            started one that neither finished nor is on the
                                            queue was lost with it: the scheduler queues it again)
    sr:{m:M}:lc:<id>                  str   a settled order's entry, compacted (its full entry
                                            and index are gone; service/ledger/packed.py)
    sr:{m:M}:to-compact               zset  orders whose entry is full, by when to look at
                                            compacting it (service/ledger/compact.py)
    sr:{m:M}:texts                    hash  texts compacted entries name (reasons, rules)
    sr:{m:M}:compacted:<week>         set   orders compacted that week (retired after
                                            LEDGER_RETENTION_DAYS)
    sr:{m:M}:retired-upto             str   the last week whose compacted orders were retired
    sr:{m:M}:retired:<n>              set   retired orders (tombstones), n = order id mod 128

Keys written together with the inbox stream (the web's group commit) carry the inbox's tag:

    sr:{inbox}:webhooks               stream every accepted webhook (the inbox and replay log)
    sr:{inbox}:app-events             stream app lifecycle events (`app.*`, some carry tokens)
                                            until a worker processed them: each entry is
                                            deleted once acknowledged, never kept for replay
    sr:{inbox}:seen:<delivery>        str   a delivery already accepted (dedupe)
    sr:{inbox}:durable-mark           str   written by `serve`'s start-up check, to see that a
                                            write reaches the AOF on disk (service/preflight.py)
    sr:{durable:n}:mark               str   the same check on a cluster's other masters
                                            (one hour)

With `INBOX_SHARDS` = N > 1 the inbox is N streams, shard 0 as above and shard n > 0 under the
tag `{inbox:<n>.<k>}` (`sr:{inbox:3.12}:webhooks`, `sr:{inbox:3.12}:seen:<delivery>`; k picks
slots spread evenly, see `inbox_tag`): each shard's stream and its seen marks share a slot,
and a cluster spreads the shards over its masters. A
store's webhooks always go to shard `merchant mod N` (`inbox_shard`), so they stay in order.
App events (few) stay in shard 0's `app-events` stream.

arq's own keys (`arq:queue`, `arq:job:<id>`, ...) live on the queue's Redis (`QUEUE_REDIS_URL`,
by default this one): nothing there is the only copy of anything (service/queue.py).

Cross-store keys are few, and kept per index shard: `INDEX_SHARDS` (16) copies of each, tagged
`{x:<n>.<k>}` (`index_tag`; written `{x:n}` below), a store's in shard n = `index_shard(merchant)`
(its id mod 16), so a Redis Cluster spreads them evenly over its masters and no key holds every
store. Writers touch their store's shard;
readers (admin views, export, the archiver, compaction, gauges) visit every shard, the sweep
a few shards a cycle, in rotation (`SWEEP_STORES_PER_CYCLE`).
They are never written inside a script that works on one store's keys (another slot): the
ledger adds a store to a set in a separate command, before the script.

    sr:{x:n}:stores:pending           set   stores that may have unsent grants
    sr:{x:n}:stores:unknown           set   stores with grants whose call got no answer
    sr:{x:n}:stores:attention         set   stores that had grants failed, in review or
                                            parked (`ledger.stores_with` checks each store)
    sr:{x:n}:token-expiry             zset  stores with tokens, by when the access token
                                            expires (s): the refresh job reads only the due
                                            (service/tokens.py)
    sr:{x:n}:orders-rec-due           zset  stores with tokens, by when the orders
                                            reconciliation scheduler next looks at each (s;
                                            service/orders/schedule.py)
    sr:{x:n}:grant-log                zset  every grant id by creation (export, archive)
    sr:{x:n}:stores:compact           zset  stores by when their compaction is next due
    sr:{x:n}:archive-intent / -cursor the grant archiver's note of the files' lengths
                                            before a batch of the shard, its place in the
                                            shard's log
    sr:archive-lock                   str   one archiver at a time (the shards share the day
                                            files); a single key, never with another
    sr:{x:n}:gauges                   hash  the shard's stores' grant gauges (pending, oldest
                                            due age, failed, review, parked) as the sweep last
                                            counted them, and when (service/sweeper.py)
    sr:sweep-cursor                   hash  where the sweep's rotation over the shards stands:
                                            the shard, the last store visited in it, and the
                                            shard's gauges so far; a single key, never with
                                            another

So every command the service sends the state store names keys of one slot: each script gets
every key it touches in KEYS (a script finding keys as it runs, the grants of the ids it
claims, builds them with its store's tag), and starts `#!lua`, which makes a Redis Cluster
node refuse a key of another slot even when the node serves both (tests/test_cluster_slots.py).

Nothing was released before this schema, so no data is migrated (CHANGELOG).
"""

from __future__ import annotations

import functools
import itertools
from typing import Literal, get_args

from redis.crc import REDIS_CLUSTER_HASH_SLOTS as CLUSTER_SLOTS
from redis.crc import key_slot

PREFIX = "sr:"

#: Sets of grant ids per store, by state (see the ledger's state machine).
GrantSet = Literal["pending", "claimed", "verifying", "parked", "failed", "unknown", "review"]

#: The grant archiver's lock: one for every shard, since the shards' grants share the day files
#: (a single key, set and released on its own, so its slot does not matter).
ARCHIVE_LOCK = f"{PREFIX}archive-lock"
#: How many copies of each cross-store key there are (`index_shard`). Fixed: a store's keys are
#: found through it, so changing it orphans every listing (nothing was released with another).
INDEX_SHARDS = 16


def index_shard(merchant: int) -> int:
    """The shard of the cross-store keys that lists `merchant`."""
    return merchant % INDEX_SHARDS


def index_shards() -> range:
    """Every shard, for the readers that visit them all."""
    return range(INDEX_SHARDS)


@functools.cache
def index_tag(shard: int) -> str:
    """The hash tag of one index shard's keys, `{x:<n>.<k>}`: shard n's slot lies in the n-th
    sixteenth of the slot space (the first k that puts it near its middle), so a cluster whose
    masters split the slots evenly holds an even share of the shards (`{x:0}`..`{x:15}` put
    5, 4 and 7 on three masters)."""
    width = CLUSTER_SLOTS // INDEX_SHARDS
    return _spread_tag(f"x:{shard}", shard * width + width // 2, width // 4)


def _spread_tag(name: str, target: int, near: int) -> str:
    """`{<name>.<k>}` for the first k whose slot is within `near` of slot `target`."""
    for k in itertools.count():
        tag = f"{name}.{k}"
        off = (key_slot(tag.encode()) - target) % CLUSTER_SLOTS
        if min(off, CLUSTER_SLOTS - off) <= near:
            return f"{{{tag}}}"
    raise AssertionError("unreachable")  # pragma: no cover


# duplicates: one small builder per key, alike by design (see `scope_grants`).
def stores_pending(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:stores:pending"


def stores_unknown(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:stores:unknown"


def stores_attention(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:stores:attention"


def token_expiry(shard: int) -> str:
    """The stores with tokens, by when their access token expires (epoch s; 0: unknown)."""
    return f"{PREFIX}{index_tag(shard)}:token-expiry"


def orders_reconcile_due(shard: int) -> str:
    """The stores with tokens, by when the reconciliation scheduler next looks at each (s)."""
    return f"{PREFIX}{index_tag(shard)}:orders-rec-due"


def grant_log(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:grant-log"


def stores_compact(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:stores:compact"


def archive_intent(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:archive-intent"


def archive_cursor(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:archive-cursor"


def sweep_gauges(shard: int) -> str:
    return f"{PREFIX}{index_tag(shard)}:gauges"


#: Where the sweep's rotation stands (service/sweeper.py): one for every shard, since a cycle
#: goes from shard to shard (a single key, read and written on its own).
SWEEP_CURSOR = f"{PREFIX}sweep-cursor"


#: Tombstone sets per store: an order's is chosen by its id. 128 sets hold 65,536 retired
#: orders as intsets (512 each, Redis's default `set-max-intset-entries`) before any converts.
TOMBSTONE_SETS = 128

INBOX_TAG = "{inbox}"
WEBHOOK_STREAM = f"{PREFIX}{INBOX_TAG}:webhooks"
APP_EVENTS_STREAM = f"{PREFIX}{INBOX_TAG}:app-events"
SEEN_PREFIX = f"{PREFIX}{INBOX_TAG}:seen:"
DURABLE_MARK = f"{PREFIX}{INBOX_TAG}:durable-mark"


def durable_probe(n: int) -> str:
    """`serve`'s start-up write on a cluster's master that does not hold `DURABLE_MARK` (the
    first n whose slot it serves; a single key, expiring)."""
    return f"{PREFIX}{{durable:{n}}}:mark"


#: The consumer group the workers read both streams as (a name inside a stream, not a key).
INBOX_GROUP = "workers"


def store_prefix(merchant: int | str) -> str:
    """`sr:{m:<merchant>}:`, the start of every key of one store. The builders below spell it
    out rather than call this: they run several times per event."""
    return f"{PREFIX}{{m:{merchant}}}:"


def store_of(key: str) -> int | None:
    """The store a per-store key belongs to (None for any other key)."""
    start = key.find("{m:")
    end = key.find("}", start)
    digits = key[start + 3 : end] if start >= 0 and end > start else ""
    return int(digits) if digits.isascii() and digits.isdigit() else None


def entry(merchant: int, scope: str) -> str:
    return f"{PREFIX}{{m:{merchant}}}:led:{scope}"


def order_index(merchant: int, order_id: int) -> str:
    """Scopes other than `order:<id>` that were granted because of this order."""
    return f"{PREFIX}{{m:{merchant}}}:led-index:order:{order_id}"


def cap(merchant: int, rule: str, customer: int, day: str) -> str:
    return f"{PREFIX}{{m:{merchant}}}:cap:{rule}:{customer}:{day}"


GRANT_SETS: frozenset[str] = frozenset(get_args(GrantSet))


def as_grant_set(name: str) -> GrantSet:
    """A state name from the outside (a CLI option, an admin query) as a grant set's name."""
    if name not in GRANT_SETS:
        raise ValueError(f"no grant set is called {name!r}: one of {', '.join(sorted(GRANT_SETS))}")
    return name  # type: ignore[return-value]


def grant_set(state: GrantSet, merchant: int | str) -> str:
    """The zset of a store's grants in one state (`merchant` "*": a SCAN pattern)."""
    return f"{PREFIX}{{m:{merchant}}}:{state}"


def idle_mark(merchant: int) -> str:
    """Set when the sweep found the store idle (it is forgotten when found idle again)."""
    return f"{PREFIX}{{m:{merchant}}}:idle"


def listed_at(merchant: int) -> str:
    """When a worker last listed the store in its `stores:pending` (written with the commit that
    follows the listing; the sweep forgets no store listed recently)."""
    return f"{PREFIX}{{m:{merchant}}}:listed-at"


def grant_prefix(merchant: int) -> str:
    """What a grant's key is made of before its id (scripts append ids to it)."""
    return f"{PREFIX}{{m:{merchant}}}:grant:"


def new_grant_id(merchant: int, random_hex: str) -> str:
    return f"{merchant}-{random_hex}"


def grant_store(grant_id: str) -> int | None:
    """The store a grant id belongs to, or None for a string that is not a grant id."""
    merchant, sep, rest = grant_id.partition("-")
    if not sep or not rest or not merchant.isascii() or not merchant.isdigit():
        return None
    return int(merchant)


def grant(grant_id: str) -> str:
    """A grant's hash. Raises ValueError for a string that is not a grant id."""
    merchant = grant_store(grant_id)
    if merchant is None:
        raise ValueError(f"not a grant id: {grant_id[:80]!r} (grant ids look like 1234-9f3c...)")
    return f"{grant_prefix(merchant)}{grant_id}"


# duplicates: one small builder per key, alike by design: each is the one place its key's name
# is spelled (a shared helper taking the name as a string would bring back the typos).
def scope_grants(merchant: int, scope: str) -> str:
    return f"{PREFIX}{{m:{merchant}}}:gidx:scope:{scope}"


def customer_grants(merchant: int, customer: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:gidx:customer:{customer}"


def asked_salla(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:asked"


def replica_mark(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:replicated"


def store(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:store"


def refresh_lock(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:lock:refresh"


def settings(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:settings"


def bucket(name: str, merchant: int) -> str:
    """A rate-limit bucket of the store (`rl`, `rl-plan`)."""
    return f"{PREFIX}{{m:{merchant}}}:{name}"


def orders_reconcile(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:orders-rec"


def orders_reconcile_slot(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:orders-rec-slot"


def orders_reconcile_done(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:orders-rec-done"


def compacted(merchant: int, order_id: int) -> str:
    """A settled order's compacted entry (short: at ~200 bytes an order, the name counts)."""
    return f"{PREFIX}{{m:{merchant}}}:lc:{order_id}"


def compact_queue(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:to-compact"


def texts(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:texts"


def compacted_week(merchant: int, week: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:compacted:{week}"


def retired_upto(merchant: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:retired-upto"


def tombstones(merchant: int, order_id: int) -> str:
    return f"{PREFIX}{{m:{merchant}}}:retired:{order_id % TOMBSTONE_SETS}"


def seen(delivery: str, shard: int = 0, shards: int = 1) -> str:
    return f"{seen_prefix(shard, shards)}{delivery}"


def inbox_shard(merchant: int, shards: int) -> int:
    """The inbox shard a store's webhooks go to (a store's events stay in one stream)."""
    return merchant % shards


@functools.cache
def inbox_tag(shard: int, shards: int) -> str:
    """The hash tag of one inbox shard's keys. Shard 0's is `{inbox}` whatever the count;
    shard n's is chosen so that the shards' slots lie evenly around the slot space from there
    (`{inbox:<n>.<k>}`, the first k whose slot is near the n-th N-th of the way round): a
    cluster whose masters split the slots evenly, as `--cluster create` does, then gets its
    share of shards on each master. (`{inbox:1}`, `{inbox:2}` all hashed to one master of
    three.) Depends on the count: changing `INBOX_SHARDS` means draining first."""
    if shard == 0:
        return INBOX_TAG
    home = key_slot(INBOX_TAG[1:-1].encode())
    target = (home + shard * CLUSTER_SLOTS // shards) % CLUSTER_SLOTS
    return _spread_tag(f"inbox:{shard}", target, max(1, CLUSTER_SLOTS // (32 * shards)))


def webhook_stream(shard: int, shards: int) -> str:
    """The inbox stream of one shard (shard 0: `WEBHOOK_STREAM`)."""
    return f"{PREFIX}{inbox_tag(shard, shards)}:webhooks"


def seen_prefix(shard: int, shards: int) -> str:
    """What a shard's seen marks start with (shard 0: `SEEN_PREFIX`)."""
    return f"{PREFIX}{inbox_tag(shard, shards)}:seen:"


def webhook_streams(shards: int) -> list[str]:
    """Every inbox stream of a deployment with `shards` shards."""
    return [webhook_stream(n, shards) for n in range(shards)]
