"""Signature verification and envelope parsing, without I/O."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import Headers

from service.errors import InvalidPayload, InvalidSignature
from service.webhooks import (
    _JS_DATE,
    _js_date,
    delivery_id,
    event_time,
    parse_envelope,
    read_head,
    sign,
    signed_headers,
    verify,
)
from tests.conftest import SECRET, fixture_bytes

VECTOR_BODY = (
    b'{"event":"order.created","merchant":1305146709,'
    b'"created_at":"Sun Jun 26 2022 12:21:48 GMT+0300","data":{"id":2116149737}}'
)


class TestSignatureVectors:
    """The test vectors published in FACTS.md."""

    def test_inline_body(self) -> None:
        assert sign(VECTOR_BODY, SECRET) == (
            "3d00fc4cd2a3ff48d280004c75121712497eb1cd1d4774cda72d57c1a3d16ece"
        )

    def test_app_store_authorize_fixture_bytes(self) -> None:
        assert sign(fixture_bytes("app.store.authorize.json"), SECRET) == (
            "560a850ae39baf3a5a06e00e41fd8a028ce25955b5b790f2ac9d90bb348fae69"
        )

    def test_the_keyed_state_is_reused_not_shared(self) -> None:
        """The keyed HMAC is kept per secret and copied per message: signing other bodies and
        other secrets in between changes nothing."""
        first = sign(VECTOR_BODY, SECRET)
        for n in range(3):
            sign(b"x" * n, SECRET)
            sign(VECTOR_BODY, f"other-{n}")
        assert sign(VECTOR_BODY, SECRET) == first
        assert sign(VECTOR_BODY, "other-0") != first


class TestVerify:
    """Both strategies; header names and values in any case; refusals say why."""

    def test_signature_strategy_accepts_salla_headers(self) -> None:
        verify(Headers(signed_headers(VECTOR_BODY, SECRET)), VECTOR_BODY, SECRET, "signature")

    def test_signature_compare_ignores_hex_case_and_header_case(self) -> None:
        headers = Headers(
            {
                "x-salla-security-strategy": "SIGNATURE",
                "X-SALLA-SIGNATURE": sign(VECTOR_BODY, SECRET).upper(),
            }
        )
        verify(headers, VECTOR_BODY, SECRET, "signature")

    def test_one_changed_byte_is_refused(self) -> None:
        headers = Headers(signed_headers(VECTOR_BODY, SECRET))
        with pytest.raises(InvalidSignature, match="does not match"):
            verify(headers, VECTOR_BODY.replace(b"2116149737", b"2116149738"), SECRET, "signature")

    def test_missing_signature_is_refused(self) -> None:
        with pytest.raises(InvalidSignature, match="missing X-Salla-Signature"):
            verify(Headers({}), VECTOR_BODY, SECRET, "signature")

    def test_token_strategy_plain_and_bearer(self) -> None:
        verify(Headers(signed_headers(VECTOR_BODY, SECRET, "token")), VECTOR_BODY, SECRET, "token")
        bearer = Headers(
            {"X-Salla-Security-Strategy": "token", "Authorization": f"Bearer {SECRET}"}
        )
        verify(bearer, VECTOR_BODY, SECRET, "token")

    def test_wrong_token_is_refused(self) -> None:
        with pytest.raises(InvalidSignature, match="token does not match"):
            verify(Headers({"Authorization": "nope"}), VECTOR_BODY, SECRET, "token")

    def test_announced_strategy_must_match_configuration(self) -> None:
        headers = Headers(signed_headers(VECTOR_BODY, SECRET, "token"))
        with pytest.raises(InvalidSignature, match="does not match the configured"):
            verify(headers, VECTOR_BODY, SECRET, "signature")

    def test_empty_secret_never_verifies(self) -> None:
        with pytest.raises(InvalidSignature, match="not configured"):
            verify(Headers(signed_headers(VECTOR_BODY, "")), VECTOR_BODY, "", "signature")


class TestEnvelope:
    """What counts as a Salla envelope."""

    def test_published_sample_parses(self) -> None:
        env = parse_envelope(fixture_bytes("order.status.updated.json"))
        assert (env.event, env.merchant) == ("order.status.updated", 193718979)
        assert env.data["order"]["id"] == 629263027

    def test_merchant_as_digit_string_is_accepted(self) -> None:
        env = parse_envelope(b'{"event":"x.y","merchant":"1305146709","data":{}}')
        assert env.merchant == 1305146709

    def test_published_app_installed_is_not_json(self) -> None:
        with pytest.raises(InvalidPayload, match="not valid JSON"):
            parse_envelope(fixture_bytes("app.installed.json"))

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"[1,2]", "not a JSON object"),
            (b'{"event":"order.created","data":{}}', "missing merchant"),
            (b'{"event":"order.created","merchant":-3,"data":{}}', "must be a store id"),
            (b'{"event":"order.created","merchant":true,"data":{}}', "positive whole number"),
            (b'{"event":"","merchant":1,"data":{}}', "non-empty string"),
            (b'{"event":"order.created","merchant":1,"data":[]}', "'data' must be"),
            (b"\xff\xfe", "not valid JSON"),
        ],
    )
    def test_not_an_envelope(self, body: bytes, message: str) -> None:
        with pytest.raises(InvalidPayload, match=message):
            parse_envelope(body)

    def test_delivery_id_depends_on_bytes_not_on_time(self) -> None:
        first = delivery_id(1, "order.created", VECTOR_BODY)
        assert first == delivery_id(1, "order.created", VECTOR_BODY)
        assert first != delivery_id(1, "order.created", VECTOR_BODY + b" ")


def _outcome(read: object, body: bytes) -> tuple[str, object, object]:
    try:
        env = read(body)  # type: ignore[operator]
    except InvalidPayload:
        return ("refused", None, None)
    return ("accepted", env.event, env.merchant)


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)


class TestHead:
    """`read_head` (the web process: the envelope only) refuses and accepts the same bodies as
    `parse_envelope` (the worker), and reads the same event and store from them."""

    @pytest.mark.parametrize(
        "path", sorted((Path(__file__).parent / "fixtures").glob("*.json")), ids=lambda p: p.name
    )
    def test_every_fixture_reads_the_same(self, path: Path) -> None:
        body = path.read_bytes()
        assert _outcome(read_head, body) == _outcome(parse_envelope, body)

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b"[1,2]", "not a JSON object"),
            (b'{"hello":"world"}', "missing event, merchant, data"),
            (b'{"event":"order.created","data":{}}', "missing merchant"),
            (b'{"event":"order.created","merchant":-3,"data":{}}', "must be a store id"),
            (b'{"event":"order.created","merchant":true,"data":{}}', "positive whole number"),
            (b'{"event":"order.created","merchant":9223372036854775808,"data":{}}', "positive"),
            (b'{"event":"","merchant":1,"data":{}}', "non-empty string"),
            (b'{"event":"' + b"e" * 101 + b'","merchant":1,"data":{}}', "non-empty string"),
            (b'{"event":"order.created","merchant":1,"data":[]}', "'data' must be"),
            (b"\xff\xfe", "not valid JSON"),
            # Inside `data`, which is checked but not built: the same refusals as a full parse.
            (b'{"event":"e","merchant":1,"data":{"a":"\xff"}}', "not valid JSON"),
            (b'{"event":"e","merchant":1,"data":{"a":NaN}}', "not valid JSON"),
            (b'{"event":"e","merchant":1,"data":{"a":"\\ud800"}}', "not valid JSON"),
            (b'{"event":"e","merchant":1,"data":{"a":}}', "not valid JSON"),
            (b'{"event":"e","merchant":1,"data":{},"other":[1,}', "not valid JSON"),
            (b'{"event":"e","merchant":1,"data":{}} trailing', "not valid JSON"),
            (b'{"event":"e","merchant":1,"data":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON"),
        ],
    )
    def test_what_it_refuses(self, body: bytes, message: str) -> None:
        with pytest.raises(InvalidPayload, match=message) as refused:
            read_head(body)
        with pytest.raises(InvalidPayload) as full:
            parse_envelope(body)
        assert refused.value.message == full.value.message  # the same words as before

    def test_the_one_difference_is_a_number_beyond_a_double(self) -> None:
        """Documented in `read_head`: the worker rejects it (`event_rejected`, test_inbox)."""
        body = b'{"event":"e","merchant":1,"data":{"weight":1e400}}'
        assert read_head(body).merchant == 1
        with pytest.raises(InvalidPayload, match="not valid JSON"):
            parse_envelope(body)

    @settings(max_examples=400)
    @given(
        envelope=st.fixed_dictionaries(
            {  # each field mostly right, sometimes wrong: every check gets both kinds
                "event": st.one_of(
                    st.sampled_from(["order.created", "review.added"]),
                    st.text(min_size=98, max_size=102),
                    _json_values,
                ),
                "merchant": st.one_of(
                    st.integers(min_value=1, max_value=10**12),
                    st.from_regex(r"\A ?\d{1,21}\Z"),
                    st.integers(min_value=-5, max_value=2**65),
                    _json_values,
                ),
                "data": st.one_of(st.dictionaries(st.text(max_size=6), _json_values), _json_values),
            },
            optional={"created_at": _json_values, "extra": _json_values},
        ),
        drop=st.sampled_from([None, "event", "merchant", "data"]),
        cut=st.integers(min_value=0, max_value=400),
    )
    def test_random_envelopes_read_the_same(
        self, envelope: dict[str, object], drop: str | None, cut: int
    ) -> None:
        envelope.pop(drop or "", None)
        body = json.dumps(envelope).encode()
        assert _outcome(read_head, body) == _outcome(parse_envelope, body)
        truncated = body[: len(body) * cut // 400]  # and any prefix of it, mostly broken JSON
        assert _outcome(read_head, truncated) == _outcome(parse_envelope, truncated)


class TestEventTime:
    """`created_at` read by hand for Salla's JS date, and the same instant as strptime reads."""

    @given(
        st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 1, 1)),
        st.integers(-14 * 60, 14 * 60),
    )
    def test_js_dates_read_as_strptime_reads_them(self, moment: dt.datetime, minutes: int) -> None:
        zone = dt.timezone(dt.timedelta(minutes=minutes))
        text = moment.replace(microsecond=0, tzinfo=zone).strftime("%a %b %d %Y %H:%M:%S GMT%z")
        assert _js_date(text) is not None
        assert event_time(text) == dt.datetime.strptime(text, _JS_DATE).timestamp()

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("Sun Jun 26 2022 12:21:48 GMT+0300", 1656235308.0),
            ("2022-12-31 12:31:25", 1672489885.0),  # app events: UTC
            ("2022-06-26T09:21:48+00:00", 1656235308.0),
            ("Sun Jun 26 2022 12:21:48 GMT+03", None),
            ("Sun Foo 26 2022 12:21:48 GMT+0300", None),
            ("not a date", None),
            ("", None),
        ],
    )
    def test_formats(self, text: str, expected: float | None) -> None:
        assert event_time(text) == expected
