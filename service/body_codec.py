"""How a webhook body is kept in the inbox stream: raw deflate with a preset dictionary.

A webhook is kept `WEBHOOK_RETENTION_DAYS` for replay; an order's JSON is 4-8 KB, mostly the same
keys and shapes in every delivery. A preset dictionary made of Salla's published payloads
(tests/fixtures, compacted as the web receives them) lets deflate refer to those from the
first byte: an `order.status.updated` of 4.3 KB keeps in about 1.2 KB at level 1. zlib is in
the standard library and its dictionary support is what this needs (zstd's trained
dictionaries would do a little better, for a native dependency).

Encoded form: `\\x00`, a version byte naming the dictionary, then the deflate stream. A body
that does not start with `\\x00` is stored as it came (JSON never starts with it): tools and
tests that write the stream directly, or an entry written before this encoding.

The dictionary of a version never changes (entries written with it must stay readable): a new
dictionary takes a new version byte, and the old one stays for reading.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from importlib import resources

MARK = b"\x00"
VERSION = 1
#: deflate level 1: about 20% larger than level 6, at a fraction of its time (the web's hot path).
LEVEL = 1
_DICTIONARIES = {1: "webhook-v1.zdict"}
#: The payloads the dictionary is made of, least common first (deflate reaches the end of its
#: window most cheaply, so the most common shape goes last).
DICTIONARY_SOURCES = (
    "app.settings.updated.json",
    "customer.created.derived.json",
    "review.added.json",
    "order.refunded.derived.json",
    "order.created.json",
    "order.cancelled.derived.json",
    "order.status.updated.json",
)


def build_dictionary(payloads: Iterable[bytes]) -> bytes:
    """A preset dictionary from sample payloads: each compacted as Salla sends bodies (no
    whitespace, UTF-8), the last 32 KB (deflate's window)."""
    docs = (json.loads(p) for p in payloads)
    joined = b"".join(
        json.dumps(d, ensure_ascii=False, separators=(",", ":")).encode() for d in docs
    )
    return joined[-32768:]


def _dictionary(version: int) -> bytes:
    return resources.files("service").joinpath(_DICTIONARIES[version]).read_bytes()


_ZDICT = _dictionary(VERSION)
# A compressor primed with the dictionary, copied for each body: priming costs more than
# compressing a body.
_PRIMED = zlib.compressobj(LEVEL, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, _ZDICT)


def encode(body: bytes) -> bytes:
    """A body as kept in the inbox."""
    compressor = _PRIMED.copy()
    return MARK + bytes((VERSION,)) + compressor.compress(body) + compressor.flush()


def decode(stored: bytes) -> bytes:
    """A kept body as it was received. Raises ValueError for an encoding this version does not
    know (written by a newer release) or a damaged one."""
    if stored[:1] != MARK:
        return stored
    version = stored[1] if len(stored) > 1 else -1
    if version not in _DICTIONARIES:
        raise ValueError(f"a kept webhook body in an unknown encoding ({version})")
    zdict = _ZDICT if version == VERSION else _dictionary(version)
    try:
        inflater = zlib.decompressobj(-15, zdict)
        body = inflater.decompress(stored[2:]) + inflater.flush()
    except zlib.error as exc:
        raise ValueError(f"a kept webhook body that does not inflate: {exc}") from None
    if not inflater.eof:
        raise ValueError("a kept webhook body that is cut short")
    return body
