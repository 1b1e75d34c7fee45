"""A settled order's ledger entry in a few dozen bytes, and back. Pure.

A settled order (every grant sent or netted, past its return window) can still hear of itself: a
late cancel or refund must take its points back, a re-sent old webhook must not pay twice, and
reconciliation compares it with Salla's list. What those read of the order's entry
(service/ledger/apply.py, order_state.py, settle.py) is kept, exactly; nothing else is:

* the facts (`OrderFacts`): the newest event's key, the newest revocation's, per rule the newest
  deciding event and its scope, completed, status, total, customer, gone;
* per rule recorded in the order's scope: the standing verdict's key, points and customer (an
  incoming event is compared with its key; `revocations` takes its customer; an ambiguity
  compares points and customer), what was granted and deserved per customer, and the reason,
  channels and rule version a reversal is sent with;
* the scopes the order granted elsewhere (its `led-index` set: a revocation reaches them).

Dropped: the standing verdict's reason, channels, hold, mode, day and cap (read only when that
verdict settles a change, and a verdict that settles anything is the incoming one, which brings
its own), and the open grant ids (all settled: settling ignores settled ids).

The encoding is one string (`|` between parts, `,` between fields, numbers in base 36), kept as
a string key (not a hash: a hash value over 64 bytes leaves the compact listpack encoding). A
reversal's reason usually differs between orders only by numbers ("points for order 1234"):
its text with the digit runs taken out, the rule, channels and version are interned once per
store (`texts`, id → text) and the runs stay here. An entry this cannot represent (free text
containing a separator, a verdict of another order) is not compacted: it stays as it was,
which is correct, only larger.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from service.ledger.event_key import EventKey
from service.ledger.facts import OrderFacts
from service.ledger.order_state import RuleRecord, Verdict

_SEPARATORS = frozenset("|,;/\x00'~@")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_RUNS = re.compile(r"[0-9]+")
#: Where a run of digits was taken out of a reason (a private-use character: 3 bytes, and no
#: reason has it; one that does is not compacted).
_HOLE = "\ue000"
#: Between a text's parts, and between channels (control characters: no escaping, so a text of
#: a short reason stays under a listpack's 64 bytes).
_PART, _ITEM = "\x1f", "\x1e"
#: Statuses stored as one character; append only (a compacted entry names them by position).
_STATUSES = (
    "completed",
    "delivered",
    "canceled",
    "restored",
    "shipped",
    "delivering",
    "in_progress",
    "under_review",
    "payment_pending",
)
#: Key parts and what a trailing part that is left out means.
_KEY_DEFAULTS = ("1", "", "", "0", "0", "")


class NotPackable(ValueError):
    """The entry holds something this encoding does not represent (it stays uncompacted)."""


@dataclass(frozen=True, slots=True)
class Packed:
    """A compacted entry: the field's value and the texts it names (id → text)."""

    value: str
    texts: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Unpacked:
    """A compacted entry read back: the full entry's fields, as `HGETALL` of an uncompacted
    entry would return them, and the scopes the order granted elsewhere."""

    fields: dict[str, str]
    linked: tuple[str, ...]


def b36(value: int) -> str:
    if value < 0:
        return "-" + b36(-value)
    out = ""
    while True:
        value, digit = divmod(value, 36)
        out = _DIGITS[digit] + out
        if not value:
            return out


def _int(text: str) -> int:
    return int(text, 36)


def _free(text: str) -> str:
    if _SEPARATORS & set(text):
        raise NotPackable(f"text with a separator: {text[:40]!r}")
    return text


def text_ids(value: str) -> list[str]:
    """The texts a compacted entry names (to read them before `unpack`)."""
    return [part.split(",", 1)[0].lstrip("'") for part in value.split("|")[3:-1]]


def pack(fields: Mapping[str, str], order_id: int, linked: Sequence[str]) -> Packed:
    """The order's full entry (`HGETALL`) and index as one string. Raises `NotPackable`."""
    facts = OrderFacts.from_fields(fields)
    records = {n[2:]: RuleRecord.decode(v) for n, v in fields.items() if n[:2] == "r:"}
    table: list[EventKey] = []

    def ref(key: EventKey | None) -> str:
        if key is None:
            return ""
        if key not in table:
            table.append(key)
        return b36(table.index(key))

    own = f"order:{order_id}"
    head = ",".join(
        (
            ref(facts.newest),
            ref(facts.revoked),
            "1" if facts.completed else "",
            _status(facts.status),
            _free(facts.total),
            b36(facts.customer) if facts.customer else "",
            "1" if facts.gone else "",
        )
    )
    texts: dict[str, str] = {}
    parts = []
    for rule in sorted(set(records) | set(facts.rules)):
        decided = facts.rules.get(rule)
        scope = "" if decided is None or decided[1] == own else _free(decided[1])
        record = records.get(rule)
        if record is None:  # decided elsewhere (a customer's bonus): only the facts name it
            text_id = _intern(texts, [rule])
            parts.append(f"'{text_id},{ref(decided[0]) if decided else ''},{_scope(scope)}")
            continue
        if set(record.verdicts) - {order_id}:
            raise NotPackable("a verdict of another order in the order's scope")
        verdict = record.verdicts.get(order_id)
        if verdict is not None and verdict.key is None:
            raise NotPackable("a verdict without a key")
        template = _RUNS.sub(_HOLE, record.reason)
        if _HOLE in record.reason:
            raise NotPackable("a reason with the placeholder character")
        text_id = _intern(texts, [rule, template, _ITEM.join(record.channels), record.version])
        v_customer = verdict.customer if verdict else 0
        v_points = verdict.points if verdict else 0
        granted = _amounts(record.granted, v_customer, v_points)
        deserved = "=" if record.deserved == record.granted else _amounts(record.deserved, 0, 0)
        runs = "/".join(_run(r) for r in _RUNS.findall(record.reason))
        parts.append(
            ",".join(
                (
                    text_id,
                    ref(decided[0]) if decided else "",
                    _scope(scope) if decided else "-",
                    ref(verdict.key) if verdict else "",
                    b36(v_points),
                    "" if v_customer == facts.customer else b36(v_customer),
                    granted,
                    deserved,
                    runs,
                )
            )
        )
    keys = ";".join(_key(k) for k in table)
    # The index usually names exactly the scopes the facts' rules went to: "~" says so.
    named = {s for _, s in facts.rules.values() if s != own}
    rest = sorted(set(linked) - named) if named <= set(linked) else sorted(linked)
    index = "/".join((["~"] if named and named <= set(linked) else []) + [_scope(s) for s in rest])
    version = b36(int(fields.get("v") or 0))
    return Packed("|".join([version, keys, head, *parts, index]), texts)


def unpack(value: str, order_id: int, texts: Mapping[str, str | None]) -> Unpacked:
    """A compacted entry as the full entry's fields (`texts`: the ids `text_ids` names).
    Raises `NotPackable` when a text is missing (never expected: texts are never deleted)."""
    version, keys, head, *parts, index = value.split("|")
    table = [_unkey(k) for k in keys.split(";")] if keys else []

    def key(ref: str) -> EventKey | None:
        return table[_int(ref)] if ref else None

    newest, revoked, completed, status, total, customer, gone = head.split(",")
    own = f"order:{order_id}"
    decided: dict[str, tuple[EventKey, str]] = {}
    fields: dict[str, str] = {"v": str(_int(version))}
    for part in parts:
        items = part.split(",")
        if part[0] == "'":
            [rule] = _text(texts, items[0][1:])
            if items[1]:
                decided[rule] = (key(items[1]), _unscope(items[2]) or own)  # type: ignore[assignment]
            continue
        text_id, ref, scope, v_ref, v_points, v_customer, granted, deserved, runs = items
        rule, template, channels, rule_version = _text(texts, text_id)
        v_customer = v_customer or customer or "0"
        if scope != "-":
            decided[rule] = (key(ref), _unscope(scope) or own)  # type: ignore[assignment]
        verdicts = {}
        if v_ref:
            verdicts[order_id] = Verdict(key(v_ref), order_id, _int(v_customer), _int(v_points))
        given = _unamounts(granted, _int(v_customer), _int(v_points))
        record = RuleRecord(
            verdicts,
            given,
            given if deserved == "=" else _unamounts(deserved, 0, 0),
            (),
            _fill(template, runs),
            tuple(channels.split(_ITEM)) if channels else (),
            rule_version,
        )
        fields[f"r:{rule}"] = record.encoded()
    facts = OrderFacts(
        newest=key(newest),
        revoked=key(revoked),
        rules=decided,
        completed=completed == "1",
        status=_unstatus(status),
        total=total,
        customer=_int(customer) if customer else 0,
        gone=gone == "1",
    )
    fields.update(facts.to_fields())
    linked = set()
    for item in index.split("/") if index else ():
        if item == "~":
            linked |= {s for _, s in decided.values() if s != own}
        else:
            linked.add(_unscope(item))
    return Unpacked(fields, tuple(sorted(linked)))


def _intern(texts: dict[str, str], parts: list[str]) -> str:
    """A text's id: 5 base-36 digits of its hash (the compaction refuses an id already taken by
    another text of the store, so a collision costs compactness, never correctness)."""
    if any(_PART in p or (_ITEM in p and i != 2) for i, p in enumerate(parts)):
        raise NotPackable("a rule, reason or version with a control character")
    text = _PART.join(parts)
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest())
    text_id = b36(digest % 36**5)
    texts[text_id] = text
    return text_id


def _text(texts: Mapping[str, str | None], text_id: str) -> list[str]:
    text = texts.get(text_id)
    if text is None:
        raise NotPackable(f"the text {text_id} of a compacted entry is missing")
    return text.split(_PART)


def _scope(scope: str) -> str:
    """A customer's scope, the usual one besides the order's, as `@` and the id in base 36."""
    name, _, number = scope.partition(":")
    if name == "customer" and number.isascii() and number.isdigit() and number[0] != "0":
        return "@" + b36(int(number))
    return _free(scope)


def _unscope(text: str) -> str:
    return f"customer:{_int(text[1:])}" if text[:1] == "@" else text


def _status(status: str) -> str:
    if status in _STATUSES:
        return b36(_STATUSES.index(status))
    return "'" + _free(status) if status else ""


def _unstatus(text: str) -> str:
    if not text:
        return ""
    return text[1:] if text[0] == "'" else _STATUSES[_int(text)]


def _amounts(amounts: Mapping[int, int], customer: int, points: int) -> str:
    if amounts and dict(amounts) == {customer: points}:
        return "="
    return "/".join(f"{b36(c)}:{b36(p)}" for c, p in sorted(amounts.items()))


def _unamounts(text: str, customer: int, points: int) -> dict[int, int]:
    if text == "=":
        return {customer: points}
    pairs = (item.split(":") for item in text.split("/") if item)
    return {_int(c): _int(p) for c, p in pairs}


def _run(digits: str) -> str:
    """A run of digits in base 36; one with a leading zero as it is (base 36 would drop it)."""
    return b36(int(digits)) if digits[0] != "0" else "'" + digits


def _fill(template: str, runs: str) -> str:
    values = iter(r[1:] if r[:1] == "'" else str(_int(r)) for r in runs.split("/") if r)
    return "".join(next(values) if ch == _HOLE else ch for ch in template)


def _key(key: EventKey) -> str:
    arrival = key.arrival[0] - (key.at_s * 1000 if key.at_s is not None else 0)
    parts = [
        b36(key.rank),
        "" if key.at_s is None else b36(key.at_s),
        "" if key.seq is None else b36(key.seq),
        b36(arrival),
        b36(key.arrival[1]),
        "1" if key.fetched else "",
    ]
    while len(parts) > 1 and parts[-1] == _KEY_DEFAULTS[len(parts) - 1]:
        parts.pop()
    return ".".join(parts)


def _unkey(text: str) -> EventKey:
    given = text.split(".")
    rank, at, seq, arrival, n, fetched = given + list(_KEY_DEFAULTS[len(given) :])
    at_s = _int(at) if at else None
    base = at_s * 1000 if at_s is not None else 0
    return EventKey(
        _int(rank),
        at_s,
        _int(seq) if seq else None,
        (base + _int(arrival), _int(n)),
        fetched == "1",
    )
