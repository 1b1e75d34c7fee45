"""The Salla Admin API client: loyalty points, points history, token refresh. Typed errors.

Failures are classified by what they mean for delivery:

* the request certainly did not take effect: `SallaRateLimited` (429), `SallaUnavailable`
  (5xx, or the connection could not be made) → retry with backoff;
* Salla refused it: `SallaValidationError` (422), `SallaAuthError` (401/403), `SallaError`;
* nobody knows: `OutcomeUnknown` (timeout or connection lost after sending) → reconcile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx

from service.errors import (
    OutcomeUnknown,
    SallaAuthError,
    SallaError,
    SallaNotFound,
    SallaRateLimited,
    SallaUnavailable,
    SallaValidationError,
)
from service.ids import parse_digits

LOYALTY_POINTS_PATH = "/customers/loyalty/points"
ORDERS_PATH = "/orders"
#: The docs disagree on the reset flag's name; the schema says `reset_points`. Kept here only.
RESET_FLAG = "reset_points"


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    limit: int | None
    remaining: int | None
    reset_epoch_s: int | None

    @classmethod
    def from_headers(cls, headers: httpx.Headers) -> RateLimitInfo:
        def number(name: str) -> int | None:
            return parse_digits(headers.get(name, "").strip())  # ASCII digits only: "٣" is no count

        return cls(
            number("x-ratelimit-limit"),
            number("x-ratelimit-remaining"),
            number("x-ratelimit-reset"),
        )


@dataclass(frozen=True, slots=True)
class TokenSet:
    access_token: str
    refresh_token: str
    expires_at_s: int
    scope: str = ""


MARKER_PREFIX = " #"


def marked_reason(reason: str, batch_id: str) -> str:
    """The reason with this call's marker, so the call can be found in the points history.

    The marker is per call, and every customer in a call shares it: it costs no batching.
    """
    return f"{reason}{MARKER_PREFIX}{batch_id[:8]}"


def history_has_marker(history: Any, batch_id: str) -> bool:
    marker = f"{MARKER_PREFIX}{batch_id[:8]}"
    entries = history.get("data", []) if isinstance(history, dict) else []
    return any(isinstance(e, dict) and str(e.get("notes", "")).endswith(marker) for e in entries)


def loyalty_body(
    points: int, grant_type: str, reason: str, channels: list[str], customers: list[int]
) -> dict[str, Any]:
    """The request body for one call, exactly as `loyalty-points.openapi.yaml` describes it."""
    return {
        "points": points,
        "type": grant_type,
        "reason": reason,
        "channel_send": channels,
        "customers": customers,
    }


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        reset = RateLimitInfo.from_headers(response.headers).reset_epoch_s
        return max(1.0, reset - time.time()) if reset else 60.0


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


def _data(response: httpx.Response) -> dict[str, Any]:
    doc = response.json()
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise SallaError(response.status_code, _body(response), "Salla's answer has no data")
    return data


def raise_for_salla(response: httpx.Response) -> None:
    status = response.status_code
    if status in (200, 201):
        return
    body = _body(response)
    if status == 429:
        raise SallaRateLimited(status, body, _retry_after(response))
    if status in (401, 403):
        raise SallaAuthError(status, body)
    if status == 422:
        raise SallaValidationError(status, body)
    if status == 404:
        raise SallaNotFound(status, body)
    if status >= 500:
        raise SallaUnavailable(status, body)
    raise SallaError(status, body)


class SallaClient:
    """One per process; wraps a shared `httpx.AsyncClient` created in the lifespan/startup."""

    def __init__(self, http: httpx.AsyncClient, api_base: str) -> None:
        self._http = http
        self._base = api_base.rstrip("/")

    async def add_points(self, access_token: str, body: dict[str, Any]) -> RateLimitInfo:
        """POST the loyalty points call. Returns the rate-limit headers of the 201."""
        try:
            response = await self._http.post(
                self._base + LOYALTY_POINTS_PATH,
                json=body,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise SallaUnavailable(0, None, f"could not connect to Salla: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise OutcomeUnknown(0, None, f"no answer from Salla: {exc!r}") from exc
        raise_for_salla(response)
        return RateLimitInfo.from_headers(response.headers)

    async def points_history(self, access_token: str, customer_id: int, page: int = 1) -> Any:
        response = await self._http.get(
            self._base + LOYALTY_POINTS_PATH,
            params={"customer_id": customer_id, "page": page},
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
        raise_for_salla(response)
        return response.json()

    async def _get(self, access_token: str, path: str, params: Any = None) -> httpx.Response:
        """A read: safe to repeat, so every transport failure is `SallaUnavailable`."""
        try:
            response = await self._http.get(
                self._base + path,
                params=params,
                headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
            )
        except httpx.TransportError as exc:
            raise SallaUnavailable(0, None, f"no answer from Salla: {exc!r}") from exc
        raise_for_salla(response)
        return response

    async def order(self, access_token: str, order_id: int) -> tuple[dict[str, Any], RateLimitInfo]:
        """`GET /orders/{id}`: the order as Salla has it now (`SallaNotFound` when it is gone)."""
        response = await self._get(access_token, f"{ORDERS_PATH}/{order_id}")
        return _data(response), RateLimitInfo.from_headers(response.headers)

    async def orders_page(
        self, access_token: str, *, from_date: str, to_date: str, page: int
    ) -> tuple[list[dict[str, Any]], int, RateLimitInfo]:
        """One page of `GET /orders` created between two dates (whole days, inclusive), oldest
        id first; returns the page's orders and the number of pages."""
        response = await self._get(
            access_token,
            ORDERS_PATH,
            {"from_date": from_date, "to_date": to_date, "sort_by": "id-asc", "page": page},
        )
        doc = response.json()
        items = doc.get("data") if isinstance(doc, dict) else None
        orders = [o for o in items if isinstance(o, dict)] if isinstance(items, list) else []
        pagination = doc.get("pagination") if isinstance(doc, dict) else None
        pages = pagination.get("totalPages") if isinstance(pagination, dict) else None
        total_pages = pages if isinstance(pages, int) and pages > 0 else page
        return orders, total_pages, RateLimitInfo.from_headers(response.headers)

    async def refresh(
        self, token_url: str, client_id: str, client_secret: str, refresh_token: str
    ) -> TokenSet:
        """Exchange a (single-use) refresh token for a new token pair."""
        try:
            response = await self._http.post(
                token_url,
                data={
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token,
                    "client_id": client_id,
                    "client_secret": client_secret,
                },
            )
        except httpx.TransportError as exc:
            raise SallaUnavailable(0, None, f"could not reach the token endpoint: {exc!r}") from exc
        if response.status_code in (400, 401):
            raise SallaAuthError(response.status_code, _body(response), "token refresh refused")
        raise_for_salla(response)
        doc = response.json()
        return TokenSet(
            access_token=str(doc["access_token"]),
            refresh_token=str(doc["refresh_token"]),
            expires_at_s=int(time.time()) + int(doc.get("expires_in", 0)),
            scope=str(doc.get("scope", "")),
        )
