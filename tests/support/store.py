"""A store as the tests set one up: installed in the sandbox, authorized through a signed
`app.store.authorize`, and sent Salla's sample webhooks."""

from __future__ import annotations

import json
from typing import Any

from service.sandbox.app import Sandbox
from tests.conftest import Service, fixture_json

ORDER_MERCHANT = 193718979
ORDER_CUSTOMER = 1779795066


def authorize_body(merchant: int, store: Any) -> bytes:
    doc = fixture_json("app.store.authorize.json")
    doc["merchant"] = merchant
    doc["data"].update(
        access_token=store.access_token,
        refresh_token=store.refresh_token,
        expires=int(store.access_expires_at),
    )
    return json.dumps(doc).encode()


def install(web: Service, box: Sandbox, merchant: int, **options: Any) -> Any:
    store = box.add_store(merchant, **options)
    assert web.post_webhook(authorize_body(merchant, store)).json()["status"] == "accepted"
    return store


def with_merchant(name: str, merchant: int, **changes: Any) -> bytes:
    doc = fixture_json(name)
    doc["merchant"] = merchant
    for path, value in changes.items():
        node = doc
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return json.dumps(doc, ensure_ascii=False).encode()


def post_reviews(web: Service, merchant: int, customers: Any) -> None:
    """One review per customer (each of its own product), as Salla would send them."""
    for customer in customers:
        web.post_webhook(
            with_merchant(
                "review.added.json",
                merchant,
                data__customer__id=str(customer),
                data__product__id=str(customer),
            )
        )


def balance(box: Sandbox, merchant: int, customer: int) -> int:
    store = box.stores.get(merchant)
    return store.balances.get(customer, 0) if store else 0
