"""The inbox stream as kept: bodies are stored compressed (service/body_codec.py), so tests read
the stream undecoded and give each body back as it was received."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from service import body_codec
from service.keys import WEBHOOK_STREAM


async def kept_webhooks(redis: Redis) -> list[tuple[str, dict[str, Any]]]:
    """Every entry of the inbox stream: text fields as str, `body` as the bytes received."""
    raw = await redis.execute_command("XRANGE", WEBHOOK_STREAM, "-", "+", NEVER_DECODE=True)
    out = []
    for stream_id, fields in raw:
        doc: dict[str, Any] = {k.decode(): v.decode() for k, v in fields.items() if k != b"body"}
        if b"body" in fields:
            doc["body"] = body_codec.decode(fields[b"body"])
        out.append((stream_id.decode(), doc))
    return out
