"""The report tests share one fixture-built SQLite book (the demo book, billed monthly) and the
report written from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from reportkit import build_demo

from billing.persistence import Engine, create_engine
from billing.replay import ReplayResult
from expansion.report import write_report


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ReplayResult]:
    url = f"sqlite:///{tmp_path_factory.mktemp('demo') / 'demo.sqlite'}"
    return url, build_demo(url)


@pytest.fixture
def engine(demo: tuple[str, ReplayResult]) -> Engine:
    engine = create_engine(demo[0])
    yield engine  # type: ignore[misc]
    engine.dispose()


@pytest.fixture(scope="session")
def report_dir(demo: tuple[str, ReplayResult], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    engine = create_engine(demo[0])
    try:
        index = write_report(engine, out)
    finally:
        engine.dispose()
    assert index == (out / "index.html").resolve()
    return out
