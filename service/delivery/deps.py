"""What delivery needs (Redis, the job queue, the Salla client, the store's rate-limit
buckets), built once in the worker's startup and handed to every delivery job."""

from __future__ import annotations

from dataclasses import dataclass, field

from arq.connections import ArqRedis
from redis.asyncio import Redis

from service import tokens
from service.delivery.ratelimit import RateLimiter
from service.salla import SallaClient, TokenSet
from service.settings import Settings
from service.state_store import ReplicaWait


@dataclass
class Deps:
    """What delivery needs, built once in the worker's startup."""

    settings: Settings
    redis: Redis
    pool: ArqRedis
    salla: SallaClient
    #: The customers endpoints' cap (loyalty calls take from it and from `plan`).
    bucket: RateLimiter = field(init=False)
    #: The store's plan limit, which every Admin API call counts against.
    plan: RateLimiter = field(init=False)
    #: On a cluster, `WAIT 1` after the transitions that guard a call (nothing otherwise).
    replicated: ReplicaWait = field(init=False)

    def __post_init__(self) -> None:
        self.replicated = ReplicaWait(self.redis, self.settings.replica_wait_timeout_s)
        self.bucket = RateLimiter(
            self.redis, self.settings.rate_limit_requests, self.settings.rate_limit_window_s
        )
        self.plan = plan_bucket(self.redis, self.settings)

    async def refresh_token(self, merchant: int, stale_access_token: str) -> TokenSet:
        """The store's tokens refreshed once (or as another worker just refreshed them), under
        its lock, confirmed on a replica on a cluster (`tokens.refresh`). Raises
        `SallaAuthError` when Salla refuses."""
        settings = self.settings
        return await tokens.refresh(
            self.redis,
            self.salla,
            merchant,
            stale_access_token,
            token_url=settings.salla_oauth_token_url,
            client_id=settings.salla_client_id,
            client_secret=settings.salla_client_secret.get_secret_value(),
            replicated=self.replicated if self.replicated.enabled else None,
        )

    async def take_loyalty(self, merchant: int) -> float:
        """One loyalty call: from the customers bucket and the plan bucket at once."""
        return await self.bucket.take(merchant, also=self.plan)


def plan_bucket(redis: Redis, settings: Settings) -> RateLimiter:
    """The store's plan bucket, resized by Salla's `X-RateLimit-Limit` on orders answers."""
    return RateLimiter(
        redis,
        settings.orders_rate_limit_requests,
        settings.orders_rate_limit_window_s,
        name="rl-plan",
        resize=True,
    )
