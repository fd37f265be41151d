"""The unit of work: one session, one transaction, rolled back unless committed.

    with UnitOfWork(engine) as uow:
        stored = uow.book.load()
        ...
        uow.commit()

Leaving the block without `commit()` (normally or by an exception) rolls everything back, so a
failing command leaves the database exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from billing.persistence.parts import PartsRepository, RunRepository
from billing.persistence.repository import (
    BookStateRepository,
    CommandRepository,
    LedgerRepository,
    ViewRepository,
)
from billing.persistence.usage_store import SqlUsage


def utc_now() -> datetime:
    return datetime.now(UTC)


class UnitOfWork:
    book: BookStateRepository
    commands: CommandRepository
    ledger: LedgerRepository
    view: ViewRepository
    parts: PartsRepository
    runs: RunRepository
    usage: SqlUsage
    session: Session

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        self._committed = False

    def __enter__(self) -> UnitOfWork:
        self.session = Session(self.engine, expire_on_commit=False, autoflush=False)
        self.book = BookStateRepository(self.session)
        self.commands = CommandRepository(self.session)
        self.ledger = LedgerRepository(self.session)
        self.view = ViewRepository(self.session)
        self.parts = PartsRepository(self.session)
        self.runs = RunRepository(self.session)
        self.usage = SqlUsage(self.session)
        self._committed = False
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if not self._committed:
                self.session.rollback()
        finally:
            self.session.close()

    def now(self) -> datetime:
        return self.clock()

    def commit(self) -> None:
        self.session.commit()
        self._committed = True

    def rollback(self) -> None:
        self.session.rollback()
