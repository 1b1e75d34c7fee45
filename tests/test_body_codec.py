"""Webhook bodies kept for replay: compressed with a preset dictionary, given back exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from service import body_codec
from tests.conftest import FIXTURES


def varied_order(seed: int) -> bytes:
    """Salla's published order.status.updated with another store's values: other ids, names,
    amounts and products (the dictionary holds the published one itself)."""
    rng = random.Random(seed)
    doc = json.loads((FIXTURES / "order.status.updated.json").read_bytes())
    doc["merchant"] = rng.randint(10**8, 2 * 10**9)
    order = doc["data"]["order"]
    order["id"] = rng.randint(10**8, 2 * 10**9)
    order["reference_id"] = rng.randint(10**4, 10**6)
    order["customer"]["first_name"] = rng.choice(["نورة", "Fahad", "سارة", "Omar"])
    order["customer"]["mobile"] = rng.randint(500000000, 599999999)
    for item in order.get("items", []):
        item["name"] = f"منتج {rng.randint(1, 10**6)} {rng.choice(['أحمر', 'large', 'قطن'])}"
        item["sku"] = f"SKU-{rng.randint(1, 10**8)}"
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


class TestBodyCodec:
    """What the inbox keeps decodes to the bytes received, in well under 2 KB."""

    @pytest.mark.parametrize("seed", range(5))
    def test_an_order_body_comes_back_exactly_and_small(self, seed: int) -> None:
        body = varied_order(seed)
        kept = body_codec.encode(body)
        assert body_codec.decode(kept) == body
        assert kept[:2] == b"\x00\x01"
        assert len(kept) < 1600 < len(body) / 2

    def test_any_bytes_come_back(self) -> None:
        body = bytes(random.Random(3).getrandbits(8) for _ in range(3000))
        assert body_codec.decode(body_codec.encode(body)) == body

    def test_a_body_kept_as_it_came_is_read_as_it_is(self) -> None:
        assert body_codec.decode(b'{"event":"order.created"}') == b'{"event":"order.created"}'

    @pytest.mark.parametrize(
        ("kept", "why"),
        [(b"\x00\x09abc", "unknown encoding"), (b"\x00\x01\xff\xff", "does not inflate")],
    )
    def test_an_unreadable_body_is_a_clear_error(self, kept: bytes, why: str) -> None:
        with pytest.raises(ValueError, match=why):
            body_codec.decode(kept)

    def test_a_cut_body_is_an_error_not_a_shorter_body(self) -> None:
        kept = body_codec.encode(varied_order(1))
        with pytest.raises(ValueError, match="cut short"):
            body_codec.decode(kept[:-20])

    def test_the_shipped_dictionary_is_made_of_the_published_payloads(self) -> None:
        """Entries written with a dictionary must stay readable: it is rebuilt here from the
        payloads it was made of, so an edit to them cannot change it unnoticed."""
        payloads = (Path(FIXTURES, name).read_bytes() for name in body_codec.DICTIONARY_SOURCES)
        assert body_codec.build_dictionary(payloads) == body_codec._dictionary(1)
