"""Database fixtures: every test runs on SQLite (a temporary file) and, when
BILLING_TEST_POSTGRES_URL is set, on PostgreSQL too, with the schema dropped and recreated per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbkit import PG_ENV, Db, FakeBook, reset_postgres

from billing import service
from billing.persistence import create_engine, upgrade


def _backends() -> list[Any]:
    pg = os.environ.get(PG_ENV)
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgresql",
            id="postgresql",
            marks=pytest.mark.skipif(not pg, reason=f"set {PG_ENV} to run on PostgreSQL"),
        ),
    ]


@pytest.fixture(params=_backends())
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    """A database with no tables at all."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.sqlite'}"
    else:
        url = os.environ[PG_ENV]
        reset_postgres(url)
    engine = create_engine(url)
    try:
        yield Db(request.param, url, engine)
    finally:
        engine.dispose()


@pytest.fixture
def db(empty_db: Db) -> Db:
    """A migrated, empty database."""
    upgrade(empty_db.engine)
    return empty_db


@pytest.fixture
def fake_book(monkeypatch: pytest.MonkeyPatch) -> type[FakeBook]:
    monkeypatch.setattr(service, "Book", FakeBook)
    monkeypatch.setattr(FakeBook, "script", None)
    return FakeBook
