"""Unknown outcomes (a call that got no answer) settled from Salla's points history: the call's
marker in a customer's history means it applied; never resend on a guess."""

from __future__ import annotations

from service import ledger, queue, tokens
from service.delivery.deps import Deps
from service.errors import SallaError
from service.logging import get_logger
from service.salla import history_has_marker

log = get_logger("service.delivery")


async def reconcile(deps: Deps, merchant: int) -> dict[str, int]:
    """Settle unknown outcomes from Salla's points history; never resend on a guess.

    For each unanswered call old enough to show up in the history: the call's marker in a
    customer's history means it applied (sent); a readable history without it means it did not
    (pending again, sent anew); an unreadable history is tried again later and, after
    `reconcile_max_attempts`, the grant goes to review.
    """
    settings = deps.settings
    counts = {"sent": 0, "resend": 0, "review": 0, "later": 0}
    before = ledger.now_ms() - int(settings.reconcile_after_s * 1000)
    grants = await ledger.unknown_since(deps.redis, merchant, before)
    token = await tokens.get(deps.redis, merchant)
    for grant in grants:
        if not settings.reconcile_marker or not grant.batch:
            await ledger.resolve_unknown(
                deps.redis, merchant, [grant], "review", "no marker to read the outcome back"
            )
            counts["review"] += 1
            continue
        if token is None or await deps.take_loyalty(merchant) > 0:
            counts["later"] += 1
            continue
        try:
            history = await deps.salla.points_history(token.access_token, grant.customer)
        except (SallaError, OSError) as exc:
            attempts = await ledger.count_reconcile_attempt(deps.redis, grant)
            if attempts >= settings.reconcile_max_attempts:
                await ledger.resolve_unknown(
                    deps.redis,
                    merchant,
                    [grant],
                    "review",
                    f"history unreadable {attempts} times: {exc}",
                )
                counts["review"] += 1
                log.error(
                    "grant_to_review",
                    merchant=merchant,
                    grant_ids=[grant.id],
                    batch_id=grant.batch,
                    error=str(exc),
                )
            else:
                counts["later"] += 1
            continue
        applied = history_has_marker(history, grant.batch)
        note = "found in the points history" if applied else "not in the history; sending again"
        await ledger.resolve_unknown(
            deps.redis, merchant, [grant], "sent" if applied else "pending", f"reconciled: {note}"
        )
        counts["sent" if applied else "resend"] += 1
        (log.info if applied else log.warning)(
            "reconciled",
            merchant=merchant,
            grant_ids=[grant.id],
            batch_id=grant.batch,
            outcome="applied" if applied else "not_applied",
        )
    if counts["resend"]:
        await queue.enqueue_flush(deps.pool, merchant, 0)
    await ledger.forget_unknown_store_if_empty(deps.redis, merchant)
    return counts
