"""POST /webhooks/salla over real HTTP: every bad input has its answer and changes nothing."""

from __future__ import annotations

import json

import httpx
import pytest
from redis.asyncio import Redis

from service.keys import APP_EVENTS_STREAM, WEBHOOK_STREAM
from service.webhooks import sign
from tests.conftest import SECRET, Service, fixture_bytes

ORDER = fixture_bytes("order.status.updated.json")


async def queued_jobs(redis: Redis) -> int:
    """Deliveries persisted: inbox entries (webhooks for the rules), app events (their own
    stream) and any arq job (none is made by the web)."""
    streams = [await redis.xlen(stream) for stream in (WEBHOOK_STREAM, APP_EVENTS_STREAM)]
    return sum(streams) + int(await redis.zcard("arq:queue"))


class TestRefusals:
    """Refused requests answer JSON with a clear message and queue nothing."""

    async def test_wrong_signature_is_401(self, web: Service, redis: Redis) -> None:
        response = web.post_webhook(ORDER, secret="not-the-secret")
        assert response.status_code == 401
        assert response.json() == {
            "status": "rejected",
            "error": "signature does not match the request body",
        }
        assert await queued_jobs(redis) == 0

    async def test_missing_signature_is_401(self, web: Service, redis: Redis) -> None:
        response = httpx.post(f"{web.url}/webhooks/salla", content=ORDER)
        assert response.status_code == 401
        assert "missing X-Salla-Signature" in response.json()["error"]
        assert await queued_jobs(redis) == 0

    async def test_wrong_strategy_is_401(self, web: Service, redis: Redis) -> None:
        response = web.post_webhook(ORDER, strategy="token")
        assert response.status_code == 401
        assert "does not match the configured 'signature'" in response.json()["error"]
        assert await queued_jobs(redis) == 0

    async def test_oversized_body_is_413(self, web: Service, redis: Redis) -> None:
        body = json.dumps(
            {"event": "order.created", "merchant": 1, "data": {"x": "a" * (1 << 20)}}
        ).encode()
        response = web.post_webhook(body)
        assert response.status_code == 413
        assert "limit" in response.json()["error"]
        assert await queued_jobs(redis) == 0

    async def test_oversized_chunked_body_is_413(self, web: Service, redis: Redis) -> None:
        def chunks():  # type: ignore[no-untyped-def]
            for _ in range(20):
                yield b"x" * 65536

        response = httpx.post(
            f"{web.url}/webhooks/salla",
            content=chunks(),
            headers={"X-Salla-Signature": "0" * 64},
        )
        assert response.status_code == 413
        assert await queued_jobs(redis) == 0

    async def test_published_broken_app_installed_is_400(self, web: Service, redis: Redis) -> None:
        response = web.post_webhook(fixture_bytes("app.installed.json"))
        assert response.status_code == 400
        assert response.json()["error"].startswith("body is not valid JSON")
        assert await queued_jobs(redis) == 0

    async def test_signed_non_envelope_is_400(self, web: Service, redis: Redis) -> None:
        response = web.post_webhook(b'{"hello": "world"}')
        assert response.status_code == 400
        assert "missing event, merchant, data" in response.json()["error"]
        assert await queued_jobs(redis) == 0


class TestAcceptance:
    """Accepted deliveries are persisted before the 200, once."""

    async def test_known_event_is_accepted_and_persisted(self, web: Service, redis: Redis) -> None:
        response = web.post_webhook(ORDER)
        assert response.status_code == 200
        assert response.json()["status"] == "accepted"
        assert await queued_jobs(redis) == 1

    @pytest.mark.parametrize("strategy", ["signature"])
    async def test_same_delivery_three_times_is_one_job(
        self, web: Service, redis: Redis, strategy: str
    ) -> None:
        answers = [web.post_webhook(ORDER, strategy=strategy).json()["status"] for _ in range(3)]
        assert answers == ["accepted", "duplicate", "duplicate"]
        assert await queued_jobs(redis) == 1

    async def test_unused_event_is_200_ignored(self, web: Service, redis: Redis) -> None:
        body = b'{"event":"product.created","merchant":1,"created_at":"","data":{"id":1}}'
        response = web.post_webhook(body)
        assert response.status_code == 200
        assert response.json() == {"status": "ignored", "event": "product.created"}
        assert await queued_jobs(redis) == 0

    async def test_app_events_are_accepted_without_rules(self, web: Service, redis: Redis) -> None:
        response = web.post_webhook(fixture_bytes("app.store.authorize.json"))
        assert response.json()["status"] == "accepted"
        assert sign(fixture_bytes("app.store.authorize.json"), SECRET)  # the FACTS vector body
        assert await queued_jobs(redis) == 1
        assert await redis.xlen(APP_EVENTS_STREAM) == 1  # in its own stream, not an arq job


class TestOtherRoutes:
    """Wrong paths and methods answer JSON too."""

    def test_unknown_path_is_json_404(self, web: Service) -> None:
        response = httpx.get(f"{web.url}/nope")
        assert response.status_code == 404
        assert response.json() == {"status": "rejected", "error": "there is nothing at GET /nope"}

    def test_wrong_method_is_json_405(self, web: Service) -> None:
        response = httpx.get(f"{web.url}/webhooks/salla")
        assert response.status_code == 405
        assert response.json() == {
            "status": "rejected",
            "error": "GET /webhooks/salla: the method is not allowed here",
        }


class TestHealth:
    def test_healthz(self, web: Service) -> None:
        assert httpx.get(f"{web.url}/healthz").json() == {"status": "ok"}

    def test_readyz_reports_redis_and_rules(self, web: Service) -> None:
        response = httpx.get(f"{web.url}/readyz")
        assert response.status_code == 200
        assert response.json()["redis"] == "ok" and response.json()["rules"] >= 2


class TestSlowClients:
    """Slow or stalled clients get 408 and never hold up other deliveries."""

    async def test_stalled_body_gets_408_and_others_are_served(
        self, redis: Redis, redis_url: str
    ) -> None:
        import socket

        from service.app import create_app
        from tests.conftest import make_settings
        from tests.support.servers import serve_in_thread

        settings = make_settings(request_body_timeout_s=0.5)
        with serve_in_thread(create_app(settings, redis_url)) as url:
            host, port = url.removeprefix("http://").split(":")
            loris = []
            for _ in range(20):  # clients dribbling headers that never finish
                sock = socket.create_connection((host, int(port)))
                sock.sendall(b"POST /webhooks/salla HTTP/1.1\r\nHost: x\r\n")
                loris.append(sock)
            stalled = socket.create_connection((host, int(port)))
            stalled.sendall(
                b"POST /webhooks/salla HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"event":'
            )
            body = fixture_bytes("order.status.updated.json")
            from service.webhooks import signed_headers

            normal = httpx.post(f"{url}/webhooks/salla", content=body,
                                headers=signed_headers(body, SECRET), timeout=5)  # fmt: skip
            assert normal.status_code == 200 and normal.json()["status"] == "accepted"
            stalled.settimeout(5)
            answer = stalled.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 408")
            assert "the body did not arrive within 0.5s" in answer
            for sock in [*loris, stalled]:
                sock.close()
        assert await queued_jobs(redis) == 1
