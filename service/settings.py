"""The typed settings object, built once from the environment.

Nothing else in the service reads `os.environ`: `Settings()` is built at start-up and passed
explicitly to `create_app(settings)` and into the worker's context. `load_settings` also reads a
`.env` file in the working directory when there is one; the environment wins over it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import ConfigError
from service.redis_url import check as check_redis_url
from service.redis_url import password as redis_password
from service.redis_url import sentinel_hosts

#: Secrets that mean "nobody set this"; refused outside development.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "placeholder", "xxx", "todo", "your-webhook-secret"}
)

MIN_ADMIN_TOKEN_LENGTH = 24

DEVELOPMENT_WEBHOOK_SECRET = "dev-webhook-secret"  # noqa: S105 - development only, printed by `run`

#: Names the dotenv file `load_settings` reads (default `.env`, relative to the working
#: directory); empty reads none. The test suite empties it, so a developer's `.env` in the
#: checkout never leaks into the tests.
ENV_FILE_VARIABLE = "SALLA_REWARDS_ENV_FILE"


#: `WEBHOOK_DURABILITY`: what a webhook's 200 waits for (see `service.ingest`).
Durability = Literal["buffered", "fsync", "replica"]


class Settings(BaseSettings):
    """Every knob of the service. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", frozen=True)

    app_env: Literal["production", "development"] = "production"

    salla_webhook_secret: SecretStr = SecretStr("")
    salla_webhook_strategy: Literal["signature", "token"] = "signature"
    salla_api_base: str = "https://api.salla.dev/admin/v2"
    salla_oauth_token_url: str = "https://accounts.salla.sa/oauth2/token"  # noqa: S105
    salla_client_id: str = ""
    salla_client_secret: SecretStr = SecretStr("")

    redis_url: str | None = None
    #: arq's queue (flush, reconciliation and order jobs, cron); unset: `REDIS_URL`. Nothing on
    #: it is the only copy of anything: the state stays on `REDIS_URL` (see docs/operations.md).
    #: With `QUEUE_REDIS_SENTINELS` only its user, password and db are used: the Sentinels name
    #: the master's address.
    queue_redis_url: str | None = None
    #: `host:port,host:port`: the Sentinels that manage the queue's Redis (arq's Sentinel mode).
    queue_redis_sentinels: str = ""
    #: The name the Sentinels monitor the queue's master by (`sentinel monitor <name> ...`).
    queue_redis_sentinel_master: str = ""
    #: `REDIS_URL` names a seed node of a Redis Cluster that holds the state (ledger, grants,
    #: inbox, tokens, limits); arq cannot run on a cluster, so `QUEUE_REDIS_URL` (or its
    #: Sentinels) must name a Redis of its own (docs/operations.md, "Redis Cluster").
    redis_cluster: bool = False
    #: Streams the inbox is split into, each in its own slot (a cluster spreads them over its
    #: masters); a store's webhooks always go to the same one. Fixed for a deployment:
    #: changing it means draining the inbox first (docs/operations.md).
    inbox_shards: int = Field(default=1, ge=1, le=1024)
    #: On a cluster, how long a grant transition that guards a call to Salla (`sending` before
    #: it, `sent` after it) waits for a replica's `WAIT 1`; unconfirmed, the flush stops there
    #: and the grants are recovered as after a lost worker (docs/operations.md).
    replica_wait_timeout_s: float = Field(default=2.0, gt=0, le=60)
    embedded_redis_port: int = 6390
    data_dir: Path = Path("var")

    rules_path: Path = Path("rules")

    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    #: Largest webhook body accepted; Salla's order payloads are ~15 KiB.
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    #: A client that has not sent its whole body by then gets 408 (slow or abusive clients).
    request_body_timeout_s: float = Field(default=10.0, gt=0)
    #: A connection must complete its request headers this long after it opens, and after
    #: each answer when kept alive; otherwise it is closed (slow or idle clients hold files).
    header_timeout_s: float = Field(default=10.0, gt=0)
    #: Connections the web process holds at most: one more closes the one that has waited
    #: longest for its headers; with every connection busy, requests get 503.
    max_connections: int = Field(default=1000, ge=1)
    #: How long a webhook delivery is remembered for deduplication (Salla retries for ~15 min).
    dedupe_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    #: When a webhook's 200 is sent: `buffered`, once Redis holds it in memory (its AOF is
    #: fsynced within the second: a crash can lose that second); `fsync`, once it is in Redis's
    #: AOF on disk (`WAITAOF 1 0`); `replica`, once also in a replica's AOF (`WAITAOF 1 1`).
    webhook_durability: Durability = "fsync"
    #: How long a group commit waits for that; deliveries not confirmed by then answer 503.
    webhook_durability_timeout_s: float = Field(default=2.0, gt=0, le=60)

    #: Pending grants of a store are coalesced for this long before one flush sends them.
    batch_window_s: float = Field(default=2.0, ge=0)
    #: Salla documents no maximum of customers per call; this keeps request bodies modest.
    max_customers_per_call: int = Field(default=100, ge=1)
    #: Batches one flush job sends before it re-enqueues itself (fairness between stores).
    # duplicates: settings fields, each documented; alike by nature.
    batches_per_flush: int = Field(default=20, ge=1)
    #: Timeout of one call to Salla; a call that times out has an unknown outcome.
    salla_timeout_s: float = Field(default=10.0, gt=0)
    #: Retry backoff for 429/5xx/connection failures: base * 2**attempt, capped, with jitter.
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_cap_s: float = Field(default=300.0, gt=0)
    #: A claimed grant whose worker has not finished after this long is returned to pending.
    claim_timeout_s: float = Field(default=60.0, gt=0)
    #: Stores the sweep (every 5 s) visits at most in one cycle; with more stores listed it
    #: visits them in rotation, each once every ceil(stores / this) cycles (docs/operations.md,
    #: "The sweep"). Each visit is a few round trips to Redis.
    sweep_stores_per_cycle: int = Field(default=1000, ge=1, le=1_000_000)
    #: Lifetime of a worker's job before arq cancels it.
    job_timeout_s: float = Field(default=120.0, gt=0)
    #: Webhooks a worker reads from the inbox at once (and processes concurrently).
    inbox_batch: int = Field(default=100, ge=1, le=1000)
    #: An inbox entry a worker read and did not acknowledge (it died, or processing failed) is
    #: claimed by a worker after this long; after 10 tries it is given up (`event_abandoned`).
    inbox_claim_after_s: float = Field(default=30.0, gt=0)

    #: Our per-store bucket: the customers endpoints' cap is 500 per 10 minutes. That the loyalty
    #: endpoint counts against it is a guess; Salla's headers correct the bucket either way.
    # duplicates: settings fields, each documented; alike by nature.
    rate_limit_requests: int = Field(default=500, ge=1)
    rate_limit_window_s: float = Field(default=600.0, gt=0)

    #: Orders API calls (deciding ambiguous events, confirming held points, reconciliation) take
    #: from the store's plan bucket: 120/360/720 requests a minute by plan. Salla's
    #: `X-RateLimit-*` headers on those answers resize it; loyalty calls take from it too.
    orders_rate_limit_requests: int = Field(default=120, ge=1)
    orders_rate_limit_window_s: float = Field(default=60.0, gt=0)
    #: Salla's clocks (webhook stamps, the orders API's answers) and ours may differ by this
    #: much: a webhook stamped within it of a state fetched from Salla makes us ask again.
    order_clock_skew_s: int = Field(default=10, ge=0, le=3600)
    #: Points held for a return window (`hold_days`) are confirmed with GET /orders/{id} before
    #: they are sent; what the order no longer deserves is never sent.
    verify_held_grants: bool = True
    #: Each store's recent orders are compared with the ledger this often (orders whose
    #: webhooks never arrived); 0 turns it off.
    orders_reconcile_every_s: int = Field(default=3600, ge=0)
    #: Days of orders reconciliation looks back (whole days: Salla filters on creation date).
    #: Unset: the longest `hold_days` of the rules plus 2.
    orders_reconcile_days: int | None = Field(default=None, ge=1, le=400)

    #: Append ` #<batch code>` to each call's reason so an unknown outcome can be read back from
    #: the customers' points history. Off: unknown outcomes always go to review.
    reconcile_marker: bool = True
    #: How long after an unanswered call its outcome is read back from the points history.
    reconcile_after_s: float = Field(default=30.0, ge=0)
    #: Reads of the history that fail before the grants are put aside for review.
    reconcile_max_attempts: int = Field(default=10, ge=1)
    #: Tokens closer than this to expiry are refreshed by a scheduled job.
    token_refresh_ahead_s: int = Field(default=2 * 86400, ge=0)
    #: The worker's Prometheus port (GET /metrics); 0 turns it off.
    worker_metrics_port: int = Field(default=9101, ge=0, le=65535)
    #: How often a live worker reports in (what `worker --check` reads).
    worker_health_interval_s: int = Field(default=10, ge=1)
    #: Bearer token for the HTTP admin routes under /admin/; empty turns those routes off.
    admin_token: SecretStr = SecretStr("")
    #: Webhooks the rules saw are kept this long for `replay`; 0 keeps none.
    webhook_retention_days: int = Field(default=7, ge=0, le=365)
    #: A settled order's compacted ledger entry is kept this long; then it becomes a tombstone
    #: that refuses any later event of the order (docs/operations.md, "Memory").
    ledger_retention_days: int = Field(default=400, ge=30)
    #: Where grant records past their 90 days are written as JSONL (one file a day) before
    #: they leave Redis. Unset: they leave Redis unarchived (as before).
    grant_archive_dir: Path | None = None

    @field_validator("redis_url", "queue_redis_url")
    @classmethod
    def _check_redis_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        try:
            return check_redis_url(url)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("queue_redis_sentinels")
    @classmethod
    def _check_sentinels(cls, text: str) -> str:
        try:
            sentinel_hosts(text)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return text.strip()

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_any_case(cls, value: Any) -> Any:
        """`debug` as uvicorn and most tools take it; `warn` as the stdlib's alias."""
        if isinstance(value, str):
            upper = value.strip().upper()
            return "WARNING" if upper == "WARN" else upper
        return value

    @field_validator("log_format", "webhook_durability", mode="before")
    @classmethod
    def _choice_in_any_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _refuse_placeholder_secret(self) -> Settings:
        secret = self.salla_webhook_secret.get_secret_value().strip().lower()
        if self.app_env != "development" and secret in PLACEHOLDER_SECRETS:
            raise ValueError(
                "SALLA_WEBHOOK_SECRET is empty or a placeholder; set it to the webhook secret "
                "from the Salla Partner Portal (or APP_ENV=development for local work)"
            )
        for name, url in (("REDIS_URL", self.redis_url), ("QUEUE_REDIS_URL", self.queue_redis_url)):
            if self.app_env == "development" or not url:
                continue
            redis_secret = redis_password(url)
            if redis_secret.lower() in PLACEHOLDER_SECRETS - {""} or redis_secret.startswith("<"):
                raise ValueError(
                    f"{name}'s password is a placeholder; put Redis's real password in it "
                    "(the deploy files read it from REDIS_PASSWORD)"
                )
        self._check_queue_sentinel()
        if self.redis_cluster and not (self.queue_redis_url or self.queue_redis_sentinels):
            raise ValueError(
                "REDIS_CLUSTER=true needs a queue Redis of its own: arq cannot run on a Redis "
                "Cluster; set QUEUE_REDIS_URL (or QUEUE_REDIS_SENTINELS) to a standalone Redis"
            )
        if self.redis_cluster and not self.redis_url:
            raise ValueError(
                "REDIS_CLUSTER=true needs REDIS_URL set to one of the cluster's nodes "
                "(redis://node-1:6379); the embedded Redis is a single server"
            )
        admin = self.admin_token.get_secret_value()
        if admin and self.app_env != "development" and len(admin) < MIN_ADMIN_TOKEN_LENGTH:
            raise ValueError(
                f"ADMIN_TOKEN is shorter than {MIN_ADMIN_TOKEN_LENGTH} characters; use a long "
                "random value (python -c 'import secrets; print(secrets.token_urlsafe(32))') "
                "or leave it empty to turn the admin routes off"
            )
        return self

    def _check_queue_sentinel(self) -> None:
        """Sentinels and the master's name go together; TLS is refused in Sentinel mode because
        arq passes no certificate options to the Sentinel client (service/queue.py)."""
        sentinels, master = self.queue_redis_sentinels, self.queue_redis_sentinel_master.strip()
        if sentinels and not master:
            raise ValueError(
                "QUEUE_REDIS_SENTINELS is set without QUEUE_REDIS_SENTINEL_MASTER; set it to the "
                "name the Sentinels monitor the queue's Redis by (sentinel monitor <name> ...)"
            )
        if master and not sentinels:
            raise ValueError(
                "QUEUE_REDIS_SENTINEL_MASTER is set without QUEUE_REDIS_SENTINELS; list the "
                "Sentinels as host:port,host:port (or unset it for a standalone queue Redis)"
            )
        if sentinels and (self.queue_redis_url or "").startswith("rediss://"):
            raise ValueError(
                "QUEUE_REDIS_URL is rediss:// but arq's Sentinel mode cannot pass TLS "
                "certificates; use redis:// behind Sentinels, or a standalone queue Redis"
            )

    @property
    def queue_sentinels(self) -> list[tuple[str, int]]:
        """`QUEUE_REDIS_SENTINELS` as (host, port) pairs (empty: a standalone queue Redis)."""
        return sentinel_hosts(self.queue_redis_sentinels)

    @property
    def is_development(self) -> bool:
        return self.app_env == "development"

    @property
    def webhook_secret(self) -> str:
        secret = self.salla_webhook_secret.get_secret_value()
        if not secret and self.is_development:
            return DEVELOPMENT_WEBHOOK_SECRET
        return secret


def env_file() -> Path | None:
    """The dotenv file to read (it need not exist), or None when it is turned off."""
    name = os.environ.get(ENV_FILE_VARIABLE, ".env")
    return Path(name) if name else None


def load_settings(**overrides: object) -> Settings:
    """Build `Settings` from the environment and `.env`, turning validation errors into one
    `ConfigError` (one sentence naming each variable, and a hint)."""
    try:
        return Settings(_env_file=env_file(), **overrides)  # type: ignore[call-arg,arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]).upper()
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise ConfigError(
            "invalid settings: " + "; ".join(problems),
            hint="set them in the environment or in .env (.env.example lists every setting)",
        ) from None


class _LogChoice(BaseSettings):
    """Only `LOG_FORMAT`, read leniently: how to print an error when the settings themselves
    cannot be loaded."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    log_format: str = "auto"


def requested_log_format() -> Literal["json", "console", "auto"]:
    """`LOG_FORMAT` from the environment or `.env`, whatever else is wrong with the settings."""
    try:
        chosen = _LogChoice(_env_file=env_file()).log_format.strip().lower()  # type: ignore[call-arg]
    except ValidationError:
        return "auto"
    if chosen == "json":
        return "json"
    return "console" if chosen == "console" else "auto"


class _CommandDefaults(BaseSettings):
    """What the commands that run without `Settings` (`send`, `sandbox`, `rules ...`) take
    from the environment as option defaults: the environment only, no `.env`, and an empty
    variable counts as unset (as when click read these variables itself)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    rules_path: str = ""
    salla_webhook_secret: str = ""
    sandbox_webhook_secret: str = ""


def default_rules_path() -> Path:
    """`--rules`'s default: `RULES_PATH`, else `rules`."""
    return Path(_CommandDefaults().rules_path or "rules")


def default_webhook_secret(*, sandbox: bool = False) -> str:
    """`send --secret`'s default (`SALLA_WEBHOOK_SECRET`) or, with `sandbox`, the sandbox's
    (`SANDBOX_WEBHOOK_SECRET`); else the development secret."""
    defaults = _CommandDefaults()
    chosen = defaults.sandbox_webhook_secret if sandbox else defaults.salla_webhook_secret
    return chosen or DEVELOPMENT_WEBHOOK_SECRET
