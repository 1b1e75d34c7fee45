"""The sandbox: a small Salla store for this service, over real HTTP.

It answers the Admin API calls the service makes (the loyalty endpoints, the token endpoint,
the orders endpoints: `loyalty.py`, `orders_api.py`), keeps orders and sends their webhooks to
the service as a store does (`webhooks_out.py`), and is driven by control routes under
`/_sandbox/` (`control.py`). docs/sandbox.md describes every route and switch.

Threads: the HTTP app runs on its server's event loop, and tests call `Sandbox` methods from
other threads. State changes happen under `Sandbox.lock`; webhooks are always sent from the
server's loop. `change_order`, `delete_order` and `release_webhooks` hand the sending to that
loop and wait for it (call them from any thread but the server's own; in a coroutine, await
the `_async` variants instead). With a webhook URL set, orders can only change while the
sandbox is being served.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
from starlette.applications import Starlette

from service.errors import SandboxNotServing
from service.sandbox import control, loyalty, order_changes, orders, orders_api, state
from service.sandbox.buckets import Bucket
from service.sandbox.loyalty import request_schema
from service.sandbox.order_changes import Prepared
from service.sandbox.state import DEFAULT_SCOPE, Faults, Store
from service.sandbox.webhooks_out import Outbox, ReleaseOrder

__all__ = ["DEFAULT_SCOPE", "Faults", "Sandbox", "Store", "create_sandbox_app", "request_schema"]


#: What `update_store` (and `PATCH /_sandbox/stores/{merchant}`) can change.
STORE_OPTIONS = frozenset(
    {
        "scope",
        "rate_limit",
        "rate_window_s",
        "plan_rate_limit",
        "plan_rate_window_s",
        "order_cancelled_event",
    }
)
#: What `add_store` (and `POST /_sandbox/stores`) accepts beside the merchant.
INSTALL_OPTIONS = STORE_OPTIONS | {"access_token", "refresh_token", "access_ttl_s", "customers"}


class Sandbox:
    """All sandbox state; one per app. Inspectable by tests in-process or over HTTP."""

    def __init__(
        self,
        rate_limit: int = 500,
        rate_window_s: float = 600.0,
        *,
        plan_rate_limit: int = 120,
        plan_rate_window_s: float = 60.0,
        webhook_url: str | None = None,
        webhook_secret: str = "",
        webhook_resends: int = 0,
        webhook_resend_delay_s: float = 300.0,
        webhook_timeout_s: float = 30.0,
        state_file: Path | str | None = None,
        save_delay_s: float = 0.2,
    ) -> None:
        if webhook_url and not webhook_secret:
            raise ValueError("a webhook URL needs a webhook secret to sign with")
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.plan_rate_limit = plan_rate_limit
        self.plan_rate_window_s = plan_rate_window_s
        self.state_file = Path(state_file) if state_file is not None else None
        self.save_delay_s = save_delay_s
        self.lock = threading.RLock()
        self.stores, self.counters = (
            state.load(self.state_file) if self.state_file else ({}, state.Counters())
        )
        self.validator = jsonschema.Draft202012Validator(request_schema())
        reset_schema = request_schema()
        reset_schema["required"] = [r for r in reset_schema["required"] if r != "points"]
        self.reset_validator = jsonschema.Draft202012Validator(reset_schema)
        self.outbox = Outbox(
            webhook_url or None,
            webhook_secret,
            resends=webhook_resends,
            resend_delay_s=webhook_resend_delay_s,
            timeout_s=webhook_timeout_s,
            sandbox_outage=lambda: self.counters.outage,
            changed=self.changed,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._save_handle: asyncio.TimerHandle | None = None

    def send_webhooks_to(self, url: str | None, secret: str = "") -> None:
        """Point the store's webhooks at `url`, signed with `secret` (None: send none). For a
        sandbox made before the service it talks to, as the tests' fixtures are."""
        if url and not secret:
            raise ValueError("a webhook URL needs a webhook secret to sign with")
        self.outbox.url, self.outbox.secret = url or None, secret

    # -- lifecycle and persistence ------------------------------------------------------------

    async def start(self) -> None:
        """Called by the app's lifespan: webhooks are sent from this loop from now on."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self.outbox.start()

    async def stop(self) -> None:
        """Called by the app's lifespan: ends delayed sends, closes the client, saves."""
        await self.outbox.close()
        if self._save_handle is not None:
            self._save_handle.cancel()
            self._save_handle = None
        self._loop = self._loop_thread = None
        self.save()

    def changed(self) -> None:
        """Something worth keeping changed: save soon (served) or now (not served)."""
        if self.state_file is None:
            return
        loop = self._loop
        if loop is None:
            self.save()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: stop() saves
            loop.call_soon_threadsafe(self._arm_save)

    def _arm_save(self) -> None:
        if self._save_handle is None and self._loop is not None:
            self._save_handle = self._loop.call_later(self.save_delay_s, self._save_now)

    def _save_now(self) -> None:
        self._save_handle = None
        self.save()

    def save(self) -> None:
        """Write the state file now (nothing without one)."""
        if self.state_file is None:
            return
        with self.lock:
            content = state.dump(self.stores, self.counters)
        state.write(self.state_file, content)

    # -- stores -------------------------------------------------------------------------------

    @property
    def entry_seq(self) -> int:
        return self.counters.entry_seq

    def add_store(self, merchant: int, /, **options: Any) -> Store:
        """Install (or re-install, forgetting the old one) a store; returns it with its tokens.

        Options: access_token, refresh_token, access_ttl_s, scope, rate_limit, rate_window_s,
        plan_rate_limit, plan_rate_window_s, customers (ids), order_cancelled_event."""
        _check_options(options, INSTALL_OPTIONS)
        store = Store(
            merchant=merchant,
            access_token=options.get("access_token") or secrets.token_urlsafe(24),
            refresh_token=options.get("refresh_token") or secrets.token_urlsafe(24),
            access_expires_at=time.time() + float(options.get("access_ttl_s", 14 * 86400)),
            bucket=Bucket(self.rate_limit, self.rate_window_s),
            plan_bucket=Bucket(self.plan_rate_limit, self.plan_rate_window_s),
        )
        store.known_customers = {int(c) for c in options.get("customers", [])}
        self._configure(store, options)
        with self.lock:
            self.stores[merchant] = store
        self.changed()
        return store

    def update_store(self, merchant: int, /, **options: Any) -> Store:
        """Change a store's scope, buckets or `order_cancelled_event`, keeping everything else."""
        _check_options(options, STORE_OPTIONS)
        with self.lock:
            store = self.store(merchant)
            self._configure(store, options)
        self.changed()
        return store

    @staticmethod
    def _configure(store: Store, options: Mapping[str, Any]) -> None:
        scope = options.get("scope")
        if scope is not None:
            if not isinstance(scope, str):
                raise ValueError("'scope' must be a space-separated string")
            store.scope = " ".join(scope.split())
        if "rate_limit" in options or "rate_window_s" in options:
            store.bucket = Bucket(
                int(options.get("rate_limit", store.bucket.limit)),
                float(options.get("rate_window_s", store.bucket.window_s)),
            )
        if "plan_rate_limit" in options or "plan_rate_window_s" in options:
            store.plan_bucket = Bucket(
                int(options.get("plan_rate_limit", store.plan_bucket.limit)),
                float(options.get("plan_rate_window_s", store.plan_bucket.window_s)),
            )
        for bucket in (store.bucket, store.plan_bucket):
            if bucket.limit < 1 or bucket.window_s <= 0:
                raise ValueError("rate limits must be at least 1 per a positive window")
        if "order_cancelled_event" in options:
            store.order_cancelled_event = bool(options["order_cancelled_event"])

    def store(self, merchant: int) -> Store:
        """The store, or `LookupError`."""
        found = self.stores.get(merchant)
        if found is None:
            raise LookupError(f"no such store: {merchant}")
        return found

    def by_access_token(self, token: str) -> Store | None:
        for store in list(self.stores.values()):
            if token and secrets.compare_digest(store.access_token, token):
                return store
        return None

    def apply(self, store: Store, body: dict[str, Any]) -> None:
        """Apply an accepted `POST /customers/loyalty/points` body."""
        with self.lock:
            loyalty.apply(store, self.counters, body)
        self.changed()

    # -- orders -------------------------------------------------------------------------------

    def order(self, merchant: int, order_id: int, *, light: bool = False) -> dict[str, Any] | None:
        """The order as `GET /orders/{id}` shows it, or None."""
        with self.lock:
            found = self.store(merchant).orders.get(order_id)
            return None if found is None else orders.render(found, light=light)

    def change_order(
        self, merchant: int, order_id: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Create or change an order and send its webhooks; waits for the ones sent now.

        `fields` as the body of `POST /_sandbox/orders`: status, total, customer_id,
        reference_id, payment_method, note, date (new orders), webhook (the switches).
        Returns `{"order": ..., "webhooks": [log entries]}`; `ValueError` for bad input,
        `LookupError` for an unknown store."""
        return self._call(lambda: self._locked(order_changes.change, merchant, order_id, fields))

    async def change_order_async(
        self, merchant: int, order_id: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        return await self._acall(
            lambda: self._locked(order_changes.change, merchant, order_id, fields)
        )

    def delete_order(
        self, merchant: int, order_id: int, webhook: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Forget the order (Order Details answers 404 from now on) and send `order.deleted`."""
        return self._call(lambda: self._locked(order_changes.delete, merchant, order_id, webhook))

    async def delete_order_async(
        self, merchant: int, order_id: int, webhook: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return await self._acall(
            lambda: self._locked(order_changes.delete, merchant, order_id, webhook)
        )

    def _locked(
        self, step: Callable[..., Prepared], merchant: int, order_id: int | None, arg: Any
    ) -> Prepared:
        with self.lock:
            prepared = step(self.store(merchant), self.counters, self.outbox, order_id, arg)
        self.changed()
        return prepared

    # -- webhook switches ---------------------------------------------------------------------

    def release_webhooks(
        self, merchant: int | None = None, order: ReleaseOrder = "as_is", seed: int | None = None
    ) -> list[dict[str, Any]]:
        """Send the held webhooks (of one store, or all) in `order`; waits for them."""
        loop = self._server_loop()
        work = self.outbox.release(self._take_held(merchant), order, seed)
        return [dict(e) for e in asyncio.run_coroutine_threadsafe(work, loop).result()]

    async def release_webhooks_async(
        self, merchant: int | None = None, order: ReleaseOrder = "as_is", seed: int | None = None
    ) -> list[dict[str, Any]]:
        loop = self._server_loop(on_loop=True)
        held = self._take_held(merchant)
        if loop is asyncio.get_running_loop():
            released = await self.outbox.release(held, order, seed)
        else:
            work = asyncio.run_coroutine_threadsafe(self.outbox.release(held, order, seed), loop)
            released = await asyncio.wrap_future(work)
        return [dict(e) for e in released]

    def _take_held(self, merchant: int | None) -> list[tuple[Store, state.Held]]:
        with self.lock:
            stores = [self.store(merchant)] if merchant is not None else list(self.stores.values())
            held = [(store, item) for store in stores for item in store.held]
            for store in stores:
                store.held = []
        self.changed()
        return held

    def set_outage(self, on: bool, merchant: int | None = None) -> None:
        """While on, every delivery attempt (of one store, or of all) fails as unreachable."""
        with self.lock:
            if merchant is None:
                self.counters.outage = on
            else:
                self.store(merchant).outage = on
        self.changed()

    # -- sending from the right loop ----------------------------------------------------------

    def _server_loop(self, *, on_loop: bool = False) -> asyncio.AbstractEventLoop:
        """The loop webhooks are sent from; refuses a blocking call from that loop's thread."""
        loop = self._loop
        if loop is None:
            raise SandboxNotServing(
                "the sandbox sends webhooks from its server's event loop; serve it first "
                "(create_sandbox_app + a server)"
            )
        if not on_loop and threading.get_ident() == self._loop_thread:
            raise RuntimeError("on the sandbox's own loop, await the *_async method instead")
        return loop

    def _call(self, prepare: Callable[[], Prepared]) -> dict[str, Any]:
        loop = self._server_loop() if self.outbox.url else None
        prepared = prepare()
        if prepared.to_send and loop is not None:
            asyncio.run_coroutine_threadsafe(self.outbox.send(prepared.to_send), loop).result()
        return prepared.result()

    async def _acall(self, prepare: Callable[[], Prepared]) -> dict[str, Any]:
        loop = self._server_loop(on_loop=True) if self.outbox.url else None
        prepared = prepare()
        if prepared.to_send and loop is not None:
            if loop is asyncio.get_running_loop():
                await self.outbox.send(prepared.to_send)
            else:
                work = asyncio.run_coroutine_threadsafe(self.outbox.send(prepared.to_send), loop)
                await asyncio.wrap_future(work)
        return prepared.result()


def _check_options(options: Mapping[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {sorted(known)}")


def create_sandbox_app(sandbox: Sandbox | None = None) -> Starlette:
    box = sandbox or Sandbox()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await box.start()
        try:
            yield
        finally:
            await box.stop()

    app = Starlette(
        routes=[*loyalty.routes(box), *orders_api.routes(box), *control.routes(box)],
        lifespan=lifespan,
    )
    app.state.sandbox = box
    return app
