"""Access tokens refreshed ahead of expiry by a scheduled job (a 401 during a flush refreshes
the store's token there and then: `FlushRun.refresh`)."""

from __future__ import annotations

from service import tokens
from service.delivery.deps import Deps
from service.errors import SallaError
from service.logging import get_logger

log = get_logger("service.delivery")


async def refresh_expiring_tokens(deps: Deps) -> int:
    """Refresh tokens ahead of expiry, each under its store's lock."""
    refreshed = 0
    for merchant, current in await tokens.expiring(deps.redis, deps.settings.token_refresh_ahead_s):
        try:
            await deps.refresh_token(merchant, current.access_token)
        except SallaError as exc:
            log.error("token_refresh_failed", merchant=merchant, error=str(exc))
            continue
        refreshed += 1
        log.info("token_refreshed", merchant=merchant, scheduled=True)
    return refreshed
