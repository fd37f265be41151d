"""Metered usage services: bulk ingestion, current usage, seat saturation.

Ingestion (`ingest`) takes usage events — from `read_jsonl` / `read_csv` or any iterable of
`(line number, mapping)` — and stores the good ones in `usage_events`, streaming: rows are
parsed one at a time and written in chunks, so memory stays flat however long the input.

- A row names its subscription (`subscription`) or its customer (`customer`: the customer's one
  live subscription whose plan bills the metric), `metric`, `at` (ISO 8601 with an offset; a bare
  date is midnight UTC), `value` (a decimal string or an exact number, at most 6 decimal places,
  |value| < 10^12), `id` (unique per subscription) and optional `properties` (an object).
  Any other field is an error, as in a scenario.
- Each row is checked by the book's one rule set for a usage event (`Book.usage_window`,
  `billing.usage.UsageWindow`): known subscription and metric, the metric billed on its plan,
  inside the subscription's life, not in a period already invoiced, and — for a period that has
  closed but is not invoiced yet — not more than `grace` after the period's end by the ingest
  clock. A rejected row is reported with its line number and reason; every good row is kept.
- An `id` already stored for the subscription is a duplicate: counted, never stored twice. The
  database's unique `(subscription, key)` constraint decides, so two processes ingesting one
  file at once store each event once.
- Each chunk is one transaction that holds the book still (billing.persistence.usage_store
  .BulkWriter) and re-reads it when a command changed it since the last chunk, so an event is
  never accepted into a period that an invoice run has just billed.

Speed without a second rule set: JSON lines are read by orjson where it gives exactly what the
standard decoder gives (no number with a fraction or an exponent, no integer beyond 64 bits —
those lines go to the decimal-exact standard decoder), the common metric shapes are measured
without redoing the decimal arithmetic, and a row inside its window's accepting span
(`_accepting`) needs no other check; a test compares each fast path with the plain one.
"""

from __future__ import annotations

import csv
import io
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import IO, Any

import orjson

from billing.book import Book, BookError
from billing.catalog import Metric
from billing.money import round_money
from billing.persistence import Engine, UnitOfWork, utc_now
from billing.persistence.audit_log import record_action
from billing.persistence.usage_store import BulkWriter, Row
from billing.scenario import parse_instant
from billing.usage import (
    EPOCH,
    SCALE,
    UsageValueError,
    UsageWindow,
    instant,
    measure,
    micros,
    parse_value,
    rate,
    scaled,
)

Clock = Callable[[], datetime]
DEFAULT_GRACE = timedelta(days=1)
CHUNK = 20_000
CHUNKS = {"sqlite": 100_000}  # rows per chunk by database (default CHUNK): SQLite gains from fewer,
# larger transactions (each index page copied to the journal once per transaction); PostgreSQL not
WRITERS = {"postgresql": 2}  # writer threads per database (default 1)
RETRIES = 5
FIELDS = frozenset({"subscription", "customer", "metric", "at", "value", "id", "properties"})
KEPT_REJECTIONS = 1_000
_DECODER = json.JSONDecoder(parse_float=Decimal)
_PROPS_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # = json.dumps(…, separators, default=str)
_BOUND = 10**12  # |value| below this (billing.usage.MAX_VALUE)
Measurement = tuple[bool, int | None, str | None]  # (matched, quantity, dim): billing.usage.measure
Measurer = Callable[[Decimal | int, int, Mapping[str, Any]], Measurement]


def _measurer(metric: Metric) -> Measurer:
    """`billing.usage.measure` for one metric, with the event's scaled value already known; the
    common shapes (the field is `value`, or a property; at most one filter) skip the decimal
    arithmetic `measure` would redo, with the same results."""
    distinct = metric.aggregation == "unique_count"
    filters = tuple(metric.filter.items())
    if metric.field == "value":
        if not filters:
            if distinct:
                return lambda value, scaled_value, _props: (True, scaled_value, str(value))
            return _PLAIN
        if len(filters) == 1:
            ((name, wanted),) = filters
            if distinct:
                return lambda value, scaled_value, props: (str(props.get(name)) == wanted, scaled_value, str(value))
            return lambda _value, scaled_value, props: (str(props.get(name)) == wanted, scaled_value, None)
        return lambda value, _scaled, props: measure(metric, Decimal(value), props)
    field_name = metric.field

    def by_property(value: Decimal | int, _scaled: int, props: Mapping[str, Any]) -> Measurement:
        raw = props.get(field_name)
        if isinstance(raw, str) and raw[:1].isalpha():
            # a letter first: not a decimal, or an infinity or NaN — `measure` gives no quantity
            matched = all(str(props.get(k)) == v for k, v in filters) if filters else True
            return matched, None, raw if distinct else None
        return measure(metric, Decimal(value), props)

    return by_property


def _plain(_value: Decimal | int, scaled_value: int, _props: Mapping[str, Any]) -> Measurement:
    """The measure of a metric of the value itself, unfiltered, not a distinct count (the parser
    inlines it: see `_Parser.parse`)."""
    return True, scaled_value, None


_PLAIN: Measurer = _plain
_fromisoformat = datetime.fromisoformat


def _props_text(props: Mapping[str, Any]) -> str:
    """`json.dumps(props, separators=(",", ":"), default=str)`, by orjson when that gives the same
    text: a flat object of strings, integers, booleans and nulls that encodes to ASCII without
    DEL (which json escapes and orjson does not)."""
    for v in props.values():
        t = type(v)
        if t is not str and t is not int and t is not bool and v is not None:
            return _PROPS_ENCODER.encode(props)
    try:
        out = orjson.dumps(props)
    except TypeError:  # a key that is not a string, an integer beyond 64 bits
        return _PROPS_ENCODER.encode(props)
    if out.isascii() and b"\x7f" not in out:
        return out.decode()
    return _PROPS_ENCODER.encode(props)


MAX_REASON = 300


@dataclass(frozen=True)
class Rejection:
    """A refused line and why; a reason quoting hostile input is cut to 300 characters."""

    line: int
    reason: str

    def __post_init__(self) -> None:
        if len(self.reason) > MAX_REASON:
            object.__setattr__(self, "reason", f"{self.reason[:MAX_REASON]}… ({len(self.reason)} characters)")

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class IngestSummary:
    """What an ingest did; `rejections` keeps the first `KEPT_REJECTIONS` (all go to the
    `on_reject` callback)."""

    accepted: int = 0
    duplicated: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.accepted + self.duplicated + self.rejected

    def to_json(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "duplicated": self.duplicated, "rejected": self.rejected,
                "rejections": [{"line": r.line, "reason": r.reason} for r in self.rejections]}


class IngestError(ValueError):
    """The input as a whole cannot be read (a CSV header without the needed columns)."""


# -- readers ------------------------------------------------------------------------------------


_BLANK = " \t\n\r\x0b\x0c"
"""What makes a line blank: ASCII whitespace, for text as for bytes (str.strip() would also
take Unicode separators such as U+001C, which JSON does not allow)."""
_BLANK_BYTES = _BLANK.encode()


def read_jsonl(stream: IO[bytes] | IO[str]) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """(line number, object) per non-blank line; (line number, reason) for a line that is not a
    JSON object. Numbers with a fraction are read as exact decimals, never floats.

    orjson reads a line several times faster than the standard decoder and gives the same
    objects, except that it makes a binary float of a number with a fraction or an exponent, or
    of an integer beyond 64 bits. So a line with a `.` goes to the standard decoder (with exact
    decimals), and so does one that orjson gave a float anywhere or refused (which then fails
    with the standard decoder's reason, as ever)."""
    lines: Iterable[str | bytes] = stream
    decode = _DECODER.decode
    fast = orjson.loads
    for number, line in enumerate(lines, start=1):
        if "." not in line if isinstance(line, str) else b"." not in line:
            try:
                read = fast(line)
            except orjson.JSONDecodeError:
                pass  # read again below, for the same reason as ever
            else:
                if not isinstance(read, dict):
                    yield number, "not a JSON object"
                    continue
                for value in read.values():
                    kind = type(value)
                    if kind is float or ((kind is dict or kind is list) and _has_float(value)):
                        break
                else:
                    yield number, read
                    continue
        try:
            data = decode(line.decode() if isinstance(line, bytes) else line)
        except UnicodeDecodeError:
            yield number, "not UTF-8 text"
            continue
        except ValueError as exc:
            if not (line.strip(_BLANK) if isinstance(line, str) else line.strip(_BLANK_BYTES)):
                continue
            yield number, f"not valid JSON ({exc.args[0].split(':')[0]})"
            continue
        yield (number, data) if isinstance(data, dict) else (number, "not a JSON object")


def _has_float(data: dict[str, Any] | list[Any]) -> bool:
    """Whether a float is anywhere in this decoded JSON (see `read_jsonl`)."""
    for value in data.values() if isinstance(data, dict) else data:
        kind = type(value)
        if kind is float or ((kind is dict or kind is list) and _has_float(value)):
            return True
    return False


def read_csv(stream: IO[str]) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """Rows of a CSV file with a header naming the columns (the JSON fields; `properties` holds
    a JSON object). Line numbers count the header as line 1."""
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        return
    names = [h.strip() for h in header]
    unknown = [n for n in names if n not in FIELDS]
    if unknown:
        raise IngestError(f"CSV header: unknown column(s) {', '.join(map(repr, unknown))}; "
                          f"expected {', '.join(sorted(FIELDS))}")
    width = len(names)
    for number, values in enumerate(reader, start=2):
        if not values:
            continue
        if len(values) != width:
            yield number, f"{len(values)} column(s), the header has {width}"
            continue
        row: dict[str, Any] = {n: v for n, v in zip(names, values, strict=True) if v != "" or n == "value"}
        raw = row.get("properties")
        if raw is not None:
            try:
                row["properties"] = json.loads(raw, parse_float=Decimal)
            except ValueError:
                yield number, "properties: not a JSON object"
                continue
        yield number, row


def open_reader(stream: IO[bytes], kind: str) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """A reader for `kind` ("jsonl" or "csv") over a binary stream."""
    if kind == "csv":
        return read_csv(io.TextIOWrapper(stream, encoding="utf-8", newline=""))
    return read_jsonl(stream)


# -- checking one row ---------------------------------------------------------------------------


@dataclass
class _Part:
    """Rows read and measured, not yet checked against the book, with their line numbers; a row
    that names its customer instead of its subscription has "" in the row's subscription place
    and its customer in `customers` (by its index). Parallel lists, not a tuple per row: fewer
    objects for the garbage collector to track."""

    lines: list[int] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    customers: dict[int, str] = field(default_factory=dict)

    def add(self, line: int, customer: str | None, row: Row) -> None:
        if customer is not None:
            self.customers[len(self.rows)] = customer
        self.lines.append(line)
        self.rows.append(row)


_EMPTY: dict[str, Any] = {}  # the properties of a row without any (only ever read)


class _Parser:
    """The checks that need only the catalog: fields, types, time, value, the metric's measure.
    Runs on the reading thread."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.measurers: dict[str, Measurer] = {m.code: _measurer(m) for m in metrics}

    def parse(self, data: Mapping[str, Any]) -> tuple[str | None, Row]:
        """(customer, row) (see `_Part`), or ValueError with the reason."""
        if not FIELDS.issuperset(data):
            unknown = sorted(set(data) - FIELDS)
            raise ValueError(f"{unknown[0]}: unknown field")
        get = data.get
        metric_code = get("metric")
        if not isinstance(metric_code, str) or not metric_code:
            raise ValueError("metric: missing")
        measurer = self.measurers.get(metric_code)
        if measurer is None:
            raise ValueError(f"metric: unknown metric {metric_code!r}")
        sub = get("subscription")
        customer = get("customer")
        if sub is None:
            if not isinstance(customer, str) or not customer:
                raise ValueError("subscription: missing (give subscription or customer)")
        elif customer is not None or not isinstance(sub, str):
            raise ValueError("subscription: must be a string (and not given with customer)")
        key = get("id")
        if not isinstance(key, str):
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            else:
                raise ValueError("id: missing or not a string of 1 to 500 characters")
        if not key or len(key) > 500:
            raise ValueError("id: missing or not a string of 1 to 500 characters")
        raw_at = get("at")
        if isinstance(raw_at, str) and len(raw_at) > 10:
            try:
                moment = _fromisoformat(raw_at)
            except ValueError:
                raise ValueError(f"at: {raw_at!r} is not an ISO 8601 time") from None
            if moment.tzinfo is None:
                raise ValueError(f"at: {raw_at!r} needs an offset (e.g. Z)")
            span = moment - EPOCH
            at = span.days * 86_400_000_000 + span.seconds * 1_000_000 + span.microseconds
        else:
            at = _micros_of(raw_at)
        raw = get("value")
        value: Decimal | int
        if type(raw) is int and -_BOUND < raw < _BOUND:
            value, scaled_value = raw, raw * SCALE
        else:
            try:
                value = parse_value(raw)
                scaled_value = scaled(value)
            except UsageValueError as exc:
                raise ValueError(str(exc)) from None
        props = get("properties")
        if props is None:
            if measurer is _PLAIN:  # the commonest row: a count or sum of the value, no properties
                if sub is None:
                    return customer, ("", metric_code, at, scaled_value, True, scaled_value, None, key, "{}")
                return None, (sub, metric_code, at, scaled_value, True, scaled_value, None, key, "{}")
            props = _EMPTY
            text = "{}"
        elif not isinstance(props, dict):
            raise ValueError("properties: must be an object")
        else:
            text = _props_text(props) if props else "{}"
        matched, quantity, dim = measurer(value, scaled_value, props)
        if sub is None:
            return customer, ("", metric_code, at, scaled_value, matched, quantity, dim, key, text)
        return None, (sub, metric_code, at, scaled_value, matched, quantity, dim, key, text)


class _Gate:
    """The book's usage rules for many rows. Runs inside a chunk's transaction, against the book
    as that transaction sees it; `windows` and `by_customer` are caches the caller keeps while
    the book does not change (they depend on the book only, not on the clock)."""

    def __init__(self, book: Book, now: int, grace: int | None,
                 windows: dict[tuple[str, str], UsageWindow | str] | None = None,
                 by_customer: dict[tuple[str, str], str] | None = None) -> None:
        self.book = book
        self.now = now
        self.grace = grace
        self.windows: dict[tuple[str, str], UsageWindow | str] = {} if windows is None else windows
        self.by_customer: dict[tuple[str, str], str] = {} if by_customer is None else by_customer
        self.bounds: dict[tuple[str, str], tuple[int, int]] = {}
        """(subscription, metric) → [lo, hi): every instant in it is accepted (`UsageWindow.reject`
        gives None), so a row inside needs no other check; outside it, `reject` decides."""

    def window(self, sub: str, metric: str) -> UsageWindow | str:
        key = (sub, metric)
        found = self.windows.get(key)
        if found is None:
            try:
                found = self.book.usage_window(sub, metric)
            except (BookError, KeyError) as exc:
                found = str(exc.args[0]) if exc.args else str(exc)
            self.windows[key] = found
        if isinstance(found, UsageWindow) and key not in self.bounds:
            self.bounds[key] = _accepting(found, self.now, self.grace)
        return found

    def subscription_of(self, customer: str, metric: str) -> str:
        key = (customer, metric)
        found = self.by_customer.get(key)
        if found is None:
            acct = self.book.accounts.get(customer)
            if acct is None:
                raise ValueError(f"customer: unknown customer {customer!r}")
            live = [s for s in acct.subscriptions if self.book.subscriptions[s].status != "cancelled"
                    and isinstance(self.window(s, metric), UsageWindow)]
            if len(live) != 1:
                raise ValueError(f"customer: {customer!r} has {len(live)} live subscriptions billing "
                                 f"{metric!r}; name the subscription")
            found = self.by_customer[key] = live[0]
        return found

    def admit(self, row: Row, customer: str | None) -> Row:
        """The row to store, or ValueError with the reason."""
        sub, metric, at = row[0], row[1], row[2]
        if customer is not None:
            sub = self.subscription_of(customer, metric)
            row = (sub, *row[1:])
        window = self.window(sub, metric)
        if isinstance(window, str):
            raise ValueError(window)
        reason = window.reject(at, now=self.now, grace=self.grace)
        if reason is not None:
            raise ValueError(reason)
        return row

    def admit_all(self, part: _Part, good: list[Row], rejected: list[Rejection],
                  refused_ids: list[tuple[int, str, str]] | None = None) -> None:
        """`admit` each row into `good` or `rejected`; a row inside its window's accepting span
        (most of them) costs a lookup and a comparison. `refused_ids` receives (position in
        `rejected`, subscription, id) of each refused row of a known subscription, so the caller
        can tell a resend of a stored event (a duplicate) from a late one."""
        bounds = self.bounds
        keep = good.append
        customers = part.customers
        for index, row in enumerate(part.rows):
            if not customers or index not in customers:
                span = bounds.get((row[0], row[1]))
                if span is not None and span[0] <= row[2] < span[1]:
                    keep(row)
                    continue
            try:
                keep(self.admit(row, customers.get(index)))
            except ValueError as exc:
                if refused_ids is not None:
                    customer = customers.get(index)
                    sub = row[0] if customer is None else self.by_customer.get((customer, row[1]), "")
                    if sub in self.book.subscriptions:
                        refused_ids.append((len(rejected), sub, row[7]))
                rejected.append(Rejection(part.lines[index], str(exc)))


def _resent(writer: BulkWriter, refused: list[tuple[int, str, str]]) -> set[int]:
    """The positions of the refused rows whose (subscription, id) is already stored, read in the
    chunk's transaction: a resend of an event stored earlier is a duplicate even when its period
    has since been invoiced or its grace has passed (Stripe and Lago dedupe on the id first)."""
    found: set[tuple[str, str]] = set()
    pairs = sorted({(sub, key) for _, sub, key in refused})
    for start in range(0, len(pairs), 400):
        chunk = pairs[start:start + 400]
        if writer.dialect == "sqlite":
            values = ", ".join("(?, ?)" for _ in chunk)
            rows = writer.dbapi.execute(
                f"SELECT subscription, key FROM usage_events WHERE (subscription, key) IN (VALUES {values})",  # noqa: S608 - placeholders only
                [v for pair in chunk for v in pair]).fetchall()
        else:
            with writer.dbapi.cursor() as cur:
                cur.execute("SELECT e.subscription, e.key FROM usage_events e JOIN unnest(%s::text[], %s::text[]) "
                            "AS p(subscription, key) ON e.subscription = p.subscription AND e.key = p.key",
                            ([sub for sub, _ in chunk], [key for _, key in chunk]))
                rows = cur.fetchall()
        found.update((str(sub), str(key)) for sub, key in rows)
    return {position for position, sub, key in refused if (sub, key) in found}


_NEVER = -(2**63)
_ALWAYS = 2**63


def _accepting(window: UsageWindow, now: int, grace: int | None) -> tuple[int, int]:
    """The span [lo, hi) of instants `window.reject(at, now=now, grace=grace)` surely accepts:
    from the start of the subscription's life, the end of what is invoiced and the end of every
    closed period already past its grace, to the end of its life."""
    lo = _NEVER
    if window.started is not None:
        lo = max(lo, window.started)
    if window.invoiced_until is not None:
        lo = max(lo, window.invoiced_until)
    if grace is not None:
        for _start, end in window.closed:
            if now > end + grace:
                lo = max(lo, end)
    return lo, _ALWAYS if window.ends is None else window.ends


def _micros_of(raw: object) -> int:
    if isinstance(raw, str) and len(raw) > 10:
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            raise ValueError(f"at: {raw!r} is not an ISO 8601 time") from None
        if parsed.tzinfo is None:
            raise ValueError(f"at: {raw!r} needs an offset (e.g. Z)")
        return (parsed - EPOCH) // timedelta(microseconds=1)
    try:
        return micros(parse_instant(raw))
    except ValueError as exc:
        raise ValueError(f"at: {exc}") from None


# -- ingest -------------------------------------------------------------------------------------


def _load_book(engine: Engine) -> Book | None:
    """The whole book as it stands (read only)."""
    with UnitOfWork(engine) as uow:
        stored = uow.book.load()
        if stored is None:
            return None
        from billing.service import whole_book  # the book is kept in customer parts (billing.shards)

        return whole_book(uow, stored)


@dataclass
class _Batch:
    """A chunk of input: its rows parsed into one part per writer, and the parser's rejections."""

    number: int
    parts: list[_Part]
    rejected: list[Rejection] = field(default_factory=list)
    rows: int = 0


@dataclass
class _Done:
    """A batch's parts as the writers finish them."""

    rows: int
    parts: int = 0
    inserted: int = 0
    good: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def _router(book: Book, writers: int) -> Callable[[str, str | None], int]:
    """The writer of a row: all rows of one customer's subscriptions go to the same writer, in
    input order, so two writers never race for one (subscription, id) and a subscription's
    events are stored (`seq`) in the order they came. A subscription the book did not know at
    the start goes by its name."""
    if writers == 1:
        return lambda _sub, _customer: 0
    known = {sub.id: hash(sub.customer) % writers for sub in book.subscriptions.values()}

    def route(sub: str, customer: str | None) -> int:
        if customer is not None:
            return hash(customer) % writers
        found = known.get(sub)
        return hash(sub) % writers if found is None else found

    return route


def ingest(
    engine: Engine,
    rows: Iterable[tuple[int, Mapping[str, Any] | str]],
    *,
    grace: timedelta | None = DEFAULT_GRACE,
    clock: Clock = utc_now,
    on_reject: Callable[[Rejection], None] | None = None,
    progress: Callable[[int], None] | None = None,
    chunk: int | None = None,
    actor: str = "library",
    source: str | None = None,
) -> IngestSummary:
    """Store the good rows, count duplicates, report the bad ones (see the module docstring).

    `grace` None accepts late events in closed, uninvoiced periods whatever their age.
    `progress` is called with the number of rows done after each chunk. The ingest is written to
    the audit log first (`actor`, the time, `source`), and every event it stores names that entry.

    The calling thread reads and parses; writer threads (two on PostgreSQL, whose server inserts
    one writer's rows while the other's are sent; one on SQLite, which writes one transaction at
    a time) check their rows against the book and write them, so parsing overlaps the database's
    work. Each chunk is split between the writers by customer (`_router`). A writer's transaction
    that loses a deadlock to another ingester is retried. Counts and rejections are reported in
    input order."""
    book = _load_book(engine)
    if book is None:
        raise IngestError("no catalog loaded; run `billing catalog load FILE` first")
    parser = _Parser(book.catalog.metrics)
    with engine.begin() as conn:
        ingest_id = record_action(conn, action="usage_ingest", actor=actor, at=clock(),
                                  detail={"source": source})
    if chunk is None:
        chunk = CHUNKS.get(engine.dialect.name, CHUNK)
    summary = IngestSummary()
    grace_us = None if grace is None else grace // timedelta(microseconds=1)
    writers = WRITERS.get(engine.dialect.name, 1)
    route = _router(book, writers)
    queues: list[queue.Queue[_Batch | None]] = [queue.Queue(maxsize=1) for _ in range(writers)]
    failure: list[BaseException] = []
    finished: dict[int, _Done] = {}
    order = threading.Lock()
    next_batch = [0]

    def report(rejection: Rejection) -> None:
        summary.rejected += 1
        if len(summary.rejections) < KEPT_REJECTIONS:
            summary.rejections.append(rejection)
        if on_reject is not None:
            on_reject(rejection)

    def done(batch: _Batch, inserted: int, good: int, rejected: list[Rejection]) -> None:
        """Count and report finished batches in input order, whichever writers finished them."""
        with order:
            state = finished.setdefault(batch.number, _Done(batch.rows))
            state.parts += 1
            state.inserted += inserted
            state.good += good
            state.rejected.extend(rejected)
            while (ready := finished.get(next_batch[0])) is not None and ready.parts == writers:
                del finished[next_batch[0]]
                next_batch[0] += 1
                summary.accepted += ready.inserted
                summary.duplicated += ready.good - ready.inserted
                for rejection in sorted(ready.rejected, key=lambda r: r.line):
                    report(rejection)
                if progress is not None:
                    progress(ready.rows)

    def write_all(index: int, inbox: queue.Queue[_Batch | None]) -> None:
        writer = BulkWriter(engine, ingest_id)
        seen_version: tuple[int, int] | None = None
        current = book
        windows: dict[tuple[str, str], UsageWindow | str] = {}  # of `current`
        by_customer: dict[tuple[str, str], str] = {}
        try:
            while (batch := inbox.get()) is not None:
                part = batch.parts[index]
                rejected: list[Rejection] = batch.rejected if index == 0 else []
                inserted = kept = 0
                for attempt in range(RETRIES if part.rows else 0):
                    version = writer.begin()
                    try:
                        if version != seen_version:
                            loaded = _load_book(engine) if seen_version is not None else current
                            if loaded is None:
                                raise IngestError("the book disappeared while ingesting")
                            current, seen_version = loaded, version
                            windows, by_customer = {}, {}
                        gate = _Gate(current, micros(clock()), grace_us, windows, by_customer)
                        good: list[Row] = []
                        refused: list[Rejection] = []
                        refused_ids: list[tuple[int, str, str]] = []
                        gate.admit_all(part, good, refused, refused_ids)
                        resent = _resent(writer, refused_ids)
                        if resent:  # stored before: a duplicate whatever its time (the id decides first)
                            refused = [r for i, r in enumerate(refused) if i not in resent]
                        inserted = writer.write(good)
                        writer.commit()
                        kept = len(good) + len(resent)
                        rejected = rejected + refused
                        break
                    except Exception as exc:
                        writer.rollback()
                        if not writer.retryable(exc) or attempt == RETRIES - 1:
                            raise
                done(batch, inserted, kept, rejected)
        except BaseException as exc:  # handed to the reading thread
            failure.append(exc)
            while inbox.get() is not None:  # drain so the reader never blocks
                pass
        finally:
            writer.close()

    def send(batch: _Batch, count: int) -> None:
        batch.rows = count
        for inbox in queues:
            inbox.put(batch)

    threads = [threading.Thread(target=write_all, args=(i, inbox), name=f"usage-ingest-writer-{i}", daemon=True)
               for i, inbox in enumerate(queues)]
    for thread in threads:
        thread.start()
    parse = parser.parse
    try:
        batch = _Batch(0, [_Part() for _ in range(writers)])
        parts = batch.parts
        count = 0
        for line, data in rows:
            count += 1
            if isinstance(data, str):
                batch.rejected.append(Rejection(line, data))
            else:
                try:
                    customer, row = parse(data)
                except ValueError as exc:
                    batch.rejected.append(Rejection(line, str(exc)))
                else:
                    parts[route(row[0], customer) if writers > 1 else 0].add(line, customer, row)
            if not count & 127:
                # let a writer waiting for the interpreter lock (its database call returned) go on
                # at once rather than after the switch interval (5 ms) that this busy thread
                # would otherwise run for: the database would sit idle meanwhile
                time.sleep(0)
            if count >= chunk:
                if failure:
                    break
                send(batch, count)
                batch = _Batch(batch.number + 1, [_Part() for _ in range(writers)])
                parts = batch.parts
                count = 0
        if count and not failure:
            send(batch, count)
    finally:
        for inbox in queues:
            inbox.put(None)
        for thread in threads:
            thread.join()
    if failure:
        raise failure[0]
    return summary


# -- current usage ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricUsage:
    metric: str
    aggregation: str
    period_start: datetime
    period_end: datetime
    quantity: Decimal
    included: Decimal
    amount: Decimal
    currency: str
    next_tier_at: Decimal | None  # the quantity where the next price tier starts, if any

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "aggregation": self.aggregation,
                "period_start": self.period_start.isoformat(), "period_end": self.period_end.isoformat(),
                "quantity": str(self.quantity), "included": str(self.included), "amount": str(self.amount),
                "currency": self.currency,
                "next_tier_at": None if self.next_tier_at is None else str(self.next_tier_at)}


def _decimal(value: Fraction) -> Decimal:
    return Decimal(value.numerator) / Decimal(value.denominator)


def current_usage(engine: Engine, subscription: str, *, as_of: datetime | None = None,
                  clock: Clock = utc_now) -> list[MetricUsage]:
    """Period-to-date usage of a subscription's open usage period, per metric its plan bills:
    the aggregate over `[period start, as_of)` (default: now) and the amount it would bill now
    (included units, pricing and minimum applied, rounded like the invoice line)."""
    from billing.persistence.usage_store import SqlUsage

    loaded = _load_book(engine)
    if loaded is None:
        raise IngestError("no catalog loaded; run `billing catalog load FILE` first")
    book = loaded
    sub = book.subscriptions.get(subscription)
    if sub is None:
        raise KeyError(f"unknown subscription {subscription!r}")
    if sub.usage_open is None or sub.current is None:
        return []
    start, end = sub.usage_open, sub.current.end
    until = as_of if as_of is not None else clock()
    until = min(max(until, start), end)
    currency = book.accounts[sub.customer].currency
    out: list[MetricUsage] = []
    with UnitOfWork(engine) as uow:
        source = SqlUsage(uow.session)
        for metric in book.catalog.plan_metrics(book.catalog.plan(sub.items.plan)):
            quantity = source.aggregate(sub.id, metric, start, until, held_until=end)
            amount = round_money(rate(metric, quantity, currency), currency, book.settings.rounding)
            out.append(MetricUsage(metric.code, metric.aggregation, start, end, _decimal(quantity),
                                   metric.included, amount, currency, _next_tier(metric, quantity)))
    return out


def _next_tier(metric: Metric, quantity: Fraction) -> Decimal | None:
    if metric.pricing not in ("tiered", "volume"):
        return None
    billable = max(quantity - Fraction(metric.included), Fraction(0))
    for tier in metric.tiers:
        if tier.up_to is not None and billable <= tier.up_to:
            return Decimal(tier.up_to) + metric.included
    return None


# -- seat saturation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeatSaturation:
    """Active seats (a metric declared `active_seats`, period to date) ÷ purchased seats."""

    subscription: str
    customer: str
    plan: str
    metric: str
    active: Decimal
    purchased: int
    ratio: Decimal | None  # None with 0 purchased seats

    def to_json(self) -> dict[str, Any]:
        return {"subscription": self.subscription, "customer": self.customer, "plan": self.plan,
                "metric": self.metric, "active": str(self.active), "purchased": self.purchased,
                "ratio": None if self.ratio is None else str(self.ratio)}


def seat_saturation(engine: Engine, *, as_of: datetime | None = None,
                    clock: Clock = utc_now) -> list[SeatSaturation]:
    """Per active subscription whose plan bills an `active_seats` metric: that metric's
    aggregate over its open usage period up to `as_of` (default: now) ÷ its seat quantity,
    as a ratio rounded to 4 places (half up). Ordered by ratio, highest first."""
    from billing.money import round_to_places
    from billing.persistence.usage_store import SqlUsage

    loaded = _load_book(engine)
    if loaded is None:
        return []
    book = loaded
    until = as_of if as_of is not None else clock()
    out: list[SeatSaturation] = []
    with UnitOfWork(engine) as uow:
        source = SqlUsage(uow.session)
        for sub in book.subscriptions.values():
            if sub.status != "active" or sub.usage_open is None or sub.current is None:
                continue
            plan = book.catalog.plan(sub.items.plan)
            for metric in book.catalog.plan_metrics(plan):
                if not metric.active_seats:
                    continue
                end = min(max(until, sub.usage_open), sub.current.end)
                active = source.aggregate(sub.id, metric, sub.usage_open, end, held_until=sub.current.end)
                purchased = sub.items.quantity
                ratio = (None if purchased <= 0
                         else round_to_places(active / purchased, 4, "half_up"))
                out.append(SeatSaturation(sub.id, sub.customer, plan.code, metric.code, _decimal(active),
                                          purchased, ratio))
    out.sort(key=lambda s: (-(s.ratio if s.ratio is not None else Decimal(-1)), s.customer, s.subscription))
    return out


__all__ = [
    "DEFAULT_GRACE",
    "IngestError",
    "IngestSummary",
    "MetricUsage",
    "Rejection",
    "SeatSaturation",
    "current_usage",
    "ingest",
    "instant",
    "open_reader",
    "read_csv",
    "read_jsonl",
    "seat_saturation",
]
