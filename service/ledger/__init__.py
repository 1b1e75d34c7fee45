"""The ledger: what each (store, scope, rule) was granted, and every grant's state. Redis.

What a scope deserves is decided by the pure order-state core (`order_state`): per
rule and order, the newest decisive verdict wins, and only the difference from what was granted
becomes a grant. `apply` is the read / decide / commit loop around it: `apply_event` reads
every entry one event touches, lets the core decide, and commits all of it with one Lua call
that writes only if each entry's version (and the unsent grants and caps it depends on) is
still what was read; otherwise it reads and decides again. Reversals come from the ledger,
never from today's rules.

Grant states (each transition one atomic Redis step, written before the action it allows):

    pending ──claim──▶ claimed ──mark_sending──▶ sending ──▶ sent
       ▲ │                │                         ├──▶ failed   (Salla refused it, e.g. 422)
       └──release─────────┘ (retry, no token)       └──▶ unknown  (no answer: never resent)
    parked: waiting for the store's tokens (moved back to pending on app.store.authorize)
    verifying: held for a return window and due; the order is being confirmed with Salla
               (service/orders/truth.py) before the grant goes back to pending
    netted: cancelled by an opposite change before it was sent (pending, parked, verifying)

Modules, one concept each:
    order_state  the pure core: an order's events → what each rule's scope deserves
    records      `Grant` (a grant as stored) and `Diff` (what one event changed)
    commit       `Writes` and `commit`: the optimistic one-round-trip write
    apply        `apply_event` / `apply_outcomes`: read, decide, commit
    grants       a grant's transitions after it was made (claim, send, finish, park...)
    sweep        recovering from dead workers and lost answers
    views        read-only views (admin, metrics, the CLI)
    packed       a settled order's entry in a few dozen bytes (pure)
    compact      compacting settled orders, retiring them after LEDGER_RETENTION_DAYS
    shards       the cross-store zsets per index shard: the stores due
    asked        orders waiting for Salla's answer (their `order_truth` job can be remade)
Keys: service/keys.py. Callers use `from service import ledger` and the names below.
"""

from service.ledger.apply import (
    Applied,
    OrderRead,
    apply_event,
    apply_outcomes,
    read_order,
    verdict_of,
)
from service.ledger.asked import asked_overdue, forget_asked, note_asked
from service.ledger.compact import compact_due_stores, compact_store
from service.ledger.grants import (
    VERIFY_RETRY_MS,
    Claim,
    claim_due,
    count_reconcile_attempt,
    extend_claims,
    finish,
    mark_sending,
    note_pending_work,
    park,
    release,
    release_unsent,
    release_verified,
    requeue,
    resolve_unknown,
    unpark,
    unsend,
    verifying_overdue,
)
from service.ledger.records import (
    LISTING_FRESH_S,
    LISTING_MARGIN_S,
    NETTABLE_STATES,
    OPEN_STATES,
    REVERSAL_PREFIX,
    SETTLED_GRANT_TTL_S,
    Diff,
    Grant,
    GrantState,
    now_ms,
)
from service.ledger.sweep import (
    forget_store_if_idle,
    forget_unknown_store_if_empty,
    stores_with_unknown,
    stores_with_work,
    sweep_claims,
    trim_grant_log,
    unknown_due,
    unknown_since,
)
from service.ledger.views import due_count, entry, grants_in, load, store_gauges, stores_with

__all__ = [
    "LISTING_FRESH_S",
    "LISTING_MARGIN_S",
    "NETTABLE_STATES",
    "OPEN_STATES",
    "REVERSAL_PREFIX",
    "SETTLED_GRANT_TTL_S",
    "VERIFY_RETRY_MS",
    "Applied",
    "Claim",
    "Diff",
    "Grant",
    "GrantState",
    "OrderRead",
    "apply_event",
    "apply_outcomes",
    "asked_overdue",
    "claim_due",
    "compact_due_stores",
    "compact_store",
    "count_reconcile_attempt",
    "due_count",
    "entry",
    "extend_claims",
    "finish",
    "forget_asked",
    "forget_store_if_idle",
    "forget_unknown_store_if_empty",
    "grants_in",
    "load",
    "mark_sending",
    "note_asked",
    "note_pending_work",
    "now_ms",
    "park",
    "read_order",
    "release",
    "release_unsent",
    "release_verified",
    "requeue",
    "resolve_unknown",
    "store_gauges",
    "stores_with",
    "stores_with_unknown",
    "stores_with_work",
    "sweep_claims",
    "trim_grant_log",
    "unknown_due",
    "unknown_since",
    "unpark",
    "unsend",
    "verdict_of",
    "verifying_overdue",
]
