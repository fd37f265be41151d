"""The report of a fixture-built book (the demo book billed monthly, plus a customer with hostile
strings): its numbers are the metric set of expansion/metrics.py, every trail sums to its number,
every link resolves, customer strings are escaped, and the page needs nothing from outside."""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from reportkit import HOSTILE, HOSTILE_NAME, HOSTILE_TAG

from billing.cli import cli
from billing.money import money_str, round_to_places
from billing.persistence import Engine
from billing.records import EXPANSION_SUBTYPES
from billing.replay import ReplayResult
from expansion.report_model import ReportModel, build_model, load_report_data
from expansion.trace import MOVEMENT_TYPES


@pytest.fixture
def model(engine: Engine) -> ReportModel:
    return build_model(load_report_data(engine))


class Links(HTMLParser):
    """The href targets and the ids of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("href", "xlink:href") and value is not None:
                self.hrefs.append(value)
            if name == "id" and value is not None:
                self.ids.add(value)


def parse(path: Path) -> Links:
    links = Links()
    links.feed(path.read_text(encoding="utf-8"))
    return links


def test_the_numbers_are_the_metric_set(model: ReportModel, demo: tuple[str, ReplayResult]) -> None:
    _, result = demo
    # the same rows `billing replay --json` prints for the book (first to last command)
    assert model.metrics == result.metrics
    march = model.row("month", "2026-03")
    assert (march["starting_mrr"], march["new"], march["expansion"], march["ending_mrr"]) == (
        "3451.52", "262.44", "1000.00", "4713.96")


def test_every_trail_sums_to_its_number(model: ReportModel) -> None:
    checked = 0
    for kind in ("month", "quarter", "year"):
        for row in model.metrics[kind]:
            p = row["period"]
            for name in MOVEMENT_TYPES:
                assert model.trails[(name, p)].total_str == row[name]
                checked += 1
            for subtype in EXPANSION_SUBTYPES:
                assert model.trails[(f"expansion.{subtype}", p)].total_str == row["expansion_by_subtype"][subtype]
            expansion = model.trails[("expansion", p)]
            assert (expansion.accounts, expansion.per_account) == (row["expansion_accounts"], row["arpea"])
            snap = model.snapshots[p]
            rep = model.rep
            assert money_str(snap.starting, rep) == row["starting_mrr"]
            assert money_str(snap.ending, rep) == row["ending_mrr"]
            if row["nrr"] is not None:
                assert str(round_to_places(Fraction(snap.active_end) / Fraction(snap.active_start) * 100, 2)) \
                    == row["nrr"]
                assert str(round_to_places(Fraction(snap.kept) / Fraction(snap.active_start) * 100, 2)) == row["grr"]
    assert checked == 5 * (13 + 5 + 2)
    q2 = model.trails[("expansion", "2026-Q2")]
    assert [(r.movement.id, r.movement.customer, r.amount) for r in q2.rows] == [
        (10, "bistro-berlin", Decimal("146.88")), (11, "kite-agency", Decimal("200.00")),
        (13, "northwind", Decimal("203.20"))]


def test_cohorts_and_readiness(model: ReportModel) -> None:
    cohorts = {c.month.label: c for c in model.cohorts}
    assert list(cohorts) == ["2026-01", "2026-02", "2026-03", "2026-09", "2026-10"]
    assert cohorts["2026-01"].customers == ("acme", "bistro-berlin", "kite-agency", "hooli")
    # the cells are expansion.cohorts' table; the customers behind each row sum to them
    for cohort in model.cohorts:
        assert cohort.recomputed(cohort.valued) == cohort.net
        assert cohort.recomputed(cohort.kept) == cohort.gross
    # constant currency: initech's GBP 79.00 valued at 1.25, the rate at the end of 2027-01
    initech = cohorts["2026-09"]
    assert (initech.customers, str(initech.base), initech.net[:2]) == (("initech",), "98.75", ("100.00", "100.00"))
    # the October cohort: 2 seats × 50.00 at signup, 5 seats by the end of October
    assert [str(v) for v in cohorts["2026-10"].native[HOSTILE]] == ["250.00", "250.00", "250.00", "250.00"]
    january = cohorts["2026-01"]
    assert (str(january.base), january.net[2], january.gross[4], january.paying[4]) == (
        "1198.68", "183.43", "91.74", 3)  # May: hooli churned (0 of its 99.00 kept)
    assert [(r.customer, r.expansions, str(r.amount), r.seats) for r in model.ready] == [
        ("acme", 1, "500.00", 35), (HOSTILE, 1, "150.00", 5)]


def test_every_link_resolves(report_dir: Path) -> None:
    pages = [report_dir / "index.html", *sorted((report_dir / "trail").glob("*.html"))]
    assert len(pages) > 300
    parsed = {page: parse(page) for page in pages}
    index = parsed[report_dir / "index.html"]
    assert "trail/expansion-2026-03.html" in index.hrefs
    assert "trail/expansion.seat-2026-03.html" in index.hrefs
    assert "trail/period-2026-08.html" in index.hrefs
    assert "trail/cohort-2026-09.html" in index.hrefs
    checked = 0
    for page, links in parsed.items():
        for href in links.hrefs:
            if href == "data:,":  # the empty favicon: the browser asks for nothing
                continue
            assert not re.match(r"[a-z]+:", href), f"{page.name}: {href}"
            target, _, anchor = href.partition("#")
            resolved = (page.parent / target).resolve() if target else page
            assert resolved.exists(), f"{page.name}: {href}"
            if anchor:
                assert anchor in parsed[resolved].ids, f"{page.name}: {href}"
            checked += 1
    assert checked > 2000


def test_trail_pages_show_the_movements(report_dir: Path) -> None:
    text = (report_dir / "trail" / "expansion-2026-03.html").read_text(encoding="utf-8")
    assert '<a href="movements.html#m-8">#8</a>' in text and '<a href="movements.html#m-9">#9</a>' in text
    assert '<td class="n">1,000.00</td></tr></tbody>' in text
    movements = (report_dir / "trail" / "movements.html").read_text(encoding="utf-8")
    assert 'id="m-15"' in movements
    assert "period-end change_quantity, scheduled by command #" in movements  # bistro's November seats
    period = (report_dir / "trail" / "period-2026-08.html").read_text(encoding="utf-8")
    assert "= 93.37%" in period and "ending 4932.76 ÷ 7 paying customer(s) = 704.68" in period


def test_customer_strings_are_escaped(report_dir: Path) -> None:
    everything = "".join(p.read_text(encoding="utf-8") for p in report_dir.rglob("*.html"))
    for raw in (HOSTILE, HOSTILE_NAME, HOSTILE_TAG):
        assert raw not in everything
    assert "<script" not in everything
    index = (report_dir / "index.html").read_text(encoding="utf-8")
    assert "o&#x27;hara &amp; &lt;sons&gt;" in index
    assert "&lt;script&gt;console.error(&quot;xss&quot;)&lt;/script&gt;" in index
    assert "segment=&lt;b onmouseover=&quot;alert(1)&quot;&gt;smb&lt;/b&gt;" in index


def test_the_page_is_self_contained(report_dir: Path) -> None:
    index = (report_dir / "index.html").read_text(encoding="utf-8")
    links = parse(report_dir / "index.html")
    assert "script" not in links.tags and "img" not in links.tags and "image" not in links.tags
    assert "<style>" in index and "@import" not in index and "@font-face" not in index
    assert not re.search(r"""\b(?:src|href)=["']?(?:https?:)?//""", index)
    assert not re.search(r"url\((?!#)", index)
    assert set(re.findall(r"https?://[^\"' )]+", index)) == {"http://www.w3.org/2000/svg",
                                                             "http://www.w3.org/1999/xlink"}
    # six charts drawn by matplotlib, inline, each with its own ids
    assert index.count("<svg ") == 6
    ids = re.findall(r' id="([^"]+)"', index)
    assert len(ids) == len(set(ids))


def test_report_command_and_empty_book(tmp_path: Path, demo: tuple[str, ReplayResult]) -> None:
    out = tmp_path / "out"
    result = CliRunner(catch_exceptions=False).invoke(cli, ["report", "--out", str(out), "--db", demo[0]])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str((out / "index.html").resolve())
    (out / "trail" / "stale-page.html").write_text("old", encoding="utf-8")
    again = CliRunner(catch_exceptions=False).invoke(cli, ["report", "--out", str(out), "--db", demo[0]])
    assert again.exit_code == 0 and not (out / "trail" / "stale-page.html").exists()

    from billing import service
    from billing.catalog import Catalog

    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    service.init_database(url)
    missing = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "e"), "--db", url])
    assert missing.exit_code == 2 and missing.stderr.startswith("billing: error: the database holds no book")
    from billing.persistence import create_engine

    engine = create_engine(url)
    service.load_catalog(engine, Catalog())
    engine.dispose()
    empty = CliRunner(catch_exceptions=False).invoke(cli, ["report", "--out", str(tmp_path / "e"), "--db", url])
    assert empty.exit_code == 0
    assert "No MRR movements yet" in (tmp_path / "e" / "index.html").read_text(encoding="utf-8")
