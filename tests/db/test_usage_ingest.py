"""Bulk usage ingestion on SQLite and PostgreSQL: accepted / duplicated / rejected counts, the
reasons, late events and the grace period, current usage, seat saturation, and two processes
ingesting one file at once."""

from __future__ import annotations

import io
import json
import multiprocessing
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from dbkit import Db
from sqlalchemy import text

from billing import service
from billing.catalog import Catalog
from billing.metering import current_usage, ingest, read_csv, read_jsonl, seat_saturation
from billing.scenario import Settings

CATALOG = Catalog.model_validate({
    "plans": [{"code": "team", "name": "Team", "interval": "month", "pricing": "per_unit",
               "prices": {"USD": "10.00"}}],
    "metrics": [
        {"code": "api", "name": "API calls", "aggregation": "sum", "pricing": "tiered",
         "tiers": [{"up_to": 1000, "unit_amount": {"USD": "0.01"}},
                   {"up_to": None, "unit_amount": {"USD": "0.005"}}],
         "included": "100"},
        {"code": "eu_gb", "name": "EU storage", "aggregation": "max", "field": "gb",
         "filter": {"region": "eu"}, "pricing": "per_unit", "prices": {"USD": "0.50"}},
        {"code": "users", "name": "Active users", "aggregation": "unique_count", "field": "user",
         "pricing": "package", "package_size": 5, "prices": {"USD": "3.00"}, "active_seats": True},
    ],
})
JAN = datetime(2026, 1, 1, tzinfo=UTC)


def _book(db: Db) -> None:
    service.load_catalog(db.engine, CATALOG, Settings())
    for i, ev in enumerate([
        {"type": "customer", "at": "2026-01-01", "customer": "acme", "currency": "USD"},
        {"type": "subscribe", "at": "2026-01-01", "customer": "acme", "subscription": "acme-team",
         "plan": "team", "quantity": 4},
        {"type": "customer", "at": "2026-01-01", "customer": "beta", "currency": "USD"},
        {"type": "subscribe", "at": "2026-01-01", "customer": "beta", "subscription": "beta-team",
         "plan": "team", "quantity": 2},
        {"type": "cancel", "at": "2026-01-20", "subscription": "beta-team", "effective": "immediately"},
    ]):
        service.apply_event(db.engine, ev, actor="test", index=i)


def _jsonl(rows: list[dict[str, Any] | str]) -> io.BytesIO:
    return io.BytesIO("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n")


def _clock(at: str) -> Any:
    return lambda: datetime.fromisoformat(at)


def _stored(db: Db) -> int:
    with db.engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM usage_events")).scalar() or 0)


def test_counts_reasons_and_duplicates(db: Db) -> None:
    _book(db)
    rows: list[dict[str, Any] | str] = [
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-05T10:00:00Z", "value": 700, "id": "a1"},
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-06T10:00:00Z", "value": "600", "id": "a2"},
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-06T11:00:00Z", "value": 600, "id": "a2"},
        {"customer": "acme", "metric": "eu_gb", "at": "2026-01-07", "value": 1, "id": "g1",
         "properties": {"region": "eu", "gb": 12.5}},
        {"subscription": "acme-team", "metric": "eu_gb", "at": "2026-01-07", "value": 1, "id": "g2",
         "properties": {"region": "us", "gb": 40}},
        {"subscription": "acme-team", "metric": "users", "at": "2026-01-08", "value": 1, "id": "u1",
         "properties": {"user": "ann"}},
        {"subscription": "acme-team", "metric": "users", "at": "2026-01-09", "value": 1, "id": "u2",
         "properties": {"user": "bob"}},
        {"subscription": "acme-team", "metric": "users", "at": "2026-01-09", "value": 1, "id": "u3",
         "properties": {"user": "ann"}},
        "{not json",
        {"subscription": "nope", "metric": "api", "at": "2026-01-05", "value": 1, "id": "x1"},
        {"subscription": "acme-team", "metric": "calls", "at": "2026-01-05", "value": 1, "id": "x2"},
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-05", "value": "1.2.3", "id": "x3"},
        {"subscription": "acme-team", "metric": "api", "at": "yesterday", "value": 1, "id": "x4"},
        {"subscription": "beta-team", "metric": "api", "at": "2026-01-25", "value": 1, "id": "x5"},
        {"subscription": "acme-team", "metric": "api", "at": "2025-12-31", "value": 1, "id": "x6"},
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-05", "value": 1.5, "id": "x7"},
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-05", "value": "0.0000001", "id": "x8"},
        {"subscription": "acme-team", "metric": "api", "at": "2026-01-05", "value": 1, "id": "x9", "qty": 2},
        {"subscription": "beta-team", "metric": "api", "at": "2026-01-10", "value": 3, "id": "b1"},
    ]
    seen: list[str] = []
    summary = ingest(db.engine, read_jsonl(_jsonl(rows)), clock=_clock("2026-01-20T12:00:00+00:00"),
                     on_reject=lambda r: seen.append(str(r)))
    # line 16's JSON number 1.5 is read as the exact decimal 1.5 and accepted
    assert (summary.accepted, summary.duplicated, summary.rejected) == (9, 1, 9)
    assert [r.line for r in summary.rejections] == [9, 10, 11, 12, 13, 14, 15, 17, 18]
    reasons = dict((r.line, r.reason) for r in summary.rejections)
    assert reasons[9].startswith("not valid JSON")
    assert "unknown subscription 'nope'" in reasons[10]
    assert reasons[11] == "metric: unknown metric 'calls'"
    assert reasons[12] == "value '1.2.3' is not a decimal number"
    assert reasons[13].startswith("at: ")
    assert "outside the life of subscription 'beta-team'" in reasons[14]
    assert "before subscription 'acme-team' started" in reasons[15]
    assert "more than 6 decimal places" in reasons[17]
    assert reasons[18] == "qty: unknown field"
    assert seen == [str(r) for r in summary.rejections]
    assert _stored(db) == 9

    again = ingest(db.engine, read_jsonl(_jsonl(rows)), clock=_clock("2026-01-20T12:00:00+00:00"))
    assert (again.accepted, again.duplicated, again.rejected) == (0, 10, 9)
    assert _stored(db) == 9

    usage = {u.metric: u for u in current_usage(db.engine, "acme-team", as_of=datetime(2026, 1, 20, tzinfo=UTC))}
    # api: 700 + 600 (a2 once) + 1.5 = 1301.5, 100 included: 1000 × 0.01 + 201.5 × 0.005 = 11.0075
    api = usage["api"]
    assert (api.quantity, api.amount, api.next_tier_at) == (Decimal("1301.5"), Decimal("11.01"), None)
    # eu_gb: only the eu event counts: max 12.5 GB × 0.50 = 6.25
    assert (usage["eu_gb"].quantity, usage["eu_gb"].amount) == (Decimal("12.5"), Decimal("6.25"))
    # users: ann and bob; one started block of 5 at 3.00
    assert (usage["users"].quantity, usage["users"].amount) == (Decimal(2), Decimal("3.00"))
    # up to Jan 6: 700 + 1.5, 601.5 billable: 6.015 → 6.02; the next tier starts at 1000 + 100 included
    early = current_usage(db.engine, "acme-team", as_of=datetime(2026, 1, 6, tzinfo=UTC))[0]
    assert (early.quantity, early.amount, early.next_tier_at) == (Decimal("701.5"), Decimal("6.02"), Decimal(1100))

    (sat,) = seat_saturation(db.engine, as_of=datetime(2026, 1, 20, tzinfo=UTC))
    assert (sat.subscription, sat.active, sat.purchased, sat.ratio) == ("acme-team", Decimal(2), 4, Decimal("0.5"))


def test_late_events_and_the_grace_period(db: Db) -> None:
    _book(db)
    service.apply_event(db.engine, {"type": "invoice_run", "at": "2026-02-01T00:00:00Z"}, actor="test")
    service.apply_event(db.engine, {"type": "invoice_run", "at": "2026-03-01T00:00:00Z"}, actor="test")
    # January is invoiced (Feb 1 run); February closed on Mar 1 and was billed by the Mar 1 run too
    row = {"subscription": "acme-team", "metric": "api", "value": 5}
    rows: list[dict[str, Any] | str] = [
        {**row, "at": "2026-01-15", "id": "late-jan"},
        {**row, "at": "2026-03-02", "id": "open-mar"},
    ]
    summary = ingest(db.engine, read_jsonl(_jsonl(rows)), clock=_clock("2026-03-02T00:00:00+00:00"))
    assert (summary.accepted, summary.rejected) == (1, 1)
    assert "already invoiced" in summary.rejections[0].reason

    # a closed period not yet invoiced: accepted within the grace after its end, late after it
    service.apply_event(db.engine, {"type": "change_quantity", "at": "2026-04-01T01:00:00Z",
                                    "subscription": "acme-team", "quantity": 5}, actor="test")
    late = [{**row, "at": "2026-03-31T23:00:00Z", "id": "m1"}]
    inside = ingest(db.engine, read_jsonl(_jsonl(late)), clock=_clock("2026-04-01T20:00:00+00:00"),
                    grace=timedelta(days=1))
    assert (inside.accepted, inside.rejected) == (1, 0)
    late = [{**row, "at": "2026-03-31T23:30:00Z", "id": "m2"}]
    outside = ingest(db.engine, read_jsonl(_jsonl(late)), clock=_clock("2026-04-03T00:00:00+00:00"),
                     grace=timedelta(days=1))
    assert (outside.accepted, outside.rejected) == (0, 1)
    assert "closed more than the grace period (1 day, 0:00:00) ago" in outside.rejections[0].reason
    # the accepted late event is billed by the next run: March = 5 + 5 = 10 calls, all included
    outcome = service.apply_event(db.engine, {"type": "invoice_run", "at": "2026-04-02T00:00:00Z"}, actor="test")
    (inv,) = [i for i in outcome.issued if i.customer == "acme"]
    api = [ln for ln in inv.lines if ln.kind == "usage" and ln.description.startswith("API calls")]
    assert [(ln.quantity, ln.amount) for ln in api] == [(Decimal(10), Decimal("0.00"))]


def test_csv_with_properties_and_a_bad_header(db: Db) -> None:
    _book(db)
    data = ("subscription,metric,at,value,id,properties\n"
            "acme-team,api,2026-01-03T00:00:00Z,250,c1,\n"
            'acme-team,eu_gb,2026-01-03T00:00:00Z,1,c2,"{""region"": ""eu"", ""gb"": ""3""}"\n'
            "acme-team,api,2026-01-03T00:00:00Z,abc,c3,\n"
            "acme-team,api\n")
    summary = ingest(db.engine, read_csv(io.StringIO(data)), clock=_clock("2026-01-04T00:00:00+00:00"))
    assert (summary.accepted, summary.duplicated, summary.rejected) == (2, 0, 2)
    assert [(r.line, r.reason) for r in summary.rejections] == [
        (4, "value 'abc' is not a decimal number"), (5, "2 column(s), the header has 6")]
    try:
        list(read_csv(io.StringIO("subscription,metric,when,value,id\n")))
    except ValueError as exc:
        assert "unknown column(s) 'when'" in str(exc)
    else:
        raise AssertionError("a bad header must be refused")


def _ingest_file(url: str, path: str, out: Any) -> None:
    from billing.persistence import create_engine

    engine = create_engine(url)
    try:
        with open(path, "rb") as stream:
            s = ingest(engine, read_jsonl(stream), clock=lambda: datetime(2026, 1, 31, tzinfo=UTC), chunk=500)
        out.put((s.accepted, s.duplicated, s.rejected))
    finally:
        engine.dispose()


def test_two_processes_ingesting_one_file_store_each_event_once(db: Db, tmp_path: Path) -> None:
    _book(db)
    path = tmp_path / "events.jsonl"
    with path.open("w") as f:
        for i in range(6000):
            f.write(json.dumps({"subscription": "acme-team", "metric": "api", "value": 1, "id": f"e{i % 5000}",
                                "at": f"2026-01-{10 + i % 10:02d}T00:00:{i % 60:02d}Z"}) + "\n")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ingest_file, args=(db.url, str(path), out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    # 5000 distinct ids in 6000 rows: between them the two stored each id exactly once
    assert sum(r[0] for r in results) == 5000
    assert all(r[0] + r[1] == 6000 and r[2] == 0 for r in results)
    assert _stored(db) == 5000
    (api, *_) = current_usage(db.engine, "acme-team", as_of=datetime(2026, 1, 31, tzinfo=UTC))
    assert api.quantity == 5000


def test_seat_saturation_is_an_expansion_readiness_signal(db: Db) -> None:
    from expansion.accounts import expansion_readiness

    _book(db)
    rows: list[dict[str, Any] | str] = [
        {"subscription": "acme-team", "metric": "users", "at": f"2026-01-1{i}", "value": 1, "id": f"u{i}",
         "properties": {"user": f"user-{i % 4}"}} for i in range(6)
    ]
    summary = ingest(db.engine, read_jsonl(_jsonl(rows)), clock=_clock("2026-01-19T00:00:00+00:00"))
    assert summary.accepted == 6
    as_of = datetime(2026, 1, 19, tzinfo=UTC)
    (sat,) = seat_saturation(db.engine, as_of=as_of)
    assert (sat.active, sat.purchased, sat.ratio) == (Decimal(4), 4, Decimal(1))
    (ready,) = expansion_readiness(db.engine, as_of=as_of)
    assert (ready["subscription"], ready["seat_saturation"], ready["signals"]) == ("acme-team", "100.00",
                                                                                  ["seats_saturated"])


def _events(db: Db) -> list[tuple[Any, ...]]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(
            "SELECT subscription, metric, at, value, matched, quantity, dim, key, properties, ingest_id "
            "FROM usage_events ORDER BY seq"))]


def test_awkward_text_is_stored_exactly(db: Db) -> None:
    """Ids and properties with tabs, newlines, backslashes, quotes, DEL and non-ASCII text are
    stored as given (the bulk paths write them in their own formats); on SQLite also a NUL."""
    _book(db)
    texts = ["tab\there", "new\nline", "cr\rx", "back\\slash", 'quote"d', "del\x7f", "été ✓", "\\N", "a\\tb"]
    batches = [texts, ["nul\x00byte"]] if db.backend == "sqlite" else [texts]
    for batch in batches:  # a NUL on its own: SQLite writes its chunk row by row
        rows: list[dict[str, Any] | str] = [
            {"subscription": "acme-team", "metric": "users", "at": "2026-01-05T10:00:00Z", "value": 1, "id": t,
             "properties": {"user": t, t: t}} for t in batch]
        summary = ingest(db.engine, read_jsonl(_jsonl(rows)), clock=_clock("2026-01-06T00:00:00+00:00"))
        assert (summary.accepted, summary.duplicated, summary.rejected) == (len(batch), 0, 0)
    texts = [t for batch in batches for t in batch]
    stored = _events(db)
    assert [r[7] for r in stored] == texts
    assert [r[6] for r in stored] == texts
    assert [r[8] for r in stored] == [json.dumps({"user": t, t: t}, separators=(",", ":")) for t in texts]


def test_a_later_file_repeating_stored_events_counts_them_as_duplicates(db: Db) -> None:
    """Chunks whose ids are partly stored already (the first chunks new, later ones not)."""
    _book(db)

    def rows(ids: range) -> list[dict[str, Any] | str]:
        return [{"subscription": "acme-team" if i % 2 else "beta-team", "metric": "api", "value": i,
                 "at": f"2026-01-{1 + i % 18:02d}T00:00:00Z", "id": f"k{i}"} for i in ids]

    clock = _clock("2026-01-19T00:00:00+00:00")
    first = ingest(db.engine, read_jsonl(_jsonl(rows(range(40, 100)))), clock=clock, chunk=10)
    assert (first.accepted, first.duplicated, first.rejected) == (60, 0, 0)
    again = ingest(db.engine, read_jsonl(_jsonl(rows(range(0, 120)) + rows(range(0, 5)))), clock=clock, chunk=10)
    assert (again.accepted, again.duplicated, again.rejected) == (60, 65, 0)
    stored = _events(db)
    assert sorted(r[7] for r in stored) == sorted(f"k{i}" for i in range(120))
    # each subscription's events are stored in input order (seq), the first file's before the second's
    for sub in ("acme-team", "beta-team"):
        keys = [int(r[7][1:]) for r in stored if r[0] == sub]
        assert keys == [k for k in range(40, 100) if (k % 2 == 1) == (sub == "acme-team")] + [
            k for k in [*range(0, 40), *range(100, 120)] if (k % 2 == 1) == (sub == "acme-team")]


def test_a_key_stored_by_another_ingester_meanwhile_is_a_duplicate(db: Db, monkeypatch: Any) -> None:
    """The COPY of new rows meets a key stored since it looked (simulated): the chunk goes the
    conflict-proof way (PostgreSQL's staging table and ON CONFLICT DO NOTHING)."""
    from billing.persistence import usage_store

    _book(db)
    clock = _clock("2026-01-19T00:00:00+00:00")
    row = {"subscription": "acme-team", "metric": "api", "value": 2, "at": "2026-01-05T00:00:00Z"}
    ingest(db.engine, read_jsonl(_jsonl([{**row, "id": "a"}])), clock=clock)
    monkeypatch.setattr(usage_store.BulkWriter, "_copy_new", lambda *_args: None)
    summary = ingest(db.engine, read_jsonl(_jsonl([{**row, "id": i} for i in ["b", "a", "c", "b"]])), clock=clock)
    assert (summary.accepted, summary.duplicated, summary.rejected) == (2, 2, 0)
    assert [r[7] for r in _events(db)] == ["a", "b", "c"]


def test_usage_accepted_after_its_period_closed_moves_mrr_to_what_is_billed(db: Db) -> None:
    """The usage part of MRR moves to the amount billed for the period: when events accepted in
    the grace raise it after the period closed, the run that bills them moves MRR again, linked to
    the usage line."""
    _book(db)
    service.apply_event(db.engine, {"type": "invoice_run", "at": "2026-02-01T00:00:00Z"}, actor="test")
    row = {"subscription": "acme-team", "metric": "api"}
    first = ingest(db.engine, read_jsonl(_jsonl([{**row, "at": "2026-02-10", "value": 2000, "id": "f1"}])),
                   clock=_clock("2026-02-10T12:00:00+00:00"))
    assert first.accepted == 1
    # a command after the period's end closes it: usage MRR moves to what 2,000 calls rate at
    closed = service.apply_event(db.engine, {"type": "change_quantity", "at": "2026-03-01T01:00:00Z",
                                             "subscription": "acme-team", "quantity": 5}, actor="test")
    (at_close,) = [m for m in closed.movements if m.subtype == "usage"]
    assert at_close.type == "expansion" and at_close.delta > 0
    late = ingest(db.engine, read_jsonl(_jsonl([{**row, "at": "2026-02-28T23:00:00Z", "value": 3000, "id": "f2"}])),
                  clock=_clock("2026-03-01T20:00:00+00:00"), grace=timedelta(days=1))
    assert (late.accepted, late.rejected) == (1, 0)
    run = service.apply_event(db.engine, {"type": "invoice_run", "at": "2026-03-02T00:00:00Z"}, actor="test")
    (inv,) = [i for i in run.issued if i.customer == "acme"]
    (index, api), = [(n, ln) for n, ln in enumerate(inv.lines)
                     if ln.kind == "usage" and ln.description.startswith("API")]
    assert api.quantity == Decimal(5000)
    (at_billing,) = [m for m in run.movements if m.subtype == "usage"]
    assert at_billing.type == "expansion" and at_billing.subscription == "acme-team"
    assert at_close.delta + at_billing.delta == api.amount  # from nothing to what is billed
    linked = {(ref.invoice, ref.line) for ref in at_billing.invoice_lines}
    linked |= {(ref.invoice, ref.line) for movement, ref in run.links if movement == at_billing.id}
    assert (inv.number, index) in linked
    # and a run that bills exactly what closed moves nothing more
    again = service.apply_event(db.engine, {"type": "invoice_run", "at": "2026-04-02T00:00:00Z"}, actor="test")
    assert [m for m in again.movements if m.subtype == "usage" and m.type != "contraction"] == []
