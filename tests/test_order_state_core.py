"""The pure order-state core, without Redis: the outcome is a function of the set of events.

Random order lives (created, status changes including canceled, restored and completed again,
total edits, customer changes, many events in one second, duplicates and re-sends) are
delivered in a random arrival order and processed in another random order, with grants sent
at random moments. Where the events' keys cannot tell two disagreeing events apart, the core
asks for Salla's state, and the test answers with the order's real final state. Every customer's
balance then equals what processing the events one by one in their real order gives.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from service.ledger import event_key as keying
from service.ledger import order_state as core
from service.ledger import settle as settling
from service.ledger.event_key import EventKey
from service.ledger.facts import OrderFacts, Snapshot
from service.ledger.order_state import EventVerdicts, RuleRecord, ScopedVerdict, Verdict
from service.ledger.settle import OpenGrant

ORDER = 9001
SKEW_S = 10
REVOKING = {"canceled", "restored"}


@dataclass(frozen=True)
class State:
    """An order as Salla has it after one change."""

    status: str
    total: int
    customer: int
    ever_completed: bool


@dataclass(frozen=True)
class Event:
    kind: str  # created | status | updated | refetch
    state: State
    at_s: int
    seq: int | None
    arrival: tuple[int, int]
    #: Where Salla made it among the order's events (a re-send keeps it).
    index: int = 0

    @property
    def key(self) -> EventKey:
        rank = keying.RANK_CREATED if self.kind == "created" else keying.RANK_EVENT
        return EventKey(rank, self.at_s, self.seq, self.arrival, self.kind == "fetched")


def judge(event: Event, facts: OrderFacts, *, bonus: bool) -> EventVerdicts:
    """The shipped purchase rule (`order.completed_once` and not revoked: total / 10), a
    once-per-customer bonus, and the file-level revoke_when, written out by hand (a rule whose
    revoke_when holds says so for its own scope, as the engine's verdict `revoke` does)."""
    s = event.state
    completed_once = s.ever_completed or s.status == "completed" or facts.completed
    revoke = s.status in REVOKING
    verdicts: list[ScopedVerdict] = []
    points = s.total // 10
    if revoke:
        verdicts.append(ScopedVerdict(f"order:{ORDER}", "purchase", _v(event, 0)))
    elif completed_once:
        verdicts.append(ScopedVerdict(f"order:{ORDER}", "purchase", _v(event, points)))
    if bonus and (revoke or completed_once):  # once per customer, state-based as docs advise
        bonus_points = 0 if revoke else 100
        verdicts.append(ScopedVerdict(f"customer:{s.customer}", "first", _v(event, bonus_points)))
    snapshot = Snapshot(event.key, completed_once, s.status, str(s.total), s.customer)
    return EventVerdicts(verdicts, revoke=revoke, snapshot=snapshot)


def _v(event: Event, points: int) -> Verdict:
    return Verdict(event.key, ORDER, event.state.customer, points, reason="r", version="1")


@dataclass
class Ledger:
    """The ledger's state in memory: the order's facts, records and grants."""

    facts: OrderFacts = field(default_factory=OrderFacts)
    records: dict[str, dict[str, RuleRecord]] = field(default_factory=dict)
    grants: dict[str, OpenGrant] = field(default_factory=dict)
    linked: set[str] = field(default_factory=set)
    asked: bool = False
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def apply(self, event: Event, *, bonus: bool) -> None:
        verdicts = judge(event, self.facts, bonus=bonus)
        scopes = core.scopes_of(verdicts, ORDER, self.linked, self.facts)
        view = {s: dict(self.records.get(s, {})) for s in scopes}
        decided = core.decide_event(view, self.facts, verdicts, ORDER, SKEW_S)
        self.asked = self.asked or decided.ask_salla
        assert decided.facts is not None
        self.facts = decided.facts
        for (scope, rule), record in decided.moved.items():
            settled = settling.settle(
                rule,
                record,
                self.grants,
                cap_used={},
                now_ms=0,
                new_id=lambda: f"g{next(self.ids)}",
            )
            for grant_id in settled.netted:
                self.grants[grant_id] = replace(self.grants[grant_id], state="netted")
            for new in settled.new:
                self.grants[new.id] = OpenGrant(
                    new.id, new.customer, new.signed_points, "pending", new.due_ms
                )
            self.records.setdefault(scope, {})[rule] = settled.record
            if scope != f"order:{ORDER}":
                self.linked.add(scope)

    def send(self) -> None:
        for grant_id, grant in self.grants.items():
            if grant.state == "pending":
                self.grants[grant_id] = replace(grant, state="sent")

    def balances(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for grant in self.grants.values():
            if grant.state == "sent":
                out[grant.customer] = out.get(grant.customer, 0) + grant.signed_points
        return {c: p for c, p in out.items() if p}


changes = st.lists(
    st.one_of(
        st.tuples(
            st.just("status"),
            st.sampled_from(
                ["completed", "canceled", "restored", "in_progress", "delivering", "delivered"]
            ),
        ),
        st.tuples(st.just("total"), st.integers(0, 3000)),
        st.tuples(st.just("customer"), st.sampled_from([41, 42, 43])),
    ),
    min_size=1,
    max_size=12,
)


@st.composite
def lives(draw: st.DrawFn) -> tuple[list[Event], list[int], list[bool], bool]:
    """An order's life as Salla would send it: events, then the processing order, when grants
    are sent, and whether the once-per-customer bonus rule exists."""
    steps = draw(changes)
    state = State(
        "under_review", draw(st.integers(0, 3000)), draw(st.sampled_from([41, 42])), False
    )
    clock = 1_700_000_000
    seq = itertools.count(100)
    events: list[Event] = [Event("created", state, clock, None, (0, 0), 0)]
    for kind, value in steps:
        clock += draw(st.sampled_from([0, 0, 0, 1, 2]))  # many events share one second
        if kind == "status":
            state = replace(
                state,
                status=value,
                ever_completed=state.ever_completed or value == "completed",
            )
            events.append(Event("status", state, clock, next(seq), (0, 0), len(events)))
        elif kind == "total":
            state = replace(state, total=value)
            events.append(Event("updated", state, clock, None, (0, 0), len(events)))
        else:
            state = replace(state, customer=value)
            events.append(Event("updated", state, clock, None, (0, 0), len(events)))
    # Salla delivers them in an order of its own (re-sends come minutes later), some twice.
    resent = [e for e in events if draw(st.booleans()) and draw(st.booleans())]
    arrival_order = draw(st.permutations(list(range(len(events) + len(resent)))))
    delivered = [
        replace(e, arrival=(1_000 + arrival_order[i], 0)) for i, e in enumerate(events + resent)
    ]
    processing = draw(st.permutations(list(range(len(delivered)))))
    sends = [draw(st.booleans()) for _ in delivered]
    return delivered, list(processing), sends, draw(st.booleans())


def run(events: list[Event], order: list[int], sends: list[bool], bonus: bool) -> Ledger:
    ledger = Ledger()
    for index, sent in zip(order, sends, strict=True):
        ledger.apply(events[index], bonus=bonus)
        ledger.apply(events[index], bonus=bonus)  # a job run twice changes nothing
        if sent:
            ledger.send()
    return ledger


class TestOutcomeIsAFunctionOfTheSet:
    """Any arrival order, any processing order, any number of workers: the same balances."""

    @settings(max_examples=300, deadline=None)
    @given(life=lives())
    def test_any_processing_order_ends_where_the_real_order_does(
        self, life: tuple[list[Event], list[int], list[bool], bool]
    ) -> None:
        events, order, sends, bonus = life
        # The reference: the original events alone, one by one in their real order.
        originals = _originals(events)
        reference = run(originals, list(range(len(originals))), [False] * len(originals), bonus)
        got = run(events, order, sends, bonus)
        if got.asked or reference.asked:
            final = _final_state(originals)
            answer = Event("fetched", final, originals[-1].at_s + 60, None, (10_000_000, 0))
            got.apply(answer, bonus=bonus)
            reference.apply(answer, bonus=bonus)
        got.send()
        reference.send()
        assert got.balances() == reference.balances()
        assert all(points >= 0 for points in got.balances().values())


def _originals(events: list[Event]) -> list[Event]:
    """The distinct events in the order Salla made them (a re-send is the same event)."""
    seen: dict[int, Event] = {}
    for event in events:
        if event.index not in seen or event.arrival < seen[event.index].arrival:
            seen[event.index] = event
    return [seen[i] for i in sorted(seen)]


def _final_state(originals: list[Event]) -> State:
    return originals[-1].state


def _at(kind: str, status: str, total: int, at: int, seq: int | None, arrival: int) -> Event:
    state = State(status, total, 42, status == "completed")
    return Event(kind, state, at, seq, (arrival, 0))


class TestNamedHistories:
    """The histories issue 13 names, spelled out."""

    def test_completed_canceled_completed_in_one_second_keeps_the_points(self) -> None:
        events = [
            _at("status", "completed", 154, 100, 1, 1),
            _at("status", "canceled", 154, 100, 2, 2),
            _at("status", "completed", 154, 100, 3, 3),
        ]
        for order in itertools.permutations(range(3)):
            ledger = run(events, list(order), [True, False, True], bonus=False)
            ledger.send()
            assert ledger.balances() == {42: 15}, order

    def test_a_late_completed_still_grants_after_delivering_was_applied(self) -> None:
        completed = _at("status", "completed", 154, 100, 1, 50)  # its first delivery failed
        delivering = State("delivering", 154, 42, True)
        later = Event("status", delivering, 101, 2, (10, 0))
        ledger = run([later, completed], [0, 1], [True, True], bonus=False)
        ledger.send()
        assert ledger.balances() == {42: 15}

    def test_an_older_cancel_changes_nothing_after_a_newer_completion(self) -> None:
        canceled = _at("status", "canceled", 154, 100, 1, 9)
        completed = _at("status", "completed", 154, 105, 2, 1)
        ledger = run([completed, canceled], [0, 1], [True, True], bonus=False)
        ledger.send()
        assert ledger.balances() == {42: 15}
        assert not ledger.asked

    def test_a_customer_change_moves_the_points(self) -> None:
        first = _at("status", "completed", 154, 100, 1, 1)
        moved = Event("updated", State("completed", 154, 43, True), 120, None, (2, 0))
        ledger = run([first, moved], [0, 1], [True, True], bonus=False)
        ledger.send()
        assert ledger.balances() == {43: 15}

    def test_same_second_events_that_disagree_ask_salla(self) -> None:
        total_edit = Event("updated", State("completed", 200, 42, True), 100, None, (2, 0))
        completed = _at("status", "completed", 154, 100, 7, 1)
        ledger = run([completed, total_edit], [1, 0], [False, False], bonus=False)
        assert ledger.asked

    def test_the_same_outcome_in_one_second_needs_no_question(self) -> None:
        a = Event("updated", State("completed", 154, 42, True), 100, None, (2, 0))
        b = _at("status", "completed", 154, 100, 7, 1)
        ledger = run([a, b], [0, 1], [False, False], bonus=False)
        assert not ledger.asked


class TestCompare:
    """The key's parts, in order."""

    def test_created_is_older_than_anything_whatever_its_stamp(self) -> None:
        created = EventKey(keying.RANK_CREATED, 200, None, (5, 0))
        update = EventKey(keying.RANK_EVENT, 100, None, (1, 0))
        assert keying.compare(update, created, SKEW_S).newer

    def test_history_ids_order_status_events_of_one_second(self) -> None:
        a = EventKey(keying.RANK_EVENT, 100, 5, (9, 0))
        b = EventKey(keying.RANK_EVENT, 100, 6, (1, 0))
        result = keying.compare(b, a, SKEW_S)
        assert result.newer and not result.near

    def test_an_unreadable_stamp_ties_with_everything(self) -> None:
        a = EventKey(keying.RANK_EVENT, None, None, (9, 0))
        b = EventKey(keying.RANK_EVENT, 100, None, (1, 0))
        assert keying.compare(a, b, SKEW_S).near

    def test_a_fetched_state_is_newer_than_what_arrived_before_it_was_asked(self) -> None:
        fetched = EventKey(keying.RANK_EVENT, 100, None, (100_000, 0), True)
        earlier = EventKey(keying.RANK_EVENT, 200, None, (99_999, 0))
        assert keying.compare(fetched, earlier, SKEW_S).newer

    def test_a_webhook_after_the_fetch_is_judged_by_its_stamp_and_the_skew(self) -> None:
        fetched = EventKey(keying.RANK_EVENT, 100, None, (100_000, 0), True)
        older = EventKey(keying.RANK_EVENT, 100 - SKEW_S - 1, None, (100_001, 0))
        newer = EventKey(keying.RANK_EVENT, 100 + SKEW_S + 1, None, (100_001, 0))
        near = EventKey(keying.RANK_EVENT, 100 + SKEW_S, None, (100_001, 0))
        assert not keying.compare(older, fetched, SKEW_S).newer
        assert keying.compare(newer, fetched, SKEW_S).newer
        assert keying.compare(near, fetched, SKEW_S).near


class TestSettle:
    """Differences only, per customer, netting unsent grants first."""

    def test_a_cap_cut_is_not_granted_later(self) -> None:
        verdict = Verdict(None, 1, 7, 50, reason="r", cap=20)
        record = core.decide(RuleRecord(), verdict, SKEW_S).record
        first = settling.settle("r", record, {}, cap_used={7: 0}, now_ms=0, new_id=lambda: "a")
        assert [g.signed_points for g in first.new] == [20]
        again = settling.settle(
            "r", first.record, {}, cap_used={7: 20}, now_ms=0, new_id=lambda: "b"
        )
        assert again.new == ()

    def test_large_changes_are_split_for_salla(self) -> None:
        record = core.decide(RuleRecord(), Verdict(None, 1, 7, 1_500_000), SKEW_S).record
        made = settling.settle("r", record, {}, cap_used={}, now_ms=0, new_id=lambda: "x")
        assert [g.signed_points for g in made.new] == [999_999, 500_001]

    def test_holds_count_from_completion(self) -> None:
        verdict = Verdict(None, 1, 7, 10, hold_s=86400, since_ms=5_000)
        record = core.decide(RuleRecord(), verdict, SKEW_S).record
        made = settling.settle("r", record, {}, cap_used={}, now_ms=9_000, new_id=lambda: "x")
        assert made.new[0].due_ms == 5_000 + 86_400_000
        assert made.new[0].held


def test_revocations_cover_every_recorded_rule() -> None:
    key = EventKey(keying.RANK_EVENT, 1, None, (1, 0))
    records: Mapping[str, RuleRecord] = {
        "gone_rule": RuleRecord(verdicts={ORDER: Verdict(key, ORDER, 7, 5)}),
        "other_order": RuleRecord(verdicts={1: Verdict(key, 1, 7, 5)}),
    }
    revoked = dict(core.revocations(records, ORDER, key))
    assert set(revoked) == {"gone_rule"}
    assert revoked["gone_rule"].points == 0
